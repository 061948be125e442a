#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "kernels/sampling.h"

namespace kvshard {
namespace {

uint32_t KeyOf(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return OrderedFloatKey(bits);
}

}  // namespace

SampledToken SampleTokenCpu(const float* logits, int vocab, const TokenSampling& params) {
  SampledToken result;
  if (vocab <= 0) return result;
  if (params.temperature <= 0.0f) {
    int32_t best = 0;
    for (int i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    result.token = best;
    return result;
  }
  const float max_logit = *std::max_element(logits, logits + vocab);
  const float inv_temperature = 1.0f / params.temperature;
  std::vector<float> weight(vocab);
  for (int i = 0; i < vocab; ++i) weight[i] = std::exp((logits[i] - max_logit) * inv_temperature);

  uint32_t cut = 0;  // keep tokens with key >= cut
  std::vector<uint32_t> keys(vocab);
  for (int i = 0; i < vocab; ++i) keys[i] = KeyOf(logits[i]);
  if (params.top_k > 0 && params.top_k < vocab) {
    std::vector<uint32_t> sorted = keys;
    std::nth_element(sorted.begin(), sorted.begin() + (params.top_k - 1), sorted.end(), std::greater<>());
    cut = sorted[params.top_k - 1];
  }
  if (params.top_p < 1.0f) {
    std::vector<int32_t> order;
    double kept_total = 0.0;
    for (int i = 0; i < vocab; ++i) {
      if (keys[i] < cut) continue;
      order.push_back(i);
      kept_total += weight[i];
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return keys[a] > keys[b]; });
    const double target = static_cast<double>(params.top_p) * kept_total;
    double cumulative = 0.0;
    for (size_t i = 0; i < order.size();) {
      // A group of equal logits enters or leaves the nucleus together.
      size_t j = i;
      double group = 0.0;
      while (j < order.size() && keys[order[j]] == keys[order[i]]) group += weight[order[j++]];
      if (cumulative + group >= target) {
        cut = std::max(cut, keys[order[i]]);
        result.margin = std::min(cumulative + group - target, target - cumulative) / kept_total;
        break;
      }
      cumulative += group;
      i = j;
    }
  }

  double total = 0.0;
  for (int i = 0; i < vocab; ++i)
    if (keys[i] >= cut) total += weight[i];
  const double target = SamplingUniform(params.seed, params.step) * total;
  double running = 0.0;
  int32_t last_kept = 0;
  for (int i = 0; i < vocab; ++i) {
    if (keys[i] < cut) continue;
    last_kept = i;
    const double before = running;
    running += weight[i];
    if (running > target) {
      result.token = i;
      result.margin = std::min(result.margin, std::min(running - target, target - before) / total);
      return result;
    }
  }
  result.token = last_kept;  // u * total rounded up to the total
  result.margin = 0.0;
  return result;
}

void ApplyRepetitionPenaltyCpu(float* logits, int vocab, const int32_t* recent, int n_recent, float penalty) {
  if (penalty == 1.0f) return;
  for (int i = 0; i < n_recent; ++i) {
    const int32_t id = recent[i];
    if (id < 0 || id >= vocab || std::find(recent, recent + i, id) != recent + i) continue;
    float& l = logits[id];
    l = l > 0 ? l / penalty : l * penalty;
  }
}

double TargetLogProbabilityCpu(const float* logits, int vocab, int32_t target) {
  float max_logit = logits[0];
  for (int i = 1; i < vocab; ++i) max_logit = std::max(max_logit, logits[i]);
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
  return static_cast<double>(logits[target]) - max_logit - std::log(sum);
}

}  // namespace kvshard
