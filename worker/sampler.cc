#include "worker/sampler.h"

namespace kvshard {

void Sampler::Accept(int32_t token) {
  if (params_.repetition_penalty == 1.0f || params_.repetition_window <= 0) return;
  if (recent_.size() < static_cast<size_t>(params_.repetition_window)) {
    recent_.push_back(token);
  } else {
    recent_[recent_next_] = token;
    recent_next_ = (recent_next_ + 1) % recent_.size();
  }
}

TokenSampling Sampler::TakeDraw() {
  TokenSampling draw;
  draw.temperature = params_.temperature;
  draw.top_k = params_.top_k;
  draw.top_p = params_.top_p;
  draw.repetition_penalty = params_.repetition_penalty;
  draw.seed = params_.seed;
  draw.step = draws_++;
  return draw;
}

int32_t Sampler::Sample(const float* logits, int vocab) {
  const TokenSampling draw = TakeDraw();
  if (!recent_.empty()) {
    penalized_.assign(logits, logits + vocab);
    ApplyRepetitionPenaltyCpu(penalized_.data(), vocab, recent_.data(), static_cast<int>(recent_.size()),
                              params_.repetition_penalty);
    logits = penalized_.data();
  }
  return SampleTokenCpu(logits, vocab, draw).token;
}

}  // namespace kvshard
