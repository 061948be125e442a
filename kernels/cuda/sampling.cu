#include "kernels/cuda/sampling.h"

#include <climits>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / 32;

__device__ __forceinline__ uint32_t KeyOf(float x) { return OrderedFloatKey(__float_as_uint(x)); }

// Greedy: the largest logit, lowest id on ties.
__device__ int32_t BlockArgmax(const float* x, int vocab) {
  float best = -INFINITY;
  int32_t best_id = -1;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
    const float v = x[i];
    if (best_id < 0 || v > best) {
      best = v;
      best_id = i;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int32_t other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    const bool better = other_id >= 0 && (best_id < 0 || other > best || (other == best && other_id < best_id));
    if (better) {
      best = other;
      best_id = other_id;
    }
  }
  __shared__ float warp_best[kSampleWarps];
  __shared__ int32_t warp_id[kSampleWarps];
  if ((threadIdx.x & 31) == 0) {
    warp_best[threadIdx.x >> 5] = best;
    warp_id[threadIdx.x >> 5] = best_id;
  }
  __syncthreads();
  best = warp_best[0];
  best_id = warp_id[0];
  for (int w = 1; w < kSampleWarps; ++w) {
    const bool better =
        warp_id[w] >= 0 && (best_id < 0 || warp_best[w] > best || (warp_best[w] == best && warp_id[w] < best_id));
    if (better) {
      best = warp_best[w];
      best_id = warp_id[w];
    }
  }
  return best_id < 0 ? 0 : best_id;
}

__global__ void __launch_bounds__(kSampleThreads) SampleTokensKernel(const float* __restrict__ logits,
                                                                     int64_t row_stride, int vocab,
                                                                     const TokenSampling* __restrict__ params,
                                                                     int32_t* __restrict__ tokens) {
  const int row = blockIdx.x;
  const float* x = logits + row * row_stride;
  const TokenSampling sp = params[row];
  __shared__ float f_scratch[kSampleWarps];
  __shared__ float scan_scratch[kSampleWarps];
  __shared__ int i_scratch[kSampleWarps];
  __shared__ int32_t chosen;

  if (sp.temperature <= 0.0f) {
    const int32_t token = BlockArgmax(x, vocab);
    if (threadIdx.x == 0) tokens[row] = token;
    return;
  }

  float local_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kSampleThreads) local_max = fmaxf(local_max, x[i]);
  const float max_logit = BlockMax(local_max, f_scratch);
  const float inv_temperature = 1.0f / sp.temperature;

  // top-k: the k-th largest key, built bit by bit (the largest key with count(key >= it) >= k).
  uint32_t cut = 0;
  if (sp.top_k > 0 && sp.top_k < vocab) {
    uint32_t key = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t candidate = key | (1u << bit);
      int count = 0;
      for (int i = threadIdx.x; i < vocab; i += kSampleThreads) count += KeyOf(x[i]) >= candidate;
      if (BlockSumInt(count, i_scratch) >= sp.top_k) key = candidate;
    }
    cut = key;
  }
  // top-p: the largest key whose kept mass (key >= max(it, cut)) is still >= top_p of the kept total.
  if (sp.top_p < 1.0f) {
    float kept = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
      const float v = x[i];
      if (KeyOf(v) >= cut) kept += __expf((v - max_logit) * inv_temperature);
    }
    const float target = sp.top_p * BlockSum(kept, f_scratch);
    uint32_t key = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t candidate = key | (1u << bit);
      const uint32_t bound = candidate > cut ? candidate : cut;
      float mass = 0.0f;
      for (int i = threadIdx.x; i < vocab; i += kSampleThreads) {
        const float v = x[i];
        if (KeyOf(v) >= bound) mass += __expf((v - max_logit) * inv_temperature);
      }
      if (BlockSum(mass, f_scratch) >= target) key = candidate;
    }
    if (key > cut) cut = key;
  }

  // The draw: inverse CDF over the kept tokens in id order. Each thread owns a contiguous id range.
  const int per_thread = (vocab + kSampleThreads - 1) / kSampleThreads;
  const int lo = min(vocab, static_cast<int>(threadIdx.x) * per_thread);
  const int hi = min(vocab, lo + per_thread);
  float my_mass = 0.0f;
  int last_kept = -1;
  for (int i = lo; i < hi; ++i) {
    const float v = x[i];
    if (KeyOf(v) >= cut) {
      my_mass += __expf((v - max_logit) * inv_temperature);
      last_kept = i;
    }
  }
  float total = 0.0f;
  const float prefix = BlockExclusiveSum(my_mass, scan_scratch, &total);
  if (threadIdx.x == 0) chosen = -1;
  __syncthreads();
  const double target = SamplingUniform(sp.seed, sp.step) * static_cast<double>(total);
  const double local_target = target - static_cast<double>(prefix);
  if (my_mass > 0.0f && local_target >= 0.0 && local_target < static_cast<double>(my_mass)) {
    float running = 0.0f;
    for (int i = lo; i < hi; ++i) {
      const float v = x[i];
      if (KeyOf(v) < cut) continue;
      running += __expf((v - max_logit) * inv_temperature);
      if (static_cast<double>(running) > local_target) {
        chosen = i;
        break;
      }
    }
  }
  // Fallback when u * total rounds onto the total: the last kept token.
  int last = last_kept;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) i_scratch[threadIdx.x >> 5] = last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int fallback = 0;
    for (int w = 0; w < kSampleWarps; ++w) fallback = max(fallback, i_scratch[w]);
    tokens[row] = chosen >= 0 ? chosen : fallback;
  }
}

// One thread per row walks the (short) recent list; a later duplicate of an id is skipped, so each
// distinct id is penalized once, in the same order and arithmetic as the CPU twin.
__global__ void RepetitionPenaltyKernel(float* __restrict__ logits, int64_t row_stride, int vocab, int rows,
                                        const int32_t* __restrict__ recent, int recent_stride,
                                        const int32_t* __restrict__ recent_counts,
                                        const TokenSampling* __restrict__ params) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float penalty = params[row].repetition_penalty;
  if (penalty == 1.0f) return;
  const int32_t* ids = recent + static_cast<int64_t>(row) * recent_stride;
  float* x = logits + row * row_stride;
  const int n = recent_counts[row];
  for (int i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= vocab) continue;
    bool seen = false;
    for (int j = 0; j < i && !seen; ++j) seen = ids[j] == id;
    if (seen) continue;
    const float l = x[id];
    x[id] = l > 0 ? __fdiv_rn(l, penalty) : __fmul_rn(l, penalty);  // IEEE division even under fast math
  }
}

constexpr int kLogProbabilityThreads = 512;

__global__ void __launch_bounds__(kLogProbabilityThreads)
    TargetLogProbabilitiesKernel(const float* __restrict__ logits, int64_t row_stride, int vocab,
                                 const int32_t* __restrict__ targets, float* __restrict__ log_probabilities) {
  __shared__ float scratch[kLogProbabilityThreads / 32];
  const float* x = logits + static_cast<int64_t>(blockIdx.x) * row_stride;
  float local_max = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) local_max = fmaxf(local_max, x[i]);
  const float max_logit = BlockReduce(local_max, scratch, WarpMaxOp{}, MaxOp{});
  float local_sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) local_sum += expf(x[i] - max_logit);
  const float sum = BlockSum(local_sum, scratch);
  if (threadIdx.x == 0) {
    const int32_t target = targets[blockIdx.x];
    log_probabilities[blockIdx.x] =
        (target >= 0 && target < vocab) ? x[target] - max_logit - logf(sum) : __int_as_float(0x7fc00000);
  }
}

}  // namespace

absl::Status ApplyRepetitionPenaltyCuda(float* logits, int64_t row_stride, int vocab, int rows,
                                        const int32_t* recent, int recent_stride, const int32_t* recent_counts,
                                        const TokenSampling* params, cudaStream_t stream) {
  if (vocab <= 0 || rows < 0 || row_stride < vocab || recent_stride < 0) {
    return absl::InvalidArgumentError(absl::StrCat("ApplyRepetitionPenaltyCuda: bad shape vocab=", vocab,
                                                   " rows=", rows, " row_stride=", row_stride));
  }
  if (rows == 0) return absl::OkStatus();
  RepetitionPenaltyKernel<<<(rows + 127) / 128, 128, 0, stream>>>(logits, row_stride, vocab, rows, recent,
                                                                   recent_stride, recent_counts, params);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status SampleTokensCuda(const float* logits, int64_t row_stride, int vocab, int rows,
                              const TokenSampling* params, int32_t* tokens, cudaStream_t stream) {
  if (vocab <= 0 || rows < 0 || row_stride < vocab) {
    return absl::InvalidArgumentError(absl::StrCat("SampleTokensCuda: bad shape vocab=", vocab, " rows=", rows,
                                                   " row_stride=", row_stride));
  }
  if (rows == 0) return absl::OkStatus();
  SampleTokensKernel<<<rows, kSampleThreads, 0, stream>>>(logits, row_stride, vocab, params, tokens);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status TargetLogProbabilitiesCuda(const float* logits, int64_t row_stride, int vocab, int rows,
                                        const int32_t* targets, float* log_probabilities, cudaStream_t stream) {
  if (vocab <= 0 || rows < 0 || row_stride < vocab) {
    return absl::InvalidArgumentError(absl::StrCat("TargetLogProbabilitiesCuda: bad shape vocab=", vocab,
                                                   " rows=", rows, " row_stride=", row_stride));
  }
  if (rows == 0) return absl::OkStatus();
  TargetLogProbabilitiesKernel<<<rows, kLogProbabilityThreads, 0, stream>>>(logits, row_stride, vocab, targets,
                                                                            log_probabilities);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvshard
