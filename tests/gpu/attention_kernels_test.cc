// GPU attention kernels (split-KV decode, causal prefill, merge) against the CPU twins in
// kernels/attention.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention.h"

namespace kvshard {
namespace {

using testing::CountMismatches;
using testing::DeviceBuffer;
using testing::GpuComputeCapabilityMajor;
using testing::RandomUniform;
using testing::ToDevice;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint16_t Encode(float f, DType dtype) { return dtype == DType::kF16 ? FloatToHalf(f) : FloatToBf16(f); }
float Decode(uint16_t h, DType dtype) { return dtype == DType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h); }
uint16_t NanBits(DType dtype) { return dtype == DType::kF16 ? 0x7e00 : 0x7fc0; }

// A paged cache filled on the host. Every slot no token occupies holds NaN, so a kernel that reads past
// a request's tokens poisons its result.
struct HostPagedKv {
  DType dtype;
  int n_kv_heads, head_dim;
  int64_t page_size, pages_per_request;
  std::vector<uint16_t> k, v;
  std::vector<int32_t> table;  // empty: pages in request order
  // ref_k[b][h]: [len_b][head_dim] floats exactly equal to the stored 16-bit values.
  std::vector<std::vector<std::vector<float>>> ref_k, ref_v;

  HostPagedKv(DType dtype_, int n_kv, int d, int64_t page_size_, const std::vector<int64_t>& lens, bool shuffled,
              uint64_t seed)
      : dtype(dtype_), n_kv_heads(n_kv), head_dim(d), page_size(page_size_) {
    const int batch = static_cast<int>(lens.size());
    const int64_t max_len = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
    pages_per_request = std::max<int64_t>(1, (max_len + page_size - 1) / page_size);
    const int64_t n_pages = batch * pages_per_request;
    k.assign(n_pages * n_kv * page_size * d, NanBits(dtype));
    v = k;
    std::vector<int32_t> physical(n_pages);
    std::iota(physical.begin(), physical.end(), 0);
    std::mt19937_64 rng(seed);
    if (shuffled) {
      std::shuffle(physical.begin(), physical.end(), rng);
      table = physical;
    }
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    ref_k.resize(batch);
    ref_v.resize(batch);
    for (int b = 0; b < batch; ++b) {
      ref_k[b].assign(n_kv, std::vector<float>(lens[b] * d));
      ref_v[b].assign(n_kv, std::vector<float>(lens[b] * d));
      for (int64_t t = 0; t < lens[b]; ++t) {
        const int64_t page = physical[b * pages_per_request + t / page_size];
        for (int h = 0; h < n_kv; ++h) {
          const int64_t base = ((page * n_kv + h) * page_size + t % page_size) * d;
          for (int c = 0; c < d; ++c) {
            const uint16_t kb = Encode(dist(rng), dtype), vb = Encode(dist(rng), dtype);
            k[base + c] = kb;
            v[base + c] = vb;
            ref_k[b][h][t * d + c] = Decode(kb, dtype);
            ref_v[b][h][t * d + c] = Decode(vb, dtype);
          }
        }
      }
    }
  }
};

struct DeviceKv {
  DeviceBuffer<uint16_t> k, v;
  DeviceBuffer<int32_t> table;
  PagedKv view;
  explicit DeviceKv(const HostPagedKv& h) {
    k.Upload(h.k);
    v.Upload(h.v);
    if (!h.table.empty()) table.Upload(h.table);
    view.dtype = h.dtype;
    view.k = k.get();
    view.v = v.get();
    view.page_size = h.page_size;
    view.page_table = h.table.empty() ? nullptr : table.get();
    view.pages_per_request = h.pages_per_request;
  }
};

// ---------------------------------------------------------------------------------------------------
struct DecodeCase {
  std::string name;
  int head_dim;
  DType dtype;
  int n_heads, n_kv_heads;
  std::vector<int64_t> lens;
  int64_t page_size;
  bool shuffled;
  int max_splits;  // 0: the kernel's choice
  float q_scale;   // > 1 sharpens the softmax
};

class DecodeAttentionTest : public ::testing::TestWithParam<DecodeCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(DecodeAttentionTest, MatchesAttentionPartialsCpu) {
  const DecodeCase c = GetParam();
  const int batch = static_cast<int>(c.lens.size());
  const int d = c.head_dim;
  const int group = c.n_heads / c.n_kv_heads;
  const HostPagedKv host(c.dtype, c.n_kv_heads, d, c.page_size, c.lens, c.shuffled, 7);
  const std::vector<float> q = RandomUniform(static_cast<size_t>(batch) * c.n_heads * d, 8, -c.q_scale, c.q_scale);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  std::vector<float> want_out(q.size()), want_lse(static_cast<size_t>(batch) * c.n_heads);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < c.n_heads; ++h) {
      const int64_t row = static_cast<int64_t>(b) * c.n_heads + h;
      const auto& kr = host.ref_k[b][h / group];
      const auto& vr = host.ref_v[b][h / group];
      AttentionPartialsCpu(q.data() + row * d, d, 1, nullptr, kr.data(), vr.data(), d, c.lens[b], 0, d, scale,
                           want_out.data() + row * d, d, want_lse.data() + row);
    }
  }

  DeviceKv kv(host);
  std::vector<int32_t> lens32(c.lens.begin(), c.lens.end());
  DeviceBuffer<int32_t> dlens = ToDevice(lens32);
  DeviceBuffer<float> dq = ToDevice(q), dout(q.size()), dlse(want_lse.size());
  DeviceBuffer<char> workspace(DecodeAttentionWorkspaceBytes(batch, c.n_heads, d));
  dout.Poison();
  dlse.Poison();
  workspace.Poison();
  DecodeAttentionArgs args;
  args.q = dq.get();
  args.kv = kv.view;
  args.kv_lens = dlens.get();
  args.max_kv_len = c.lens.empty() ? 0 : *std::max_element(c.lens.begin(), c.lens.end());
  args.batch = batch;
  args.n_heads = c.n_heads;
  args.n_kv_heads = c.n_kv_heads;
  args.head_dim = d;
  args.scale = scale;
  args.out = dout.get();
  args.lse = dlse.get();
  args.workspace = workspace.get();
  args.workspace_bytes = workspace.size();
  args.max_splits = c.max_splits;
  const absl::Status status = DecodeAttentionCuda(args, nullptr);
  KV_SKIP_IF_NOT_BUILT(status);
  ASSERT_TRUE(status.ok()) << status;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::printf("  %s: %d KV split(s)\n", c.name.c_str(), DecodeAttentionSplits(args));
  // Both sides compute in fp32 from identical K/V values; they differ in summation order and in exp2
  // (ex2.approx, ~2 ulp). Score errors stay below ~1e-5 * q_scale; the output, a convex combination of
  // values |v| <= 1, moves by less than that, and lse by the score error.
  const double tol = 2e-5 * c.q_scale;
  EXPECT_EQ(CountMismatches("out", dout.Download(), want_out, tol, 1e-4), 0);
  EXPECT_EQ(CountMismatches("lse", dlse.Download(), want_lse, tol, 1e-5), 0);
}

std::vector<DecodeCase> DecodeCases() {
  return {
      {"one_token", 128, DType::kF16, 32, 8, {1}, 64, false, 0, 1.0f},
      {"llama_mixed_batch", 128, DType::kF16, 32, 8, {37, 0, 1000, 4096, 65}, 64, true, 0, 1.0f},
      {"llama_page_boundaries", 128, DType::kF16, 32, 8, {63, 64, 127, 128, 129}, 64, true, 0, 2.0f},
      {"smollm_mixed", 64, DType::kF16, 9, 3, {37, 1, 0, 2049}, 128, true, 0, 1.0f},
      {"smollm_sharp", 64, DType::kF16, 9, 3, {3000}, 64, false, 0, 8.0f},
      {"single_split", 128, DType::kF16, 32, 8, {5000, 17}, 256, true, 1, 1.0f},
      {"seven_splits", 64, DType::kF16, 9, 3, {5000, 4999}, 64, true, 7, 1.0f},
      {"all_empty", 128, DType::kF16, 32, 8, {0, 0}, 64, false, 0, 1.0f},
      {"mha", 128, DType::kF16, 4, 4, {300, 77}, 64, true, 0, 1.0f},
      {"group2", 64, DType::kF16, 8, 4, {513}, 64, true, 0, 1.0f},
      {"contiguous_long", 128, DType::kF16, 32, 8, {40000}, 40000 / 64 * 64 + 64, false, 0, 1.0f},
      {"bf16_llama", 128, DType::kBF16, 32, 8, {37, 4096, 1}, 64, true, 0, 1.0f},
      {"bf16_smollm", 64, DType::kBF16, 9, 3, {1000, 0}, 64, true, 0, 1.0f},
      {"group8", 128, DType::kF16, 64, 8, {1000, 37}, 64, true, 0, 1.0f},
      {"group7", 64, DType::kF16, 28, 4, {200}, 64, false, 0, 1.0f},
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, DecodeAttentionTest, ::testing::ValuesIn(DecodeCases()),
                         [](const auto& info) { return info.param.name; });

TEST(DecodeAttentionArgsTest, BadInputsAreRefused) {
  KV_SKIP_WITHOUT_GPU();
  DecodeAttentionArgs args;
  args.batch = 1;
  args.n_heads = 32;
  args.n_kv_heads = 8;
  args.head_dim = 128;
  args.kv.page_size = 48;  // not a multiple of 64
  args.kv.pages_per_request = 1;
  EXPECT_EQ(DecodeAttentionCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.kv.page_size = 64;
  args.max_kv_len = 65;  // more than one page holds
  EXPECT_EQ(DecodeAttentionCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.max_kv_len = 1;
  args.head_dim = 96;
  DeviceBuffer<float> dummy(1);
  args.q = args.out = args.lse = dummy.get();
  args.kv.k = args.kv.v = dummy.get();
  DeviceBuffer<int32_t> lens(1);
  args.kv_lens = lens.get();
  const absl::Status status = DecodeAttentionCuda(args, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(status.message()).find("head_dim 96"), std::string::npos) << status;
  args.head_dim = 128;
  args.n_kv_heads = 5;  // 32 % 5 != 0
  EXPECT_EQ(DecodeAttentionCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.n_kv_heads = 8;
  args.q_row_stride = 32 * 128 - 4;  // rows would overlap
  EXPECT_EQ(DecodeAttentionCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args.q_row_stride = 32 * 128 + 2;  // float4 loads need 16-byte rows
  EXPECT_EQ(DecodeAttentionCuda(args, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------------
struct PrefillCase {
  std::string name;
  int head_dim;
  DType dtype;
  int n_heads, n_kv_heads;
  int64_t n_queries, n_keys, query_first_position, key_first_position, page_size;
  bool shuffled;
};

class PrefillAttentionTest : public ::testing::TestWithParam<PrefillCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(PrefillAttentionTest, MatchesAttentionPartialsCpu) {
  const PrefillCase c = GetParam();
  const int d = c.head_dim;
  const int group = c.n_heads / c.n_kv_heads;
  const HostPagedKv host(c.dtype, c.n_kv_heads, d, c.page_size, {c.n_keys}, c.shuffled, 17);
  std::vector<float> qf = RandomUniform(c.n_queries * c.n_heads * d, 18, -2.0f, 2.0f);
  std::vector<uint16_t> q16(qf.size());
  for (size_t i = 0; i < qf.size(); ++i) {
    q16[i] = Encode(qf[i], c.dtype);
    qf[i] = Decode(q16[i], c.dtype);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  std::vector<float> want_out(qf.size()), want_lse(c.n_queries * c.n_heads), lse_tmp(c.n_queries);
  std::vector<int64_t> row_positions(c.n_queries);
  for (int64_t i = 0; i < c.n_queries; ++i) row_positions[i] = c.query_first_position + i;
  const int64_t stride = static_cast<int64_t>(c.n_heads) * d;
  for (int h = 0; h < c.n_heads; ++h) {
    const auto& kr = host.ref_k[0][h / group];
    const auto& vr = host.ref_v[0][h / group];
    AttentionPartialsCpu(qf.data() + h * d, stride, c.n_queries, row_positions.data(), kr.data(), vr.data(), d,
                         c.n_keys, c.key_first_position, d, scale, want_out.data() + h * d, stride, lse_tmp.data());
    for (int64_t i = 0; i < c.n_queries; ++i) want_lse[i * c.n_heads + h] = lse_tmp[i];
  }

  DeviceKv kv(host);
  DeviceBuffer<uint16_t> dq = ToDevice(q16);
  DeviceBuffer<float> dout(qf.size()), dlse(want_lse.size());
  // Both kernels: mma.sync everywhere, warpgroup MMAs on Hopper.
  for (PrefillKernel kernel : {PrefillKernel::kMmaSync, PrefillKernel::kWgmma}) {
    SCOPED_TRACE(kernel == PrefillKernel::kWgmma ? "wgmma kernel" : "mma.sync kernel");
    if (kernel == PrefillKernel::kWgmma && GpuComputeCapabilityMajor() != 9) continue;
    dout.Poison();
    dlse.Poison();
    PrefillAttentionArgs args;
    args.q = dq.get();
    args.kv = kv.view;
    args.n_queries = c.n_queries;
    args.n_keys = c.n_keys;
    args.query_first_position = c.query_first_position;
    args.key_first_position = c.key_first_position;
    args.n_heads = c.n_heads;
    args.n_kv_heads = c.n_kv_heads;
    args.head_dim = d;
    args.scale = scale;
    args.out = dout.get();
    args.lse = dlse.get();
    args.kernel = kernel;
    const absl::Status status = PrefillAttentionCuda(args, nullptr);
    KV_SKIP_IF_NOT_BUILT(status);
    ASSERT_TRUE(status.ok()) << status;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // Scores are exact products of 16-bit values summed in fp32. The probabilities P enter the P*V product
    // rounded to the input type (relative error <= 2^-11 for fp16, 2^-8 for bf16), so the output, a
    // weighted mean of |v| <= 1, moves by at most that; lse uses the fp32 probabilities.
    const double p_rounding = c.dtype == DType::kF16 ? 1.0 / 2048 : 1.0 / 256;
    EXPECT_EQ(CountMismatches("out", dout.Download(), want_out, p_rounding + 2e-5, 0), 0);
    EXPECT_EQ(CountMismatches("lse", dlse.Download(), want_lse, 1e-4, 1e-5), 0);
  }
}

std::vector<PrefillCase> PrefillCases() {
  return {
      {"self_37", 128, DType::kF16, 32, 8, 37, 37, 0, 0, 64, false},
      {"one_query", 128, DType::kF16, 32, 8, 1, 100, 99, 0, 128, false},
      {"chunk_after_context", 128, DType::kF16, 32, 8, 100, 300, 200, 0, 64, true},
      {"smollm_129", 64, DType::kF16, 9, 3, 129, 129, 0, 0, 192, true},
      {"smollm_chunk", 64, DType::kF16, 9, 3, 65, 1000, 935, 0, 64, true},
      {"multi_tile_512", 128, DType::kF16, 32, 8, 512, 512, 0, 0, 64, true},
      {"shard_after_queries", 128, DType::kF16, 8, 2, 64, 128, 500, 1000, 128, false},  // sees nothing
      {"queries_straddle_shard", 64, DType::kF16, 9, 3, 70, 90, 480, 500, 128, true},
      {"shard_before_queries", 128, DType::kF16, 32, 8, 33, 257, 9000, 100, 320, true},
      {"mha", 64, DType::kF16, 4, 4, 77, 77, 0, 0, 128, false},
      {"bf16_llama", 128, DType::kBF16, 32, 8, 200, 300, 100, 0, 64, true},
      {"bf16_smollm", 64, DType::kBF16, 9, 3, 37, 37, 0, 0, 64, false},
      // Several 128-key tiles whose halves sit on different pages, the diagonal inside a tile.
      {"long_chunk_after_context", 128, DType::kF16, 32, 8, 300, 1300, 1000, 0, 192, true},
      {"bf16_long_smollm", 64, DType::kBF16, 9, 3, 260, 777, 517, 0, 64, true},
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, PrefillAttentionTest, ::testing::ValuesIn(PrefillCases()),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------------------
struct MergeCase {
  int n_sources;
  int64_t n_rows;
  int head_dim;
};

class MergePartialsTest : public ::testing::TestWithParam<MergeCase> {
 protected:
  void SetUp() override { KV_SKIP_WITHOUT_GPU(); }
};

TEST_P(MergePartialsTest, MatchesMergePartialsCpu) {
  const MergeCase c = GetParam();
  std::vector<float> outs = RandomUniform(static_cast<size_t>(c.n_sources) * c.n_rows * c.head_dim, 31);
  std::vector<float> lses = RandomUniform(static_cast<size_t>(c.n_sources) * c.n_rows, 32, -20.0f, 20.0f);
  // Empty sources: source 1 entirely; and every source for rows divisible by 5.
  for (int s = 0; s < c.n_sources; ++s) {
    for (int64_t r = 0; r < c.n_rows; ++r) {
      if ((s == 1 || r % 5 == 0) && c.n_sources > 0) {
        lses[s * c.n_rows + r] = kNegInf;
        std::fill_n(outs.begin() + (s * c.n_rows + r) * c.head_dim, c.head_dim, 0.0f);
      }
    }
  }
  std::vector<const float*> out_ptrs, lse_ptrs;
  for (int s = 0; s < c.n_sources; ++s) {
    out_ptrs.push_back(outs.data() + s * c.n_rows * c.head_dim);
    lse_ptrs.push_back(lses.data() + s * c.n_rows);
  }
  std::vector<float> want_out(c.n_rows * c.head_dim), want_lse(c.n_rows);
  MergePartialsCpu(c.n_sources, out_ptrs.data(), lse_ptrs.data(), c.n_rows, c.head_dim, want_out.data(),
                   want_lse.data());

  DeviceBuffer<float> douts = ToDevice(outs), dlses = ToDevice(lses), dout(want_out.size()), dlse(c.n_rows);
  dout.Poison();
  dlse.Poison();
  ASSERT_TRUE(MergePartialsCuda(douts.get(), dlses.get(), c.n_sources, c.n_rows, c.head_dim, dout.get(), dlse.get(),
                                nullptr)
                  .ok());
  // fp32 on both sides; expf is approximate on the GPU (~2 ulp).
  EXPECT_EQ(CountMismatches("out", dout.Download(), want_out, 1e-6, 1e-5), 0);
  EXPECT_EQ(CountMismatches("lse", dlse.Download(), want_lse, 1e-6, 1e-6), 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, MergePartialsTest,
                         ::testing::Values(MergeCase{1, 37, 128}, MergeCase{2, 37, 64}, MergeCase{3, 1, 128},
                                           MergeCase{8, 1024, 128}, MergeCase{0, 5, 64}, MergeCase{128, 37, 64}));

}  // namespace
}  // namespace kvshard
