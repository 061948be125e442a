#include <cmath>

#include "kernels/rope.h"

namespace kvshard {

std::vector<float> RopeInverseFrequencies(const RopeParams& params) {
  const int half = params.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    // Same float32 arithmetic as torch: theta ** (arange(0, d, 2) / d), then reciprocal.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(params.head_dim);
    inv_freq[i] = 1.0f / std::pow(params.theta, exponent);
  }
  const RopeScaling& s = params.scaling;
  if (s.type == RopeScalingType::kLinear) {
    for (float& f : inv_freq) f /= s.factor;
  } else if (s.type == RopeScalingType::kLlama3) {
    const double low_freq_wavelen = s.original_max_position / s.low_freq_factor;
    const double high_freq_wavelen = s.original_max_position / s.high_freq_factor;
    for (float& f : inv_freq) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        f = static_cast<float>(f / s.factor);
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / s.factor + smooth * f);
      }
    }
  }
  return inv_freq;
}

void ApplyRopeCpu(float* x, int n_heads, int head_dim, int64_t pos, const std::vector<float>& inv_freq) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = static_cast<double>(pos) * static_cast<double>(inv_freq[i]);
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + static_cast<int64_t>(h) * head_dim;
      const float a = v[i];
      const float b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

}  // namespace kvshard
