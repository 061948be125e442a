// Causal flash-style prefill attention on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// A block owns 64 rows and one KV head. Rows pack the query heads of the KV head's group: row r is
// query token r / group, head kv_head * group + r % group, so every K/V tile loaded into shared memory
// serves the whole group. Four warps own 16 rows each. K/V tiles of 64 keys are double-buffered with
// cp.async; scores S = Q K^T and the output O += P V run on tensor cores, with the online softmax in
// registers (log2 domain) between them (prefill_tile.cuh, shared with the kvq3 kernel).
#include <algorithm>
#include <climits>
#include <cmath>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/prefill_tile.cuh"

namespace kvshard {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = kPrefillTileKeys;
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

template <int HEAD_DIM>
constexpr int PrefillSmemBytes() {
  return (kBlockM + 4 * kBlockN) * HEAD_DIM * 2;  // Q, K x2, V x2 of 16-bit values
}

template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(kPrefillThreads) PrefillAttentionKernel(const PrefillParams<T> p) {
  constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row

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

  LoadQueryTileAsync<HEAD_DIM, kBlockM, kPrefillThreads>(s_q, p.q, row0, total_rows, p.group, kv_head, p.n_heads, tid);

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
      CpAsync16(dst_k + TileOffset<HEAD_DIM>(r, c), p.k + offset, valid);
      CpAsync16(dst_v + TileOffset<HEAD_DIM>(r, c), p.v + offset, valid);
    }
  };

  if (n_tiles > 0) load_kv(0, 0);
  CpAsyncCommit();

  const PrefillRowPositions pos = RowPositions(p.query_first_position, row0, p.group, warp, lane);

  PrefillRows<HEAD_DIM> rows;
  rows.Init();
  uint32_t q_frag[HEAD_DIM / 16][4];

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
    if (tile == 0) LoadQueryFragments<HEAD_DIM>(s_q, warp * 16, lane, q_frag);
    const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;
    const auto masked = [&](int key, int upper) {
      const int64_t k = key0 + key;
      return k >= p.n_keys || p.key_first_position + k > (upper ? pos.b : pos.a);
    };
    PrefillTileStep<HEAD_DIM, T>(q_frag, s_k + buffer * kBlockN * HEAD_DIM, s_v + buffer * kBlockN * HEAD_DIM,
                                 p.scale_log2, key0 + kBlockN > unmasked, masked, lane, rows);
    __syncthreads();  // the next iteration's loads overwrite the other buffer
  }
  CpAsyncWait<0>();  // n_tiles == 0: the Q copy is still outstanding
  StorePrefillRows<HEAD_DIM>(rows, row0 + warp * 16, total_rows, p.group, kv_head, p.n_heads, lane, p.out, p.lse);
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
