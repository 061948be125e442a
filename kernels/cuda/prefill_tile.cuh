// The tensor-core core of the flash-style prefill kernels (prefill_attention.cu over fp16/bf16 pages,
// kvq_prefill_attention.cu over packed kvq3 pages): one warp's 16 query rows against a tile of 64 keys
// in shared memory. S = Q K^T and O += P V run as m16n8k16 MMAs with fp32 accumulation; the online
// softmax runs in registers in the log2 domain. Its softmax (PrefillSoftmax), row state and partials'
// store also serve the Hopper kernel of prefill_attention.cu. CUDA sources only.
//
// V tiles are [64 keys][HEAD_DIM] of 16-bit values; K tiles the same or, channel-major, [HEAD_DIM][64 keys]
// (KEYS_BY_CHANNEL: a writer that holds a channel's consecutive keys stores them as 16-byte vectors). Rows
// are XOR-swizzled in 16-byte chunks (TileOffset) so that ldmatrix reads are free of bank conflicts.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cuda/device_utils.cuh"

namespace kvshard {

inline constexpr int kPrefillTileKeys = 64;

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][HEAD_DIM] tile.
template <int HEAD_DIM>
__device__ __forceinline__ int TileOffset(int row, int chunk) {
  return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
}

// One warp's running state: lane (g = lane / 4) holds rows g ("a") and g + 8 ("b") of the warp's 16.
// o: output accumulators (columns 8 d + 2 (lane % 4) + {0, 1}); m: running max of log2-domain scores;
// l: this lane's part of the row sums (the quad's lanes are summed at the end).
template <int HEAD_DIM>
struct PrefillRows {
  float o[HEAD_DIM / 8][4];
  float m_a, m_b, l_a, l_b;

  __device__ __forceinline__ void Init() {
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    m_a = m_b = -INFINITY;
    l_a = l_b = 0.0f;
  }

  // Moves the output to new running maxima: rows a and b scale by corr_a and corr_b.
  __device__ __forceinline__ void Rescale(float corr_a, float corr_b) {
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      o[d][0] *= corr_a;
      o[d][1] *= corr_a;
      o[d][2] *= corr_b;
      o[d][3] *= corr_b;
    }
  }
};

// Query positions of this thread's rows a = lane / 4 and b = a + 8 of its warp's 16 (PrefillRows): block row r
// of a block starting at chunk row row0 is query token (row0 + r) / group.
struct PrefillRowPositions {
  int64_t a, b;
};
__device__ __forceinline__ PrefillRowPositions RowPositions(int64_t query_first_position, int64_t row0, int group,
                                                            int warp, int lane) {
  const int64_t row_a = row0 + warp * 16 + (lane >> 2);
  return {query_first_position + row_a / group, query_first_position + (row_a + 8) / group};
}

// The rows and keys of the block that blockIdx.x names (blocks of `rows` rows, the last rows first: they see
// the most keys): its first row, and keys [0, visible) seen by some row, [0, unmasked) by every row.
struct PrefillBlockSpan {
  int64_t row0, visible, unmasked;
};
__device__ __forceinline__ PrefillBlockSpan BlockSpan(int rows, int64_t total_rows, int group,
                                                      int64_t query_first_position, int64_t key_first_position,
                                                      int64_t n_keys) {
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * rows;
  const int64_t last_row = min(row0 + rows, total_rows) - 1;
  const int64_t first_pos = query_first_position + row0 / group;
  const int64_t last_pos = query_first_position + last_row / group;
  return {row0, max(int64_t{0}, min(n_keys, last_pos - key_first_position + 1)),
          max(int64_t{0}, min(n_keys, first_pos - key_first_position + 1))};
}

// Starts the cp.async copies of a block's query rows [row0, row0 + ROWS) into a tile of shared memory
// whose 16-byte chunk c of row r is at dest(r, c) (rows past total_rows are zeros). Row r is query token
// r / group, head kv_head * group + r % group of q [tokens][n_heads][HEAD_DIM], so the rows of one KV
// head's group share every K/V tile.
template <int HEAD_DIM, int ROWS, int THREADS, typename T, typename Dest>
__device__ __forceinline__ void LoadQueryRowsAsync(const Dest& dest, const T* q, int64_t row0, int64_t total_rows,
                                                   int group, int kv_head, int n_heads, int tid) {
  constexpr int kChunks = HEAD_DIM / 8;
  for (int i = tid; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = i % kChunks;
    const int64_t row = row0 + r;
    const bool valid = row < total_rows;
    const T* src = q;
    if (valid) {
      const int64_t token = row / group;
      const int head = kv_head * group + static_cast<int>(row % group);
      src = q + (token * n_heads + head) * HEAD_DIM + c * 8;
    }
    CpAsync16(dest(r, c), src, valid);
  }
}

// The same into a swizzled [ROWS][HEAD_DIM] tile (TileOffset), as the mma.sync kernels read it.
template <int HEAD_DIM, int ROWS, int THREADS, typename T>
__device__ __forceinline__ void LoadQueryTileAsync(T* s_q, const T* q, int64_t row0, int64_t total_rows, int group,
                                                   int kv_head, int n_heads, int tid) {
  LoadQueryRowsAsync<HEAD_DIM, ROWS, THREADS>([&](int r, int c) { return s_q + TileOffset<HEAD_DIM>(r, c); }, q,
                                              row0, total_rows, group, kv_head, n_heads, tid);
}

// The warp's Q fragments (16 rows of a swizzled [rows][HEAD_DIM] tile from row `row0`).
template <int HEAD_DIM, typename T>
__device__ __forceinline__ void LoadQueryFragments(const T* s_q, int row0, int lane,
                                                   uint32_t (&q_frag)[HEAD_DIM / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
    LdMatrixX4(q_frag[kk], s_q + TileOffset<HEAD_DIM>(row0 + (lane & 15), kk * 2 + (lane >> 4)));
  }
}

// The online softmax of one tile's scores s (N_TILES accumulator tiles of 8 key columns, the m16n8 layout:
// s[j][0..1] row a, s[j][2..3] row b, columns 8 j + 2 (lane % 4) + {0, 1}; unscaled): masks (masked(key,
// upper) as in PrefillTileStep, called only when needs_mask), turns s into the probabilities against the
// new running maxima (log2 domain: scale_log2 is applied in the exponent) and moves the row state r to
// them. With RESCALE = false the output accumulators are left alone and their factors go to *out_corr_a,
// *out_corr_b (a caller whose accumulators an asynchronous MMA still writes rescales them after it).
template <int HEAD_DIM, int N_TILES, typename Masked, bool RESCALE = true>
__device__ __forceinline__ void PrefillSoftmax(float (&s)[N_TILES][4], float scale_log2, bool needs_mask,
                                               const Masked& masked, int lane, PrefillRows<HEAD_DIM>& r,
                                               float* out_corr_a = nullptr, float* out_corr_b = nullptr) {
  constexpr int kNTiles = N_TILES;
  constexpr float kNegInf = -INFINITY;
  // Scores stay unscaled until the exponent: max(x) * c is the max of x * c for c > 0, and
  // exp2(x * c - max) is one FMA.
  if (needs_mask) {
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (masked(j * 8 + (lane & 3) * 2 + (e & 1), e >> 1)) s[j][e] = kNegInf;
      }
    }
  }

  float raw_a = kNegInf, raw_b = kNegInf;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    raw_a = fmaxf(raw_a, fmaxf(s[j][0], s[j][1]));
    raw_b = fmaxf(raw_b, fmaxf(s[j][2], s[j][3]));
  }
  raw_a = fmaxf(raw_a, __shfl_xor_sync(0xffffffffu, raw_a, 1));
  raw_a = fmaxf(raw_a, __shfl_xor_sync(0xffffffffu, raw_a, 2));
  raw_b = fmaxf(raw_b, __shfl_xor_sync(0xffffffffu, raw_b, 1));
  raw_b = fmaxf(raw_b, __shfl_xor_sync(0xffffffffu, raw_b, 2));
  const float max_a = fmaxf(r.m_a, raw_a * scale_log2);
  const float max_b = fmaxf(r.m_b, raw_b * scale_log2);
  const float base_a = max_a == kNegInf ? 0.0f : max_a;  // guards -inf - (-inf)
  const float base_b = max_b == kNegInf ? 0.0f : max_b;
  const float corr_a = exp2f(r.m_a - base_a);
  const float corr_b = exp2f(r.m_b - base_b);
  r.m_a = max_a;
  r.m_b = max_b;
  float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    s[j][0] = exp2f(fmaf(s[j][0], scale_log2, -base_a));
    s[j][1] = exp2f(fmaf(s[j][1], scale_log2, -base_a));
    s[j][2] = exp2f(fmaf(s[j][2], scale_log2, -base_b));
    s[j][3] = exp2f(fmaf(s[j][3], scale_log2, -base_b));
    sum_a += s[j][0] + s[j][1];
    sum_b += s[j][2] + s[j][3];
  }
  r.l_a = r.l_a * corr_a + sum_a;
  r.l_b = r.l_b * corr_b + sum_b;
  if constexpr (RESCALE) {
    r.Rescale(corr_a, corr_b);
  } else {
    *out_corr_a = corr_a;
    *out_corr_b = corr_b;
  }
}

// One tile step (K [64][HEAD_DIM], or [HEAD_DIM][64] when KEYS_BY_CHANNEL). masked(key, upper) says whether key column `key` (0..63) is hidden from the lane's row
// a (upper = 0) or b (upper = 1); it is called only when needs_mask. A hidden key may hold any finite
// values in the tile (its weight is exactly 0).
template <int HEAD_DIM, typename T, bool KEYS_BY_CHANNEL = false, typename Masked>
__device__ __forceinline__ void PrefillTileStep(const uint32_t (&q_frag)[HEAD_DIM / 16][4], const T* tile_k,
                                                const T* tile_v, float scale_log2, bool needs_mask,
                                                const Masked& masked, int lane, PrefillRows<HEAD_DIM>& r) {
  constexpr int kKSteps = HEAD_DIM / 16;
  constexpr int kDTiles = HEAD_DIM / 8;
  constexpr int kNTiles = kPrefillTileKeys / 8;

  float s[kNTiles][4];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
    for (int jj = 0; jj < kNTiles / 2; ++jj) {
      uint32_t b[4];  // matrices (keys 16 jj + {0, 8}) x (channels 16 kk + {0, 8})
      if constexpr (KEYS_BY_CHANNEL) {
        LdMatrixX4Trans(b, tile_k + TileOffset<kPrefillTileKeys>(kk * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                                                 jj * 2 + (lane >> 4)));
      } else {
        LdMatrixX4(b, tile_k + TileOffset<HEAD_DIM>(jj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                    kk * 2 + ((lane >> 3) & 1)));
      }
      Mma16816<T>(s[2 * jj], q_frag[kk], b[0], b[1]);
      Mma16816<T>(s[2 * jj + 1], q_frag[kk], b[2], b[3]);
    }
  }

  PrefillSoftmax<HEAD_DIM>(s, scale_log2, needs_mask, masked, lane, r);

  // O += P V: the S accumulator layout of two n-tiles is the A-operand layout of one k-step.
#pragma unroll
  for (int kk = 0; kk < kPrefillTileKeys / 16; ++kk) {
    uint32_t a[4];
    a[0] = PackPair<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = PackPair<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = PackPair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = PackPair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dd = 0; dd < kDTiles / 2; ++dd) {
      uint32_t b[4];
      LdMatrixX4Trans(b, tile_v + TileOffset<HEAD_DIM>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                       dd * 2 + (lane >> 4)));
      Mma16816<T>(r.o[2 * dd], a, b[0], b[1]);
      Mma16816<T>(r.o[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

// Writes the warp's rows as partials (o normalized, lse natural log; a row that saw no key gets o = 0,
// lse = -inf). Row `row` (block row row0 + local row) is query token row / group, head
// kv_head * group + row % group; rows >= total_rows are skipped.
template <int HEAD_DIM>
__device__ __forceinline__ void StorePrefillRows(PrefillRows<HEAD_DIM>& r, int64_t first_row, int64_t total_rows,
                                                 int group, int kv_head, int n_heads, int lane, float* out,
                                                 float* lse) {
  r.l_a += __shfl_xor_sync(0xffffffffu, r.l_a, 1);
  r.l_a += __shfl_xor_sync(0xffffffffu, r.l_a, 2);
  r.l_b += __shfl_xor_sync(0xffffffffu, r.l_b, 1);
  r.l_b += __shfl_xor_sync(0xffffffffu, r.l_b, 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = first_row + (lane >> 2) + half * 8;
    if (row >= total_rows) continue;
    const float l = half == 0 ? r.l_a : r.l_b;
    const float m = half == 0 ? r.m_a : r.m_b;
    const bool empty = l == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / l;
    const int64_t token = row / group;
    const int head = kv_head * group + static_cast<int>(row % group);
    const int64_t out_row = token * n_heads + head;
    float* dst = out + out_row * HEAD_DIM + (lane & 3) * 2;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; ++d) {
      *reinterpret_cast<float2*>(dst + d * 8) = make_float2(r.o[d][2 * half] * inv, r.o[d][2 * half + 1] * inv);
    }
    if ((lane & 3) == 0) lse[out_row] = empty ? -INFINITY : (m + log2f(l)) * kLn2;
  }
}

}  // namespace kvshard
