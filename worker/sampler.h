// Token sampling on the CPU: greedy, temperature, top-k, top-p, seeded.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace kvshard {

struct SamplingParams {
  float temperature = 0.0f;  // 0 means greedy (argmax)
  int top_k = 0;             // 0 means no top-k cut
  float top_p = 1.0f;        // 1 means no nucleus cut
  uint64_t seed = 0;
  // CTRL-style penalty on tokens generated in the last `repetition_window` steps: positive logits are
  // divided by it, negative ones multiplied. 1 disables it. Small models loop without it.
  float repetition_penalty = 1.0f;
  int repetition_window = 64;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // Picks a token id from logits[vocab]. Ties in greedy mode go to the lowest id.
  int32_t Sample(const float* logits, int vocab);
  // Records a generated token for the repetition penalty.
  void Accept(int32_t token);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
  std::vector<int32_t> recent_;     // ring of the last repetition_window generated tokens
  size_t recent_next_ = 0;
  std::vector<float> penalized_;
};

}  // namespace kvshard
