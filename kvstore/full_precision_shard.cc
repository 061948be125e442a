// The unquantized KV cache: keys after RoPE and values, per layer and KV head, fp32 or fp16.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "kernels/attention.h"
#include "kvstore/kv_shard.h"

namespace kvshard {

float KvGeometry::scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

namespace {

class FullPrecisionKvShard final : public KvShard {
 public:
  FullPrecisionKvShard(const KvGeometry& geometry, int64_t start_position, FullPrecision precision)
      : geometry_(geometry),
        start_position_(start_position),
        precision_(precision),
        inv_freq_(RopeInverseFrequencies(geometry.rope)),
        layers_(geometry.n_layers) {
    for (auto& layer : layers_) layer.heads.resize(geometry.n_kv_heads);
  }

  const KvGeometry& geometry() const override { return geometry_; }
  std::string scheme() const override { return precision_ == FullPrecision::kFp16 ? "fp16" : "fp32"; }
  int64_t start_position() const override { return start_position_; }
  int64_t length(int layer) const override { return layers_[layer].length; }

  absl::Status Append(int layer, int n_tokens, const float* k, const float* v) override {
    if (layer < 0 || layer >= geometry_.n_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
    }
    const int d = geometry_.head_dim;
    const int kvh = geometry_.n_kv_heads;
    Layer& L = layers_[layer];
    std::vector<float> rotated(d);
    for (int t = 0; t < n_tokens; ++t) {
      const int64_t pos = start_position_ + L.length + t;
      for (int h = 0; h < kvh; ++h) {
        const float* kt = k + (static_cast<int64_t>(t) * kvh + h) * d;
        const float* vt = v + (static_cast<int64_t>(t) * kvh + h) * d;
        rotated.assign(kt, kt + d);
        ApplyRopeCpu(rotated.data(), 1, d, pos, inv_freq_);
        Head& H = L.heads[h];
        if (precision_ == FullPrecision::kFp32) {
          H.k32.insert(H.k32.end(), rotated.begin(), rotated.end());
          H.v32.insert(H.v32.end(), vt, vt + d);
        } else {
          for (int i = 0; i < d; ++i) H.k16.push_back(FloatToHalf(rotated[i]));
          for (int i = 0; i < d; ++i) H.v16.push_back(FloatToHalf(vt[i]));
        }
      }
    }
    L.length += n_tokens;
    return absl::OkStatus();
  }

  absl::Status Attend(int layer, int n_queries, const float* q, const int64_t* q_positions, float* out,
                      float* lse) const override {
    if (layer < 0 || layer >= geometry_.n_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
    }
    const int d = geometry_.head_dim;
    const int group = geometry_.n_heads / geometry_.n_kv_heads;
    const Layer& L = layers_[layer];
    // Rows of one KV head's group: (query i, head h*group+g) -> row i*group+g, strided in q and out.
    std::vector<int64_t> row_positions(static_cast<int64_t>(n_queries) * group);
    for (int i = 0; i < n_queries; ++i)
      for (int g = 0; g < group; ++g) row_positions[i * group + g] = q_positions[i];
    // Work items: (KV head, kAttendQueriesPerItem queries).
    const int query_blocks = (n_queries + kAttendQueriesPerItem - 1) / kAttendQueriesPerItem;
#pragma omp parallel for schedule(dynamic)
    for (int item = 0; item < geometry_.n_kv_heads * query_blocks; ++item) {
      const int h = item / query_blocks;
      const int q0 = item % query_blocks * kAttendQueriesPerItem, q1 = std::min(n_queries, q0 + kAttendQueriesPerItem);
      const Head& H = L.heads[h];
      const float* kp = H.k32.data();
      const float* vp = H.v32.data();
      if (precision_ == FullPrecision::kFp16) {
        thread_local std::vector<float> k_scratch, v_scratch;  // reused: fresh ones page-fault every call
        k_scratch.resize(H.k16.size());
        v_scratch.resize(H.v16.size());
        HalfToFloatRow(H.k16.data(), static_cast<int64_t>(H.k16.size()), k_scratch.data());
        HalfToFloatRow(H.v16.data(), static_cast<int64_t>(H.v16.size()), v_scratch.data());
        kp = k_scratch.data();
        vp = v_scratch.data();
      }
      // With [query][head][dim] layout, the group's heads of query i are contiguous: rows i*group+g sit
      // at stride d within a query and n_heads*d across queries. Gather to a dense block for the GEMMs.
      const int64_t rows = static_cast<int64_t>(q1 - q0) * group;
      std::vector<float> q_rows(rows * d), out_rows(rows * d), lse_rows(rows);
      GatherGroupRows(geometry_, q, h, q0, q1, q_rows.data());
      AttentionPartialsCpu(q_rows.data(), d, rows, row_positions.data() + static_cast<int64_t>(q0) * group, kp, vp,
                           d, L.length, start_position_, d, geometry_.scale(), out_rows.data(), d, lse_rows.data());
      ScatterGroupRows(geometry_, out_rows.data(), lse_rows.data(), h, q0, q1, out, lse);
    }
    return absl::OkStatus();
  }

  KvMemory Memory() const override {
    KvMemory m;
    const int64_t bytes_per_elem = precision_ == FullPrecision::kFp16 ? 2 : 4;
    for (const Layer& L : layers_) {
      m.elements += 2 * L.length * geometry_.n_kv_heads * geometry_.head_dim;
    }
    m.bytes = m.elements * bytes_per_elem;
    return m;
  }

  void Clear() override {
    for (Layer& L : layers_) {
      L.length = 0;
      for (Head& H : L.heads) H = Head();
    }
  }

 private:
  struct Head {
    std::vector<float> k32, v32;
    std::vector<uint16_t> k16, v16;
  };
  struct Layer {
    int64_t length = 0;
    std::vector<Head> heads;
  };
  KvGeometry geometry_;
  int64_t start_position_;
  FullPrecision precision_;
  std::vector<float> inv_freq_;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<KvShard> MakeFullPrecisionKvShard(const KvGeometry& geometry, int64_t start_position,
                                                  FullPrecision precision) {
  return std::make_unique<FullPrecisionKvShard>(geometry, start_position, precision);
}

}  // namespace kvshard
