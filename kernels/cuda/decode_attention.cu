// Split-KV decode attention over an fp16/bf16 paged KV cache, and the merge of partials.
//
// Decode reads every K/V byte of the batch once, so it is bound by memory bandwidth. One thread block
// owns (request, KV head, group tile of query heads, KV split). Its four warps stride over the split's
// tokens; within a warp, HEAD_DIM/8 lanes share one token (one 16-byte load each, so a warp load moves
// 512 contiguous bytes), and each warp keeps UNROLL loads of K and V in flight before it uses them. The
// query group's vectors stay in registers, so one read of a K/V row serves every query head of the group.
// Each lane group keeps its own online-softmax state (log2 domain); the block combines them in shared
// memory, and MergePartialsCuda combines the splits.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <limits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMaxDecodeSplits = 128;
constexpr int64_t kSplitAlign = 64;        // split boundaries (and page sizes) are multiples of this
// A split below this many bytes of K/V per block costs more in fixed per-block work than it gains in
// parallelism (measured on H100: see bench/RESULTS.md, the batch-1 split sweep).
constexpr int64_t kMinSplitBytes = 128 << 10;
constexpr int64_t kBlockOverheadTokens = 64;  // fixed cost of a block, in token-reads (planning only)

template <typename T>
struct DecodeParams {
  const float* q;
  int64_t q_stride;  // floats between requests' query rows
  const T* k;
  const T* v;
  const int32_t* page_table;
  const int32_t* page_rows;
  int64_t pages_per_request;
  int64_t page_size;
  const int32_t* kv_lens;
  int n_heads;
  int n_kv_heads;
  int group;
  int n_group_tiles;
  float scale_log2;
  int64_t split_tokens;
  int num_splits;
  float* out;  // [num_splits][rows][HEAD_DIM] when num_splits > 1, else the final [rows][HEAD_DIM]
  float* lse;  // [num_splits][rows]
  int64_t rows;
};

// Query heads held in registers per block: 4 covers Llama-3 (group 4) and SmolLM2 (group 3); larger
// groups use 8 (fewer loads in flight, to stay within registers).
template <int GROUP_TILE>
constexpr int DecodeUnroll() {
  return GROUP_TILE <= 4 ? 8 : 4;
}

// Blocks per SM the register budget is capped for: three (168 registers, no spills) keep 12 warps'
// loads in flight per SM; the 8-head group tile needs more registers and gets two.
template <int GROUP_TILE>
constexpr int DecodeMinBlocksPerSm() {
  return GROUP_TILE <= 4 ? 3 : 2;
}

template <int HEAD_DIM, typename T, int GROUP_TILE>
__global__ void __launch_bounds__(kDecodeThreads, DecodeMinBlocksPerSm<GROUP_TILE>()) DecodeAttentionKernel(const DecodeParams<T> p) {
  constexpr int kVec = 8;                        // 16 bytes of 16-bit values
  constexpr int kLanesPerToken = HEAD_DIM / kVec;  // 16 (d=128) or 8 (d=64)
  constexpr int kTokensPerLoad = 32 / kLanesPerToken;
  constexpr int kUnroll = DecodeUnroll<GROUP_TILE>();
  constexpr int kSpan = kUnroll * kTokensPerLoad;  // tokens per warp iteration; divides kSplitAlign
  constexpr int kStates = kDecodeWarps * kTokensPerLoad;
  static_assert(kSplitAlign % kSpan == 0, "a warp iteration must not straddle a page");
  constexpr float kNegInf = -INFINITY;

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.n_group_tiles;
  const int g0 = (blockIdx.y % p.n_group_tiles) * GROUP_TILE;
  const int request = blockIdx.z;
  const int n_group = min(GROUP_TILE, p.group - g0);
  const int first_head = kv_head * p.group + g0;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int slot = lane / kLanesPerToken;
  const int channel0 = (lane % kLanesPerToken) * kVec;

  const int64_t kv_len = p.kv_lens[request];
  const int64_t start = static_cast<int64_t>(split) * p.split_tokens;
  const int64_t end = min(kv_len, start + p.split_tokens);

  float q[GROUP_TILE][kVec];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    if (g < n_group) {
      const float4* qp = reinterpret_cast<const float4*>(
          p.q + static_cast<int64_t>(request) * p.q_stride + (first_head + g) * HEAD_DIM + channel0);
      const float4 a = qp[0];
      const float4 b = qp[1];
      q[g][0] = a.x * p.scale_log2;
      q[g][1] = a.y * p.scale_log2;
      q[g][2] = a.z * p.scale_log2;
      q[g][3] = a.w * p.scale_log2;
      q[g][4] = b.x * p.scale_log2;
      q[g][5] = b.y * p.scale_log2;
      q[g][6] = b.z * p.scale_log2;
      q[g][7] = b.w * p.scale_log2;
    } else {
#pragma unroll
      for (int c = 0; c < kVec; ++c) q[g][c] = 0.0f;
    }
  }

  float m[GROUP_TILE];
  float l[GROUP_TILE];
  float acc[GROUP_TILE][kVec];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < kVec; ++c) acc[g][c] = 0.0f;
  }

  for (int64_t t0 = start + static_cast<int64_t>(warp) * kSpan; t0 < end; t0 += kDecodeWarps * kSpan) {
    const int64_t logical_page = t0 / p.page_size;
    const int64_t page_row = p.page_rows != nullptr ? p.page_rows[request] : request;
    const int64_t page_slot = page_row * p.pages_per_request + logical_page;
    const int64_t page = p.page_table != nullptr ? p.page_table[page_slot] : page_slot;
    const int64_t row0 = (page * p.n_kv_heads + kv_head) * p.page_size + (t0 - logical_page * p.page_size);
    const T* kp = p.k + (row0 + slot) * HEAD_DIM + channel0;
    const T* vp = p.v + (row0 + slot) * HEAD_DIM + channel0;

    uint4 k_raw[kUnroll];
    uint4 v_raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = t0 + u * kTokensPerLoad + slot < end;
      k_raw[u] = valid ? LoadStreaming16(kp + u * kTokensPerLoad * HEAD_DIM) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = t0 + u * kTokensPerLoad + slot < end;
      v_raw[u] = valid ? LoadStreaming16(vp + u * kTokensPerLoad * HEAD_DIM) : make_uint4(0, 0, 0, 0);
    }

    float s[kUnroll][GROUP_TILE];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[kVec];
      Unpack8<T>(k_raw[u], kf);
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kVec; ++c) dot = fmaf(q[g][c], kf[c], dot);
        s[u][g] = dot;
      }
    }
    // Sum each token's partial dot products over its lane group (butterfly: every lane gets the sum).
#pragma unroll
    for (int offset = kLanesPerToken / 2; offset > 0; offset >>= 1) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int g = 0; g < GROUP_TILE; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], offset);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (t0 + u * kTokensPerLoad + slot >= end) {
#pragma unroll
        for (int g = 0; g < GROUP_TILE; ++g) s[u][g] = kNegInf;
      }
    }

#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      float new_max = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) new_max = fmaxf(new_max, s[u][g]);
      const float base = new_max == kNegInf ? 0.0f : new_max;  // guards -inf - (-inf)
      const float correction = exp2f(m[g] - base);
      m[g] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        s[u][g] = exp2f(s[u][g] - base);
        sum += s[u][g];
      }
      l[g] = l[g] * correction + sum;
#pragma unroll
      for (int c = 0; c < kVec; ++c) acc[g][c] *= correction;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[kVec];
      Unpack8<T>(v_raw[u], vf);
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g)
#pragma unroll
        for (int c = 0; c < kVec; ++c) acc[g][c] = fmaf(s[u][g], vf[c], acc[g][c]);
    }
  }

  // Combine the block's kStates softmax states.
  __shared__ float state_max[kStates][GROUP_TILE];
  __shared__ float state_sum[kStates][GROUP_TILE];
  __shared__ __align__(16) float state_acc[kStates][GROUP_TILE][HEAD_DIM];
  const int state = warp * kTokensPerLoad + slot;
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    float4* dst = reinterpret_cast<float4*>(&state_acc[state][g][channel0]);
    dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    if (lane % kLanesPerToken == 0) {
      state_max[state][g] = m[g];
      state_sum[state][g] = l[g];
    }
  }
  __syncthreads();

  const int out_split = p.num_splits > 1 ? split : 0;
  for (int idx = threadIdx.x; idx < n_group * HEAD_DIM; idx += kDecodeThreads) {
    const int g = idx / HEAD_DIM;
    const int c = idx % HEAD_DIM;
    float max_all = kNegInf;
#pragma unroll
    for (int st = 0; st < kStates; ++st) max_all = fmaxf(max_all, state_max[st][g]);
    float total = 0.0f;
    float value = 0.0f;
    if (max_all != kNegInf) {
#pragma unroll
      for (int st = 0; st < kStates; ++st) {
        const float w = exp2f(state_max[st][g] - max_all);
        total = fmaf(state_sum[st][g], w, total);
        value = fmaf(state_acc[st][g][c], w, value);
      }
    }
    const int64_t row = static_cast<int64_t>(request) * p.n_heads + first_head + g;
    const int64_t out_row = static_cast<int64_t>(out_split) * p.rows + row;
    const bool empty = total == 0.0f;
    p.out[out_row * HEAD_DIM + c] = empty ? 0.0f : value / total;
    if (c == 0) p.lse[out_row] = empty ? kNegInf : (max_all + log2f(total)) * kLn2;
  }
}

absl::Status ValidateDecode(const DecodeAttentionArgs& a) {
  if (a.batch < 0 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttentionCuda: bad heads n_heads=", a.n_heads,
                                                   " n_kv_heads=", a.n_kv_heads, " batch=", a.batch));
  }
  if (a.batch > 65535) return absl::InvalidArgumentError("DecodeAttentionCuda: batch over 65535");
  if (a.kv.page_size <= 0 || a.kv.page_size % kSplitAlign != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttentionCuda: page_size ", a.kv.page_size, " is not a positive multiple of 64"));
  }
  if (a.max_kv_len < 0 || a.kv.pages_per_request * a.kv.page_size < a.max_kv_len) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttentionCuda: max_kv_len ", a.max_kv_len,
                                                   " exceeds pages_per_request * page_size = ",
                                                   a.kv.pages_per_request * a.kv.page_size));
  }
  if (a.q_row_stride != 0 && (a.q_row_stride < static_cast<int64_t>(a.n_heads) * a.head_dim || a.q_row_stride % 4 != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttentionCuda: q_row_stride ", a.q_row_stride,
                                                   " is not 0 or a multiple of 4 of at least n_heads * head_dim"));
  }
  if (a.batch > 0 && (a.q == nullptr || a.out == nullptr || a.lse == nullptr || a.kv_lens == nullptr ||
                      a.kv.k == nullptr || a.kv.v == nullptr)) {
    return absl::InvalidArgumentError("DecodeAttentionCuda: null pointer");
  }
  return absl::OkStatus();
}

struct DecodePlan {
  int splits = 1;
  int64_t split_tokens = 0;
};

// Picks the split count that minimises an estimate of the kernel's time in token-reads per block slot:
// the waves of blocks times each block's tokens, plus the partials written and merged.
DecodePlan PlanDecode(const DecodeAttentionArgs& a, int group_tile, int blocks_per_sm, int sm_count) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t base_blocks = static_cast<int64_t>(a.batch) * a.n_kv_heads * CeilDiv(group, group_tile);
  const int64_t capacity = std::max<int64_t>(1, static_cast<int64_t>(blocks_per_sm) * sm_count);
  const int64_t max_len = std::max<int64_t>(a.max_kv_len, 1);
  const int64_t min_split_tokens = std::max<int64_t>(kSplitAlign, kMinSplitBytes / (4 * a.head_dim));
  int64_t limit = std::min<int64_t>(kMaxDecodeSplits, CeilDiv(max_len, min_split_tokens));
  if (a.max_splits > 0) limit = std::min<int64_t>(limit, a.max_splits);
  const int64_t partial_bytes = static_cast<int64_t>(a.batch) * a.n_heads * (a.head_dim + 1) * 4;
  if (partial_bytes > 0) limit = std::min<int64_t>(limit, a.workspace_bytes / partial_bytes);
  limit = std::max<int64_t>(limit, 1);
  DecodePlan best;
  double best_cost = -1.0;
  for (int64_t s = 1; s <= limit; ++s) {
    const int64_t chunk = CeilDiv(CeilDiv(max_len, s), kSplitAlign) * kSplitAlign;
    if (s > 1 && (s - 1) * chunk >= max_len) continue;  // the last split would be empty for every request
    const double waves = static_cast<double>(CeilDiv(base_blocks * s, capacity));
    double cost = waves * static_cast<double>(chunk + kBlockOverheadTokens);
    if (s > 1) cost += static_cast<double>(base_blocks * s * 2 * group_tile) / capacity + kBlockOverheadTokens;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best.splits = static_cast<int>(s);
      best.split_tokens = chunk;
    }
  }
  return best;
}

template <int HEAD_DIM, typename T, int GROUP_TILE>
absl::Status LaunchDecode(const DecodeAttentionArgs& a, cudaStream_t stream, int* splits_only) {
  auto kernel = DecodeAttentionKernel<HEAD_DIM, T, GROUP_TILE>;
  static int blocks_per_sm = 0;  // per instantiation; the same on every device of one kind
  if (blocks_per_sm == 0) {
    CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kDecodeThreads, 0));
  }
  int device = 0;
  int sm_count = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const DecodePlan plan = PlanDecode(a, GROUP_TILE, blocks_per_sm, sm_count);
  if (splits_only != nullptr) {
    *splits_only = plan.splits;
    return absl::OkStatus();
  }
  if (a.batch == 0) return absl::OkStatus();
  const int group = a.n_heads / a.n_kv_heads;
  DecodeParams<T> p;
  p.q = a.q;
  p.q_stride = a.q_row_stride != 0 ? a.q_row_stride : static_cast<int64_t>(a.n_heads) * a.head_dim;
  p.k = static_cast<const T*>(a.kv.k);
  p.v = static_cast<const T*>(a.kv.v);
  p.page_table = a.kv.page_table;
  p.page_rows = a.page_rows;
  p.pages_per_request = a.kv.pages_per_request;
  p.page_size = a.kv.page_size;
  p.kv_lens = a.kv_lens;
  p.n_heads = a.n_heads;
  p.n_kv_heads = a.n_kv_heads;
  p.group = group;
  p.n_group_tiles = static_cast<int>(CeilDiv(group, GROUP_TILE));
  p.scale_log2 = a.scale * kLog2e;
  p.split_tokens = std::max<int64_t>(plan.split_tokens, kSplitAlign);
  p.num_splits = plan.splits;
  p.rows = static_cast<int64_t>(a.batch) * a.n_heads;
  float* partial_out = static_cast<float*>(a.workspace);
  float* partial_lse = partial_out + static_cast<int64_t>(plan.splits) * p.rows * HEAD_DIM;
  p.out = plan.splits > 1 ? partial_out : a.out;
  p.lse = plan.splits > 1 ? partial_lse : a.lse;
  const int64_t grid_y = static_cast<int64_t>(a.n_kv_heads) * p.n_group_tiles;
  if (grid_y > 65535) return absl::InvalidArgumentError("DecodeAttentionCuda: too many KV heads");
  const dim3 grid(plan.splits, static_cast<unsigned>(grid_y), a.batch);
  kernel<<<grid, kDecodeThreads, 0, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  if (plan.splits > 1) {
    return MergePartialsCuda(partial_out, partial_lse, plan.splits, p.rows, HEAD_DIM, a.out, a.lse, stream);
  }
  return absl::OkStatus();
}

absl::Status DispatchDecode(const DecodeAttentionArgs& a, cudaStream_t stream, int* splits_only) {
  if (absl::Status s = ValidateDecode(a); !s.ok()) return s;
  const int group = a.n_heads / a.n_kv_heads;
  return KV_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, {
    return KV_DISPATCH_HALF_TYPE(a.kv.dtype, T, {
      if (group <= 4) return LaunchDecode<HEAD_DIM, T, 4>(a, stream, splits_only);
#if !defined(KVSHARD_QUICK_KERNELS)
      return LaunchDecode<HEAD_DIM, T, 8>(a, stream, splits_only);
#else
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeAttentionCuda: query group ", group, " > 4 is not built (KVSHARD_QUICK_KERNELS)"));
#endif
    });
  });
}

}  // namespace

int64_t DecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim) {
  return static_cast<int64_t>(kMaxDecodeSplits) * batch * n_heads * (head_dim + 1) * 4;
}

absl::Status DecodeAttentionCuda(const DecodeAttentionArgs& args, cudaStream_t stream) {
  return DispatchDecode(args, stream, nullptr);
}

int DecodeAttentionSplits(const DecodeAttentionArgs& args) {
  int splits = 0;
  if (!DispatchDecode(args, nullptr, &splits).ok()) return 0;
  return splits;
}

}  // namespace kvshard
