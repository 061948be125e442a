// Token sampling on the CPU: greedy, temperature, top-k, top-p, seeded, with a repetition penalty.
// The draws follow kernels/sampling.h (SampleTokenCpu, a counter-based random stream), so a draw made on
// the GPU from TakeDraw()'s settings and recent() picks the same token as Sample() on the CPU.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/sampling.h"

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
  explicit Sampler(const SamplingParams& params) : params_(params) {}
  // Picks a token id from logits[vocab]: the repetition penalty over recent(), then SampleTokenCpu with
  // TakeDraw()'s settings. Ties in greedy mode go to the lowest id.
  int32_t Sample(const float* logits, int vocab);
  // The settings of the next draw (its step is the number of draws before it); the draw counts as made,
  // wherever it runs.
  TokenSampling TakeDraw();
  // Records a generated token for the repetition penalty.
  void Accept(int32_t token);
  // The ids the next draw's repetition penalty covers: the last repetition_window accepted tokens, in no
  // particular order; empty when the penalty is off.
  std::span<const int32_t> recent() const { return recent_; }
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  uint64_t draws_ = 0;
  std::vector<int32_t> recent_;     // ring of the last repetition_window generated tokens
  size_t recent_next_ = 0;
  std::vector<float> penalized_;
};

}  // namespace kvshard
