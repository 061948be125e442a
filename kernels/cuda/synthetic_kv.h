// Synthetic keys/values made on the GPU: the device twin of worker/synthetic.h's SyntheticKvTokens, for
// filling long contexts without a host round trip. Host launcher; pointers are device memory; the
// launch is asynchronous on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace kvshard {

// k, v: fp32 [n_tokens][n_kv_heads][head_dim] (keys pre-RoPE) for one layer and absolute positions
// [begin, begin + n_tokens), the same hashes and fp32 operations (explicitly rounded) as SyntheticKvTokens
// compiled as the project does (x86-64 with -mfma, GCC's default FP contraction): the values are equal bit
// for bit there. A CPU build that does not fuse `mean + scale * normal` differs in the last bit of keys
// in the wide channels; the distribution is the same.
absl::Status SyntheticKvTokensCuda(int n_kv_heads, int head_dim, int layer, int64_t begin, int64_t n_tokens,
                                   uint64_t seed, float* k, float* v, cudaStream_t stream);

}  // namespace kvshard
