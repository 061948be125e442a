// Causal prefill attention (one chunk of n tokens attending to itself): time and TFLOP/s, against a
// cuBLAS bf16 GEMM rate measured in the same run. `wrong` counts output values of the checked rows (the
// last query tokens of KV head 0's group) that miss the CPU twin.
//
//   prefill_attention_bench [--tokens=4096,32768] [--kernels=auto] [--csv=out.csv]
// --kernels=mma,wgmma times both kernels in one run (wgmma: Hopper only).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/half.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dense.h"

ABSL_FLAG(std::string, tokens, "4096,32768", "tokens in the chunk (queries = keys, causal)");
ABSL_FLAG(std::string, kernels, "auto", "kernels to time, comma-separated: auto, mma (mma.sync), wgmma (Hopper)");
ABSL_FLAG(std::string, csv, "", "also write the table as CSV here");
ABSL_FLAG(int, warmup, 2, "untimed runs before timing");
ABSL_FLAG(int, iters, 10, "timed runs (median reported)");
ABSL_FLAG(int, gemm_size, 8192, "m = n = k of the reference bf16 GEMM");

namespace kvshard::bench {
namespace {

struct Geometry {
  std::string name;
  int n_heads, n_kv_heads, head_dim;
};

constexpr int kCheckedTokens = 2;

absl::StatusOr<PrefillKernel> ParseKernel(absl::string_view name) {
  if (name == "auto") return PrefillKernel::kAuto;
  if (name == "mma") return PrefillKernel::kMmaSync;
  if (name == "wgmma") return PrefillKernel::kWgmma;
  return absl::InvalidArgumentError(absl::StrCat("--kernels: unknown kernel '", name, "' (auto, mma, wgmma)"));
}

absl::Status RunOne(const Geometry& g, int64_t n, DType dtype, absl::string_view kernel_name, PrefillKernel kernel,
                    double gemm_tflops, FILE* csv, cudaStream_t stream) {
  const int d = g.head_dim;
  const int group = g.n_heads / g.n_kv_heads;
  const int64_t page_size = (n + 63) / 64 * 64;
  const int64_t kv_elems = g.n_kv_heads * page_size * d;
  const int64_t q_elems = n * g.n_heads * d;
  uint16_t *k = nullptr, *v = nullptr, *q = nullptr;
  float *out = nullptr, *lse = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&k, kv_elems * 2));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&v, kv_elems * 2));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&q, q_elems * 2));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&out, q_elems * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&lse, n * g.n_heads * 4));
  const bool bf16 = dtype == DType::kBF16;
  if (auto s = FillRandom16(k, kv_elems, bf16, 11, stream); !s.ok()) return s;
  if (auto s = FillRandom16(v, kv_elems, bf16, 12, stream); !s.ok()) return s;
  if (auto s = FillRandom16(q, q_elems, bf16, 13, stream); !s.ok()) return s;
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0xFF, q_elems * 4, stream));

  PrefillAttentionArgs args;
  args.q = q;
  args.kv.dtype = dtype;
  args.kv.k = k;
  args.kv.v = v;
  args.kv.page_size = page_size;
  args.kv.pages_per_request = 1;
  args.n_queries = n;
  args.n_keys = n;
  args.n_heads = g.n_heads;
  args.n_kv_heads = g.n_kv_heads;
  args.head_dim = d;
  args.scale = 1.0f / std::sqrt(static_cast<float>(d));
  args.out = out;
  args.lse = lse;
  args.kernel = kernel;

  std::string note;
  double ms = 0, tflops = 0;
  int64_t wrong = 0, checked = 0;
  auto timed = MedianMs([&](int) { return PrefillAttentionCuda(args, stream); }, absl::GetFlag(FLAGS_warmup),
                        absl::GetFlag(FLAGS_iters), stream);
  if (!timed.ok()) {
    note = std::string(timed.status().message());
  } else {
    ms = *timed;
    tflops = 2.0 * n * n * d * g.n_heads / (ms * 1e-3) / 1e12;  // causal: half of 4 n^2 d per head
    // The checked output comes from one more run into poisoned buffers.
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0xFF, q_elems * 4, stream));
    if (auto s = PrefillAttentionCuda(args, stream); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    // Check the last kCheckedTokens query tokens of KV head 0's group.
    std::vector<uint16_t> kh(n * d), vh(n * d), qh(q_elems);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(kh.data(), k, n * d * 2, cudaMemcpyDeviceToHost));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(vh.data(), v, n * d * 2, cudaMemcpyDeviceToHost));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(qh.data(), q, q_elems * 2, cudaMemcpyDeviceToHost));
    std::vector<float> got(q_elems);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(got.data(), out, q_elems * 4, cudaMemcpyDeviceToHost));
    auto to_float = [&](uint16_t x) { return bf16 ? Bf16ToFloat(x) : HalfToFloat(x); };
    std::vector<float> kf(n * d), vf(n * d);
    for (int64_t i = 0; i < n * d; ++i) {
      kf[i] = to_float(kh[i]);
      vf[i] = to_float(vh[i]);
    }
    const double atol = (bf16 ? 1.0 / 256 : 1.0 / 2048) + 2e-5;  // as the kernel tests
    for (int64_t t = n - kCheckedTokens; t < n; ++t) {
      for (int hq = 0; hq < group; ++hq) {
        std::vector<float> qrow(d), want(d);
        float want_lse = 0;
        for (int c = 0; c < d; ++c) qrow[c] = to_float(qh[(t * g.n_heads + hq) * d + c]);
        const int64_t pos = t;
        AttentionPartialsCpu(qrow.data(), d, 1, &pos, kf.data(), vf.data(), d, n, 0, d, args.scale, want.data(), d,
                             &want_lse);
        for (int c = 0; c < d; ++c) {
          const float gv = got[(t * g.n_heads + hq) * d + c];
          wrong += !(std::fabs(gv - want[c]) <= atol);
          ++checked;
        }
      }
    }
  }
  std::printf("%-10s %4d %4d %4d %6s %6s %7lld %10.3f %8.1f %6.1f%% %6lld %s\n", g.name.c_str(), g.n_heads,
              g.n_kv_heads, d, DTypeName(dtype), std::string(kernel_name).c_str(), static_cast<long long>(n), ms,
              tflops, 100 * tflops / gemm_tflops,
              static_cast<long long>(wrong), note.c_str());
  std::fflush(stdout);
  if (csv != nullptr) {
    std::fprintf(csv, "%s,%d,%d,%d,%s,%s,%lld,%.6f,%.3f,%.3f,%.5f,%lld,%lld,%s\n", g.name.c_str(), g.n_heads,
                 g.n_kv_heads, d, DTypeName(dtype), std::string(kernel_name).c_str(), static_cast<long long>(n), ms,
                 tflops, gemm_tflops,
                 tflops / gemm_tflops, static_cast<long long>(checked), static_cast<long long>(wrong),
                 absl::StrReplaceAll(note, {{",", ";"}}).c_str());
  }
  cudaFree(k);
  cudaFree(v);
  cudaFree(q);
  cudaFree(out);
  cudaFree(lse);
  return absl::OkStatus();
}

absl::StatusOr<double> GemmTflops(int64_t size, cudaStream_t stream) {
  auto handle = CublasHandle::Create();
  if (!handle.ok()) return handle.status();
  uint16_t *a = nullptr, *b = nullptr, *c = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&a, size * size * 2));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&b, size * size * 2));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&c, size * size * 2));
  if (auto s = FillRandom16(a, size * size, true, 1, stream); !s.ok()) return s;
  if (auto s = FillRandom16(b, size * size, true, 2, stream); !s.ok()) return s;
  auto ms = MedianMs(
      [&](int) { return GemmBf16(*handle, a, b, size, size, size, c, DType::kBF16, 1.0f, 0.0f, stream); }, 3, 10,
      stream);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  if (!ms.ok()) return ms.status();
  return 2.0 * size * size * size / (*ms * 1e-3) / 1e12;
}

int Main() {
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  std::printf("# device: %s\n", DeviceSummary().c_str());
  const int size = absl::GetFlag(FLAGS_gemm_size);
  auto gemm = GemmTflops(size, stream);
  if (!gemm.ok()) {
    std::fprintf(stderr, "GEMM: %s\n", gemm.status().ToString().c_str());
    return 1;
  }
  std::printf("# cuBLAS bf16 GEMM %dx%dx%d (GemmBf16): %.0f TFLOP/s\n", size, size, size, *gemm);
  FILE* csv = nullptr;
  if (!absl::GetFlag(FLAGS_csv).empty()) {
    csv = std::fopen(absl::GetFlag(FLAGS_csv).c_str(), "w");
    if (csv != nullptr) {
      std::fprintf(csv, "geometry,n_heads,n_kv_heads,head_dim,dtype,kernel,tokens,ms,tflops,gemm_tflops,frac_gemm,checked,wrong,note\n");
    }
  }
  std::vector<std::pair<std::string, PrefillKernel>> kernels;
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_kernels), ',', absl::SkipEmpty())) {
    absl::StatusOr<PrefillKernel> kernel = ParseKernel(name);
    if (!kernel.ok()) {
      std::fprintf(stderr, "%s\n", kernel.status().ToString().c_str());
      return 1;
    }
    kernels.emplace_back(std::string(name), *kernel);
  }
  std::printf("%-10s %4s %4s %4s %6s %6s %7s %10s %8s %7s %6s %s\n", "geometry", "qh", "kvh", "d", "dtype", "kernel", "tokens",
              "time_ms", "TFLOP/s", "%gemm", "#wrong", "note");
  const std::vector<Geometry> geometries = {{"llama3-8b", 32, 8, 128}, {"smollm2", 9, 3, 64}};
  for (const Geometry& g : geometries) {
    for (absl::string_view piece : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',', absl::SkipEmpty())) {
      int64_t n = 0;
      if (!absl::SimpleAtoi(piece, &n) || n <= 0) continue;
      for (DType dtype : {DType::kF16, DType::kBF16}) {
        for (const auto& [name, kernel] : kernels) {
          if (auto s = RunOne(g, n, dtype, name, kernel, *gemm, csv, stream); !s.ok()) {
            std::printf("%-10s %s %s: %s\n", g.name.c_str(), DTypeName(dtype), name.c_str(), s.ToString().c_str());
            cudaGetLastError();
          }
        }
      }
    }
  }
  if (csv != nullptr) std::fclose(csv);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace kvshard::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvshard::bench::Main();
}
