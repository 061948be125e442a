// Seeded attention partials of one worker for the cross-worker merge tests and benchmarks: every value
// is a hash of (worker, row, channel), so every rank can rebuild every other rank's partials and the
// CPU reference (MergePartialsCpu over all workers) without communicating.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/attention.h"
#include "worker/distributed_attention.h"

namespace kvshard::testing {

// Uniform in [lo, hi) from a splitmix64 hash of (seed, index).
inline float SeededUniform(uint64_t seed, uint64_t index, float lo, float hi) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + index + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return lo + (hi - lo) * static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

struct Partials {
  std::vector<float> out;  // [rows][head_dim], values in [-1, 1)
  std::vector<float> lse;  // [rows], values in [-6, 6), or -inf where the worker saw no key
};

// Worker w's partials. Row 0 is empty on every worker; row r is empty on worker w when (r + w) % 5 == 3;
// worker `empty_worker` (-1: none) holds no tokens at all, so every row of it is empty.
inline Partials SeededPartials(int worker, int64_t rows, int head_dim, int empty_worker) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Partials p;
  p.out.resize(rows * head_dim);
  p.lse.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = worker == empty_worker || r == 0 || (r + worker) % 5 == 3;
    p.lse[r] = empty ? kNegInf : SeededUniform(2 * worker + 1, r, -6.0f, 6.0f);
    for (int c = 0; c < head_dim; ++c) {
      p.out[r * head_dim + c] = empty ? 0.0f : SeededUniform(2 * worker + 2, r * head_dim + c, -1.0f, 1.0f);
    }
  }
  return p;
}

// MergePartialsCpu over the partials of workers 0..n_workers-1.
inline Partials ReferenceMerge(int n_workers, int64_t rows, int head_dim, int empty_worker) {
  std::vector<Partials> all;
  std::vector<const float*> outs, lses;
  for (int w = 0; w < n_workers; ++w) all.push_back(SeededPartials(w, rows, head_dim, empty_worker));
  for (const Partials& p : all) {
    outs.push_back(p.out.data());
    lses.push_back(p.lse.data());
  }
  Partials merged;
  merged.out.resize(rows * head_dim);
  merged.lse.resize(rows);
  MergePartialsCpu(n_workers, outs.data(), lses.data(), rows, head_dim, merged.out.data(), merged.lse.data());
  return merged;
}

// The bound on |GPU merge - ReferenceMerge| for `out` of these partials (max|out_w| <= 1, |lse_w| <= 6, so
// |lse_w - M| <= 12), merged across n workers:
// - the weights exp(lse_w - M) use the fast exp (--use_fast_math: ex2.approx of x * log2 e), relative error
//   about |x| log2(e) 2^-24 + 2^-22 <= 2^-19 at |x| <= 12; out is a convex combination, so its error is at
//   most 2 * 2^-19 plus a few fp32 roundings: 1e-5;
// - bf16 on the wire keeps 8 significant bits (unit roundoff 2^-9). allgather rounds each out_w once
//   before a convex combination: + 2^-8. tree rounds a_w * out_w and then each of the n - 1 partial sums of
//   the all-reduce (sums <= n, divided by the fp32 sum of weights >= 1): + (n + 1) 2^-8.
// lse: 1e-5 + 1e-6 |lse| (ln of a sum of weights with the error above).
inline double MergeOutTolerance(MergeMode mode, WireType wire, int n_workers) {
  if (wire == WireType::kF32) return 1e-5;
  return 1e-5 + (mode == MergeMode::kAllGather ? 1 : n_workers + 1) * std::ldexp(1.0, -8);
}
constexpr double kMergeLseAtol = 1e-5;
constexpr double kMergeLseRtol = 1e-6;

// Values of a merge result outside those bounds (equal infinities match; NaN never does).
inline int64_t CountMergeMismatches(const Partials& got, const Partials& want, double out_atol) {
  auto bad = [](float g, float w, double atol, double rtol) {
    if (std::isnan(g) || std::isnan(w)) return true;
    if (std::isinf(g) || std::isinf(w)) return g != w;
    return std::abs(static_cast<double>(g) - w) > atol + rtol * std::abs(static_cast<double>(w));
  };
  int64_t wrong = 0;
  for (size_t i = 0; i < want.out.size(); ++i) wrong += bad(got.out[i], want.out[i], out_atol, 0.0);
  for (size_t i = 0; i < want.lse.size(); ++i) wrong += bad(got.lse[i], want.lse[i], kMergeLseAtol, kMergeLseRtol);
  return wrong;
}

}  // namespace kvshard::testing
