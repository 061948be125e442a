// Dense-layer kernels on the CPU (the twins of the CUDA dense kernels): RMSNorm, SwiGLU, embedding gather.
#pragma once

#include <cstdint>

namespace kvshard {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for n_rows rows of `dim` values, fp32 math.
void RmsNormCpu(const float* x, const float* weight, int64_t n_rows, int64_t dim, float eps, float* y);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
void SwiGluCpu(const float* gate, const float* up, int64_t n, float* out);

// out[r, :] = table[ids[r], :] for n rows of `dim` values. Ids must be in range (checked by the caller).
void EmbeddingGatherCpu(const float* table, const int32_t* ids, int64_t n, int64_t dim, float* out);

}  // namespace kvshard
