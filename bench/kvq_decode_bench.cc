// Fused kvq3 decode attention (kernels/cuda/kvq_attention.h): time, bandwidth over the bytes the kernel
// must read (codes, value thresholds, outliers with indices and counts, sink, residual), that bandwidth
// as a fraction of a device-to-device copy measured in the same run, and our fp16 decode kernel
// (DecodeAttentionCuda) on the same shape. Synthetic store: random codes and metadata, 4 sink and 32
// residual tokens, one value outlier and one key outlier per token (head_dim 128, 1%), on channels spread
// by a hash (--outlier_channels=same puts every token's on one channel).
// The CSV has decode_attention_bench's columns, so bench/sdpa_baseline.py times SDPA on the same rows.
//
//   kvq_decode_bench [--contexts=65536,262144,1048576] [--batches=1,16] [--outlier_channels=spread|same]
//                    [--csv=out.csv]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_flags.h"
#include "bench/bench_util.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kvq_attention.h"
#include "kernels/rope.h"

ABSL_FLAG(std::string, contexts, "65536,262144,1048576", "KV tokens per request");
ABSL_FLAG(std::string, batches, "1,16", "requests per decode step");
ABSL_FLAG(std::string, csv, "", "also write the table as CSV here");
ABSL_FLAG(int, warmup, 3, "untimed runs before timing");
ABSL_FLAG(int, iters, 20, "timed runs (median reported)");
ABSL_FLAG(std::string, outlier_channels, "spread",
          "channels of the outliers: spread (a seeded hash per token and kind, as real text spreads them) or "
          "same (every token's on one channel: the worst case of the value-outlier merge)");

namespace kvshard::bench {
namespace {

constexpr int kHeads = 32, kKvHeads = 8, kDim = 128, kSink = 4, kResidual = 32, kPage = 128;
constexpr int64_t kRotateBytes = 512ll << 20;

struct Row {
  int64_t context = 0;
  int batch = 0, splits = 0;
  double read_gb = 0, ms = 0, gbs = 0, frac = 0, fp16_ms = 0, fp16_gbs = 0;
  std::string note;
};

template <typename T>
absl::Status Alloc(T** p, int64_t n, std::vector<void*>& owned) {
  CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(p), std::max<int64_t>(n, 16) * sizeof(T)));
  owned.push_back(*p);
  return absl::OkStatus();
}

absl::Status RunOne(int64_t context, int batch, double copy_gbs, Row& row, cudaStream_t stream) {
  row.context = context;
  row.batch = batch;
  const int64_t quantized = context - kSink - kResidual;
  const int64_t pages = (quantized + kPage - 1) / kPage;
  const int64_t code_bytes = 16 * 3 * kDim;
  // Bytes one step must read, per copy of the store.
  const int64_t ph_per_copy = pages * batch * kKvHeads;
  const int64_t per_ph = 2 * code_bytes + 4 * kPage /*low, high*/ + 3 * kPage /*value outlier*/ +
                         kPage /*key counts*/ + 8 /*offset*/ + 3 * kPage /*key outliers*/;
  const int64_t fp_bytes = static_cast<int64_t>(batch) * kKvHeads * (kSink + kResidual) * kDim * 2 * 2;
  const int64_t read_bytes = ph_per_copy * per_ph + fp_bytes;
  row.read_gb = read_bytes / 1e9;
  const int copies = static_cast<int>(std::max<int64_t>(1, (kRotateBytes + read_bytes - 1) / read_bytes));
  const int64_t ph_total = ph_per_copy * copies;

  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (read_bytes * copies + (2ll << 30) > static_cast<int64_t>(free_bytes)) {
    row.note = "skipped: out of memory";
    return absl::OkStatus();
  }
  std::vector<void*> owned;
  uint8_t *kc, *vc, *voc, *kcount, *kch;
  uint16_t *vlo, *vhi, *vov, *kval, *sink_k, *sink_v, *res_k, *res_v;
  int64_t* koff;
  int32_t *table, *sink_lens, *q_lens, *res_lens;
  int64_t* starts;
  float *klo, *khi, *kcb, *vcb, *invf, *q, *out, *lse;
  uint2* rope_table = nullptr;
  void* ws;
  const int64_t fp_elems = static_cast<int64_t>(batch) * kKvHeads * kResidual * kDim;
  absl::Status s;
  auto ok = [&](absl::Status st) {
    if (s.ok()) s = st;
  };
  ok(Alloc(&kc, ph_total * code_bytes, owned));
  ok(Alloc(&vc, ph_total * code_bytes, owned));
  ok(Alloc(&vlo, ph_total * kPage, owned));
  ok(Alloc(&vhi, ph_total * kPage, owned));
  ok(Alloc(&voc, ph_total * kPage, owned));
  ok(Alloc(&vov, ph_total * kPage, owned));
  ok(Alloc(&kcount, ph_total * kPage, owned));
  ok(Alloc(&koff, ph_total, owned));
  ok(Alloc(&kch, ph_total * kPage, owned));
  ok(Alloc(&kval, ph_total * kPage, owned));
  ok(Alloc(&table, pages * batch * copies, owned));
  for (uint16_t** p : {&sink_k, &sink_v, &res_k, &res_v}) ok(Alloc(p, fp_elems, owned));
  ok(Alloc(&sink_lens, batch, owned));
  ok(Alloc(&q_lens, batch, owned));
  ok(Alloc(&res_lens, batch, owned));
  ok(Alloc(&starts, batch, owned));
  ok(Alloc(&klo, kKvHeads * kDim, owned));
  ok(Alloc(&khi, kKvHeads * kDim, owned));
  ok(Alloc(&kcb, 8, owned));
  ok(Alloc(&vcb, 8, owned));
  ok(Alloc(&invf, kDim / 2, owned));
  ok(Alloc(&rope_table, 128 * kDim / 4, owned));
  ok(Alloc(&q, batch * kHeads * kDim, owned));
  ok(Alloc(&out, batch * kHeads * kDim, owned));
  ok(Alloc(&lse, batch * kHeads, owned));
  const int64_t ws_bytes = KvqDecodeAttentionWorkspaceBytes(batch, kHeads, kDim);
  ok(Alloc(reinterpret_cast<uint8_t**>(&ws), ws_bytes, owned));
  if (!s.ok()) {
    for (void* p : owned) cudaFree(p);
    return s;
  }
  ok(FillRandom16(kc, ph_total * code_bytes / 2, false, 1, stream));
  ok(FillRandom16(vc, ph_total * code_bytes / 2, false, 2, stream));
  ok(FillRandom16(vlo, ph_total * kPage, false, 3, stream));
  ok(FillRandom16(vhi, ph_total * kPage, false, 4, stream));
  ok(FillRandom16(vov, ph_total * kPage, false, 5, stream));
  ok(FillRandom16(kval, ph_total * kPage, false, 6, stream));
  for (uint16_t* p : {sink_k, sink_v, res_k, res_v}) ok(FillRandom16(p, fp_elems, false, 7, stream));
  ok(FillRandomF32(q, batch * kHeads * kDim, -1.0f, 1.0f, 8, stream));
  ok(FillRandomF32(klo, kKvHeads * kDim, -2.0f, -1.0f, 9, stream));
  ok(FillRandomF32(khi, kKvHeads * kDim, 1.0f, 2.0f, 10, stream));
  CUDA_RETURN_IF_ERROR(cudaMemset(kcount, 1, ph_total * kPage));
  if (absl::GetFlag(FLAGS_outlier_channels) == "same") {
    CUDA_RETURN_IF_ERROR(cudaMemset(voc, 0x05, ph_total * kPage));
    CUDA_RETURN_IF_ERROR(cudaMemset(kch, 0x07, ph_total * kPage));
  } else {
    std::vector<uint8_t> channels(ph_total * kPage);
    for (uint8_t* dst : {voc, kch}) {
      const uint64_t salt = dst == voc ? 0x9E3779B97F4A7C15ull : 0xC2B2AE3D27D4EB4Full;
      for (int64_t i = 0; i < static_cast<int64_t>(channels.size()); ++i) {
        uint64_t x = (static_cast<uint64_t>(i) + 1) * salt;
        x ^= x >> 31;
        channels[i] = static_cast<uint8_t>((x * 0xBF58476D1CE4E5B9ull) >> 57);  // 0 .. 127
      }
      CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, channels.data(), channels.size(), cudaMemcpyHostToDevice));
    }
  }
  {
    std::vector<int64_t> offsets(ph_total);
    for (int64_t i = 0; i < ph_total; ++i) offsets[i] = i * kPage;
    CUDA_RETURN_IF_ERROR(cudaMemcpy(koff, offsets.data(), ph_total * 8, cudaMemcpyHostToDevice));
    std::vector<int32_t> t(pages * batch * copies);
    for (int64_t i = 0; i < static_cast<int64_t>(t.size()); ++i) t[i] = static_cast<int32_t>(i);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(table, t.data(), t.size() * 4, cudaMemcpyHostToDevice));
    const std::vector<float> cb = {-1.0f, -0.6f, -0.3f, -0.1f, 0.1f, 0.3f, 0.6f, 1.0f};
    CUDA_RETURN_IF_ERROR(cudaMemcpy(kcb, cb.data(), 32, cudaMemcpyHostToDevice));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(vcb, cb.data(), 32, cudaMemcpyHostToDevice));
    RopeParams rope;
    rope.head_dim = kDim;
    rope.theta = 500000.0f;
    const std::vector<float> inv = RopeInverseFrequencies(rope);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(invf, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
    const std::vector<uint2> rope_host = KvqRopeTable(inv);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(rope_table, rope_host.data(), rope_host.size() * sizeof(uint2), cudaMemcpyHostToDevice));
    const std::vector<int32_t> sl(batch, kSink), ql(batch, static_cast<int32_t>(quantized)), rl(batch, kResidual);
    const std::vector<int64_t> st(batch, 0);
    CUDA_RETURN_IF_ERROR(cudaMemcpy(sink_lens, sl.data(), batch * 4, cudaMemcpyHostToDevice));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(q_lens, ql.data(), batch * 4, cudaMemcpyHostToDevice));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(res_lens, rl.data(), batch * 4, cudaMemcpyHostToDevice));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(starts, st.data(), batch * 8, cudaMemcpyHostToDevice));
  }
  if (!s.ok()) return s;

  KvqDecodeAttentionArgs a;
  a.q = q;
  a.kv.bits = 3;
  a.kv.n_value_outliers = 1;
  a.kv.key_codes = kc;
  a.kv.value_codes = vc;
  a.kv.value_low = vlo;
  a.kv.value_high = vhi;
  a.kv.value_outlier_channel = voc;
  a.kv.value_outlier_value = vov;
  a.kv.key_outlier_count = kcount;
  a.kv.key_outlier_offset = koff;
  a.kv.key_outlier_channel = kch;
  a.kv.key_outlier_value = kval;
  a.kv.pages_per_request = pages;
  a.kv.sink_k = sink_k;
  a.kv.sink_v = sink_v;
  a.kv.max_sink = kSink;
  a.kv.residual_k = res_k;
  a.kv.residual_v = res_v;
  a.kv.max_residual = kResidual;
  a.kv.sink_lens = sink_lens;
  a.kv.quantized_lens = q_lens;
  a.kv.residual_lens = res_lens;
  a.kv.start_positions = starts;
  a.kv.key_low = klo;
  a.kv.key_high = khi;
  a.kv.key_codebook = kcb;
  a.kv.value_codebook = vcb;
  a.kv.inv_freq = invf;
  a.kv.rope_table = rope_table;
  a.max_quantized_len = quantized;
  a.batch = batch;
  a.n_heads = kHeads;
  a.n_kv_heads = kKvHeads;
  a.head_dim = kDim;
  a.scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  a.out = out;
  a.lse = lse;
  a.workspace = ws;
  a.workspace_bytes = ws_bytes;
  a.kv.page_table = table;
  row.splits = KvqDecodeAttentionSplits(a);
  auto timed = MedianMs(
      [&](int i) {
        KvqDecodeAttentionArgs b = a;
        b.kv.page_table = table + static_cast<int64_t>(i % copies) * pages * batch;
        return KvqDecodeAttentionCuda(b, stream);
      },
      absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_iters), stream);
  for (void* p : owned) cudaFree(p);
  if (!timed.ok()) return timed.status();
  row.ms = *timed;
  row.gbs = read_bytes / (row.ms * 1e-3) / 1e9;
  row.frac = row.gbs / copy_gbs;

  // Our fp16 decode kernel on the same shape (contiguous cache), when it fits.
  const int64_t fp16_bytes = 2ll * batch * kKvHeads * context * kDim * 2;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (fp16_bytes + (2ll << 30) > static_cast<int64_t>(free_bytes)) {
    row.note = "fp16 kernel skipped: out of memory";
    return absl::OkStatus();
  }
  std::vector<void*> owned16;
  uint16_t *k16, *v16;
  int32_t* lens;
  ok(Alloc(&k16, fp16_bytes / 4, owned16));
  ok(Alloc(&v16, fp16_bytes / 4, owned16));
  ok(Alloc(&lens, batch, owned16));
  ok(Alloc(&q, batch * kHeads * kDim, owned16));
  ok(Alloc(&out, batch * kHeads * kDim, owned16));
  ok(Alloc(&lse, batch * kHeads, owned16));
  const int64_t ws16 = DecodeAttentionWorkspaceBytes(batch, kHeads, kDim);
  ok(Alloc(reinterpret_cast<uint8_t**>(&ws), ws16, owned16));
  ok(FillRandom16(k16, fp16_bytes / 4, false, 11, stream));
  ok(FillRandom16(v16, fp16_bytes / 4, false, 12, stream));
  ok(FillRandomF32(q, batch * kHeads * kDim, -1.0f, 1.0f, 13, stream));
  const std::vector<int32_t> l32(batch, static_cast<int32_t>(context));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(lens, l32.data(), batch * 4, cudaMemcpyHostToDevice));
  DecodeAttentionArgs f;
  f.q = q;
  f.kv.dtype = DType::kF16;
  f.kv.k = k16;
  f.kv.v = v16;
  f.kv.page_size = context;
  f.kv.pages_per_request = 1;
  f.kv_lens = lens;
  f.max_kv_len = context;
  f.batch = batch;
  f.n_heads = kHeads;
  f.n_kv_heads = kKvHeads;
  f.head_dim = kDim;
  f.scale = a.scale;
  f.out = out;
  f.lse = lse;
  f.workspace = ws;
  f.workspace_bytes = ws16;
  auto t16 = s.ok() ? MedianMs([&](int) { return DecodeAttentionCuda(f, stream); }, absl::GetFlag(FLAGS_warmup),
                               absl::GetFlag(FLAGS_iters), stream)
                    : absl::StatusOr<double>(s);
  for (void* p : owned16) cudaFree(p);
  if (!t16.ok()) return t16.status();
  row.fp16_ms = *t16;
  row.fp16_gbs = fp16_bytes / (row.fp16_ms * 1e-3) / 1e9;
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvshard::bench

int main(int argc, char** argv) {
  using namespace kvshard::bench;
  absl::ParseCommandLine(argc, argv);
  const std::string outlier_channels = absl::GetFlag(FLAGS_outlier_channels);
  if (outlier_channels != "spread" && outlier_channels != "same") {
    std::fprintf(stderr, "--outlier_channels must be spread or same, not '%s'\n", outlier_channels.c_str());
    return 2;
  }
  if (kvshard::CudaDeviceCount() == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  auto copy = CopyBandwidthGBs(1ll << 30, 20, stream);
  if (!copy.ok()) {
    std::fprintf(stderr, "copy bandwidth: %s\n", copy.status().ToString().c_str());
    return 1;
  }
  std::printf("# %s\n# device-to-device copy: %.1f GB/s (read + write)\n", DeviceSummary().c_str(), *copy);
  std::printf("# kvq3, head_dim 128, 32 query heads, 8 KV heads (group 4), sink 4, residual 32, outlier channels: %s\n",
              outlier_channels.c_str());
  std::printf("%8s %5s %6s %9s %10s %8s %7s %10s %9s %8s  %s\n", "context", "batch", "splits", "read_GB", "ms",
              "GB/s", "%copy", "fp16_ms", "fp16_GB/s", "vs_fp16", "note");
  std::vector<Row> rows;
  for (int64_t context : ParseList(absl::GetFlag(FLAGS_contexts))) {
    for (int64_t batch : ParseList(absl::GetFlag(FLAGS_batches))) {
      Row row;
      if (auto s = RunOne(context, static_cast<int>(batch), *copy, row, stream); !s.ok()) {
        row.note = "error: " + std::string(s.message());
      }
      std::printf("%8lld %5d %6d %9.4f %10.4f %8.1f %6.1f%% %10.4f %9.1f %7.2fx  %s\n",
                  static_cast<long long>(row.context), row.batch, row.splits, row.read_gb, row.ms, row.gbs,
                  100 * row.frac, row.fp16_ms, row.fp16_gbs, row.ms > 0 ? row.fp16_ms / row.ms : 0.0,
                  row.note.c_str());
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  const std::string csv = absl::GetFlag(FLAGS_csv);
  if (!csv.empty()) {
    FILE* f = std::fopen(csv.c_str(), "w");
    if (f != nullptr) {
      std::fprintf(f, "geometry,n_heads,n_kv_heads,head_dim,context,batch,splits,kv_gb,ms,gbs,copy_gbs,frac_copy,"
                      "checked,wrong,note,fp16_ms\n");
      for (const Row& r : rows) {
        std::fprintf(f, "kvq3-llama3-8b,%d,%d,%d,%lld,%d,%d,%.6f,%.6f,%.3f,%.3f,%.5f,0,0,%s,%.6f\n", kHeads, kKvHeads,
                     kDim, static_cast<long long>(r.context), r.batch, r.splits, r.read_gb, r.ms, r.gbs, *copy,
                     r.frac, r.note.c_str(), r.fp16_ms);
      }
      std::fclose(f);
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}
