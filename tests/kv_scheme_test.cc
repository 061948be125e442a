// KV scheme names, parameters, token layout and the bit formula.
#include <cstdio>

#include "gtest/gtest.h"
#include "kvstore/kv_scheme.h"
#include "yaml-cpp/yaml.h"

namespace kvshard {
namespace {

TEST(KvScheme, ParsesEverySchemeWithDefaults) {
  struct Case {
    const char* name;
    KvSchemeKind kind;
    int bits;
  };
  for (const Case& c : {Case{"fp16", KvSchemeKind::kFp16, 16}, Case{"int8", KvSchemeKind::kInt, 8},
                        Case{"int4", KvSchemeKind::kInt, 4}, Case{"int3", KvSchemeKind::kInt, 3},
                        Case{"kivi2", KvSchemeKind::kKivi, 2}, Case{"kivi4", KvSchemeKind::kKivi, 4},
                        Case{"kvq2", KvSchemeKind::kKvq, 2}, Case{"kvq3", KvSchemeKind::kKvq, 3},
                        Case{"KVQ4", KvSchemeKind::kKvq, 4}, Case{"wkv4", KvSchemeKind::kWkv, 4},
                        Case{"deco", KvSchemeKind::kDeco, 4}, Case{"deco2", KvSchemeKind::kDeco, 2}}) {
    auto config = ParseKvScheme(c.name);
    ASSERT_TRUE(config.ok()) << c.name << ": " << config.status();
    EXPECT_EQ(config->kind, c.kind) << c.name;
    EXPECT_EQ(config->bits, c.bits) << c.name;
  }
  auto kvq3 = ParseKvScheme("kvq3");
  EXPECT_EQ(kvq3->outlier_fraction, 0.01);
  EXPECT_EQ(kvq3->sink_tokens, 4);
  EXPECT_EQ(kvq3->residual_tokens, 32);
  EXPECT_EQ(ParseKvScheme("kivi2")->residual_tokens, 128);
  EXPECT_EQ(ParseKvScheme("kivi2")->group_size, 32);
  EXPECT_EQ(ParseKvScheme("wkv4")->residual_tokens, 1);
}

TEST(KvScheme, ParsesParameters) {
  auto c = ParseKvScheme("kvq3:outliers=0.5%, sink=2,residual=0");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->outlier_fraction, 0.005);
  EXPECT_EQ(c->sink_tokens, 2);
  EXPECT_EQ(c->residual_tokens, 0);
  EXPECT_EQ(c->ToString(), "kvq3:outliers=0.005,sink=2,residual=0");
  auto again = ParseKvScheme(c->ToString());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToString(), c->ToString());

  YAML::Node node = YAML::Load("{scheme: kivi4, group: 64, residual: 32}");
  auto y = KvSchemeFromYaml(node);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(y->kind, KvSchemeKind::kKivi);
  EXPECT_EQ(y->bits, 4);
  EXPECT_EQ(y->group_size, 64);
  EXPECT_EQ(y->residual_tokens, 32);
  EXPECT_TRUE(KvSchemeFromYaml(YAML::Load("int4")).ok());
}

TEST(KvScheme, RejectsBadInputWithClearErrors) {
  auto expect_error = [](const char* spec, const char* needle) {
    auto c = ParseKvScheme(spec);
    ASSERT_FALSE(c.ok()) << spec;
    EXPECT_NE(std::string(c.status().message()).find(needle), std::string::npos)
        << spec << " -> " << c.status().message();
  };
  expect_error("nuq3", "unknown KV scheme");
  expect_error("", "unknown KV scheme");
  expect_error("kvq7", "out of range");
  expect_error("kvq1", "out of range");
  expect_error("int1", "out of range");
  expect_error("int9", "out of range");
  expect_error("kivi16", "out of range");
  expect_error("kvq", "needs a bit width");
  expect_error("kvq3:bogus=1", "unknown KV scheme parameter");
  expect_error("kvq3:outliers=2", "outlier fraction");
  expect_error("kvq3:sink", "not key=value");
  expect_error("deco:block=48", "deco block");
  expect_error("int4:bits=12", "out of range");
  EXPECT_FALSE(KvSchemeFromYaml(YAML::Load("{bits: 3}")).ok());
  EXPECT_FALSE(ValidateKvScheme(*ParseKvScheme("deco"), 40).ok());  // 40 % 16 != 0
  EXPECT_FALSE(ValidateKvScheme(*ParseKvScheme("kvq3"), 512).ok());
  EXPECT_TRUE(ValidateKvScheme(*ParseKvScheme("kvq3"), 128).ok());
}

TEST(KvScheme, LayoutKeepsSinkResidualAndFlushUnits) {
  const KvSchemeConfig kvq = *ParseKvScheme("kvq3");  // sink 4, residual 32
  KvStreamLayout l = StreamLayout(kvq, 0, 100, false);
  EXPECT_EQ(l.sink, 4);
  EXPECT_EQ(l.quantized_end, 68);
  l = StreamLayout(kvq, 2, 100, false);  // positions 2, 3 are sink
  EXPECT_EQ(l.sink, 2);
  l = StreamLayout(kvq, 1000, 20, false);
  EXPECT_EQ(l.sink, 0);
  EXPECT_EQ(l.quantized_end, 0);
  l = StreamLayout(kvq, 1000, 20, true);  // sealed: everything quantized
  EXPECT_EQ(l.quantized_end, 20);

  const KvSchemeConfig kivi = *ParseKvScheme("kivi2");  // residual 128, group 32
  l = StreamLayout(kivi, 0, 300, false);
  EXPECT_EQ(l.quantized_end, 160);  // (300 - 128) / 32 * 32
  EXPECT_GE(l.n - l.quantized_end, 128);
  EXPECT_LT(l.n - l.quantized_end, 128 + 32);
}

TEST(KvScheme, FormulaMatchesHandCounts) {
  // int4, head_dim 64, 10 tokens, no sink/residual: codes 2*10*64*4, scales 2*10*2*16.
  EXPECT_EQ(KvStreamBits(*ParseKvScheme("int4"), 64, 0, 10, false), 2 * 10 * 64 * 4 + 2 * 10 * 2 * 16);
  // kvq3, head_dim 64, 100 tokens at 0: sink 4 and residual 32 fp16, 64 quantized, 3 key outliers.
  const int64_t q = 64;
  const int64_t expected = (4 + 32) * 2 * 64 * 16 + 2 * q * 64 * 3 + q * 8 + 3 * 24 + q * (32 + 1 * 24);
  EXPECT_EQ(KvStreamBits(*ParseKvScheme("kvq3"), 64, 0, 100, false, 3), expected);
  EXPECT_EQ(KvStreamBits(*ParseKvScheme("fp16"), 64, 0, 100, false), 2 * 100 * 64 * 16);
  // Ablations: the part left unquantized costs 16 bits per element.
  EXPECT_EQ(KvStreamBits(*ParseKvScheme("int4:parts=k"), 64, 0, 10, false), 10 * 64 * 4 + 10 * 2 * 16 + 10 * 64 * 16);
  EXPECT_EQ(ParseKvScheme("kvq3:parts=v")->ToString(), "kvq3:outliers=0.01,sink=4,residual=32,parts=v");
  EXPECT_FALSE(ParseKvScheme("kvq3:parts=q").ok());
}

TEST(KvScheme, Kvq3MeetsTheBitBudgetAtHeadDim128) {
  // The goal: kvq3 with 1% outliers at most 3.4 bits per element all-in at head_dim 128 (long context).
  const double kvq3_128 = KvAsymptoticBitsPerElement(*ParseKvScheme("kvq3"), 128);
  std::printf("bits/element, long context:   head_dim 128   head_dim 64\n");
  for (const char* name : {"fp16", "int8", "int4", "int3", "kivi2", "kivi4", "kvq2", "kvq3", "kvq4", "wkv4", "deco"}) {
    const KvSchemeConfig c = *ParseKvScheme(name);
    std::printf("  %-8s                     %6.3f         %6.3f\n", name, KvAsymptoticBitsPerElement(c, 128),
                KvAsymptoticBitsPerElement(c, 64));
  }
  EXPECT_LE(kvq3_128, 3.4);
  // The formula for long streams converges to the asymptotic value.
  const KvSchemeConfig kvq3 = *ParseKvScheme("kvq3");
  const int64_t n = 1 << 20;
  const int64_t key_outliers = static_cast<int64_t>(0.01 * n * 128);
  const double bits = static_cast<double>(KvStreamBits(kvq3, 128, 0, n, false, key_outliers)) / (2.0 * n * 128);
  EXPECT_NEAR(bits, kvq3_128, 0.01);
}

}  // namespace
}  // namespace kvshard
