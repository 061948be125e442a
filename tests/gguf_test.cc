// GGUF reader: every metadata value type, tensor infos and alignment, and malformed files, each of which
// must give one clear InvalidArgument line naming the file and the problem.
#include "common/gguf.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gguf_writer.h"

namespace kvshard {
namespace {

using testing_gguf::GgufWriter;

std::string WriteTemp(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = testing_gguf::FreshTempDir("gguf_" + name) + "/" + name + ".gguf";
  GgufWriter::WriteFile(path, bytes);
  return path;
}

// A small valid file: a little metadata and three tensors of different types and sizes.
GgufWriter SmallFile() {
  GgufWriter w;
  w.AddString("general.architecture", "llama");
  w.AddU32("llama.block_count", 2);
  w.AddStringArray("tokenizer.ggml.tokens", {"a", "b", "c"});
  w.AddF32Tensor("norm", {5}, {1, 2, 3, 4, 5});
  std::vector<uint8_t> q8(2 * 34, 0x11);  // two Q8_0 blocks: one row of 64
  w.AddTensor("q8", {64, 1}, GgmlType::kQ8_0, q8);
  w.AddF32Tensor("matrix", {3, 2}, {1, 2, 3, 4, 5, 6});
  return w;
}

// Expects an InvalidArgument on one line that names the file and contains `what`.
void ExpectOpenError(const std::string& path, const std::string& what) {
  auto file = GgufFile::Open(path);
  ASSERT_FALSE(file.ok()) << "opened " << path;
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  const std::string message(file.status().message());
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find(what), std::string::npos) << "expected '" << what << "' in: " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
}

TEST(GgufTest, ReadsEveryValueType) {
  GgufWriter w;
  w.AddScalar("u8", testing_gguf::kU8, uint8_t{200});
  w.AddScalar("i8", testing_gguf::kI8, int8_t{-100});
  w.AddScalar("u16", testing_gguf::kU16, uint16_t{60000});
  w.AddScalar("i16", testing_gguf::kI16, int16_t{-30000});
  w.AddScalar("u32", testing_gguf::kU32, uint32_t{4000000000u});
  w.AddScalar("i32", testing_gguf::kI32, int32_t{-2000000000});
  w.AddScalar("u64", testing_gguf::kU64, uint64_t{18000000000000000000ull});
  w.AddScalar("i64", testing_gguf::kI64, int64_t{-9000000000000000000ll});
  w.AddScalar("f32", testing_gguf::kF32, 0.1f);
  w.AddScalar("f64", testing_gguf::kF64, 0.1);
  w.AddBool("t", true);
  w.AddBool("f", false);
  w.AddString("s", "héllo");
  w.AddString("empty", "");
  w.AddArray<int32_t>("ai32", testing_gguf::kI32, {-1, 2, -3});
  w.AddArray<uint8_t>("au8", testing_gguf::kU8, {255, 0});
  w.AddArray<uint64_t>("au64", testing_gguf::kU64, {1, 2});
  w.AddArray<float>("af32", testing_gguf::kF32, {0.5f, -1.5f});
  w.AddArray<double>("af64", testing_gguf::kF64, {0.25});
  w.AddArray<uint8_t>("abool", testing_gguf::kBool, {1, 0, 1});
  w.AddStringArray("astr", {"x", "", "yz"});
  w.AddStringArray("aempty", {});
  const std::string path = WriteTemp("value_types", w.Bytes());

  auto opened = GgufFile::Open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const GgufFile& f = **opened;
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.metadata().size(), 22u);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(*f.GetInt("u8"), 200);
  EXPECT_EQ(*f.GetInt("i8"), -100);
  EXPECT_EQ(*f.GetInt("u16"), 60000);
  EXPECT_EQ(*f.GetInt("i16"), -30000);
  EXPECT_EQ(*f.GetInt("u32"), 4000000000ll);
  EXPECT_EQ(*f.GetInt("i32"), -2000000000);
  EXPECT_EQ(std::get<uint64_t>(*f.Find("u64")), 18000000000000000000ull);
  EXPECT_EQ(f.GetInt("u64").status().code(), absl::StatusCode::kInvalidArgument);  // beyond int64
  EXPECT_EQ(*f.GetInt("i64"), -9000000000000000000ll);
  EXPECT_EQ(*f.GetFloat("f32"), static_cast<double>(0.1f));
  EXPECT_EQ(*f.GetFloat("f64"), 0.1);
  EXPECT_EQ(*f.GetFloat("u32"), 4000000000.0);  // integers read as floats
  EXPECT_TRUE(*f.GetBool("t"));
  EXPECT_FALSE(*f.GetBool("f"));
  EXPECT_EQ(*f.GetString("s"), "héllo");
  EXPECT_EQ(*f.GetString("empty"), "");
  EXPECT_EQ(*f.GetIntArray("ai32"), (std::vector<int64_t>{-1, 2, -3}));
  EXPECT_EQ(*f.GetIntArray("au8"), (std::vector<int64_t>{255, 0}));
  EXPECT_EQ(*f.GetIntArray("au64"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(*f.GetFloatArray("af32"), (std::vector<double>{0.5, -1.5}));
  EXPECT_EQ(*f.GetFloatArray("af64"), (std::vector<double>{0.25}));
  EXPECT_EQ(*f.GetFloatArray("ai32"), (std::vector<double>{-1, 2, -3}));
  EXPECT_EQ(std::get<std::vector<bool>>(std::get<GgufArray>(*f.Find("abool"))), (std::vector<bool>{true, false, true}));
  EXPECT_EQ(*f.GetStringArray("astr"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_TRUE(f.GetStringArray("aempty")->empty());

  // Metadata keeps file order.
  EXPECT_EQ(f.metadata().front().first, "u8");
  EXPECT_EQ(f.metadata().back().first, "aempty");
}

TEST(GgufTest, GettersNameMissingKeysAndWrongTypes) {
  const std::string path = WriteTemp("getters", SmallFile().Bytes());
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_FALSE((*f)->Has("nope"));
  EXPECT_EQ((*f)->Find("nope"), nullptr);
  auto missing = (*f)->GetInt("llama.context_length");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'llama.context_length' is missing"), std::string::npos)
      << missing.status();
  auto wrong = (*f)->GetString("llama.block_count");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("is an integer, expected a string"), std::string::npos) << wrong.status();
  EXPECT_EQ((*f)->GetIntArray("tokenizer.ggml.tokens").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*f)->GetBool("general.architecture").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GgufTest, TensorInfosAndData) {
  const std::string path = WriteTemp("tensors", SmallFile().Bytes());
  auto opened = GgufFile::Open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const GgufFile& f = **opened;
  EXPECT_EQ(f.alignment(), 32u);
  ASSERT_EQ(f.tensors().size(), 3u);
  const GgufTensorInfo* norm = f.FindTensor("norm");
  const GgufTensorInfo* q8 = f.FindTensor("q8");
  const GgufTensorInfo* matrix = f.FindTensor("matrix");
  ASSERT_TRUE(norm && q8 && matrix);
  EXPECT_EQ(f.FindTensor("absent"), nullptr);
  EXPECT_EQ(norm->type, GgmlType::kF32);
  EXPECT_EQ(norm->ne, (std::vector<int64_t>{5}));
  EXPECT_EQ(norm->size_bytes, 20u);
  EXPECT_EQ(norm->offset, 0u);
  EXPECT_EQ(q8->type, GgmlType::kQ8_0);
  EXPECT_EQ(q8->size_bytes, 68u);
  EXPECT_EQ(q8->offset, 32u);
  EXPECT_EQ(q8->numel(), 64);
  EXPECT_EQ(matrix->ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(matrix->offset, 128u);
  float values[6];
  std::memcpy(values, f.TensorData(*matrix), sizeof(values));
  EXPECT_EQ(values[0], 1.0f);
  EXPECT_EQ(values[5], 6.0f);
  EXPECT_EQ(f.TensorData(*q8)[0], 0x11);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.TensorData(*norm)) % 32, 0u);
}

TEST(GgufTest, HonoursGeneralAlignment) {
  GgufWriter w = SmallFile();
  w.alignment = 256;
  w.AddU32("general.alignment", 256);
  const std::string path = WriteTemp("alignment", w.Bytes());
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 256u);
  EXPECT_EQ((*f)->FindTensor("matrix")->offset, 512u);
  float first;
  std::memcpy(&first, (*f)->TensorData(*(*f)->FindTensor("matrix")), 4);
  EXPECT_EQ(first, 1.0f);
}

TEST(GgufTest, TypeNamesAndSizes) {
  EXPECT_EQ(GgmlTypeName(GgmlType::kQ4_1), "Q4_1");
  EXPECT_EQ(GgmlTypeName(GgmlType::kBF16), "BF16");
  EXPECT_EQ(GgmlTypeName(static_cast<GgmlType>(23)), "IQ4_XS");
  EXPECT_EQ(GgmlTypeName(static_cast<GgmlType>(4)), "type<4>");
  EXPECT_EQ(GgmlTypeName(static_cast<GgmlType>(1000)), "type<1000>");
  EXPECT_EQ(GgmlBlockSize(GgmlType::kQ6_K), 256);
  EXPECT_EQ(GgmlTypeSize(GgmlType::kQ6_K), 210);
  EXPECT_EQ(GgmlTypeSize(GgmlType::kQ4_1), 20);
  EXPECT_EQ(GgmlBlockSize(static_cast<GgmlType>(4)), 0);
}

TEST(GgufBadInputTest, MissingFile) {
  auto f = GgufFile::Open("/nonexistent/dir/model.gguf");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound) << f.status();
  EXPECT_NE(f.status().message().find("/nonexistent/dir/model.gguf"), std::string::npos);
}

TEST(GgufBadInputTest, Directory) {
  const std::string dir = testing_gguf::FreshTempDir("gguf_dir");
  ExpectOpenError(dir, "is a directory");
}

TEST(GgufBadInputTest, EmptyFile) { ExpectOpenError(WriteTemp("empty", {}), "truncated"); }

TEST(GgufBadInputTest, WrongMagic) {
  std::vector<uint8_t> bytes = SmallFile().Bytes();
  std::memcpy(bytes.data(), "GGML", 4);
  ExpectOpenError(WriteTemp("magic", bytes), "bad magic 'GGML'");
}

TEST(GgufBadInputTest, NotAGgufAtAll) {
  const std::string text = "{\"hidden_size\": 576, \"num_hidden_layers\": 30}";
  ExpectOpenError(WriteTemp("json", std::vector<uint8_t>(text.begin(), text.end())), "bad magic");
}

TEST(GgufBadInputTest, WrongVersion) {
  GgufWriter w = SmallFile();
  w.version = 2;
  ExpectOpenError(WriteTemp("version2", w.Bytes()), "unsupported GGUF version 2");
  w.version = 3u << 24;  // a big-endian v3 file read little-endian
  ExpectOpenError(WriteTemp("version_be", w.Bytes()), "big-endian");
}

// Every proper prefix of a valid file is refused, and the error says the file is truncated.
class GgufTruncatedTest : public ::testing::TestWithParam<int> {};

TEST_P(GgufTruncatedTest, EveryPrefixIsRefused) {
  const std::vector<uint8_t> full = SmallFile().Bytes();
  const int step = GetParam();
  for (size_t n = 0; n < full.size(); n += step) {
    const std::string path = WriteTemp("truncated", std::vector<uint8_t>(full.begin(), full.begin() + n));
    SCOPED_TRACE(::testing::Message() << "first " << n << " of " << full.size() << " bytes");
    ExpectOpenError(path, "truncated");
    if (::testing::Test::HasFailure()) return;
  }
}
INSTANTIATE_TEST_SUITE_P(Steps, GgufTruncatedTest, ::testing::Values(1, 37));

TEST(GgufBadInputTest, AbsurdTensorCount) {
  std::vector<uint8_t> bytes = SmallFile().Bytes();
  const uint64_t absurd = uint64_t{1} << 60;
  std::memcpy(bytes.data() + 8, &absurd, 8);
  ExpectOpenError(WriteTemp("tensor_count", bytes), "cannot fit");
}

TEST(GgufBadInputTest, AbsurdMetadataCount) {
  std::vector<uint8_t> bytes = SmallFile().Bytes();
  const uint64_t absurd = ~uint64_t{0};
  std::memcpy(bytes.data() + 16, &absurd, 8);
  ExpectOpenError(WriteTemp("kv_count", bytes), "cannot fit");
}

TEST(GgufBadInputTest, AbsurdStringLength) {
  GgufWriter w;
  std::vector<uint8_t> payload(8);
  const uint64_t absurd = uint64_t{1} << 62;
  std::memcpy(payload.data(), &absurd, 8);
  w.AddRaw("general.name", testing_gguf::kString, payload);
  ExpectOpenError(WriteTemp("string_length", w.Bytes()), "'general.name': truncated or corrupt file");
}

TEST(GgufBadInputTest, AbsurdArrayLength) {
  GgufWriter w;
  std::vector<uint8_t> payload(12 + 8);
  const uint32_t element_type = testing_gguf::kString;
  const uint64_t absurd = uint64_t{1} << 40;
  std::memcpy(payload.data(), &element_type, 4);
  std::memcpy(payload.data() + 4, &absurd, 8);
  w.AddRaw("tokenizer.ggml.tokens", testing_gguf::kArray, payload);
  ExpectOpenError(WriteTemp("array_length", w.Bytes()), "array of 1099511627776 elements");
}

TEST(GgufBadInputTest, UnknownValueType) {
  GgufWriter w;
  w.AddRaw("weird", 13, {0, 0, 0, 0});
  ExpectOpenError(WriteTemp("value_type", w.Bytes()), "unknown value type 13");
}

TEST(GgufBadInputTest, NestedArray) {
  GgufWriter w;
  std::vector<uint8_t> payload(12);
  const uint32_t element_type = testing_gguf::kArray;
  std::memcpy(payload.data(), &element_type, 4);
  w.AddRaw("nested", testing_gguf::kArray, payload);
  ExpectOpenError(WriteTemp("nested", w.Bytes()), "nested arrays");
}

TEST(GgufBadInputTest, DuplicateKey) {
  GgufWriter w = SmallFile();
  w.AddU32("llama.block_count", 3);
  ExpectOpenError(WriteTemp("duplicate_key", w.Bytes()), "duplicate metadata key");
}

TEST(GgufBadInputTest, DuplicateTensor) {
  GgufWriter w = SmallFile();
  w.AddF32Tensor("norm", {1}, {1});
  ExpectOpenError(WriteTemp("duplicate_tensor", w.Bytes()), "duplicate tensor name");
}

TEST(GgufBadInputTest, BadAlignment) {
  GgufWriter w = SmallFile();
  w.AddU32("general.alignment", 48);
  ExpectOpenError(WriteTemp("bad_alignment", w.Bytes()), "alignment 48 is not a positive power of two");
}

TEST(GgufBadInputTest, UnknownTensorType) {
  GgufWriter w;
  w.AddTensor("weird", {4}, static_cast<GgmlType>(77), std::vector<uint8_t>(16));
  ExpectOpenError(WriteTemp("unknown_type", w.Bytes()), "tensor 'weird': unknown ggml type id 77");
}

TEST(GgufBadInputTest, RowNotMultipleOfBlock) {
  GgufWriter w;
  w.AddTensor("q", {48, 1}, GgmlType::kQ4_0, std::vector<uint8_t>(18));
  ExpectOpenError(WriteTemp("row_block", w.Bytes()), "row length 48 is not a multiple of the Q4_0 block size 32");
}

TEST(GgufBadInputTest, AbsurdDimensions) {
  GgufWriter w;
  w.AddTensor("huge", {int64_t{1} << 40, int64_t{1} << 40}, GgmlType::kF32, std::vector<uint8_t>(4));
  ExpectOpenError(WriteTemp("huge_dims", w.Bytes()), "absurd dimension");
  GgufWriter zero;
  zero.AddTensor("zero", {0}, GgmlType::kF32, {});
  ExpectOpenError(WriteTemp("zero_dims", zero.Bytes()), "absurd dimension 0");
  GgufWriter many;
  many.AddTensor("many", {1, 1, 1, 1, 1}, GgmlType::kF32, std::vector<uint8_t>(4));
  ExpectOpenError(WriteTemp("many_dims", many.Bytes()), "has 5 dimensions");
}

TEST(GgufBadInputTest, TensorOutsideFile) {
  // A tensor that claims more rows than the data section holds.
  GgufWriter w;
  w.AddTensor("big", {4, 1000}, GgmlType::kF32, std::vector<uint8_t>(16));
  ExpectOpenError(WriteTemp("outside", w.Bytes()), "tensor 'big': truncated or corrupt file: data at [0, 16000)");
}

TEST(GgufBadInputTest, MisalignedTensorOffset) {
  // Rewrites the offset of tensor 'matrix' (128) in its tensor info to 100.
  std::vector<uint8_t> bytes = SmallFile().Bytes();
  const std::string name = "matrix";
  const auto pos = std::search(bytes.begin(), bytes.end(), name.begin(), name.end()) - bytes.begin();
  const size_t offset_at = pos + name.size() + 4 + 2 * 8 + 4;  // name, n_dims, 2 dims, type
  uint64_t offset;
  std::memcpy(&offset, bytes.data() + offset_at, 8);
  ASSERT_EQ(offset, 128u);
  offset = 100;
  std::memcpy(bytes.data() + offset_at, &offset, 8);
  ExpectOpenError(WriteTemp("misaligned", bytes), "data offset 100 is not a multiple of the alignment 32");
}

}  // namespace
}  // namespace kvshard
