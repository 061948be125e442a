// Attention partials and their merge: CPU twins. The CUDA launchers are in kernels/cuda/.
//
// Numeric convention everywhere: scores are scale * q.k in fp32; lse is the natural log (base e) of
// sum exp(score); a row that sees no key has out = 0 and lse = -inf.
#pragma once

#include <cstdint>

namespace kvshard {

// Partials of `n_rows` query rows against `n_keys` fp32 keys/values of one KV head.
//   q:   [n_rows][head_dim], row r at q + r * q_stride
//   k,v: [n_keys][head_dim], key j at k + j * kv_stride, absolute position first_key_position + j
//   row_positions[r]: row r sees keys with position <= row_positions[r] (pass nullptr: sees all)
//   out: [n_rows][head_dim] at out + r * out_stride;  lse: [n_rows]
// Flash-style: keys are processed in blocks with an online softmax; no n_rows x n_keys matrix.
void AttentionPartialsCpu(const float* q, int64_t q_stride, int64_t n_rows, const int64_t* row_positions,
                          const float* k, const float* v, int64_t kv_stride, int64_t n_keys,
                          int64_t first_key_position, int head_dim, float scale, float* out,
                          int64_t out_stride, float* lse);

// Merges partials of `n_sources` sources for `n_rows` rows of head_dim values:
//   lse = log sum_s exp(lse_s);  out = sum_s exp(lse_s - lse) out_s.
// Sources with lse = -inf contribute nothing; if all are -inf the row is out = 0, lse = -inf.
// out_s at outs[s] + r * head_dim, lse_s at lses[s] + r. out/lse may alias source 0.
void MergePartialsCpu(int n_sources, const float* const* outs, const float* const* lses, int64_t n_rows,
                      int head_dim, float* out, float* lse);

}  // namespace kvshard
