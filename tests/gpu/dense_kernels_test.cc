// Dense GPU kernels against their CPU twins.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/half.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/cuda/dense.h"
#include "kernels/dense_cpu.h"
#include "kernels/gemm_cpu.h"
#include "kernels/rope.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;
using testing::RandomUniform;
using testing::ToDevice;

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}
std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(v[i]);
  return out;
}
std::vector<float> FromHalf(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = HalfToFloat(v[i]);
  return out;
}

// ---------------------------------------------------------------------------------------------------
struct GemmCase {
  int64_t m, n, k;
  DType out;
  float beta;
};

class GemmTest : public ::testing::TestWithParam<GemmCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(GemmTest, MatchesLinearCpu) {
  const GemmCase c = GetParam();
  const std::vector<uint16_t> x16 = ToBf16(RandomUniform(c.m * c.k, 1 + c.m));
  const std::vector<uint16_t> w16 = ToBf16(RandomUniform(c.n * c.k, 2 + c.n));
  const std::vector<float> y0 = RandomUniform(c.m * c.n, 3);
  const std::vector<float> x = FromBf16(x16), w = FromBf16(w16);
  std::vector<float> want(c.m * c.n), abs_sum(c.m * c.n);
  LinearCpu(x.data(), w.data(), c.m, c.k, c.n, want.data());
  std::vector<float> ax(x.size()), aw(w.size());
  std::transform(x.begin(), x.end(), ax.begin(), [](float f) { return std::fabs(f); });
  std::transform(w.begin(), w.end(), aw.begin(), [](float f) { return std::fabs(f); });
  LinearCpu(ax.data(), aw.data(), c.m, c.k, c.n, abs_sum.data());
  for (size_t i = 0; i < want.size(); ++i) want[i] += c.beta * y0[i];

  auto handle = CublasHandle::Create();
  ASSERT_TRUE(handle.ok()) << handle.status();
  DeviceBuffer<uint16_t> dx = ToDevice(x16), dw = ToDevice(w16);
  std::vector<float> got;
  if (c.out == DType::kF32) {
    DeviceBuffer<float> dy = ToDevice(y0);
    if (c.beta == 0.0f) dy.Poison();
    ASSERT_TRUE(GemmBf16(*handle, dx.get(), dw.get(), c.m, c.n, c.k, dy.get(), DType::kF32, 1.0f, c.beta, nullptr).ok());
    got = dy.Download();
  } else {
    DeviceBuffer<uint16_t> dy(c.m * c.n);
    dy.Poison();
    ASSERT_TRUE(GemmBf16(*handle, dx.get(), dw.get(), c.m, c.n, c.k, dy.get(), DType::kBF16, 1.0f, 0.0f, nullptr).ok());
    got = FromBf16(dy.Download());
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Both sides sum exact products of bf16 values in fp32, in different orders: the difference is bounded
  // by a few hundred fp32 ulps of sum |x||w| (~sqrt(k) * u growth, u = 2^-24, k <= 4096). A bf16 output
  // adds its rounding, 2^-8 relative.
  std::vector<double> atol(want.size());
  for (size_t i = 0; i < want.size(); ++i) atol[i] = 1e-5 * abs_sum[i] + 1e-6;
  const double rtol = c.out == DType::kBF16 ? 1.0 / 256 : 0.0;
  EXPECT_EQ(CountMismatches("y", got, want, 0, rtol, &atol), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, GemmTest,
                         ::testing::Values(GemmCase{1, 576, 576, DType::kF32, 0.0f},
                                           GemmCase{37, 1536, 576, DType::kF32, 0.0f},
                                           GemmCase{37, 576, 1536, DType::kF32, 1.0f},
                                           GemmCase{128, 4096, 4096, DType::kBF16, 0.0f},
                                           GemmCase{3, 49152, 576, DType::kF32, 0.0f},
                                           GemmCase{0, 64, 64, DType::kF32, 0.0f}));

// ---------------------------------------------------------------------------------------------------
struct RowCase {
  int64_t rows, dim;
  DType out;
};

class RmsNormTest : public ::testing::TestWithParam<RowCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(RmsNormTest, MatchesCpu) {
  const RowCase c = GetParam();
  const std::vector<float> x = RandomUniform(c.rows * c.dim, 11, -3.0f, 3.0f);
  const std::vector<float> w = RandomUniform(c.dim, 12, 0.5f, 1.5f);
  std::vector<float> want(x.size());
  RmsNormCpu(x.data(), w.data(), c.rows, c.dim, 1e-5f, want.data());
  DeviceBuffer<float> dx = ToDevice(x), dw = ToDevice(w);
  std::vector<float> got;
  if (c.out == DType::kF32) {
    DeviceBuffer<float> dy(x.size());
    dy.Poison();
    ASSERT_TRUE(RmsNormCuda(dx.get(), dw.get(), c.rows, c.dim, 1e-5f, dy.get(), DType::kF32, nullptr).ok());
    got = dy.Download();
  } else {
    DeviceBuffer<uint16_t> dy(x.size());
    dy.Poison();
    ASSERT_TRUE(RmsNormCuda(dx.get(), dw.get(), c.rows, c.dim, 1e-5f, dy.get(), c.out, nullptr).ok());
    got = c.out == DType::kBF16 ? FromBf16(dy.Download()) : FromHalf(dy.Download());
  }
  // fp32 both sides; the sums of squares differ in order (relative error ~ dim * 2^-24 worst case, far
  // less in practice) and rsqrt is approximate (2 ulp): 1e-5 relative. 16-bit outputs add their rounding.
  const double rtol = c.out == DType::kF32 ? 1e-5 : c.out == DType::kBF16 ? 1.0 / 256 + 1e-5 : 1.0 / 2048 + 1e-5;
  EXPECT_EQ(CountMismatches("y", got, want, 1e-6, rtol), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, RmsNormTest,
                         ::testing::Values(RowCase{1, 576, DType::kF32}, RowCase{37, 576, DType::kBF16},
                                           RowCase{5, 4096, DType::kF32}, RowCase{3, 33, DType::kF16},
                                           RowCase{64, 4096, DType::kBF16}, RowCase{0, 576, DType::kF32}));

// ---------------------------------------------------------------------------------------------------
struct RopeCase {
  int64_t rows;
  int n_heads, head_dim;
  int64_t first_position, position_step;
  RopeScalingType scaling;
};

class RopeTest : public ::testing::TestWithParam<RopeCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(RopeTest, MatchesApplyRopeCpu) {
  const RopeCase c = GetParam();
  RopeParams params;
  params.head_dim = c.head_dim;
  params.theta = c.scaling == RopeScalingType::kLlama3 ? 500000.0f : 10000.0f;
  params.scaling.type = c.scaling;
  params.scaling.factor = 8.0f;
  const std::vector<float> inv_freq = RopeInverseFrequencies(params);
  // Rows hold n_heads heads plus 3 spare floats, to exercise row_stride.
  const int64_t stride = static_cast<int64_t>(c.n_heads) * c.head_dim + 3;
  std::vector<float> x = RandomUniform(c.rows * stride, 21, -2.0f, 2.0f);
  std::vector<int64_t> positions(c.rows);
  for (int64_t r = 0; r < c.rows; ++r) positions[r] = c.first_position + r * c.position_step;
  std::vector<float> want = x;
  for (int64_t r = 0; r < c.rows; ++r) ApplyRopeCpu(want.data() + r * stride, c.n_heads, c.head_dim, positions[r], inv_freq);

  DeviceBuffer<float> dx = ToDevice(x), dfreq = ToDevice(inv_freq);
  DeviceBuffer<int64_t> dpos = ToDevice(positions);
  ASSERT_TRUE(RopeCuda(dx.get(), stride, dpos.get(), dfreq.get(), c.rows, c.n_heads, c.head_dim, nullptr).ok());
  const std::vector<float> got = dx.Download();
  // cos/sin are the same doubles rounded once to fp32 (rarely 1 ulp apart), and a*c - b*s may be fused
  // differently: a few ulps of max(|a|, |b|) <= 2, so 2e-6 absolute.
  EXPECT_EQ(CountMismatches("x", got, want, 2e-6, 1e-6), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, RopeTest,
                         ::testing::Values(RopeCase{1, 9, 64, 0, 1, RopeScalingType::kNone},
                                           RopeCase{37, 9, 64, 100, 1, RopeScalingType::kNone},
                                           RopeCase{37, 3, 64, 5, 1, RopeScalingType::kNone},
                                           RopeCase{17, 32, 128, 1000000, 977, RopeScalingType::kLlama3},
                                           RopeCase{64, 8, 128, 0, 4093, RopeScalingType::kLlama3},
                                           RopeCase{0, 8, 128, 0, 1, RopeScalingType::kNone}));

// ---------------------------------------------------------------------------------------------------
class SwiGluTest : public ::testing::TestWithParam<RowCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(SwiGluTest, MatchesCpuOnFusedLayout) {
  const RowCase c = GetParam();
  // Fused gate|up rows: [rows][2 * dim].
  const std::vector<float> gate_up = RandomUniform(c.rows * 2 * c.dim, 31, -8.0f, 8.0f);
  std::vector<float> want(c.rows * c.dim);
  for (int64_t r = 0; r < c.rows; ++r) {
    SwiGluCpu(gate_up.data() + r * 2 * c.dim, gate_up.data() + r * 2 * c.dim + c.dim, c.dim, want.data() + r * c.dim);
  }
  DeviceBuffer<float> din = ToDevice(gate_up);
  std::vector<float> got;
  if (c.out == DType::kF32) {
    DeviceBuffer<float> dout(want.size());
    dout.Poison();
    ASSERT_TRUE(SwiGluCuda(din.get(), din.get() + c.dim, 2 * c.dim, c.rows, c.dim, dout.get(), c.out, nullptr).ok());
    got = dout.Download();
  } else {
    DeviceBuffer<uint16_t> dout(want.size());
    dout.Poison();
    ASSERT_TRUE(SwiGluCuda(din.get(), din.get() + c.dim, 2 * c.dim, c.rows, c.dim, dout.get(), c.out, nullptr).ok());
    got = FromBf16(dout.Download());
  }
  // expf and the division are approximate on the GPU (fast math, ~2 ulp each): 1e-5 relative.
  const double rtol = c.out == DType::kF32 ? 1e-5 : 1.0 / 256 + 1e-5;
  EXPECT_EQ(CountMismatches("out", got, want, 1e-7, rtol), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, SwiGluTest,
                         ::testing::Values(RowCase{1, 1536, DType::kF32}, RowCase{37, 1536, DType::kBF16},
                                           RowCase{3, 37, DType::kF32}, RowCase{8, 14336, DType::kBF16},
                                           RowCase{0, 1536, DType::kF32}));

// ---------------------------------------------------------------------------------------------------
class EmbeddingTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(EmbeddingTest, GathersRowsExactly) {
  const int64_t vocab = 1000, dim = 576;
  std::vector<float> table = RandomUniform(vocab * dim, 41);
  std::vector<uint16_t> table16 = ToBf16(table);
  if (GetParam() == DType::kBF16) table = FromBf16(table16);
  const std::vector<int32_t> ids = {0, 999, 37, 37, 1, 500, -1, 1000};  // the last two are out of range
  std::vector<float> want(ids.size() * dim, 0.0f);
  EmbeddingGatherCpu(table.data(), ids.data(), 6, dim, want.data());

  DeviceBuffer<int32_t> dids = ToDevice(ids);
  DeviceBuffer<float> dout(want.size());
  dout.Poison();
  absl::Status status;
  if (GetParam() == DType::kBF16) {
    DeviceBuffer<uint16_t> dtable = ToDevice(table16);
    status = EmbeddingGatherCuda(dtable.get(), DType::kBF16, vocab, dim, dids.get(), ids.size(), dout.get(), nullptr);
  } else {
    DeviceBuffer<float> dtable = ToDevice(table);
    status = EmbeddingGatherCuda(dtable.get(), DType::kF32, vocab, dim, dids.get(), ids.size(), dout.get(), nullptr);
  }
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(CountMismatches("out", dout.Download(), want, 0, 0), 0);  // bit-exact, zero rows for bad ids
}

INSTANTIATE_TEST_SUITE_P(Types, EmbeddingTest, ::testing::Values(DType::kF32, DType::kBF16));

// ---------------------------------------------------------------------------------------------------
class ConvertTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(ConvertTest, RoundsLikeCommonHalf) {
  const int64_t n = GetParam();
  std::vector<float> x = RandomUniform(n, 51, -70000.0f, 70000.0f);
  for (int64_t i = 0; i < n; i += 7) x[i] *= 1e-6f;  // subnormal fp16 range too
  DeviceBuffer<float> dx = ToDevice(x);
  DeviceBuffer<uint16_t> dh(n), db(n);
  dh.Poison();
  db.Poison();
  ASSERT_TRUE(ConvertCuda(dx.get(), DType::kF32, dh.get(), DType::kF16, n, nullptr).ok());
  ASSERT_TRUE(ConvertCuda(dx.get(), DType::kF32, db.get(), DType::kBF16, n, nullptr).ok());
  const std::vector<uint16_t> h = dh.Download(), b = db.Download();
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (h[i] != FloatToHalf(x[i]) || b[i] != FloatToBf16(x[i])) {
      if (wrong++ < 8) std::printf("  [%lld] %g: f16 %04x/%04x bf16 %04x/%04x\n", static_cast<long long>(i), x[i], h[i],
                                   FloatToHalf(x[i]), b[i], FloatToBf16(x[i]));
    }
  }
  EXPECT_EQ(wrong, 0);
  // And back to fp32, exactly.
  DeviceBuffer<float> back(n);
  back.Poison();
  ASSERT_TRUE(ConvertCuda(db.get(), DType::kBF16, back.get(), DType::kF32, n, nullptr).ok());
  EXPECT_EQ(CountMismatches("back", back.Download(), FromBf16(b), 0, 0), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, ConvertTest, ::testing::Values(1, 37, 65536 + 3));

// ---------------------------------------------------------------------------------------------------
TEST(FinalNormLogitsTest, MatchesRmsNormThenLinear) {
  KV_SKIP_WITHOUT_GPU();
  const int64_t rows = 3, hidden = 576, vocab = 4099;
  const std::vector<float> x = RandomUniform(rows * hidden, 61, -3.0f, 3.0f);
  const std::vector<float> norm_w = RandomUniform(hidden, 62, 0.5f, 1.5f);
  const std::vector<uint16_t> w16 = ToBf16(RandomUniform(vocab * hidden, 63));
  const std::vector<float> w = FromBf16(w16);
  std::vector<float> normed(x.size()), want(rows * vocab), abs_sum(rows * vocab);
  RmsNormCpu(x.data(), norm_w.data(), rows, hidden, 1e-5f, normed.data());
  for (float& f : normed) f = Bf16ToFloat(FloatToBf16(f));  // the GEMM operand is bf16
  LinearCpu(normed.data(), w.data(), rows, hidden, vocab, want.data());
  std::vector<float> an(normed.size()), aw(w.size());
  std::transform(normed.begin(), normed.end(), an.begin(), [](float f) { return std::fabs(f); });
  std::transform(w.begin(), w.end(), aw.begin(), [](float f) { return std::fabs(f); });
  LinearCpu(an.data(), aw.data(), rows, hidden, vocab, abs_sum.data());

  auto handle = CublasHandle::Create();
  ASSERT_TRUE(handle.ok());
  DeviceBuffer<float> dx = ToDevice(x), dnorm = ToDevice(norm_w), dlogits(rows * vocab);
  DeviceBuffer<uint16_t> dw = ToDevice(w16), scratch(rows * hidden);
  dlogits.Poison();
  ASSERT_TRUE(FinalNormLogitsCuda(*handle, dx.get(), dnorm.get(), dw.get(), rows, hidden, vocab, 1e-5f, scratch.get(),
                                  dlogits.get(), nullptr)
                  .ok());
  // As GEMM, plus a rare 1-ulp bf16 flip of a normed value when GPU and CPU norms straddle a rounding
  // boundary: at most 2^-7 * max|normed| * max|w| (|w| <= 1) per flipped value; allow two.
  const float max_normed = std::fabs(*std::max_element(normed.begin(), normed.end(),
                                                       [](float a, float b) { return std::fabs(a) < std::fabs(b); }));
  std::vector<double> atol(want.size());
  for (size_t i = 0; i < want.size(); ++i) atol[i] = 1e-5 * abs_sum[i] + 1e-6 + 2.0 * max_normed / 128;
  EXPECT_EQ(CountMismatches("logits", dlogits.Download(), want, 0, 0, &atol), 0);
}

TEST(DenseArgsTest, BadShapesAreRefused) {
  KV_SKIP_WITHOUT_GPU();
  EXPECT_EQ(RopeCuda(nullptr, 10, nullptr, nullptr, 1, 2, 7, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RmsNormCuda(nullptr, nullptr, 1, 0, 1e-5f, nullptr, DType::kF32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  auto handle = CublasHandle::Create();
  ASSERT_TRUE(handle.ok());
  EXPECT_EQ(GemmBf16(*handle, nullptr, nullptr, 1, 1, 1, nullptr, DType::kF16, 1, 0, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvshard
