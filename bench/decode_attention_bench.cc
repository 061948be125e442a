// Decode attention over the fp16 KV scheme: time, effective bandwidth, and its fraction of a
// device-to-device copy measured in the same run. One table row per (geometry, context, batch); the
// `wrong` column counts output values of a checked (request, KV head) that miss the CPU twin.
//
//   decode_attention_bench [--contexts=4096,65536,262144,1048576] [--batches=1,8,32] [--csv=out.csv]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/half.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"

ABSL_FLAG(std::string, contexts, "4096,65536,262144,1048576", "KV tokens per request");
ABSL_FLAG(std::string, batches, "1,8,32", "requests per decode step");
ABSL_FLAG(std::string, geometries, "llama3-8b,smollm2", "head geometries to run");
ABSL_FLAG(std::string, csv, "", "also write the table as CSV here");
ABSL_FLAG(int, warmup, 3, "untimed runs before timing");
ABSL_FLAG(int, iters, 20, "timed runs (median reported)");
ABSL_FLAG(bool, check, true, "check one (request, KV head) per configuration against the CPU twin");
ABSL_FLAG(int64_t, page_size, 256, "tokens per KV page");
ABSL_FLAG(std::string, mixed, "1048576,524288,262144,131072,65536,32768,16384,4096",
          "one more row per geometry: a batch with these different context lengths (empty: none)");
ABSL_FLAG(std::string, split_sweep, "", "batch-1 rows also time these caps on the KV splits (e.g. 8,16,33,66,128)");

namespace kvshard::bench {
namespace {

struct Geometry {
  std::string name;
  int n_heads, n_kv_heads, head_dim;
};

// Inputs smaller than this are replicated and rotated so that timings do not come from L2.
constexpr int64_t kRotateBytes = 512ll << 20;

std::vector<int64_t> ParseList(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (absl::SimpleAtoi(piece, &v)) out.push_back(v);
  }
  return out;
}

struct Row {
  Geometry g;
  int64_t context = 0;
  int batch = 0;
  int splits = 0;
  double kv_gb = 0, ms = 0, gbs = 0, frac = 0;
  int64_t checked = 0, wrong = 0;
  std::string note;
};

// `lens`: the context length of each request of the batch; `context` is the longest.
absl::Status RunOne(const Geometry& g, const std::vector<int64_t>& lens, double copy_gbs, Row& row,
                    cudaStream_t stream) {
  const int64_t page_size = absl::GetFlag(FLAGS_page_size);
  const int d = g.head_dim;
  const int group = g.n_heads / g.n_kv_heads;
  const int batch = static_cast<int>(lens.size());
  const int64_t context = *std::max_element(lens.begin(), lens.end());
  const int64_t total_tokens = std::accumulate(lens.begin(), lens.end(), int64_t{0});
  const int64_t pages_per_request = (context + page_size - 1) / page_size;
  const int64_t n_pages = pages_per_request * batch;
  const int64_t elems = n_pages * g.n_kv_heads * page_size * d;  // allocated per K (and per V) copy
  const int64_t kv_bytes = 2 * total_tokens * g.n_kv_heads * d * 2;  // read by one decode step
  const int copies = static_cast<int>(std::max<int64_t>(1, (kRotateBytes + kv_bytes - 1) / kv_bytes));
  row.kv_gb = kv_bytes / 1e9;
  const int64_t allocated_bytes = 2 * elems * 2;

  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t workspace_bytes = DecodeAttentionWorkspaceBytes(batch, g.n_heads, d);
  const int64_t need = allocated_bytes * copies + workspace_bytes + (1ll << 30);
  if (need > static_cast<int64_t>(free_bytes)) {
    row.note = absl::StrFormat("skipped: needs %.1f GB of %.1f GB free", need / 1e9, free_bytes / 1e9);
    return absl::OkStatus();
  }

  std::vector<int32_t> table(n_pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(5));
  std::vector<uint16_t*> k(copies), v(copies);
  for (int c = 0; c < copies; ++c) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(&k[c], elems * 2));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&v[c], elems * 2));
    if (auto s = FillRandom16(k[c], elems, false, 100 + 2 * c, stream); !s.ok()) return s;
    if (auto s = FillRandom16(v[c], elems, false, 101 + 2 * c, stream); !s.ok()) return s;
  }
  int32_t* d_table = nullptr;
  int32_t* d_lens = nullptr;
  float *q = nullptr, *out = nullptr, *lse = nullptr;
  void* workspace = nullptr;
  const int64_t q_elems = static_cast<int64_t>(batch) * g.n_heads * d;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&d_table, n_pages * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&d_lens, batch * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&q, q_elems * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&out, q_elems * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&lse, batch * g.n_heads * 4));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&workspace, workspace_bytes));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(d_table, table.data(), n_pages * 4, cudaMemcpyHostToDevice));
  const std::vector<int32_t> lens32(lens.begin(), lens.end());
  CUDA_RETURN_IF_ERROR(cudaMemcpy(d_lens, lens32.data(), batch * 4, cudaMemcpyHostToDevice));
  if (auto s = FillRandomF32(q, q_elems, -1.0f, 1.0f, 7, stream); !s.ok()) return s;
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0xFF, q_elems * 4, stream));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(lse, 0xFF, batch * g.n_heads * 4, stream));

  DecodeAttentionArgs args;
  args.q = q;
  args.kv.dtype = DType::kF16;
  args.kv.page_size = page_size;
  args.kv.page_table = d_table;
  args.kv.pages_per_request = pages_per_request;
  args.kv_lens = d_lens;
  args.max_kv_len = context;
  args.batch = batch;
  args.n_heads = g.n_heads;
  args.n_kv_heads = g.n_kv_heads;
  args.head_dim = d;
  args.scale = 1.0f / std::sqrt(static_cast<float>(d));
  args.out = out;
  args.lse = lse;
  args.workspace = workspace;
  args.workspace_bytes = workspace_bytes;
  args.kv.k = k[0];
  args.kv.v = v[0];
  row.splits = DecodeAttentionSplits(args);

  auto timed = MedianMs(
      [&](int i) {
        DecodeAttentionArgs a = args;
        a.kv.k = k[i % copies];
        a.kv.v = v[i % copies];
        return DecodeAttentionCuda(a, stream);
      },
      absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_iters), stream);
  if (!timed.ok()) return timed.status();
  row.ms = *timed;
  row.gbs = kv_bytes / (row.ms * 1e-3) / 1e9;
  row.frac = row.gbs / copy_gbs;
  if (batch == 1) {
    for (int64_t cap : ParseList(absl::GetFlag(FLAGS_split_sweep))) {
      DecodeAttentionArgs a = args;
      a.max_splits = static_cast<int>(cap);
      const int splits = DecodeAttentionSplits(a);
      auto ms = MedianMs(
          [&](int i) {
            a.kv.k = k[i % copies];
            a.kv.v = v[i % copies];
            return DecodeAttentionCuda(a, stream);
          },
          absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_iters), stream);
      if (!ms.ok()) return ms.status();
      row.note += absl::StrFormat("%s%d splits: %.4f ms", row.note.empty() ? "" : "; ", splits, *ms);
    }
  }

  if (absl::GetFlag(FLAGS_check)) {
    // Last request, last KV head, on copy 0: gather its pages, run the CPU twin for the query group.
    args.kv.k = k[0];
    args.kv.v = v[0];
    if (auto s = DecodeAttentionCuda(args, stream); !s.ok()) return s;
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const int b = batch - 1, h = g.n_kv_heads - 1;
    const int64_t len = lens[b];
    std::vector<uint16_t> page_buf(page_size * d);
    std::vector<float> kf(len * d), vf(len * d);
    for (int64_t p = 0; p * page_size < len; ++p) {
      const int64_t page = table[b * pages_per_request + p];
      const int64_t offset = (page * g.n_kv_heads + h) * page_size * d;
      const int64_t tokens = std::min(page_size, len - p * page_size);
      for (int which = 0; which < 2; ++which) {
        CUDA_RETURN_IF_ERROR(cudaMemcpy(page_buf.data(), (which == 0 ? k[0] : v[0]) + offset, tokens * d * 2,
                                        cudaMemcpyDeviceToHost));
        float* dst = (which == 0 ? kf.data() : vf.data()) + p * page_size * d;
        for (int64_t i = 0; i < tokens * d; ++i) dst[i] = HalfToFloat(page_buf[i]);
      }
    }
    std::vector<float> qh(group * d), got_out(group * d), got_lse(group), want_out(group * d), want_lse(group);
    const int64_t first_row = static_cast<int64_t>(b) * g.n_heads + h * group;
    CUDA_RETURN_IF_ERROR(cudaMemcpy(qh.data(), q + first_row * d, group * d * 4, cudaMemcpyDeviceToHost));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(got_out.data(), out + first_row * d, group * d * 4, cudaMemcpyDeviceToHost));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(got_lse.data(), lse + first_row, group * 4, cudaMemcpyDeviceToHost));
    AttentionPartialsCpu(qh.data(), d, group, nullptr, kf.data(), vf.data(), d, len, 0, d, args.scale,
                         want_out.data(), d, want_lse.data());
    // Same tolerance as the kernel tests (fp32 on both sides, |q|, |v| <= 1).
    auto ok = [](float got, float want) { return std::fabs(got - want) <= 2e-5 + 1e-4 * std::fabs(want); };
    for (int i = 0; i < group * d; ++i) row.wrong += !ok(got_out[i], want_out[i]);
    for (int i = 0; i < group; ++i) row.wrong += !ok(got_lse[i], want_lse[i]);
    row.checked = group * (d + 1);
  }

  for (int c = 0; c < copies; ++c) {
    cudaFree(k[c]);
    cudaFree(v[c]);
  }
  cudaFree(d_table);
  cudaFree(d_lens);
  cudaFree(q);
  cudaFree(out);
  cudaFree(lse);
  cudaFree(workspace);
  return absl::OkStatus();
}

int Main() {
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  std::printf("# device: %s\n", DeviceSummary().c_str());
  auto copy = CopyBandwidthGBs(4ll << 30, 10, stream);
  if (!copy.ok()) {
    std::fprintf(stderr, "copy bandwidth: %s\n", copy.status().ToString().c_str());
    return 1;
  }
  std::printf("# device-to-device copy, 4 GiB: %.0f GB/s (read + write)\n", *copy);
  std::vector<Geometry> geometries;
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_geometries), ',', absl::SkipEmpty())) {
    if (name == "llama3-8b") geometries.push_back({"llama3-8b", 32, 8, 128});
    if (name == "smollm2") geometries.push_back({"smollm2", 9, 3, 64});
  }
  std::vector<Row> rows;
  std::printf("%-10s %4s %4s %4s %8s %5s %6s %8s %10s %8s %7s %6s %s\n", "geometry", "qh", "kvh", "d", "context",
              "batch", "splits", "KV_GB", "time_ms", "GB/s", "%copy", "#wrong", "note");
  for (const Geometry& g : geometries) {
    for (int64_t context : ParseList(absl::GetFlag(FLAGS_contexts))) {
      for (int64_t batch : ParseList(absl::GetFlag(FLAGS_batches))) {
        Row row;
        row.g = g;
        row.context = context;
        row.batch = static_cast<int>(batch);
        if (absl::Status s = RunOne(g, std::vector<int64_t>(batch, context), *copy, row, stream); !s.ok()) {
          row.note = std::string(s.message());
          cudaGetLastError();
        }
        std::printf("%-10s %4d %4d %4d %8lld %5d %6d %8.3f %10.4f %8.0f %6.1f%% %6lld %s\n", g.name.c_str(), g.n_heads,
                    g.n_kv_heads, g.head_dim, static_cast<long long>(context), row.batch, row.splits, row.kv_gb,
                    row.ms, row.gbs, 100 * row.frac, static_cast<long long>(row.wrong), row.note.c_str());
        std::fflush(stdout);
        rows.push_back(row);
      }
    }
    const std::vector<int64_t> mixed = ParseList(absl::GetFlag(FLAGS_mixed));
    if (!mixed.empty()) {
      Row row;
      row.g = g;
      row.context = *std::max_element(mixed.begin(), mixed.end());
      row.batch = static_cast<int>(mixed.size());
      if (absl::Status s = RunOne(g, mixed, *copy, row, stream); !s.ok()) {
        row.note = std::string(s.message());
        cudaGetLastError();
      }
      row.note = absl::StrCat("mixed lengths ", absl::GetFlag(FLAGS_mixed), row.note.empty() ? "" : "; ", row.note);
      std::printf("%-10s %4d %4d %4d %8lld %5d %6d %8.3f %10.4f %8.0f %6.1f%% %6lld %s\n", g.name.c_str(), g.n_heads,
                  g.n_kv_heads, g.head_dim, static_cast<long long>(row.context), row.batch, row.splits, row.kv_gb,
                  row.ms, row.gbs, 100 * row.frac, static_cast<long long>(row.wrong), row.note.c_str());
      rows.push_back(row);
    }
  }
  const std::string csv = absl::GetFlag(FLAGS_csv);
  if (!csv.empty()) {
    FILE* f = std::fopen(csv.c_str(), "w");
    if (f != nullptr) {
      std::fprintf(f, "geometry,n_heads,n_kv_heads,head_dim,context,batch,splits,kv_gb,ms,gbs,copy_gbs,frac_copy,checked,wrong,note\n");
      for (const Row& r : rows) {
        std::fprintf(f, "%s,%d,%d,%d,%lld,%d,%d,%.6f,%.6f,%.3f,%.3f,%.5f,%lld,%lld,%s\n", r.g.name.c_str(), r.g.n_heads,
                     r.g.n_kv_heads, r.g.head_dim, static_cast<long long>(r.context), r.batch, r.splits, r.kv_gb, r.ms,
                     r.gbs, *copy, r.frac, static_cast<long long>(r.checked), static_cast<long long>(r.wrong),
                     absl::StrReplaceAll(r.note, {{",", ";"}}).c_str());
      }
      std::fclose(f);
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace kvshard::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvshard::bench::Main();
}
