// Causal flash-style prefill attention on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// A block owns 64 rows and one KV head. Rows pack the query heads of the KV head's group: row r is
// query token r / group, head kv_head * group + r % group, so every K/V tile loaded into shared memory
// serves the whole group. Four warps own 16 rows each. K/V tiles of 64 keys are double-buffered with
// cp.async; scores S = Q K^T and the output O += P V run on tensor cores, with the online softmax in
// registers (log2 domain) between them (prefill_tile.cuh, shared with the kvq3 kernel).
//
// On Hopper (compute capability 9.x) a second kernel runs instead: warpgroup MMAs (wgmma.mma_async) over
// 128-byte swizzled tiles. A block owns 128 rows (two warpgroups of 64) and walks K/V tiles of 128 keys
// loaded with cp.async (K double-, V triple-buffered); S = Q K^T takes Q and K from shared memory, O += P V
// takes P from registers and V from shared memory read transposed. Each step issues its tile's S with the
// previous tile's P V, so the softmax (the same code as above) runs while P V is on the tensor cores.
#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "absl/status/statusor.h"
#include "common/status.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/prefill_tile.cuh"
#include "kernels/cuda/wgmma.cuh"

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
  const PrefillBlockSpan span =
      BlockSpan(kBlockM, total_rows, p.group, p.query_first_position, p.key_first_position, p.n_keys);
  const int64_t row0 = span.row0, unmasked = span.unmasked;
  const int n_tiles = static_cast<int>((span.visible + kBlockN - 1) / kBlockN);

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

// ---- Hopper: warpgroup MMAs ----
constexpr int kWgmmaRows = 128;  // two warpgroups of 64 rows
constexpr int kWgmmaKeys = 128;  // keys per K/V tile
constexpr int kWgmmaThreads = 256;

// Shared memory (bytes from a 1024-byte aligned base): Q [128 rows][HEAD_DIM], then two K tiles and three
// V tiles [128 keys][HEAD_DIM] (tile t's P V runs during tile t + 1, while tile t + 2 loads), each in
// 128-byte swizzled panels of 64 columns (wgmma.cuh).
template <int HEAD_DIM>
struct WgmmaPrefillSmem {
  static constexpr int kPanelBytes = 128 * 128;  // 128 rows of 64 16-bit values
  static constexpr int kTileBytes = kWgmmaKeys * HEAD_DIM * 2;
  static constexpr int kKStages = 2;
  static constexpr int kVStages = 3;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kWgmmaRows * HEAD_DIM * 2;
  static constexpr int kV = kK + kKStages * kTileBytes;
  static constexpr int kTotal = kV + kVStages * kTileBytes + 1024;  // + room to align the base
};

template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(kWgmmaThreads, 1) PrefillAttentionWgmmaKernel(const PrefillParams<T> p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = WgmmaPrefillSmem<HEAD_DIM>;
  constexpr int kChunks = HEAD_DIM / 8;   // 16-byte chunks per row
  constexpr int kKSteps = HEAD_DIM / 16;  // k-steps of S = Q K^T
  constexpr int kNTiles = kWgmmaKeys / 8; // accumulator tiles of S

  extern __shared__ uint4 smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_raw) + ((1024 - (raw_address & 1023)) & 1023);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int warpgroup = warp >> 2;
  const int kv_head = blockIdx.y;
  const int64_t total_rows = p.n_queries * p.group;
  const PrefillBlockSpan span =
      BlockSpan(kWgmmaRows, total_rows, p.group, p.query_first_position, p.key_first_position, p.n_keys);
  const int64_t row0 = span.row0, unmasked = span.unmasked;
  const int n_tiles = static_cast<int>((span.visible + kWgmmaKeys - 1) / kWgmmaKeys);

  LoadQueryRowsAsync<HEAD_DIM, kWgmmaRows, kWgmmaThreads>(
      [&](int r, int c) { return smem + L::kQ + Swizzle128Offset(r, c, kWgmmaRows); }, p.q, row0, total_rows, p.group,
      kv_head, p.n_heads, tid);

  // K/V tiles load in order, so the page of the next tile's first key is tracked instead of divided out.
  // A tile's two halves of 64 keys each lie inside one page (page_size is a multiple of 64). Thread tid
  // copies chunk tid % kChunks of rows tid / kChunks + kRowStep j.
  constexpr int kRowStep = kWgmmaThreads / kChunks;
  constexpr int kLoadsPerThread = kWgmmaKeys / kRowStep;
  static_assert(64 % kRowStep == 0, "a thread's rows split evenly between the halves");
  const int load_row = tid / kChunks;
  const int load_at = Swizzle128Offset(load_row, tid % kChunks, kWgmmaKeys);  // + kRowStep * 128 per row step
  const int64_t load_column = static_cast<int64_t>(load_row) * HEAD_DIM + (tid % kChunks) * 8;
  int64_t next_page = 0, next_offset = 0;  // logical page and row in it of the next half to load
  const auto next_half = [&]() -> int64_t {  // cache row of the next half's first key; advances
    const int64_t page = p.page_table != nullptr ? p.page_table[next_page] : next_page;
    const int64_t row = (page * p.n_kv_heads + kv_head) * p.page_size + next_offset;
    next_offset += 64;
    if (next_offset == p.page_size) {
      next_offset = 0;
      ++next_page;
    }
    return row;
  };
  auto load_kv = [&](int tile) {
    const int64_t key0 = static_cast<int64_t>(tile) * kWgmmaKeys;  // < n_keys
    const int64_t lower = next_half();
    const int64_t upper = key0 + 64 < p.n_keys ? next_half() : lower;
    unsigned char* dst_k = smem + L::kK + (tile % L::kKStages) * L::kTileBytes + load_at;
    unsigned char* dst_v = smem + L::kV + (tile % L::kVStages) * L::kTileBytes + load_at;
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      constexpr int kUpperFrom = 64 / kRowStep;  // steps j >= this copy rows of the upper half
      const bool valid = key0 + load_row + j * kRowStep < p.n_keys;
      const int64_t offset = (j < kUpperFrom ? lower * HEAD_DIM + j * kRowStep * HEAD_DIM
                                             : upper * HEAD_DIM + (j - kUpperFrom) * kRowStep * HEAD_DIM) +
                             load_column;
      CpAsync16(dst_k + j * kRowStep * 128, valid ? p.k + offset : p.k, valid);
      CpAsync16(dst_v + j * kRowStep * 128, valid ? p.v + offset : p.v, valid);
    }
  };

  if (n_tiles > 0) load_kv(0);
  CpAsyncCommit();

  const PrefillRowPositions pos = RowPositions(p.query_first_position, row0, p.group, warp, lane);
  PrefillRows<HEAD_DIM> rows;
  rows.Init();
  const unsigned char* q_rows = smem + L::kQ + warpgroup * 64 * 128;  // this warpgroup's 64 rows, panel 0

  // O += P V of tile `tile` (P in registers, relative to the running maxima of that tile), issued.
  uint32_t pa[kWgmmaKeys / 16][4];
  const auto issue_pv = [&](int tile) {
    const unsigned char* tile_v = smem + L::kV + (tile % L::kVStages) * L::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < kWgmmaKeys / 16; ++kk) {
      const uint64_t desc_v = SmemDescriptor128(tile_v + kk * 16 * 128, L::kPanelBytes, 1024);
      if constexpr (HEAD_DIM == 128) {
        WgmmaM64N128RS<T, 1>(rows.o, pa[kk], desc_v, 1);
      } else {
        WgmmaM64N64RS<T, 1>(rows.o, pa[kk], desc_v, 1);
      }
    }
  };

  // Each step issues S = Q K^T of this tile and the previous tile's P V together; the softmax of this tile
  // runs while that P V is on the tensor cores, and the output is rescaled after it. (The first step, without
  // a P V, is a separate instance: a branch around the MMAs would make the compiler serialize them.)
  const auto step = [&](int tile, auto with_pv) {
    CpAsyncWait<0>();  // this tile (and, at tile 0, Q)
    FenceProxyAsyncShared();
    __syncthreads();   // every copy landed; no warpgroup reads the buffers the next loads overwrite

    const unsigned char* tile_k = smem + L::kK + (tile % L::kKStages) * L::kTileBytes;
    float s[kNTiles][4];
    WgmmaFenceOperands(rows.o);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const int at = (kk >> 2) * L::kPanelBytes + (kk & 3) * 32;  // panel, then 16 values of 2 bytes
      WgmmaM64N128SS<T>(s, SmemDescriptor128(q_rows + at, 16, 1024), SmemDescriptor128(tile_k + at, 16, 1024),
                        kk > 0);
    }
    WgmmaCommit();
    if constexpr (decltype(with_pv)::value) issue_pv(tile - 1);
    WgmmaCommit();
    if (tile + 1 < n_tiles) load_kv(tile + 1);  // the next tile's copies go out while the MMAs run
    CpAsyncCommit();
    WgmmaWait<1>();  // S of this tile
    WgmmaFenceOperands(s);

    const int64_t key0 = static_cast<int64_t>(tile) * kWgmmaKeys;
    const auto masked = [&](int key, int upper) {
      const int64_t k = key0 + key;
      return k >= p.n_keys || p.key_first_position + k > (upper ? pos.b : pos.a);
    };
    float corr_a, corr_b;
    PrefillSoftmax<HEAD_DIM, kNTiles, decltype(masked), /*RESCALE=*/false>(
        s, p.scale_log2, key0 + kWgmmaKeys > unmasked, masked, lane, rows, &corr_a, &corr_b);
    WgmmaWait<0>();  // the previous tile's P V, and with it the use of pa
    WgmmaFenceOperands(rows.o);
#pragma unroll
    for (int kk = 0; kk < kWgmmaKeys / 16; ++kk) {
      pa[kk][0] = PackPair<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = PackPair<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = PackPair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = PackPair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    rows.Rescale(corr_a, corr_b);
  };
  if (n_tiles > 0) {
    step(0, std::false_type{});
    for (int tile = 1; tile < n_tiles; ++tile) step(tile, std::true_type{});
    WgmmaFenceOperands(rows.o);
    WgmmaFence();
    issue_pv(n_tiles - 1);
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaFenceOperands(rows.o);
  }
  CpAsyncWait<0>();  // n_tiles == 0: the Q copy is still outstanding
  StorePrefillRows<HEAD_DIM>(rows, row0 + warp * 16, total_rows, p.group, kv_head, p.n_heads, lane, p.out, p.lse);
#else
  __trap();  // built without sm_90a (CMakeLists.txt refuses such a Hopper target): fail loudly, not silently
#endif
}

template <int HEAD_DIM, typename T>
absl::Status LaunchPrefill(const PrefillAttentionArgs& a, bool wgmma, cudaStream_t stream) {
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
  const int rows_per_block = wgmma ? kWgmmaRows : kBlockM;
  const int64_t row_blocks = CeilDiv(a.n_queries * group, rows_per_block);
  if (row_blocks > INT_MAX) return absl::InvalidArgumentError("PrefillAttentionCuda: too many queries");
  const dim3 grid(static_cast<unsigned>(row_blocks), a.n_kv_heads);
  if (wgmma) {
    static bool configured = false;
    constexpr int kSmem = WgmmaPrefillSmem<HEAD_DIM>::kTotal;
    KV_RETURN_IF_ERROR(AllowSharedMemory(PrefillAttentionWgmmaKernel<HEAD_DIM, T>, kSmem, &configured));
    PrefillAttentionWgmmaKernel<HEAD_DIM, T><<<grid, kWgmmaThreads, kSmem, stream>>>(p);
  } else {
    static bool configured = false;
    constexpr int kSmem = PrefillSmemBytes<HEAD_DIM>();
    KV_RETURN_IF_ERROR(AllowSharedMemory(PrefillAttentionKernel<HEAD_DIM, T>, kSmem, &configured));
    PrefillAttentionKernel<HEAD_DIM, T><<<grid, kPrefillThreads, kSmem, stream>>>(p);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// Whether the current device runs the warpgroup-MMA kernel (compute capability 9.x).
absl::StatusOr<bool> DeviceHasWgmma() {
  int device = 0, major = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
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
  bool wgmma = false;
  if (a.kernel != PrefillKernel::kMmaSync) {
    absl::StatusOr<bool> has_wgmma = DeviceHasWgmma();
    if (!has_wgmma.ok()) return has_wgmma.status();
    if (a.kernel == PrefillKernel::kWgmma && !*has_wgmma) {
      return absl::FailedPreconditionError(
          "PrefillAttentionCuda: the wgmma kernel needs a GPU of compute capability 9.x (Hopper)");
    }
    wgmma = *has_wgmma;
  }
  return KV_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, {
    return KV_DISPATCH_HALF_TYPE(a.kv.dtype, T, { return LaunchPrefill<HEAD_DIM, T>(a, wgmma, stream); });
  });
}

}  // namespace kvshard
