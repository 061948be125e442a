// kvq packing on the GPU: time and throughput of PackKvqKeysCuda (codes and outliers) and of
// PackKvqValuesCuda per layer,
// beside a device-to-device copy measured in the same run. Throughput is quoted in GB/s of the keys as
// bf16 (the projection's width; 2 bytes per element) and of the fp32 input the kernel actually reads.
//
//   kv_pack_bench [--tokens=4096,32768,131072] [--kv_heads=8] [--head_dims=128,64] [--bits=3]
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kv_pack.h"
#include "kernels/kv_pack.h"

ABSL_FLAG(std::string, tokens, "4096,32768,131072", "tokens packed per (layer, KV head)");
ABSL_FLAG(int, kv_heads, 8, "KV heads of one layer (one launch each)");
ABSL_FLAG(std::string, head_dims, "128,64", "head dims");
ABSL_FLAG(int, bits, 3, "kvq bits");
ABSL_FLAG(int, iters, 20, "timed runs (median reported)");

namespace kvshard::bench {
namespace {

std::vector<int64_t> ParseList(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (absl::SimpleAtoi(piece, &v)) out.push_back(v);
  }
  return out;
}

template <typename T>
absl::StatusOr<T*> Alloc(int64_t n) {
  void* p = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&p, n * sizeof(T)));
  return static_cast<T*>(p);
}

absl::Status Run() {
  cudaStream_t stream;
  CUDA_RETURN_IF_ERROR(cudaStreamCreate(&stream));
  KV_ASSIGN_OR_RETURN(const double copy_gbs, CopyBandwidthGBs(int64_t{1} << 30, 10, stream));
  std::printf("%s\ncopy: %.0f GB/s (read + write)\n", DeviceSummary().c_str(), copy_gbs);
  std::printf("%6s %4s %8s %6s %10s %12s %12s %10s %10s %12s\n", "d", "bits", "tokens", "heads", "keys ms",
              "bf16 GB/s", "fp32 GB/s", "of copy", "values ms", "bf16 GB/s");
  const int bits = absl::GetFlag(FLAGS_bits);
  const int heads = absl::GetFlag(FLAGS_kv_heads);
  for (int64_t d : ParseList(absl::GetFlag(FLAGS_head_dims))) {
    for (int64_t n : ParseList(absl::GetFlag(FLAGS_tokens))) {
      const int64_t elems = n * d * heads;
      const int64_t page_bytes = PackedBytes(128 * d, bits);
      const int64_t pages = (n + 127) / 128;
      KV_ASSIGN_OR_RETURN(float* keys, Alloc<float>(elems));
      KV_ASSIGN_OR_RETURN(float* thresholds, Alloc<float>(2 * d * heads + 16));
      KV_ASSIGN_OR_RETURN(uint8_t* codes, Alloc<uint8_t>(pages * page_bytes * heads));
      KV_ASSIGN_OR_RETURN(uint8_t* counts, Alloc<uint8_t>(n * heads));
      KV_ASSIGN_OR_RETURN(uint8_t* channels, Alloc<uint8_t>(elems));
      KV_ASSIGN_OR_RETURN(uint16_t* values, Alloc<uint16_t>(elems));
      KV_RETURN_IF_ERROR(FillRandomF32(keys, elems, -1.0f, 1.0f, 1, stream));
      // Thresholds +-0.98 (about 1% of uniform keys are outliers); codebook uniform in [-1, 1].
      std::vector<float> host(2 * d * heads + 16);
      for (int64_t i = 0; i < d * heads; ++i) host[i] = -0.98f, host[d * heads + i] = 0.98f;
      for (int i = 0; i < (1 << bits); ++i) host[2 * d * heads + i] = -1.0f + 2.0f * i / ((1 << bits) - 1);
      CUDA_RETURN_IF_ERROR(cudaMemcpy(thresholds, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
      auto launch = [&](int) -> absl::Status {
        for (int h = 0; h < heads; ++h) {
          KvqKeyPackArgs a;
          a.keys = keys + h * n * d;
          a.n_tokens = n;
          a.head_dim = static_cast<int>(d);
          a.bits = bits;
          a.low = thresholds + h * d;
          a.high = thresholds + d * heads + h * d;
          a.codebook = thresholds + 2 * d * heads;
          a.pages = codes + h * pages * page_bytes;
          a.outlier_count = counts + h * n;
          a.outlier_channel = channels + h * n * d;
          a.outlier_value = values + h * n * d;
          KV_RETURN_IF_ERROR(PackKvqKeysCuda(a, stream));
        }
        return absl::OkStatus();
      };
      KV_ASSIGN_OR_RETURN(const double ms, MedianMs(launch, 3, absl::GetFlag(FLAGS_iters), stream));
      // Values of the same shape (the keys buffer as input), one outlier per token (1% of d, rounded).
      auto launch_values = [&](int) -> absl::Status {
        for (int h = 0; h < heads; ++h) {
          KvqValuePackArgs a;
          a.values = keys + h * n * d;
          a.n_tokens = n;
          a.head_dim = static_cast<int>(d);
          a.bits = bits;
          a.n_out = 1;
          a.codebook = thresholds + 2 * d * heads;
          a.pages = codes + h * pages * page_bytes;
          a.low = values + h * n * d;  // scratch: the outlier buffers are large enough
          a.high = values + h * n * d + n;
          a.outlier_channel = channels + h * n * d;
          a.outlier_value = values + h * n * d + 2 * n;
          KV_RETURN_IF_ERROR(PackKvqValuesCuda(a, stream));
        }
        return absl::OkStatus();
      };
      KV_ASSIGN_OR_RETURN(const double values_ms, MedianMs(launch_values, 3, absl::GetFlag(FLAGS_iters), stream));
      const double bf16_gbs = elems * 2.0 / (ms * 1e6), fp32_gbs = elems * 4.0 / (ms * 1e6);
      std::printf("%6lld %4d %8lld %6d %10.4f %12.1f %12.1f %9.1f%% %10.4f %12.1f\n", static_cast<long long>(d),
                  bits, static_cast<long long>(n), heads, ms, bf16_gbs, fp32_gbs, 100.0 * fp32_gbs / copy_gbs,
                  values_ms, elems * 2.0 / (values_ms * 1e6));
      for (void* p : {static_cast<void*>(keys), static_cast<void*>(thresholds), static_cast<void*>(codes),
                      static_cast<void*>(counts), static_cast<void*>(channels), static_cast<void*>(values)}) {
        CUDA_RETURN_IF_ERROR(cudaFree(p));
      }
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamDestroy(stream));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvshard::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = kvshard::bench::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "kv_pack_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
