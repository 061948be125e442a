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

// For each of `rows` rows: log_probabilities[r] = log softmax(logits[r * row_stride .. + vocab))[targets[r]]
// (natural log; CPU twin TargetLogProbabilityCpu, which sums in double: this kernel sums exp in fp32 per
// thread and combines in a fixed order, relative error ~1e-6 of the sum). A target outside [0, vocab)
// gives NaN. logits fp32, targets int32, log_probabilities fp32 (device). One block per row.
absl::Status TargetLogProbabilitiesCuda(const float* logits, int64_t row_stride, int vocab, int rows,
                                        const int32_t* targets, float* log_probabilities, cudaStream_t stream);

}  // namespace kvshard
