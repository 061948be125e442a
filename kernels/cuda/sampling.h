// Token sampling on the GPU, so only token ids travel back to the host. The semantics (greedy with
// lowest-id ties, top-k, top-p, the counter-based random stream) are specified in kernels/sampling.h,
// whose SampleTokenCpu is the CPU twin.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "kernels/sampling.h"

namespace kvshard {

// For each of `rows` rows: tokens[r] = the token drawn from logits[r * row_stride .. + vocab) with
// params[r]. logits: fp32; params: TokenSampling [rows] (device); tokens: int32 [rows] (device).
// One block per row; the top-k/top-p cuts are found by bisection on the logits' ordered bit patterns
// (32 passes each, deterministic fixed-order reductions), so no sort is needed.
absl::Status SampleTokensCuda(const float* logits, int64_t row_stride, int vocab, int rows,
                              const TokenSampling* params, int32_t* tokens, cudaStream_t stream);

// In place, for each of `rows` rows: the repetition penalty params[r].repetition_penalty on the distinct
// ids among recent[r * recent_stride .. + recent_counts[r]) (kernels/sampling.h,
// ApplyRepetitionPenaltyCpu; bit-identical). logits: fp32, row r at logits + r * row_stride; recent,
// recent_counts: int32 (device).
absl::Status ApplyRepetitionPenaltyCuda(float* logits, int64_t row_stride, int vocab, int rows,
                                        const int32_t* recent, int recent_stride, const int32_t* recent_counts,
                                        const TokenSampling* params, cudaStream_t stream);

}  // namespace kvshard
