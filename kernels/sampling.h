// Token sampling from logits, as the device does it (so only token ids leave the GPU), and its CPU twin.
//
// Semantics, identical on both sides (the CPU twin is the specification):
// - temperature <= 0: argmax; ties go to the lowest id.
// - otherwise weights w_i = exp((logit_i - max_logit) / temperature), in fp32.
//   top_k (0 = off): keep the tokens whose logit is >= the k-th largest logit (ties at the cut are all
//   kept, so a few more than k can survive on exact ties).
//   top_p (>= 1 = off): of those, keep the tokens whose logit is >= t, where t is the largest logit such
//   that the kept tokens with logit >= t hold at least top_p of the kept weight (ties at the cut kept).
//   The draw: u = SamplingUniform(seed, step) in [0, 1); the token is the lowest id j among the kept
//   ones whose running weight sum, in id order, exceeds u * (kept weight). Walking in id order instead
//   of sorted order draws from the same distribution and needs no sort on the device.
// The random stream is counter-based: the same (seed, step) gives the same token on CPU and GPU, except
// when u * total falls within float rounding of a boundary between two tokens' weight intervals.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVSHARD_HOST_DEVICE __host__ __device__
#else
#define KVSHARD_HOST_DEVICE
#endif

namespace kvshard {

// Per-row sampling settings, laid out for a device array (one per batch row).
struct TokenSampling {
  float temperature = 0.0f;  // <= 0: greedy
  int32_t top_k = 0;         // 0: no cut
  float top_p = 1.0f;        // >= 1: no cut
  float repetition_penalty = 1.0f;  // see ApplyRepetitionPenaltyCpu; 1: none
  uint64_t seed = 0;
  uint64_t step = 0;  // index of the token being drawn within its request; advances the stream
};

// SplitMix64 finalizer: a bijective 64-bit mix, good enough to turn counters into uniform bits.
KVSHARD_HOST_DEVICE inline uint64_t MixBits64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform double in [0, 1) from (seed, step), 53 random bits.
KVSHARD_HOST_DEVICE inline double SamplingUniform(uint64_t seed, uint64_t step) {
  const uint64_t bits = MixBits64(MixBits64(seed) ^ (step * 0xd1b54a32d192ed03ull + 0x8cb92ba72f3d8dd7ull));
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}

// Orders floats as unsigned integers (a larger float gives a larger key; -0 < +0).
KVSHARD_HOST_DEVICE inline uint32_t OrderedFloatKey(uint32_t float_bits) {
  return (float_bits & 0x80000000u) ? ~float_bits : (float_bits | 0x80000000u);
}

struct SampledToken {
  int32_t token = 0;
  // How close the draw came to choosing differently, relative to the kept weight: the distance of
  // u * total from the nearest interval boundary, and of the top-p mass from its target. Twins may
  // disagree only when this is at rounding level.
  double margin = 1.0;
};

// CPU twin of SampleTokensCuda for one row of `vocab` logits.
SampledToken SampleTokenCpu(const float* logits, int vocab, const TokenSampling& params);

// CTRL-style repetition penalty, applied to the logits before sampling (CPU twin of
// ApplyRepetitionPenaltyCuda): every distinct id among recent[0 .. n_recent) inside [0, vocab) gets its
// logit divided by `penalty` when positive, multiplied by it otherwise, once. Same rule as
// worker/sampler.h's Sampler.
void ApplyRepetitionPenaltyCpu(float* logits, int vocab, const int32_t* recent, int n_recent, float penalty);

// log softmax(logits)[target] in natural log, computed in double: the score of one next-token
// prediction (perplexity). CPU twin of TargetLogProbabilitiesCuda.
double TargetLogProbabilityCpu(const float* logits, int vocab, int32_t target);

}  // namespace kvshard
