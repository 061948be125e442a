#include "worker/sampler.h"

#include <algorithm>
#include <cmath>

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

int32_t Sampler::Sample(const float* logits, int vocab) {
  if (!recent_.empty()) {
    penalized_.assign(logits, logits + vocab);
    for (int32_t id : recent_) {
      if (id < 0 || id >= vocab) continue;
      float& l = penalized_[id];
      if (l != logits[id]) continue;  // a repeated id: penalize each distinct token once
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
    logits = penalized_.data();
  }
  if (params_.temperature <= 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return best;
  }
  // Candidates sorted by logit, cut by top-k, softmax at the temperature, cut by top-p, then drawn.
  scratch_.resize(vocab);
  for (int i = 0; i < vocab; ++i) scratch_[i] = {logits[i], i};
  int keep = vocab;
  if (params_.top_k > 0 && params_.top_k < vocab) keep = params_.top_k;
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  std::partial_sort(scratch_.begin(), scratch_.begin() + keep, scratch_.end(), by_logit);
  scratch_.resize(keep);
  const float max_logit = scratch_[0].first;
  double total = 0.0;
  for (auto& [value, id] : scratch_) {
    value = static_cast<float>(std::exp((value - max_logit) / params_.temperature));
    total += value;
  }
  if (params_.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t cut = scratch_.size();
    for (size_t i = 0; i < scratch_.size(); ++i) {
      cumulative += scratch_[i].first / total;
      if (cumulative >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    scratch_.resize(cut);
    total = 0.0;
    for (const auto& [value, id] : scratch_) total += value;
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  double r = uniform(rng_);
  for (const auto& [value, id] : scratch_) {
    r -= value;
    if (r <= 0.0) return id;
  }
  return scratch_.back().second;
}

}  // namespace kvshard
