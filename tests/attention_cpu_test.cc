// AttentionPartialsCpu and MergePartialsCpu against a float64 reference, over odd and boundary sizes.
#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/test_util.h"

namespace kvshard {
namespace {

struct Reference {
  std::vector<double> out, lse;
};

Reference NaiveAttention(const std::vector<float>& q, int64_t rows, const std::vector<int64_t>& row_pos,
                         const std::vector<float>& k, const std::vector<float>& v, int64_t n_keys, int64_t first_pos,
                         int d, double scale) {
  Reference ref{std::vector<double>(rows * d, 0.0), std::vector<double>(rows)};
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> s;
    for (int64_t j = 0; j < n_keys && first_pos + j <= row_pos[r]; ++j) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += static_cast<double>(q[r * d + i]) * k[j * d + i];
      s.push_back(dot * scale);
    }
    if (s.empty()) {
      ref.lse[r] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double m = -std::numeric_limits<double>::infinity();
    for (double x : s) m = std::max(m, x);
    double l = 0;
    for (double x : s) l += std::exp(x - m);
    for (size_t j = 0; j < s.size(); ++j)
      for (int i = 0; i < d; ++i) ref.out[r * d + i] += std::exp(s[j] - m) / l * v[j * d + i];
    ref.lse[r] = m + std::log(l);
  }
  return ref;
}

std::vector<float> RandomVector(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  return x;
}

// (n_rows, n_keys, head_dim, causal)
class AttentionPartialsTest : public ::testing::TestWithParam<std::tuple<int, int, int, bool>> {};

TEST_P(AttentionPartialsTest, MatchesFloat64Reference) {
  const auto [rows, n_keys, d, causal] = GetParam();
  std::mt19937 rng(rows * 1000003 + n_keys * 101 + d);
  const auto q = RandomVector(int64_t{rows} * d, rng, 2.0f);
  const auto k = RandomVector(int64_t{n_keys} * d, rng);
  const auto v = RandomVector(int64_t{n_keys} * d, rng);
  const int64_t first_pos = 5;
  std::vector<int64_t> row_pos(rows);
  for (int r = 0; r < rows; ++r) row_pos[r] = causal ? first_pos + (r * 7) % (n_keys + 2) - 1 : 1 << 30;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));

  std::vector<float> out(int64_t{rows} * d, std::nanf("")), lse(rows, std::nanf(""));  // poisoned
  AttentionPartialsCpu(q.data(), d, rows, row_pos.data(), k.data(), v.data(), d, n_keys, first_pos, d,
                       static_cast<float>(scale), out.data(), d, lse.data());
  const Reference ref = NaiveAttention(q, rows, row_pos, k, v, n_keys, first_pos, d, scale);
  // fp32 accumulation over up to ~1000 keys: relative error ~1e-6; 1e-5 leaves a margin.
  EXPECT_EQ(testing::CountMismatches(out, ref.out, 1e-5, 1e-5, "out"), 0);
  EXPECT_EQ(testing::CountMismatches(lse, ref.lse, 1e-5, 1e-5, "lse"), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, AttentionPartialsTest,
                         ::testing::Combine(::testing::Values(1, 3, 37), ::testing::Values(0, 1, 37, 255, 256, 257, 700),
                                            ::testing::Values(64, 128, 72), ::testing::Bool()));

// Splitting the keys into shards (some empty) and merging the partials equals the unsplit result.
class MergePartialsTest : public ::testing::TestWithParam<int> {};

TEST_P(MergePartialsTest, SplitThenMergeEqualsWhole) {
  const int n_shards = GetParam();
  const int rows = 6, d = 64, n_keys = 300;
  std::mt19937 rng(n_shards);
  const auto q = RandomVector(rows * d, rng, 2.0f);
  const auto k = RandomVector(n_keys * d, rng);
  const auto v = RandomVector(n_keys * d, rng);
  std::vector<int64_t> row_pos = {0, 17, 150, 299, 299, 64};
  const float scale = 0.125f;

  std::vector<float> whole(rows * d), whole_lse(rows);
  AttentionPartialsCpu(q.data(), d, rows, row_pos.data(), k.data(), v.data(), d, n_keys, 0, d, scale,
                       whole.data(), d, whole_lse.data());

  // Uneven boundaries, with an empty shard whenever there are more than two.
  std::vector<int> bounds = {0};
  for (int s = 1; s < n_shards; ++s) bounds.push_back(std::min(n_keys, s * n_keys / n_shards + (s == 1 ? 0 : 7)));
  if (n_shards > 2) bounds[2] = bounds[1];
  bounds.push_back(n_keys);
  std::vector<std::vector<float>> outs(n_shards, std::vector<float>(rows * d)), lses(n_shards, std::vector<float>(rows));
  std::vector<const float*> out_ptrs, lse_ptrs;
  for (int s = 0; s < n_shards; ++s) {
    const int begin = bounds[s], len = bounds[s + 1] - bounds[s];
    AttentionPartialsCpu(q.data(), d, rows, row_pos.data(), k.data() + begin * d, v.data() + begin * d, d, len, begin,
                         d, scale, outs[s].data(), d, lses[s].data());
    out_ptrs.push_back(outs[s].data());
    lse_ptrs.push_back(lses[s].data());
  }
  std::vector<float> merged(rows * d, std::nanf("")), merged_lse(rows, std::nanf(""));
  MergePartialsCpu(n_shards, out_ptrs.data(), lse_ptrs.data(), rows, d, merged.data(), merged_lse.data());
  std::vector<double> whole_d(whole.begin(), whole.end()), whole_lse_d(whole_lse.begin(), whole_lse.end());
  EXPECT_EQ(testing::CountMismatches(merged, whole_d, 1e-5, 1e-5, "out"), 0);
  EXPECT_EQ(testing::CountMismatches(merged_lse, whole_lse_d, 1e-5, 1e-5, "lse"), 0);
}

INSTANTIATE_TEST_SUITE_P(Shards, MergePartialsTest, ::testing::Values(1, 2, 3, 7));

TEST(MergePartialsTest, AllEmptySourcesGiveZeroAndMinusInfinity) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> o1(4, 0.0f), o2(4, 0.0f), l1 = {-inf}, l2 = {-inf};
  const float* outs[] = {o1.data(), o2.data()};
  const float* lses[] = {l1.data(), l2.data()};
  std::vector<float> out(4, 1.0f), lse(1, 0.0f);
  MergePartialsCpu(2, outs, lses, 1, 4, out.data(), lse.data());
  EXPECT_EQ(lse[0], -inf);
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

}  // namespace
}  // namespace kvshard
