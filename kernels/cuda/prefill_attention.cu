// Causal flash-style prefill attention on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// A block owns 64 rows and one KV head. Rows pack the query heads of the KV head's group: row r is
// query token r / group, head kv_head * group + r % group, so every K/V tile loaded into shared memory
// serves the whole group. Four warps own 16 rows each. K/V tiles of 64 keys are double-buffered with
// cp.async; scores S = Q K^T and the output O += P V run on tensor cores, with the online softmax in
// registers (log2 domain) between them. Shared-memory rows are XOR-swizzled in 16-byte chunks so that
// ldmatrix reads are free of bank conflicts.
#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"

namespace kvshard {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kPrefillWarps = 4;
constexpr int kPrefillThreads = kPrefillWarps * 32;

template <typename T>
struct PrefillParams {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* page_table;
  int64_t page_size;
  int64_t n_queries;
  int64_t n_keys;
  int64_t query_first_position;
  int64_t key_first_position;
  int n_heads;
  int n_kv_heads;
  int group;
  float scale_log2;
  float* out;
  float* lse;
};

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][HEAD_DIM] tile.
template <int HEAD_DIM>
__device__ __forceinline__ int Swizzle(int row, int chunk) {
  return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
}

template <int HEAD_DIM>
constexpr int PrefillSmemBytes() {
  return (kBlockM + 4 * kBlockN) * HEAD_DIM * 2;  // Q, K x2, V x2 of 16-bit values
}

template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(kPrefillThreads) PrefillAttentionKernel(const PrefillParams<T> p) {
  constexpr int kChunks = HEAD_DIM / 8;   // 16-byte chunks per row
  constexpr int kKSteps = HEAD_DIM / 16;  // k-steps of the QK^T product
  constexpr int kDTiles = HEAD_DIM / 8;   // n-tiles of the PV product
  constexpr int kNTiles = kBlockN / 8;    // n-tiles of the QK^T product
  constexpr float kNegInf = -INFINITY;

  extern __shared__ uint4 smem_raw[];
  T* s_q = reinterpret_cast<T*>(smem_raw);
  T* s_k = s_q + kBlockM * HEAD_DIM;
  T* s_v = s_k + 2 * kBlockN * HEAD_DIM;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int kv_head = blockIdx.y;
  const int64_t total_rows = p.n_queries * p.group;
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest rows first
  const int64_t last_row = min(row0 + kBlockM, total_rows) - 1;
  const int64_t first_pos = p.query_first_position + row0 / p.group;
  const int64_t last_pos = p.query_first_position + last_row / p.group;
  // Keys [0, visible) may be seen by some row; keys [0, unmasked) by every row.
  const int64_t visible = max(int64_t{0}, min(p.n_keys, last_pos - p.key_first_position + 1));
  const int64_t unmasked = max(int64_t{0}, min(p.n_keys, first_pos - p.key_first_position + 1));
  const int n_tiles = static_cast<int>((visible + kBlockN - 1) / kBlockN);

  // Q tile: row r -> token (row0 + r) / group, head kv_head * group + (row0 + r) % group.
  for (int i = tid; i < kBlockM * kChunks; i += kPrefillThreads) {
    const int r = i / kChunks;
    const int c = i % kChunks;
    const int64_t row = row0 + r;
    const bool valid = row < total_rows;
    const T* src = p.q;
    if (valid) {
      const int64_t token = row / p.group;
      const int head = kv_head * p.group + static_cast<int>(row % p.group);
      src = p.q + (token * p.n_heads + head) * HEAD_DIM + c * 8;
    }
    CpAsync16(s_q + Swizzle<HEAD_DIM>(r, c), src, valid);
  }

  auto load_kv = [&](int tile, int buffer) {
    const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;
    const int64_t logical_page = key0 / p.page_size;
    const int64_t page = p.page_table != nullptr ? p.page_table[logical_page] : logical_page;
    const int64_t base_row = (page * p.n_kv_heads + kv_head) * p.page_size + (key0 - logical_page * p.page_size);
    T* dst_k = s_k + buffer * kBlockN * HEAD_DIM;
    T* dst_v = s_v + buffer * kBlockN * HEAD_DIM;
    for (int i = tid; i < kBlockN * kChunks; i += kPrefillThreads) {
      const int r = i / kChunks;
      const int c = i % kChunks;
      const bool valid = key0 + r < p.n_keys;
      const int64_t offset = valid ? (base_row + r) * HEAD_DIM + c * 8 : 0;
      CpAsync16(dst_k + Swizzle<HEAD_DIM>(r, c), p.k + offset, valid);
      CpAsync16(dst_v + Swizzle<HEAD_DIM>(r, c), p.v + offset, valid);
    }
  };

  if (n_tiles > 0) load_kv(0, 0);
  CpAsyncCommit();

  // This thread's two rows within the warp's 16: row_a = lane / 4, row_b = row_a + 8.
  const int local_a = warp * 16 + (lane >> 2);
  const int64_t pos_a = p.query_first_position + (row0 + local_a) / p.group;
  const int64_t pos_b = p.query_first_position + (row0 + local_a + 8) / p.group;

  float o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m_a = kNegInf, m_b = kNegInf, l_a = 0.0f, l_b = 0.0f;
  uint32_t q_frag[kKSteps][4];

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buffer = tile & 1;
    if (tile + 1 < n_tiles) {
      load_kv(tile + 1, buffer ^ 1);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        LdMatrixX4(q_frag[kk], s_q + Swizzle<HEAD_DIM>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      }
    }
    const T* tile_k = s_k + buffer * kBlockN * HEAD_DIM;
    const T* tile_v = s_v + buffer * kBlockN * HEAD_DIM;

    float s[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int jj = 0; jj < kNTiles / 2; ++jj) {
        uint32_t b[4];
        LdMatrixX4(b, tile_k + Swizzle<HEAD_DIM>(jj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                 kk * 2 + ((lane >> 3) & 1)));
        Mma16816<T>(s[2 * jj], q_frag[kk], b[0], b[1]);
        Mma16816<T>(s[2 * jj + 1], q_frag[kk], b[2], b[3]);
      }
    }

    const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;
    const bool needs_mask = key0 + kBlockN > unmasked;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float value = s[j][e] * p.scale_log2;
        if (needs_mask) {
          const int64_t key = key0 + j * 8 + (lane & 3) * 2 + (e & 1);
          const int64_t row_pos = e < 2 ? pos_a : pos_b;
          if (key >= p.n_keys || p.key_first_position + key > row_pos) value = kNegInf;
        }
        s[j][e] = value;
      }
    }

    float max_a = m_a, max_b = m_b;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      max_a = fmaxf(max_a, fmaxf(s[j][0], s[j][1]));
      max_b = fmaxf(max_b, fmaxf(s[j][2], s[j][3]));
    }
    max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 1));
    max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 2));
    max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 1));
    max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 2));
    const float base_a = max_a == kNegInf ? 0.0f : max_a;  // guards -inf - (-inf)
    const float base_b = max_b == kNegInf ? 0.0f : max_b;
    const float corr_a = exp2f(m_a - base_a);
    const float corr_b = exp2f(m_b - base_b);
    m_a = max_a;
    m_b = max_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      s[j][0] = exp2f(s[j][0] - base_a);
      s[j][1] = exp2f(s[j][1] - base_a);
      s[j][2] = exp2f(s[j][2] - base_b);
      s[j][3] = exp2f(s[j][3] - base_b);
      sum_a += s[j][0] + s[j][1];
      sum_b += s[j][2] + s[j][3];
    }
    l_a = l_a * corr_a + sum_a;  // per-thread partial; the quad sums at the end
    l_b = l_b * corr_b + sum_b;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o[d][0] *= corr_a;
      o[d][1] *= corr_a;
      o[d][2] *= corr_b;
      o[d][3] *= corr_b;
    }

    // O += P V: the S accumulator layout of two n-tiles is the A-operand layout of one k-step.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = PackPair<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = PackPair<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = PackPair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = PackPair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < kDTiles / 2; ++dd) {
        uint32_t b[4];
        LdMatrixX4Trans(b, tile_v + Swizzle<HEAD_DIM>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                      dd * 2 + (lane >> 4)));
        Mma16816<T>(o[2 * dd], a, b[0], b[1]);
        Mma16816<T>(o[2 * dd + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's loads overwrite the other buffer
  }
  CpAsyncWait<0>();  // n_tiles == 0: the Q copy is still outstanding

  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + local_a + half * 8;
    if (row >= total_rows) continue;
    const float l = half == 0 ? l_a : l_b;
    const float m = half == 0 ? m_a : m_b;
    const bool empty = l == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / l;
    const int64_t token = row / p.group;
    const int head = kv_head * p.group + static_cast<int>(row % p.group);
    const int64_t out_row = token * p.n_heads + head;
    float* dst = p.out + out_row * HEAD_DIM + (lane & 3) * 2;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
    }
    if ((lane & 3) == 0) p.lse[out_row] = empty ? kNegInf : (m + log2f(l)) * kLn2;
  }
}

template <int HEAD_DIM, typename T>
absl::Status LaunchPrefill(const PrefillAttentionArgs& a, cudaStream_t stream) {
  auto kernel = PrefillAttentionKernel<HEAD_DIM, T>;
  constexpr int kSmem = PrefillSmemBytes<HEAD_DIM>();
  static bool configured = false;
  if (!configured) {
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    configured = true;
  }
  const int group = a.n_heads / a.n_kv_heads;
  PrefillParams<T> p;
  p.q = static_cast<const T*>(a.q);
  p.k = static_cast<const T*>(a.kv.k);
  p.v = static_cast<const T*>(a.kv.v);
  p.page_table = a.kv.page_table;
  p.page_size = a.kv.page_size;
  p.n_queries = a.n_queries;
  p.n_keys = a.n_keys;
  p.query_first_position = a.query_first_position;
  p.key_first_position = a.key_first_position;
  p.n_heads = a.n_heads;
  p.n_kv_heads = a.n_kv_heads;
  p.group = group;
  p.scale_log2 = a.scale * kLog2e;
  p.out = a.out;
  p.lse = a.lse;
  const int64_t row_blocks = CeilDiv(a.n_queries * group, kBlockM);
  if (row_blocks > INT_MAX) return absl::InvalidArgumentError("PrefillAttentionCuda: too many queries");
  const dim3 grid(static_cast<unsigned>(row_blocks), a.n_kv_heads);
  kernel<<<grid, kPrefillThreads, kSmem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace

absl::Status PrefillAttentionCuda(const PrefillAttentionArgs& a, cudaStream_t stream) {
  if (a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 || a.n_kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillAttentionCuda: bad heads n_heads=", a.n_heads,
                                                   " n_kv_heads=", a.n_kv_heads));
  }
  if (a.n_queries < 0 || a.n_keys < 0) {
    return absl::InvalidArgumentError("PrefillAttentionCuda: negative n_queries or n_keys");
  }
  if (a.kv.page_size <= 0 || a.kv.page_size % kBlockN != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrefillAttentionCuda: page_size ", a.kv.page_size, " is not a positive multiple of 64"));
  }
  if (a.kv.pages_per_request * a.kv.page_size < a.n_keys) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillAttentionCuda: n_keys ", a.n_keys,
                                                   " exceeds pages_per_request * page_size = ",
                                                   a.kv.pages_per_request * a.kv.page_size));
  }
  if (a.n_queries == 0) return absl::OkStatus();
  if (a.q == nullptr || a.out == nullptr || a.lse == nullptr || a.kv.k == nullptr || a.kv.v == nullptr) {
    return absl::InvalidArgumentError("PrefillAttentionCuda: null pointer");
  }
  return KV_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, {
    return KV_DISPATCH_HALF_TYPE(a.kv.dtype, T, { return LaunchPrefill<HEAD_DIM, T>(a, stream); });
  });
}

}  // namespace kvshard
