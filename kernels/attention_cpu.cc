#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/gemm_cpu.h"

namespace kvshard {
namespace {
constexpr int64_t kKeyBlock = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
}  // namespace

void AttentionPartialsCpu(const float* q, int64_t q_stride, int64_t n_rows, const int64_t* row_positions,
                          const float* k, const float* v, int64_t kv_stride, int64_t n_keys,
                          int64_t first_key_position, int head_dim, float scale, float* out,
                          int64_t out_stride, float* lse) {
  if (n_rows == 0) return;
  std::vector<float> running_max(n_rows, kNegInf);
  std::vector<float> running_sum(n_rows, 0.0f);
  std::vector<float> acc(n_rows * head_dim, 0.0f);
  std::vector<float> scores(n_rows * kKeyBlock);
  std::vector<float> block_out(n_rows * head_dim);

  int64_t max_row_position = std::numeric_limits<int64_t>::max();
  int64_t min_row_position = max_row_position;
  if (row_positions != nullptr) {
    max_row_position = *std::max_element(row_positions, row_positions + n_rows);
    min_row_position = *std::min_element(row_positions, row_positions + n_rows);
  }
  // Keys past the furthest row are invisible to every row.
  const int64_t visible_keys =
      std::clamp<int64_t>(row_positions ? max_row_position - first_key_position + 1 : n_keys, 0, n_keys);

  for (int64_t j0 = 0; j0 < visible_keys; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, visible_keys - j0);
    // scores[r, j] = scale * q_r . k_{j0+j}
    GemmCpu(/*transpose_b=*/true, n_rows, nb, head_dim, scale, q, q_stride, k + j0 * kv_stride, kv_stride, 0.0f,
            scores.data(), kKeyBlock);
    const bool needs_mask = row_positions != nullptr && first_key_position + j0 + nb - 1 > min_row_position;
    for (int64_t r = 0; r < n_rows; ++r) {
      float* s = scores.data() + r * kKeyBlock;
      int64_t limit = nb;
      if (needs_mask) limit = std::clamp<int64_t>(row_positions[r] - (first_key_position + j0) + 1, 0, nb);
      float block_max = kNegInf;
      for (int64_t j = 0; j < limit; ++j) block_max = std::max(block_max, s[j]);
      const float new_max = std::max(running_max[r], block_max);
      if (new_max == kNegInf) {  // nothing visible yet
        for (int64_t j = 0; j < nb; ++j) s[j] = 0.0f;
        continue;
      }
      float block_sum = 0.0f;
      for (int64_t j = 0; j < limit; ++j) {
        s[j] = std::exp(s[j] - new_max);
        block_sum += s[j];
      }
      for (int64_t j = limit; j < nb; ++j) s[j] = 0.0f;
      const float correction = std::exp(running_max[r] - new_max);  // exp(-inf) = 0 on the first block
      running_sum[r] = running_sum[r] * correction + block_sum;
      running_max[r] = new_max;
      float* a = acc.data() + r * head_dim;
      for (int d = 0; d < head_dim; ++d) a[d] *= correction;
    }
    // acc[r, :] += p[r, :] . V_block
    GemmCpu(/*transpose_b=*/false, n_rows, head_dim, nb, 1.0f, scores.data(), kKeyBlock, v + j0 * kv_stride,
            kv_stride, 1.0f, acc.data(), head_dim);
  }

  for (int64_t r = 0; r < n_rows; ++r) {
    float* o = out + r * out_stride;
    if (running_sum[r] == 0.0f) {
      std::fill(o, o + head_dim, 0.0f);
      lse[r] = kNegInf;
      continue;
    }
    const float inv = 1.0f / running_sum[r];
    const float* a = acc.data() + r * head_dim;
    for (int d = 0; d < head_dim; ++d) o[d] = a[d] * inv;
    lse[r] = running_max[r] + std::log(running_sum[r]);
  }
}

void MergePartialsCpu(int n_sources, const float* const* outs, const float* const* lses, int64_t n_rows,
                      int head_dim, float* out, float* lse) {
  std::vector<float> merged(head_dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    float max_lse = kNegInf;
    for (int s = 0; s < n_sources; ++s) max_lse = std::max(max_lse, lses[s][r]);
    if (max_lse == kNegInf) {  // guards -inf - (-inf)
      std::fill(out + r * head_dim, out + (r + 1) * head_dim, 0.0f);
      lse[r] = kNegInf;
      continue;
    }
    std::fill(merged.begin(), merged.end(), 0.0f);
    float total = 0.0f;
    for (int s = 0; s < n_sources; ++s) {
      const float l = lses[s][r];
      if (l == kNegInf) continue;
      const float w = std::exp(l - max_lse);
      total += w;
      const float* o = outs[s] + r * head_dim;
      for (int d = 0; d < head_dim; ++d) merged[d] += w * o[d];
    }
    const float inv = 1.0f / total;
    for (int d = 0; d < head_dim; ++d) out[r * head_dim + d] = merged[d] * inv;
    lse[r] = max_lse + std::log(total);
  }
}

}  // namespace kvshard
