#include "kernels/dense_cpu.h"

#include <cmath>
#include <cstring>

namespace kvshard {

void RmsNormCpu(const float* x, const float* weight, int64_t n_rows, int64_t dim, float eps, float* y) {
#pragma omp parallel for schedule(static) if (n_rows > 16)
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv_rms * weight[i];
  }
}

void SwiGluCpu(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void EmbeddingGatherCpu(const float* table, const int32_t* ids, int64_t n, int64_t dim, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(out + r * dim, table + static_cast<int64_t>(ids[r]) * dim, sizeof(float) * dim);
  }
}

}  // namespace kvshard
