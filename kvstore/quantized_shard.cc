#include "kvstore/quantized_shard.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/attention.h"
#include "kernels/gemm_cpu.h"
#include "kernels/rope.h"

namespace kvshard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kAttendTile = 512;  // tokens Attend dequantizes at a time (K and V: 256 KB at head_dim 64)
constexpr int64_t kTiledRows = 64;  // Attend's work items are (KV head, tile) up to this many query rows, else
                                    // (KV head, kAttendQueriesPerItem queries)

// Attention partials of `rows` query rows over a band of `n` keys (absolute positions first_position..,
// local indices first_local..) where row r sees key j (position <= row_positions[r]) in its quantized
// version (kq, vq) when its local index is below row_boundary[r], else in fp16 (kf, vf). Only the
// exact decode view needs it (chunked queries whose fp16 windows differ). Four GEMMs over the band
// instead of one pass per distinct boundary.
void BandAttention(const float* q, int64_t rows, const int64_t* row_positions, const int64_t* row_boundary,
                   const float* kq, const float* vq, const float* kf, const float* vf, int64_t n,
                   int64_t first_position, int64_t first_local, int d, float scale, float* out, float* lse) {
  std::vector<float> sq(rows * n), sf(rows * n);
  if (n > 0) {
    GemmCpu(/*transpose_b=*/true, rows, n, d, scale, q, d, kq, d, 0.0f, sq.data(), n);
    GemmCpu(/*transpose_b=*/true, rows, n, d, scale, q, d, kf, d, 0.0f, sf.data(), n);
  }
  std::vector<float> inv_sum(rows, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* pq = sq.data() + r * n;
    float* pf = sf.data() + r * n;
    const int64_t limit = std::clamp<int64_t>(row_positions[r] - first_position + 1, 0, n);
    const int64_t split = std::clamp<int64_t>(row_boundary[r] - first_local, 0, limit);
    float m = kNegInf;
    for (int64_t j = 0; j < split; ++j) m = std::max(m, pq[j]);
    for (int64_t j = split; j < limit; ++j) m = std::max(m, pf[j]);
    if (limit == 0) {
      std::fill(pq, pq + n, 0.0f);
      std::fill(pf, pf + n, 0.0f);
      lse[r] = kNegInf;
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < split; ++j) sum += (pq[j] = std::exp(pq[j] - m));
    std::fill(pq + split, pq + n, 0.0f);
    std::fill(pf, pf + split, 0.0f);
    for (int64_t j = split; j < limit; ++j) sum += (pf[j] = std::exp(pf[j] - m));
    std::fill(pf + limit, pf + n, 0.0f);
    lse[r] = m + std::log(sum);
    inv_sum[r] = 1.0f / sum;
  }
  std::fill(out, out + rows * d, 0.0f);
  if (n > 0) {
    GemmCpu(/*transpose_b=*/false, rows, d, n, 1.0f, sq.data(), n, vq, d, 0.0f, out, d);
    GemmCpu(/*transpose_b=*/false, rows, d, n, 1.0f, sf.data(), n, vf, d, 1.0f, out, d);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) out[r * d + c] *= inv_sum[r];
}

}  // namespace

QuantizedKvShard::QuantizedKvShard(const KvSchemeConfig& config, const KvGeometry& geometry, int64_t start_position)
    : config_(config),
      geometry_(geometry),
      start_position_(start_position),
      inv_freq_(RopeInverseFrequencies(geometry.rope)),
      layers_(geometry.n_layers) {}

absl::StatusOr<std::unique_ptr<QuantizedKvShard>> QuantizedKvShard::Create(const KvSchemeConfig& config,
                                                                           const KvGeometry& geometry,
                                                                           int64_t start_position,
                                                                           const Calibration* calibration) {
  if (config.kind == KvSchemeKind::kFp16) {
    return absl::InvalidArgumentError("fp16 is the full-precision cache, not a quantized store");
  }
  if (geometry.n_layers <= 0 || geometry.n_kv_heads <= 0 || geometry.n_heads <= 0 ||
      geometry.n_heads % geometry.n_kv_heads != 0 || geometry.head_dim <= 0 || geometry.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad KV geometry: ", geometry.n_layers, " layers, ", geometry.n_heads, " heads, ", geometry.n_kv_heads,
        " KV heads, head_dim ", geometry.head_dim, " (heads must be a multiple of KV heads, head_dim even)"));
  }
  if (start_position < 0) return absl::InvalidArgumentError("negative start position");
  KV_RETURN_IF_ERROR(ValidateKvScheme(config, geometry.head_dim));
  if (config.needs_calibration()) {
    if (calibration == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("KV scheme ", config.name(),
                                                     " needs a calibration file (make one with kvshard calibrate)"));
    }
    KV_RETURN_IF_ERROR(CheckCalibrationGeometry(*calibration, geometry));
  }
  std::unique_ptr<QuantizedKvShard> shard(new QuantizedKvShard(config, geometry, start_position));
  for (int l = 0; l < geometry.n_layers; ++l) {
    shard->layers_[l].streams.resize(geometry.n_kv_heads);
    for (int h = 0; h < geometry.n_kv_heads; ++h) {
      Stream& s = shard->layers_[l].streams[h];
      KV_ASSIGN_OR_RETURN(s.key, MakePartCodec(config, KvPart::kKey, geometry.head_dim, l, h, calibration));
      KV_ASSIGN_OR_RETURN(s.value, MakePartCodec(config, KvPart::kValue, geometry.head_dim, l, h, calibration));
    }
  }
  return shard;
}

void QuantizedKvShard::EnsureRopeTable(int64_t n_tokens) {
  const int half = geometry_.head_dim / 2;
  const int64_t have = static_cast<int64_t>(rope_cos_.size()) / half;
  if (n_tokens <= have) return;
  rope_cos_.resize(n_tokens * half);
  rope_sin_.resize(n_tokens * half);
  for (int64_t j = have; j < n_tokens; ++j) {
    const int64_t pos = start_position_ + j;
    for (int i = 0; i < half; ++i) {
      // The same angle and rounding as ApplyRopeCpu.
      const double angle = static_cast<double>(pos) * static_cast<double>(inv_freq_[i]);
      rope_cos_[j * half + i] = static_cast<float>(std::cos(angle));
      rope_sin_[j * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

void QuantizedKvShard::Rotate(float* x, int64_t local_token) const {
  const int half = geometry_.head_dim / 2;
  const float* cs = rope_cos_.data() + local_token * half;
  const float* sn = rope_sin_.data() + local_token * half;
  for (int i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cs[i] - b * sn[i];
    x[i + half] = b * cs[i] + a * sn[i];
  }
}

absl::Status QuantizedKvShard::Append(int layer, int n_tokens, const float* k, const float* v) {
  if (layer < 0 || layer >= geometry_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n_tokens < 0) return absl::InvalidArgumentError("negative token count");
  if (sealed_) {
    return absl::FailedPreconditionError("the KV shard is sealed (another shard holds the sequence's tail)");
  }
  const int d = geometry_.head_dim;
  const int kvh = geometry_.n_kv_heads;
  Layer& L = layers_[layer];
  EnsureRopeTable(L.length + n_tokens);
  const int64_t sink = StreamLayout(config_, start_position_, L.length + n_tokens, false).sink;
  std::vector<float> rotated(d);
  for (int t = 0; t < n_tokens; ++t) {
    const int64_t j = L.length + t;
    for (int h = 0; h < kvh; ++h) {
      const float* kt = k + (static_cast<int64_t>(t) * kvh + h) * d;
      const float* vt = v + (static_cast<int64_t>(t) * kvh + h) * d;
      Stream& s = L.streams[h];
      if (j < sink) {
        rotated.assign(kt, kt + d);
        Rotate(rotated.data(), j);
        for (int c = 0; c < d; ++c) s.sink_k.push_back(FloatToHalf(rotated[c]));
        for (int c = 0; c < d; ++c) s.sink_v.push_back(FloatToHalf(vt[c]));
        continue;
      }
      if (s.fp_k.empty()) s.fp_begin = j;
      if (config_.keys_pre_rope()) {
        for (int c = 0; c < d; ++c) s.fp_k.push_back(FloatToHalf(kt[c]));
      } else {
        rotated.assign(kt, kt + d);
        Rotate(rotated.data(), j);
        for (int c = 0; c < d; ++c) s.fp_k.push_back(FloatToHalf(rotated[c]));
      }
      for (int c = 0; c < d; ++c) s.fp_v.push_back(FloatToHalf(vt[c]));
    }
  }
  L.length += n_tokens;
  Flush(L);
  return absl::OkStatus();
}

void QuantizedKvShard::Flush(Layer& L) {
  const int d = geometry_.head_dim;
  const KvStreamLayout layout = StreamLayout(config_, start_position_, L.length, sealed_);
  const int unit = config_.flush_unit();
  std::vector<float> kbuf, vbuf;
  for (Stream& s : L.streams) {
    int64_t next = layout.sink + s.key->size();  // first local token not yet quantized
    while (next < layout.quantized_end) {
      const int n = static_cast<int>(std::min<int64_t>(unit, layout.quantized_end - next));
      const int64_t off = (next - s.fp_begin) * d;
      kbuf.resize(static_cast<size_t>(n) * d);
      vbuf.resize(static_cast<size_t>(n) * d);
      HalfToFloatRow(s.fp_k.data() + off, static_cast<int64_t>(n) * d, kbuf.data());
      HalfToFloatRow(s.fp_v.data() + off, static_cast<int64_t>(n) * d, vbuf.data());
      s.key->Encode(n, kbuf.data());
      s.value->Encode(n, vbuf.data());
      next += n;
    }
    if (!config_.exact_decode_view && layout.quantized_end > s.fp_begin && !s.fp_k.empty()) {
      const int64_t drop = (layout.quantized_end - s.fp_begin) * d;
      s.fp_k.erase(s.fp_k.begin(), s.fp_k.begin() + drop);
      s.fp_v.erase(s.fp_v.begin(), s.fp_v.begin() + drop);
      s.fp_begin = layout.quantized_end;
    }
  }
}

void QuantizedKvShard::Seal() {
  sealed_ = true;
  for (Layer& L : layers_) Flush(L);
}

void QuantizedKvShard::Clear() {
  sealed_ = false;
  for (Layer& L : layers_) {
    L.length = 0;
    for (Stream& s : L.streams) {
      s.key->Clear();
      s.value->Clear();
      s.sink_k.clear();
      s.sink_v.clear();
      s.fp_k.clear();
      s.fp_v.clear();
      s.fp_begin = 0;
    }
  }
}

KvStreamLayout QuantizedKvShard::layout(int layer) const {
  return StreamLayout(config_, start_position_, layers_[layer].length, sealed_);
}

void QuantizedKvShard::Materialize(const Stream& s, int64_t sink, int64_t begin, int64_t end, int64_t fp_from,
                                   float* k, float* v) const {
  const int d = geometry_.head_dim;
  const bool rotate = config_.keys_pre_rope();
  // Sink: fp16 after RoPE.
  for (int64_t j = begin; j < std::min(end, sink); ++j) {
    HalfToFloatRow(s.sink_k.data() + j * d, d, k + (j - begin) * d);
    HalfToFloatRow(s.sink_v.data() + j * d, d, v + (j - begin) * d);
  }
  // Quantized: decode, then rotate keys quantized before RoPE.
  const int64_t q0 = std::max(begin, sink), q1 = std::min(end, fp_from);
  if (q1 > q0) {
    s.key->Decode(q0 - sink, q1 - q0, k + (q0 - begin) * d);
    s.value->Decode(q0 - sink, q1 - q0, v + (q0 - begin) * d);
    if (rotate)
      for (int64_t j = q0; j < q1; ++j) Rotate(k + (j - begin) * d, j);
  }
  // fp16 copies.
  for (int64_t j = std::max(begin, std::max(fp_from, sink)); j < end; ++j) {
    HalfToFloatRow(s.fp_k.data() + (j - s.fp_begin) * d, d, k + (j - begin) * d);
    HalfToFloatRow(s.fp_v.data() + (j - s.fp_begin) * d, d, v + (j - begin) * d);
    if (rotate) Rotate(k + (j - begin) * d, j);
  }
}

void QuantizedKvShard::Dequantize(int layer, int kv_head, int64_t first, int64_t n, float* k, float* v) const {
  const KvStreamLayout l = layout(layer);
  Materialize(layers_[layer].streams[kv_head], l.sink, first, first + n, l.quantized_end, k, v);
}

int64_t QuantizedKvShard::KeyOutliers(int layer, int kv_head) const {
  return layers_[layer].streams[kv_head].key->outliers();
}
const PagedCodes& QuantizedKvShard::key_codes(int layer, int kv_head) const {
  return layers_[layer].streams[kv_head].key->codes();
}
const PagedCodes& QuantizedKvShard::value_codes(int layer, int kv_head) const {
  return layers_[layer].streams[kv_head].value->codes();
}

absl::Status QuantizedKvShard::Attend(int layer, int n_queries, const float* q, const int64_t* q_positions,
                                      float* out, float* lse) const {
  if (layer < 0 || layer >= geometry_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n_queries <= 0) return absl::OkStatus();
  const int d = geometry_.head_dim;
  const int group = geometry_.n_heads / geometry_.n_kv_heads;
  const Layer& L = layers_[layer];
  const KvStreamLayout now = layout(layer);

  // Per query: tokens it can see, and where its fp16 view begins (decode at its position).
  std::vector<int64_t> boundary(n_queries);
  int64_t visible = 0;
  for (int i = 0; i < n_queries; ++i) {
    const int64_t n_vis = std::clamp<int64_t>(q_positions[i] - start_position_ + 1, 0, L.length);
    visible = std::max(visible, n_vis);
    boundary[i] = now.quantized_end;
    if (config_.exact_decode_view && n_vis > 0 && n_vis < L.length) {
      boundary[i] = StreamLayout(config_, start_position_, n_vis, false).quantized_end;
    }
  }
  const int64_t first_boundary = *std::min_element(boundary.begin(), boundary.end());
  const int64_t last_boundary = *std::max_element(boundary.begin(), boundary.end());

  const int64_t rows = static_cast<int64_t>(n_queries) * group;
  std::vector<int64_t> row_positions(rows), row_boundary(rows);
  for (int i = 0; i < n_queries; ++i)
    for (int g = 0; g < group; ++g) {
      row_positions[i * group + g] = q_positions[i];
      row_boundary[i * group + g] = boundary[i];
    }

  // Threads only pay off on real work: small calls (tests, single decode steps of short contexts) stay
  // on the calling thread.
  const bool parallel = visible * rows * d > (int64_t{1} << 18);
  const int kvh = geometry_.n_kv_heads;
  // Without per-query boundaries the context is taken in tiles of kAttendTile tokens, each dequantized into
  // buffers its thread reuses (the K/V stay in cache; no call allocates the whole context) and merged as
  // partials. attend_tile: KV head h's rows over tile `tile` into (o, l).
  const int64_t n_tiles = std::max<int64_t>(1, (visible + kAttendTile - 1) / kAttendTile);
  // attend_tile: KV head h's rows [r0, r0 + n_rows) over tile `tile` into (o, l).
  auto attend_tile = [&](int h, const float* q_rows, int64_t r0, int64_t n_rows, int64_t tile, float* o, float* l) {
    thread_local std::vector<float> k, v;
    k.resize(kAttendTile * d);
    v.resize(kAttendTile * d);
    const int64_t t0 = tile * kAttendTile, n = std::min(visible - t0, kAttendTile);
    Materialize(L.streams[h], now.sink, t0, t0 + n, first_boundary, k.data(), v.data());
    AttentionPartialsCpu(q_rows, d, n_rows, row_positions.data() + r0, k.data(), v.data(), d, n, start_position_ + t0,
                         d, geometry_.scale(), o, d, l);
  };

  if (first_boundary == last_boundary && rows <= kTiledRows) {
    // Decode: the (KV head, tile) pairs are the work items (a few KV heads would leave threads idle).
    std::vector<float> q_rows(kvh * rows * d), part_out(kvh * n_tiles * rows * d), part_lse(kvh * n_tiles * rows);
    for (int h = 0; h < kvh; ++h) GatherGroupRows(geometry_, q, h, 0, n_queries, q_rows.data() + h * rows * d);
#pragma omp parallel for schedule(dynamic) if (parallel)
    for (int64_t item = 0; item < kvh * n_tiles; ++item) {
      const int h = static_cast<int>(item / n_tiles);
      attend_tile(h, q_rows.data() + h * rows * d, 0, rows, item % n_tiles, part_out.data() + item * rows * d,
                  part_lse.data() + item * rows);
    }
    std::vector<const float*> outs(n_tiles), lses(n_tiles);
    std::vector<float> out_rows(rows * d), lse_rows(rows);
    for (int h = 0; h < kvh; ++h) {
      for (int64_t t = 0; t < n_tiles; ++t) {
        outs[t] = part_out.data() + (h * n_tiles + t) * rows * d;
        lses[t] = part_lse.data() + (h * n_tiles + t) * rows;
      }
      MergePartialsCpu(static_cast<int>(n_tiles), outs.data(), lses.data(), rows, d, out_rows.data(), lse_rows.data());
      ScatterGroupRows(geometry_, out_rows.data(), lse_rows.data(), h, 0, n_queries, out, lse);
    }
    return absl::OkStatus();
  }

  const int query_blocks = (n_queries + kAttendQueriesPerItem - 1) / kAttendQueriesPerItem;
#pragma omp parallel for schedule(dynamic) if (parallel)
  for (int item = 0; item < kvh * query_blocks; ++item) {
    const int h = item / query_blocks;
    const int q0 = item % query_blocks * kAttendQueriesPerItem, q1 = std::min(n_queries, q0 + kAttendQueriesPerItem);
    const int64_t r0 = static_cast<int64_t>(q0) * group, n_rows = static_cast<int64_t>(q1 - q0) * group;
    const Stream& s = L.streams[h];
    std::vector<float> q_rows(n_rows * d), out_rows(n_rows * d), lse_rows(n_rows);
    GatherGroupRows(geometry_, q, h, q0, q1, q_rows.data());
    if (first_boundary == last_boundary) {
      // Many rows (prefill): the tiles merged one by one (partials of every tile at once would take
      // tiles x rows x head_dim floats).
      attend_tile(h, q_rows.data(), r0, n_rows, 0, out_rows.data(), lse_rows.data());
      thread_local std::vector<float> tile_out, tile_lse;
      tile_out.resize(n_rows * d);
      tile_lse.resize(n_rows);
      for (int64_t tile = 1; tile < n_tiles; ++tile) {
        attend_tile(h, q_rows.data(), r0, n_rows, tile, tile_out.data(), tile_lse.data());
        const float* outs[2] = {out_rows.data(), tile_out.data()};
        const float* lses[2] = {lse_rows.data(), tile_lse.data()};
        MergePartialsCpu(2, outs, lses, n_rows, d, out_rows.data(), lse_rows.data());
      }
    } else {
      // Tokens before the earliest boundary look the same to every query: one pass for all rows. In the
      // band [first_boundary, visible) each row sees tokens quantized before its boundary and fp16 from
      // it on: both versions are materialized once and the band's partials merged in.
      const int64_t head_len = std::min(first_boundary, visible);
      const int64_t band_len = visible - head_len;
      thread_local std::vector<float> k, v;  // reused: a fresh context-sized buffer page-faults every call
      k.resize(head_len * d);
      v.resize(head_len * d);
      Materialize(s, now.sink, 0, head_len, head_len, k.data(), v.data());
      AttentionPartialsCpu(q_rows.data(), d, n_rows, row_positions.data() + r0, k.data(), v.data(), d, head_len,
                           start_position_, d, geometry_.scale(), out_rows.data(), d, lse_rows.data());
      std::vector<float> kq(band_len * d), vq(band_len * d), kf(band_len * d), vf(band_len * d);
      Materialize(s, now.sink, head_len, visible, std::min(last_boundary, visible), kq.data(), vq.data());
      Materialize(s, now.sink, head_len, visible, head_len, kf.data(), vf.data());
      std::vector<float> band_out(n_rows * d), band_lse(n_rows);
      BandAttention(q_rows.data(), n_rows, row_positions.data() + r0, row_boundary.data() + r0, kq.data(), vq.data(),
                    kf.data(), vf.data(), band_len, start_position_ + head_len, head_len, d, geometry_.scale(),
                    band_out.data(), band_lse.data());
      const float* outs[2] = {out_rows.data(), band_out.data()};
      const float* lses[2] = {lse_rows.data(), band_lse.data()};
      MergePartialsCpu(2, outs, lses, n_rows, d, out_rows.data(), lse_rows.data());
    }
    ScatterGroupRows(geometry_, out_rows.data(), lse_rows.data(), h, q0, q1, out, lse);
  }
  return absl::OkStatus();
}

KvMemory QuantizedKvShard::Memory() const {
  const int d = geometry_.head_dim;
  int64_t bits = 0;
  KvMemory m;
  for (int l = 0; l < geometry_.n_layers; ++l) {
    const Layer& L = layers_[l];
    for (const Stream& s : L.streams) {
      const int64_t sink = static_cast<int64_t>(s.sink_k.size()) / d;
      const int64_t residual = L.length - sink - s.key->size();
      bits += (sink + residual) * 2 * d * kHalfBits + s.key->bits() + s.value->bits();
    }
    m.elements += 2 * L.length * geometry_.n_kv_heads * d;
  }
  m.bytes = (bits + 7) / 8;
  return m;
}

absl::StatusOr<std::unique_ptr<KvShard>> MakeKvShard(const KvSchemeConfig& config, const KvGeometry& geometry,
                                                     int64_t start_position, const Calibration* calibration) {
  if (config.kind == KvSchemeKind::kFp16) {
    return MakeFullPrecisionKvShard(geometry, start_position, FullPrecision::kFp16);
  }
  KV_ASSIGN_OR_RETURN(std::unique_ptr<QuantizedKvShard> shard,
                      QuantizedKvShard::Create(config, geometry, start_position, calibration));
  return std::unique_ptr<KvShard>(std::move(shard));
}

}  // namespace kvshard
