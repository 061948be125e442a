// Dequantization against the gguf Python package (tests/fixtures/dequantize_blocks.json, made by
// tests/fixtures/make_loader_fixtures.py): blocks from the demo model for the types it uses and seeded
// random blocks for the rest. Our arithmetic is ggml's, operation for operation, so every value must be
// bit-identical: no tolerance.
#include "worker/dequantize.h"

#include <algorithm>
#include <cstring>
#include <set>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/gguf_writer.h"

namespace kvshard {
namespace {

struct BlockCase {
  std::string name;
  GgmlType type;
  int64_t row_length = 0;
  std::vector<uint8_t> bytes;
  std::vector<uint32_t> expected_bits;
};

std::vector<BlockCase> LoadCases() {
  const std::string path = std::string(KVSHARD_SOURCE_DIR) + "/tests/fixtures/dequantize_blocks.json";
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  std::vector<BlockCase> cases;
  if (j.is_discarded()) return cases;
  for (const auto& c : j["cases"]) {
    BlockCase bc;
    bc.name = c["name"].get<std::string>();
    bc.type = static_cast<GgmlType>(c["type_id"].get<uint32_t>());
    bc.row_length = c["row_length"].get<int64_t>();
    const std::string hex = c["bytes_hex"].get<std::string>();
    for (size_t i = 0; i + 1 < hex.size(); i += 2) bc.bytes.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    bc.expected_bits = c["expected_bits"].get<std::vector<uint32_t>>();
    cases.push_back(std::move(bc));
  }
  return cases;
}

const std::vector<BlockCase>& Cases() {
  static const std::vector<BlockCase> cases = LoadCases();
  return cases;
}

// Compares bit patterns; prints the first mismatches.
void ExpectBitIdentical(const std::vector<float>& got, const std::vector<uint32_t>& expected) {
  ASSERT_EQ(got.size(), expected.size());
  int mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &got[i], 4);
    if (bits != expected[i]) {
      float want;
      std::memcpy(&want, &expected[i], 4);
      if (++mismatches <= 5) ADD_FAILURE() << "element " << i << ": got " << got[i] << " expected " << want;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

constexpr int kFixtureCases = 14;  // the cases DequantizeBlocksTest runs

TEST(DequantizeFixtureTest, CoversEveryType) {
  ASSERT_FALSE(Cases().empty()) << "tests/fixtures/dequantize_blocks.json is missing or unreadable";
  EXPECT_EQ(Cases().size(), static_cast<size_t>(kFixtureCases)) << "update kFixtureCases";
  std::set<std::string> types;
  for (const BlockCase& c : Cases()) {
    types.insert(std::string(GgmlTypeName(c.type)));
    EXPECT_TRUE(CanDequantize(c.type)) << c.name;
  }
  for (const char* t : {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}) {
    EXPECT_TRUE(types.count(t)) << "no fixture for " << t;
  }
}

// Parameter: index of the fixture case, and how many rows its blocks are split into (1 = one row of all
// blocks; n_blocks = one block per row).
class DequantizeBlocksTest : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(DequantizeBlocksTest, BitIdenticalToGgufPackage) {
  const auto [index, one_block_per_row] = GetParam();
  ASSERT_LT(static_cast<size_t>(index), Cases().size()) << "fixture missing";
  const BlockCase& c = Cases()[index];
  SCOPED_TRACE(c.name);
  const int64_t block = GgmlBlockSize(c.type);
  const int64_t n_rows = one_block_per_row ? c.row_length / block : 1;
  const int64_t row_length = c.row_length / n_rows;
  ASSERT_EQ(static_cast<int64_t>(c.bytes.size()), c.row_length / block * GgmlTypeSize(c.type));
  std::vector<float> out(c.row_length);
  ASSERT_TRUE(DequantizeRows(c.type, c.bytes.data(), n_rows, row_length, out.data()).ok());
  ExpectBitIdentical(out, c.expected_bits);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DequantizeBlocksTest,
                         ::testing::Combine(::testing::Range(0, kFixtureCases), ::testing::Bool()),
                         [](const auto& info) {
                           const int index = std::get<0>(info.param);
                           std::string name = index < static_cast<int>(Cases().size())
                                                  ? Cases()[index].name : "case" + std::to_string(index);
                           for (char& ch : name) if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name + (std::get<1>(info.param) ? "_RowPerBlock" : "_OneRow");
                         });

// The parallel path (large tensors) gives the same values as the small single-threaded one: many rows
// built by repeating each fixture's blocks, rows of 1, 37 and 64 blocks (the odd count crosses thread
// chunk boundaries unevenly).
class DequantizeParallelTest : public ::testing::TestWithParam<int> {};

TEST_P(DequantizeParallelTest, ManyRowsMatchFixture) {
  const int blocks_per_row = GetParam();
  for (const BlockCase& c : Cases()) {
    SCOPED_TRACE(c.name);
    const int64_t block = GgmlBlockSize(c.type), type_size = GgmlTypeSize(c.type);
    const int64_t fixture_blocks = c.row_length / block;
    const int64_t n_rows = std::max<int64_t>(3, (int64_t{1} << 16) / (blocks_per_row * block) + 5);
    const int64_t total_blocks = n_rows * blocks_per_row;
    std::vector<uint8_t> bytes(total_blocks * type_size);
    std::vector<uint32_t> expected(total_blocks * block);
    for (int64_t b = 0; b < total_blocks; ++b) {
      const int64_t src = b % fixture_blocks;
      std::memcpy(bytes.data() + b * type_size, c.bytes.data() + src * type_size, type_size);
      std::copy(c.expected_bits.begin() + src * block, c.expected_bits.begin() + (src + 1) * block,
                expected.begin() + b * block);
    }
    std::vector<float> out(expected.size());
    ASSERT_TRUE(DequantizeRows(c.type, bytes.data(), n_rows, blocks_per_row * block, out.data()).ok());
    ExpectBitIdentical(out, expected);
  }
}
INSTANTIATE_TEST_SUITE_P(BlocksPerRow, DequantizeParallelTest, ::testing::Values(1, 37, 64));

TEST(DequantizeTest, EmptyInputIsFine) {
  EXPECT_TRUE(DequantizeRows(GgmlType::kQ4_1, nullptr, 0, 32, nullptr).ok());
  EXPECT_TRUE(DequantizeRows(GgmlType::kQ6_K, nullptr, 5, 0, nullptr).ok());
}

TEST(DequantizeTest, RowLengthNotMultipleOfBlock) {
  std::vector<uint8_t> bytes(64);
  std::vector<float> out(64);
  const absl::Status s = DequantizeRows(GgmlType::kQ8_0, bytes.data(), 1, 33, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("not a multiple of the Q8_0 block size 32"), std::string::npos) << s;
}

TEST(DequantizeTest, UnsupportedTypeIsUnimplemented) {
  for (GgmlType type : {GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ8_1, GgmlType::kQ8_K, static_cast<GgmlType>(16)}) {
    EXPECT_FALSE(CanDequantize(type));
    std::vector<uint8_t> bytes(512);
    std::vector<float> out(256);
    const absl::Status s = DequantizeRows(type, bytes.data(), 1, 256, out.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(s.message().find(std::string(GgmlTypeName(type))), std::string::npos) << s;
  }
}

TEST(DequantizeTest, TensorShapeIsReversedNe) {
  testing_gguf::GgufWriter w;
  std::vector<float> values(24);
  for (int i = 0; i < 24; ++i) values[i] = static_cast<float>(i) - 3.5f;
  w.AddF32Tensor("t", {4, 3, 2}, values);
  std::vector<uint8_t> halves;
  for (float v : values) {
    const uint16_t h = FloatToHalf(v);
    halves.push_back(h & 0xff);
    halves.push_back(h >> 8);
  }
  w.AddTensor("h", {6, 4}, GgmlType::kF16, halves);
  const std::string path = testing_gguf::FreshTempDir("dequantize_shape") + "/t.gguf";
  w.WriteTo(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto t = DequantizeTensor(**file, *(*file)->FindTensor("t"));
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(t->data, values);
  auto h = DequantizeTensor(**file, *(*file)->FindTensor("h"));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->shape, (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(h->data, values);  // all values are exact in fp16
}

TEST(DequantizeTest, UnsupportedTensorNamesTensorAndType) {
  testing_gguf::GgufWriter w;
  w.AddTensor("blk.3.ffn_down.weight", {256, 2}, GgmlType::kQ3_K, std::vector<uint8_t>(2 * 110));
  const std::string path = testing_gguf::FreshTempDir("dequantize_unsupported") + "/q3k.gguf";
  w.WriteTo(path);
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto t = DequantizeTensor(**file, (*file)->tensors()[0]);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);
  const std::string message(t.status().message());
  EXPECT_NE(message.find("tensor 'blk.3.ffn_down.weight' has type Q3_K"), std::string::npos) << message;
  EXPECT_NE(message.find(path), std::string::npos) << message;
}

}  // namespace
}  // namespace kvshard
