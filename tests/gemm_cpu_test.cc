// GemmCpu against a float64 reference, and the same bits whatever the thread count: a worker gets its
// share of the node's cores and single-process mode all of them, and both must compute the same KV
// (kvq3's 3-bit codes turn last-bit differences into different tokens).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/shared_library.h"
#include "gtest/gtest.h"
#include "kernels/gemm_cpu.h"

namespace kvshard {
namespace {

// (transpose_b, m, n, k): decode rows (the sgemv path), odd sizes, and products wider and taller than
// one of GemmCpu's blocks.
using GemmShape = std::tuple<bool, int64_t, int64_t, int64_t>;

class GemmCpuTest : public ::testing::TestWithParam<GemmShape> {
 protected:
  void SetUp() override {
    const auto [transpose_b, m, n, k] = GetParam();
    std::mt19937 rng(static_cast<uint32_t>(m * 131 + n * 7 + k + transpose_b));
    std::normal_distribution<float> normal;
    a_.resize(m * k);
    b_.resize(n * k);
    for (float& x : a_) x = normal(rng);
    for (float& x : b_) x = normal(rng);
  }

  // C = A op(B), every output poisoned first.
  std::vector<float> Product(int threads) const {
    const auto [transpose_b, m, n, k] = GetParam();
    std::vector<float> c(m * n, std::nanf(""));
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    GemmCpu(transpose_b, m, n, k, 1.0f, a_.data(), k, b_.data(), transpose_b ? k : n, 0.0f, c.data(), n);
    omp_set_num_threads(saved);
    return c;
  }

  std::vector<float> a_, b_;
};

TEST_P(GemmCpuTest, MatchesFloat64Reference) {
  const auto [transpose_b, m, n, k] = GetParam();
  const std::vector<float> c = Product(omp_get_max_threads());
  // fp32 sums of k products of unit normals: error ~ sqrt(k) ulps of the partial sums.
  const double atol = 1e-5 * std::sqrt(static_cast<double>(k)), rtol = 1e-5;
  int64_t bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double want = 0;
      for (int64_t p = 0; p < k; ++p)
        want += static_cast<double>(a_[i * k + p]) * (transpose_b ? b_[j * k + p] : b_[p * n + j]);
      const double got = c[i * n + j];
      if (!(std::abs(got - want) <= atol + rtol * std::abs(want)) && bad++ < 5) {
        ADD_FAILURE() << "C[" << i << ", " << j << "] = " << got << ", want " << want;
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST_P(GemmCpuTest, SameBitsForAnyThreadCount) {
  const std::vector<float> one = Product(1);
  for (int threads : {2, 3, 8}) {
    const std::vector<float> many = Product(threads);
    int64_t differ = 0;
    for (size_t i = 0; i < one.size(); ++i) differ += std::memcmp(&one[i], &many[i], sizeof(float)) != 0;
    EXPECT_EQ(differ, 0) << "of " << one.size() << " outputs with " << threads << " threads against 1";
  }
}

// GemmCpu's blocks are single-threaded calls inside its own OpenMP region: OpenBLAS's pthreads build
// must run one thread (else every block starts all the cores' worth), and opening OpenBLAS must leave
// the process's OpenMP thread count alone (the OpenMP build's openblas_set_num_threads would change it).
TEST(GemmCpuThreads, OpenBlasStartsNoThreadsOfItsOwn) {
  const int threads_before = omp_get_max_threads();
  std::vector<float> a(64 * 64, 1.0f), c(64 * 64, 0.0f);
  GemmCpu(/*transpose_b=*/true, 64, 64, 64, 1.0f, a.data(), 64, a.data(), 64, 0.0f, c.data(), 64);
  EXPECT_EQ(omp_get_max_threads(), threads_before);
  EXPECT_EQ(c[0], 64.0f);
  if (std::string(CpuGemmLibrary()) != "OpenBLAS") GTEST_SKIP() << "no OpenBLAS on this host: " << CpuGemmLibrary();
  const std::vector<std::string> candidates = {"libopenblas.so.0", "libopenblas.so"};
  absl::StatusOr<void*> library = OpenSharedLibrary(candidates);
  ASSERT_TRUE(library.ok()) << library.status();
  int (*get_parallel)() = nullptr;
  int (*get_threads)() = nullptr;
  if (!ResolveFunction(*library, "openblas_get_parallel", get_parallel).ok() ||
      !ResolveFunction(*library, "openblas_get_num_threads", get_threads).ok()) {
    GTEST_SKIP() << "this OpenBLAS does not say how it threads";
  }
  const int parallel = get_parallel();
  std::printf("  OpenBLAS threading: %s, %d thread(s)\n",
              parallel == 0 ? "sequential" : parallel == 1 ? "pthreads" : "OpenMP", get_threads());
  if (parallel == 1) EXPECT_EQ(get_threads(), 1);
}

std::string ShapeName(const ::testing::TestParamInfo<GemmShape>& info) {
  const auto [transpose_b, m, n, k] = info.param;
  return std::string(transpose_b ? "BT_" : "B_") + std::to_string(m) + "x" + std::to_string(n) + "x" +
         std::to_string(k);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmCpuTest,
                         ::testing::Values(GemmShape(true, 1, 576, 576), GemmShape(false, 1, 576, 1536),
                                           GemmShape(true, 3, 37, 64), GemmShape(true, 4, 1, 1),
                                           GemmShape(false, 37, 64, 256), GemmShape(true, 64, 256, 64),
                                           GemmShape(true, 129, 1025, 96), GemmShape(false, 300, 2100, 33),
                                           GemmShape(true, 512, 576, 576)),
                         ShapeName);

}  // namespace
}  // namespace kvshard
