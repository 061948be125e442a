// Rotary position embedding (RoPE), "rotate_half" convention: channel i pairs with i + head_dim/2.
// CPU twin here; the CUDA launcher is RopeCuda in kernels/cuda/dense.h.
#pragma once

#include <cstdint>
#include <vector>

namespace kvshard {

enum class RopeScalingType { kNone, kLinear, kLlama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;          // llama3 only
  float high_freq_factor = 4.0f;         // llama3 only
  int64_t original_max_position = 8192;  // llama3 only
};

struct RopeParams {
  int head_dim = 0;
  float theta = 10000.0f;
  RopeScaling scaling;
};

// Inverse frequencies, one per channel pair: inv_freq[i] for i < head_dim/2, with scaling applied the
// way Hugging Face's _compute_default/linear/llama3_parameters do.
std::vector<float> RopeInverseFrequencies(const RopeParams& params);

// Rotates `n_heads` vectors of head_dim channels, laid out contiguously, for position `pos`, in place.
// Angles are computed in double and rounded once, so CPU and GPU agree to fp32 rounding.
void ApplyRopeCpu(float* x, int n_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq);

}  // namespace kvshard
