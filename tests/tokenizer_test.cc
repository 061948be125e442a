// Tokenizer tests. The expected ids come from Hugging Face `tokenizers` through
// tests/fixtures/make_tokenizer_fixtures.py (tests/fixtures/tokenizer_fixtures.json).
#include "coordinator/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/gguf.h"
#include "coordinator/bpe_vocabulary.h"
#include "coordinator/pretokenizer.h"
#include "tests/gguf_writer.h"
#include "tests/test_sha256.h"

namespace kvshard {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using testing::Sha256Hex;

constexpr int kMaxReportedMismatches = 5;

std::string ReadFileOrEmpty(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

const Json& Fixtures() {
  static const Json fixtures = [] {
    const fs::path path = fs::path(KVSHARD_SOURCE_DIR) / "tests/fixtures/tokenizer_fixtures.json";
    Json j = Json::parse(ReadFileOrEmpty(path), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      ADD_FAILURE() << path << ": missing or not valid JSON";
      return Json::object();
    }
    return j;
  }();
  return fixtures;
}

fs::path ModelPath() {
  if (const char* env = std::getenv("KVSHARD_MODEL")) return env;
  const char* home = std::getenv("HOME");
  return fs::path(home ? home : "") / ".cache/kvshard/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

fs::path TextsDir() {
  if (const char* env = std::getenv("KVSHARD_TEXTS")) return env;
  return fs::path(KVSHARD_SOURCE_DIR) / "../shared/data/texts";
}

// Where make_tokenizer_fixtures.py writes the reference tokenizer.json by default: beside the model.
fs::path ReferenceTokenizerJson() {
  if (const char* env = std::getenv("KVSHARD_TOKENIZER_JSON")) return env;
  fs::path path = ModelPath();
  path.replace_extension("");
  path.replace_extension(".tokenizer.json");
  return path;
}

std::string IdsToString(const std::vector<int32_t>& ids, size_t limit = 24) {
  std::vector<int32_t> head(ids.begin(), ids.begin() + std::min(limit, ids.size()));
  return absl::StrCat("[", absl::StrJoin(head, ", "), ids.size() > limit ? ", ..." : "", "] (", ids.size(),
                      " ids)");
}

std::string IdsSha256(const std::vector<int32_t>& ids) {
  std::string bytes;
  bytes.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    for (int i = 0; i < 4; ++i) bytes.push_back(static_cast<char>(static_cast<uint32_t>(id) >> (8 * i)));
  }
  return Sha256Hex(bytes);
}

std::vector<int32_t> JsonIds(const Json& j) { return j.get<std::vector<int32_t>>(); }

// The first `limit` bytes of a text, shortened so as not to cut a UTF-8 sequence (as the script does).
std::string Utf8Prefix(const std::string& data, size_t limit) {
  if (data.size() <= limit) return data;
  size_t end = limit;
  while (end > 0 && (static_cast<unsigned char>(data[end]) & 0xC0) == 0x80) --end;
  return data.substr(0, end);
}

// ---------------------------------------------------------------------------------------------------
// Byte alphabet and pre-tokenizers (no model needed).

TEST(ByteAlphabetTest, MatchesGpt2BytesToUnicode) {
  const auto& table = ByteToAlphabetCodePoint();
  EXPECT_EQ(table['!'], U'!');
  EXPECT_EQ(table['~'], U'~');
  EXPECT_EQ(table[0xA1], char32_t{0xA1});
  EXPECT_EQ(table[0xFF], char32_t{0xFF});
  EXPECT_EQ(table[0], char32_t{0x100});
  EXPECT_EQ(table[' '], char32_t{0x120});   // 'Ġ'
  EXPECT_EQ(table['\n'], char32_t{0x10A});  // 'Ċ'
  EXPECT_EQ(table[0xAD], char32_t{0x143});  // the last non-printable byte
  std::set<char32_t> distinct(table.begin(), table.end());
  EXPECT_EQ(distinct.size(), 256u);
}

struct PreTokenizerCase {
  const char* fixture_name;
  PreTokenizerKind kind;
};

class PreTokenizerTest : public ::testing::TestWithParam<PreTokenizerCase> {};

std::vector<uint32_t> PieceLengths(PreTokenizerKind kind, std::string_view text) {
  std::vector<std::string_view> pieces;
  PreTokenize(kind, text, &pieces);
  std::vector<uint32_t> lengths;
  size_t offset = 0;
  for (std::string_view piece : pieces) {
    EXPECT_EQ(piece.data(), text.data() + offset) << "pieces must cover the text in order";
    offset += piece.size();
    lengths.push_back(static_cast<uint32_t>(piece.size()));
  }
  EXPECT_EQ(offset, text.size());
  return lengths;
}

TEST_P(PreTokenizerTest, MatchesTokenizersOnStrings) {
  const Json& fixtures = Fixtures();
  std::map<std::string, std::string> texts;
  for (const Json& s : fixtures["strings"])
    texts[s["name"].get<std::string>()] = s["text"].get<std::string>();
  int checked = 0, mismatches = 0;
  for (const Json& entry : fixtures["pretokenize"]) {
    if (entry["kind"] != GetParam().fixture_name || !entry.contains("name")) continue;
    const std::string& text = texts.at(entry["name"].get<std::string>());
    const std::vector<uint32_t> expected = entry["lengths"].get<std::vector<uint32_t>>();
    const std::vector<uint32_t> actual = PieceLengths(GetParam().kind, text);
    ++checked;
    if (actual != expected && ++mismatches <= kMaxReportedMismatches) {
      ADD_FAILURE() << entry["name"] << ": piece byte lengths [" << absl::StrJoin(actual, ",")
                    << "], expected [" << absl::StrJoin(expected, ",") << "]";
    }
  }
  EXPECT_GT(checked, 30);
  EXPECT_EQ(mismatches, 0);
}

TEST_P(PreTokenizerTest, MatchesTokenizersOnTexts) {
  if (!fs::is_directory(TextsDir()))
    GTEST_SKIP() << "texts not found at " << TextsDir() << " (set KVSHARD_TEXTS)";
  const Json& fixtures = Fixtures();
  const size_t prefix = fixtures["text_prefix_bytes"].get<size_t>();
  int checked = 0;
  for (const Json& entry : fixtures["pretokenize"]) {
    if (entry["kind"] != GetParam().fixture_name || !entry.contains("file")) continue;
    const fs::path path = TextsDir() / entry["file"].get<std::string>();
    const std::string text = Utf8Prefix(ReadFileOrEmpty(path), prefix);
    if (text.empty()) {
      ADD_FAILURE() << path << ": missing";
      continue;
    }
    const std::vector<uint32_t> lengths = PieceLengths(GetParam().kind, text);
    std::string bytes;
    for (uint32_t len : lengths) bytes.append(reinterpret_cast<const char*>(&len), 4);  // little endian
    EXPECT_EQ(lengths.size(), entry["count"].get<size_t>()) << path;
    EXPECT_EQ(Sha256Hex(bytes), entry["lengths_sha256"].get<std::string>()) << path;
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

INSTANTIATE_TEST_SUITE_P(Kinds, PreTokenizerTest,
                         ::testing::Values(PreTokenizerCase{"gpt2", PreTokenizerKind::kGpt2},
                                           PreTokenizerCase{"gpt2_individual_digits",
                                                            PreTokenizerKind::kGpt2IndividualDigits},
                                           PreTokenizerCase{"llama3", PreTokenizerKind::kLlama3},
                                           PreTokenizerCase{"qwen2", PreTokenizerKind::kQwen2}),
                         [](const auto& info) { return std::string(info.param.fixture_name); });

// The window the scanner reads the text through must not change the pieces: compare with one window
// holding the whole text.
class PreTokenizerWindowTest : public ::testing::TestWithParam<size_t> {};

std::vector<std::string_view> PiecesWithWindow(PreTokenizerKind kind, std::string_view text, size_t window) {
  std::vector<std::string_view> pieces;
  PreTokenize(
      kind, text, [&](std::string_view piece) { pieces.push_back(piece); }, window);
  return pieces;
}

TEST_P(PreTokenizerWindowTest, PiecesDoNotDependOnWindow) {
  std::vector<std::string> texts;
  for (const Json& s : Fixtures()["strings"]) texts.push_back(s["text"]);
  texts.push_back(std::string(3000, ' ') + "a" + std::string(2000, '\n') + " " + std::string(1000, ' '));
  texts.push_back(std::string(5000, '7') + "x" + std::string(4000, '.') + "\r\n\r\n'" +
                  std::string(999, 'z'));
  std::string mixed;
  for (int i = 0; i < 400; ++i)
    mixed += "It's 12 o'clock \xE2\x80\x94 caf\xC3\xA9!  \n\t\xF0\x9F\x98\x80 \xFF";
  texts.push_back(mixed);
  int mismatches = 0;
  for (PreTokenizerKind kind : {PreTokenizerKind::kGpt2, PreTokenizerKind::kGpt2IndividualDigits,
                                PreTokenizerKind::kLlama3, PreTokenizerKind::kQwen2}) {
    for (const std::string& text : texts) {
      if (PiecesWithWindow(kind, text, GetParam()) != PiecesWithWindow(kind, text, text.size() + 1) &&
          ++mismatches <= kMaxReportedMismatches) {
        ADD_FAILURE() << "kind " << static_cast<int>(kind) << ", window " << GetParam()
                      << ": pieces differ on '" << text.substr(0, 60) << "'";
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(WindowBytes, PreTokenizerWindowTest,
                         ::testing::Values(1, 2, 3, 4, 5, 37, 1000, 65536));

TEST(PreTokenizerTest, InvalidUtf8RoundTrips) {
  const std::string text = "ab\xFF\xC3 c\xE2\x82\n\x80\x80z";
  for (PreTokenizerKind kind : {PreTokenizerKind::kGpt2, PreTokenizerKind::kGpt2IndividualDigits,
                                PreTokenizerKind::kLlama3, PreTokenizerKind::kQwen2}) {
    std::vector<std::string_view> pieces;
    PreTokenize(kind, text, &pieces);
    std::string joined;
    for (std::string_view p : pieces) joined += p;
    EXPECT_EQ(joined, text);
  }
}

TEST(PreTokenizerTest, KnowsGgufNames) {
  EXPECT_EQ(*PreTokenizerFromGgufName("smollm"), PreTokenizerKind::kGpt2IndividualDigits);
  EXPECT_EQ(*PreTokenizerFromGgufName("gpt-2"), PreTokenizerKind::kGpt2);
  EXPECT_EQ(*PreTokenizerFromGgufName("llama-bpe"), PreTokenizerKind::kLlama3);
  EXPECT_EQ(*PreTokenizerFromGgufName("qwen2"), PreTokenizerKind::kQwen2);
  const auto unknown = PreTokenizerFromGgufName("chameleon");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("chameleon"), std::string_view::npos);
}

// ---------------------------------------------------------------------------------------------------
// BPE on a small hand-made vocabulary (no model needed).

// Spells bytes in the GPT-2 byte alphabet, as vocabularies store tokens.
std::string Spell(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) {
    const char32_t cp = ByteToAlphabetCodePoint()[b];
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return out;
}

// Every byte but 'Q' as a token (ids 0..254), then the merge results and two added tokens.
BpeVocabulary SmallVocabulary() {
  BpeVocabulary v;
  for (int b = 0; b < 256; ++b) {
    if (b != 'Q') v.tokens.push_back(Spell(std::string(1, static_cast<char>(b))));
  }
  for (const char* merged : {"ab", "bc", "abc", "aa", "aaaa", " a", " ab"}) v.tokens.push_back(Spell(merged));
  // "b c" ranks before "a b", so "abc" becomes a + bc, which has no merge ("abc" is reachable by none).
  v.merges = {{"b", "c"}, {Spell(" "), "a"}, {"a", "b"}, {Spell(" a"), "b"}, {"a", "a"}, {"aa", "aa"}};
  v.tokens.push_back("<|end|>");
  v.tokens.push_back("<tool>");
  v.tokens.push_back("<tool>x");
  const int32_t n = static_cast<int32_t>(v.tokens.size());
  v.added_tokens = {{n - 3, "<|end|>", true}, {n - 2, "<tool>", false}, {n - 1, "<tool>x", false}};
  v.eos_id = n - 3;
  return v;
}

std::unique_ptr<Tokenizer> BuildOrDie(BpeVocabulary v) {
  auto tok = BuildBpeTokenizer(std::move(v));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

std::vector<std::string> Pieces(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) out.push_back(tok.TokenBytes(id));
  return out;
}

using Strings = std::vector<std::string>;

TEST(BpeTest, AppliesMergesByRankLeftmostFirst) {
  auto tok = BuildOrDie(SmallVocabulary());
  ASSERT_TRUE(tok);
  EXPECT_EQ(Pieces(*tok, tok->Encode("abc")), (Strings{"a", "bc"}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("abd")), (Strings{"ab", "d"}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("aaa")), (Strings{"aa", "a"}));  // leftmost of equal ranks
  EXPECT_EQ(Pieces(*tok, tok->Encode("aaaaa")), (Strings{"aaaa", "a"}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("aaaaaaa")), (Strings{"aaaa", "aa", "a"}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("x ab ab")), (Strings{"x", " ab", " ab"}));
  EXPECT_TRUE(tok->Encode("").empty());
}

TEST(BpeTest, DropsBytesWithoutTokenUnlessUnknownIsSet) {
  BpeVocabulary v = SmallVocabulary();
  auto tok = BuildOrDie(v);
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->Decode(tok->Encode("aQb")), "ab");  // as `tokenizers` does without unk_token
  v.unk_id = 0;
  auto with_unk = BuildOrDie(v);
  ASSERT_TRUE(with_unk);
  EXPECT_EQ(with_unk->Encode("aQ"), (std::vector<int32_t>{*with_unk->TokenId("a"), 0}));
}

TEST(BpeTest, AddedTokens) {
  auto tok = BuildOrDie(SmallVocabulary());
  ASSERT_TRUE(tok);
  const int32_t end_id = *tok->TokenId("<|end|>");
  const int32_t tool_id = *tok->TokenId("<tool>");
  const int32_t toolx_id = *tok->TokenId("<tool>x");
  EXPECT_TRUE(tok->IsSpecial(end_id));
  EXPECT_FALSE(tok->IsSpecial(tool_id));
  // Special tokens only with parse_special; non-special added tokens always; the longest match wins.
  EXPECT_EQ(tok->Encode("ab<|end|>", true), (std::vector<int32_t>{*tok->TokenId("ab"), end_id}));
  EXPECT_EQ(tok->Encode("<|end|>", false).size(), 7u);
  EXPECT_EQ(tok->Encode("<tool>xy<tool>", false),
            (std::vector<int32_t>{toolx_id, *tok->TokenId("y"), tool_id}));
  const int32_t a_id = *tok->TokenId("a");
  EXPECT_EQ(tok->Decode({end_id, a_id, end_id}, /*skip_special=*/true), "a");
  EXPECT_EQ(tok->Decode({end_id, a_id, tool_id}, /*skip_special=*/false), "<|end|>a<tool>");
  EXPECT_EQ(tok->Decode({-1, a_id, tok->vocab_size()}), "a");  // ids out of range are skipped
  EXPECT_EQ(tok->stop_ids(), (std::vector<int32_t>{end_id}));
  EXPECT_EQ(tok->DefaultChatTemplate(), ChatTemplate::kChatML);
}

TEST(BpeTest, IgnoreMergesTakesWholePiece) {
  BpeVocabulary v = SmallVocabulary();
  v.tokens.push_back(Spell("cab"));  // reachable by no merge
  v.ignore_merges = true;
  auto tok = BuildOrDie(v);
  ASSERT_TRUE(tok);
  EXPECT_EQ(Pieces(*tok, tok->Encode("cab")), (Strings{"cab"}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("abc")), (Strings{"abc"}));  // in the vocabulary: taken whole
}

TEST(BpeTest, RejectsBadVocabularies) {
  BpeVocabulary v = SmallVocabulary();
  v.merges.push_back({"b", "d"});  // "bd" is not a token
  auto status = BuildBpeTokenizer(v).status();
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.message().find("'bd'"), std::string_view::npos) << status;

  v = SmallVocabulary();
  v.eos_id = 100000;
  EXPECT_FALSE(BuildBpeTokenizer(v).ok());

  v = SmallVocabulary();
  v.tokens[1] = v.tokens[2];
  status = BuildBpeTokenizer(v).status();
  EXPECT_NE(status.message().find("twice"), std::string_view::npos) << status;

  EXPECT_FALSE(BuildBpeTokenizer(BpeVocabulary{}).ok());
}

// ---------------------------------------------------------------------------------------------------
// tokenizer.json parsing (no model needed).

class TokenizerJsonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("kvshard_tokenizer_test_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name(), "_", getpid());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& content) {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << content;
    return path.string();
  }

  // A tokenizer.json with the small vocabulary; merges as "a b" strings or as ["a", "b"] pairs.
  Json SmallJson(bool merges_as_pairs) {
    const BpeVocabulary v = SmallVocabulary();
    Json vocab = Json::object();
    for (size_t id = 0; id < v.tokens.size(); ++id) vocab[v.tokens[id]] = id;
    Json merges = Json::array();
    for (const auto& [a, b] : v.merges) {
      merges.push_back(merges_as_pairs ? Json::array({a, b}) : Json(a + " " + b));
    }
    Json added = Json::array();
    for (const auto& t : v.added_tokens) {
      added.push_back({{"id", t.id}, {"content", t.content}, {"special", t.special}, {"normalized", false}});
    }
    return {{"version", "1.0"},
            {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers", Json::array({{{"type", "Digits"}, {"individual_digits", true}},
                                             {{"type", "ByteLevel"},
                                              {"add_prefix_space", false},
                                              {"trim_offsets", true},
                                              {"use_regex", true}}})}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"unk_token", nullptr}}}};
  }

  fs::path dir_;
};

TEST_F(TokenizerJsonTest, ReadsBothMergeForms) {
  for (bool pairs : {false, true}) {
    auto tok = Tokenizer::FromJsonFile(Write("tokenizer.json", SmallJson(pairs).dump()));
    ASSERT_TRUE(tok.ok()) << tok.status();
    EXPECT_EQ(Pieces(**tok, (*tok)->Encode("abc abd 12<|end|>", true)),
              (Strings{"a", "bc", " ab", "d", " ", "1", "2", "<|end|>"}));
    EXPECT_TRUE((*tok)->IsSpecial(*(*tok)->TokenId("<|end|>")));
    EXPECT_FALSE((*tok)->IsSpecial(*(*tok)->TokenId("<tool>")));
  }
}

TEST_F(TokenizerJsonTest, ReadsBosEosFromTokenizerConfig) {
  const std::string path = Write("tokenizer.json", SmallJson(false).dump());
  auto without = Tokenizer::FromJsonFile(path);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_FALSE((*without)->eos_id().has_value());
  Write("tokenizer_config.json", R"({"bos_token": "<tool>", "eos_token": {"content": "<|end|>"}})");
  auto with = Tokenizer::FromJsonFile(path);
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_EQ((*with)->bos_id(), (*with)->TokenId("<tool>"));
  EXPECT_EQ((*with)->eos_id(), (*with)->TokenId("<|end|>"));
}

TEST_F(TokenizerJsonTest, ReadsLlama3SplitPreTokenizer) {
  Json j = SmallJson(false);
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       Json::array(
           {{{"type", "Split"},
             {"pattern",
              {{"Regex",
                R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
             {"behavior", "Isolated"},
             {"invert", false}},
            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
  auto tok = Tokenizer::FromJsonFile(Write("tokenizer.json", j.dump()));
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(Pieces(**tok, (*tok)->Encode("1234")), (Strings{"1", "2", "3", "4"}));  // no merges of digits
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("(abc 12345")), "(abc 12345");
}

TEST_F(TokenizerJsonTest, ErrorsNameTheProblem) {
  auto missing = Tokenizer::FromJsonFile((dir_ / "absent.json").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("absent.json"), std::string_view::npos);

  auto garbage = Tokenizer::FromJsonFile(Write("garbage.json", "{\"model\": "));
  EXPECT_NE(garbage.status().message().find("not valid JSON"), std::string_view::npos) << garbage.status();

  Json j = SmallJson(false);
  j["normalizer"] = {{"type", "NFC"}};
  auto normalizer = Tokenizer::FromJsonFile(Write("n.json", j.dump()));
  EXPECT_NE(normalizer.status().message().find("normalizer"), std::string_view::npos) << normalizer.status();

  j = SmallJson(false);
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  auto pre = Tokenizer::FromJsonFile(Write("p.json", j.dump()));
  EXPECT_NE(pre.status().message().find("pre_tokenizer"), std::string_view::npos) << pre.status();

  j = SmallJson(false);
  j["model"]["merges"][0] = "abc";
  auto merge = Tokenizer::FromJsonFile(Write("m.json", j.dump()));
  EXPECT_NE(merge.status().message().find("merges[0]"), std::string_view::npos) << merge.status();

  j = SmallJson(false);
  j["model"]["type"] = "WordPiece";
  EXPECT_FALSE(Tokenizer::FromJsonFile(Write("w.json", j.dump())).ok());
}

// ---------------------------------------------------------------------------------------------------
// GGUF metadata (a small file written by the test; no model needed).

class TokenizerGgufTest : public TokenizerJsonTest {
 protected:
  // The small vocabulary as llama.cpp's converter writes it (token types: 1 normal, 3 control, 4 user).
  testing_gguf::GgufWriter SmallGguf() {
    const BpeVocabulary v = SmallVocabulary();
    testing_gguf::GgufWriter w;
    w.AddString("general.architecture", "llama");
    w.AddString("tokenizer.ggml.model", "gpt2");
    w.AddString("tokenizer.ggml.pre", "smollm");
    w.AddStringArray("tokenizer.ggml.tokens", v.tokens);
    std::vector<int32_t> types(v.tokens.size(), 1);
    for (const auto& t : v.added_tokens) types[t.id] = t.special ? 3 : 4;
    w.AddArray("tokenizer.ggml.token_type", testing_gguf::kI32, types);
    std::vector<std::string> merges;
    for (const auto& [a, b] : v.merges) merges.push_back(a + " " + b);
    w.AddStringArray("tokenizer.ggml.merges", merges);
    w.AddU32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.added_tokens[1].id));
    w.AddU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(*v.eos_id));
    return w;
  }

  absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const testing_gguf::GgufWriter& w) {
    const std::string path = (dir_ / "tokenizer.gguf").string();
    w.WriteTo(path);
    auto file = GgufFile::Open(path);
    if (!file.ok()) return file.status();
    return Tokenizer::FromGguf(**file);
  }

  // Loading must fail with a message that names the file and contains `needle`.
  void ExpectError(const testing_gguf::GgufWriter& w, const std::string& needle) {
    auto tok = Load(w);
    ASSERT_FALSE(tok.ok()) << "expected an error mentioning " << needle;
    EXPECT_NE(tok.status().message().find(needle), std::string_view::npos) << tok.status();
    EXPECT_NE(tok.status().message().find("tokenizer.gguf"), std::string_view::npos) << tok.status();
  }
};

TEST_F(TokenizerGgufTest, ReadsTokenizerMetadata) {
  auto tok = Load(SmallGguf());
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;
  EXPECT_EQ(Pieces(t, t.Encode("abc abd 12<|end|>", true)),
            (Strings{"a", "bc", " ab", "d", " ", "1", "2", "<|end|>"}));
  EXPECT_TRUE(t.IsSpecial(*t.TokenId("<|end|>")));
  EXPECT_FALSE(t.IsSpecial(*t.TokenId("<tool>")));
  EXPECT_EQ(t.bos_id(), t.TokenId("<tool>"));
  EXPECT_EQ(t.eos_id(), t.TokenId("<|end|>"));
  EXPECT_EQ(t.stop_ids(), (std::vector<int32_t>{*t.TokenId("<|end|>")}));
}

TEST_F(TokenizerGgufTest, ErrorsNameTheProblem) {
  auto w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.model");
  w.AddString("tokenizer.ggml.model", "llama");
  ExpectError(w, "only byte-level BPE");

  w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.pre");
  w.AddString("tokenizer.ggml.pre", "chameleon");
  ExpectError(w, "'chameleon'");

  w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.tokens");
  ExpectError(w, "tokenizer.ggml.tokens");

  w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.token_type");
  w.AddArray("tokenizer.ggml.token_type", testing_gguf::kI32, std::vector<int32_t>{1, 1});
  ExpectError(w, "token_type");

  w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.merges");
  w.AddStringArray("tokenizer.ggml.merges", {"a b", "ab"});
  ExpectError(w, "merges[1]");

  w = SmallGguf();
  w.RemoveKey("tokenizer.ggml.eos_token_id");
  w.AddU32("tokenizer.ggml.eos_token_id", 99999);
  ExpectError(w, "EOS id 99999");
}

// ---------------------------------------------------------------------------------------------------
// Streaming UTF-8 and chat templates (no model needed).

std::string StreamInChunks(std::string_view bytes, size_t chunk) {
  Utf8StreamDecoder decoder;
  std::string out;
  for (size_t i = 0; i < bytes.size(); i += chunk) {
    const std::string piece = decoder.Push(bytes.substr(i, chunk));
    // Only whole, valid characters come out of Push.
    size_t end = 0;
    while (end < piece.size()) {
      const unsigned char b = piece[end];
      end += b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    }
    EXPECT_EQ(end, piece.size()) << "chunk " << chunk << " at " << i;
    out += piece;
  }
  return out + decoder.Flush();
}

class Utf8StreamDecoderTest : public ::testing::TestWithParam<size_t> {};

TEST_P(Utf8StreamDecoderTest, ReassemblesSplitCharacters) {
  const std::string text =
      "a\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xE6\x97\xA5\xE6\x9C\xAC end\n"  // é € 😀 日本
      "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 \xD8\xB9\xD8\xB1\xD8\xA8\xD9\x8A";
  EXPECT_EQ(StreamInChunks(text, GetParam()), text);
}

TEST_P(Utf8StreamDecoderTest, ReplacesInvalidBytes) {
  // A stray continuation byte, a lead byte followed by ASCII, an overlong form and a surrogate: one U+FFFD
  // per maximal ill-formed subpart. The text ends in the middle of a character, replaced on Flush.
  const std::string text =
      "a\x80"
      "b\xE2\x82z\xC0\xAF\xED\xA0\x80y\xF0\x9F\x98";
  const std::string expected =
      "a\xEF\xBF\xBD"
      "b\xEF\xBF\xBDz\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBDy\xEF\xBF\xBD";
  EXPECT_EQ(StreamInChunks(text, GetParam()), expected);
}

INSTANTIATE_TEST_SUITE_P(ChunkSizes, Utf8StreamDecoderTest, ::testing::Values(1, 2, 3, 5, 37, 1000));

TEST(Utf8StreamDecoderTest, EmptyInput) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push(""), "");
  EXPECT_EQ(decoder.Flush(), "");
  EXPECT_EQ(decoder.Push("\xE2\x82"), "");
  EXPECT_EQ(decoder.Push("\xAC"), "\xE2\x82\xAC");
  EXPECT_EQ(decoder.Flush(), "");
}

TEST(ChatTemplateTest, MatchesJinjaRendering) {
  int checked = 0;
  for (const Json& chat : Fixtures()["chats"]) {
    std::vector<ChatMessage> messages;
    for (const Json& m : chat["messages"]) messages.push_back({m["role"], m["content"]});
    const ChatTemplate tmpl = chat["template"] == "llama3" ? ChatTemplate::kLlama3 : ChatTemplate::kChatML;
    EXPECT_EQ(ApplyChatTemplate(tmpl, messages, chat["add_generation_prompt"].get<bool>()),
              chat["text"].get<std::string>())
        << chat["name"] << " " << chat["template"]
        << " add_generation_prompt=" << chat["add_generation_prompt"];
    ++checked;
  }
  EXPECT_GE(checked, 16);
}

TEST(ChatTemplateTest, SmolLM2DefaultSystemMessage) {
  EXPECT_EQ(
      ApplyChatTemplate(ChatTemplate::kChatML, {{"user", "Hi"}}, true),
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(ApplyChatTemplate(ChatTemplate::kLlama3, {{"system", " S "}, {"user", "\tHi\n"}}, true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

// ---------------------------------------------------------------------------------------------------
// The demo model's vocabulary against the fixtures.

class ModelTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!fs::is_regular_file(ModelPath())) return;
    auto file = GgufFile::Open(ModelPath().string());
    ASSERT_TRUE(file.ok()) << file.status();
    auto tok = Tokenizer::FromGguf(**file);
    ASSERT_TRUE(tok.ok()) << tok.status();
    gguf_tokenizer_ = tok->release();
    if (fs::is_regular_file(ReferenceTokenizerJson())) {
      auto json_tok = Tokenizer::FromJsonFile(ReferenceTokenizerJson().string());
      ASSERT_TRUE(json_tok.ok()) << json_tok.status();
      json_tokenizer_ = json_tok->release();
    }
  }
  static void TearDownTestSuite() {
    delete gguf_tokenizer_;
    delete json_tokenizer_;
    gguf_tokenizer_ = json_tokenizer_ = nullptr;
  }
  void SetUp() override {
    if (gguf_tokenizer_ == nullptr) {
      GTEST_SKIP() << "demo model not found at " << ModelPath()
                   << "; run deploy/fetch-demo-model.sh (or set KVSHARD_MODEL)";
    }
  }
  // The tokenizers to check: from the GGUF, and from the reference tokenizer.json when present.
  static std::vector<std::pair<std::string, const Tokenizer*>> Tokenizers() {
    std::vector<std::pair<std::string, const Tokenizer*>> out = {{"gguf", gguf_tokenizer_}};
    if (json_tokenizer_ != nullptr) out.emplace_back("tokenizer.json", json_tokenizer_);
    return out;
  }

  static const Tokenizer* gguf_tokenizer_;
  static const Tokenizer* json_tokenizer_;
};
const Tokenizer* ModelTokenizerTest::gguf_tokenizer_ = nullptr;
const Tokenizer* ModelTokenizerTest::json_tokenizer_ = nullptr;

TEST_F(ModelTokenizerTest, Metadata) {
  const Tokenizer& tok = *gguf_tokenizer_;
  const Json& fixtures = Fixtures();
  EXPECT_EQ(tok.vocab_size(), fixtures["vocab_size"].get<int32_t>());
  EXPECT_EQ(tok.bos_id(), fixtures["bos_id"].get<int32_t>());
  EXPECT_EQ(tok.eos_id(), fixtures["eos_id"].get<int32_t>());
  for (int32_t id : fixtures["special_ids"].get<std::vector<int32_t>>()) EXPECT_TRUE(tok.IsSpecial(id)) << id;
  EXPECT_FALSE(tok.IsSpecial(17));
  EXPECT_EQ(tok.TokenId("<|im_end|>"), 2);
  EXPECT_EQ(tok.TokenId("Ġthe"), tok.TokenId(" the"));
  EXPECT_EQ(tok.TokenBytes(*tok.TokenId("Ġthe")), " the");
  EXPECT_EQ(tok.TokenBytes(2), "<|im_end|>");
  EXPECT_EQ(tok.TokenBytes(-1), "");
  EXPECT_EQ(tok.TokenBytes(tok.vocab_size()), "");
  // EOS is <|im_end|>; <|endoftext|> also ends generation.
  EXPECT_EQ(tok.stop_ids(), (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(tok.DefaultChatTemplate(), ChatTemplate::kChatML);
  if (json_tokenizer_ != nullptr) {
    EXPECT_EQ(json_tokenizer_->vocab_size(), tok.vocab_size());
    for (int32_t id = 0; id < tok.vocab_size(); ++id) {
      ASSERT_EQ(json_tokenizer_->TokenBytes(id), tok.TokenBytes(id)) << id;
      ASSERT_EQ(json_tokenizer_->IsSpecial(id), tok.IsSpecial(id)) << id;
    }
  }
}

TEST_F(ModelTokenizerTest, MatchesTokenizersOnTrickyStrings) {
  for (const auto& [source, tok] : Tokenizers()) {
    int checked = 0, mismatches = 0;
    for (const Json& s : Fixtures()["strings"]) {
      const std::string text = s["text"];
      const bool parse_special = s["parse_special"];
      const std::vector<int32_t> expected = JsonIds(s["ids"]);
      const std::vector<int32_t> actual = tok->Encode(text, parse_special);
      ++checked;
      if (actual != expected && ++mismatches <= kMaxReportedMismatches) {
        ADD_FAILURE() << source << ": " << s["name"] << " parse_special=" << parse_special << "\n  got      "
                      << IdsToString(actual) << "\n  expected " << IdsToString(expected);
      }
      // Decoding gives the text back, except where the reference drops bytes it has no token for.
      const std::string decoded = tok->Decode(actual);
      if (s["roundtrip"].get<bool>()) {
        EXPECT_EQ(decoded, text) << source << ": " << s["name"];
      } else {
        EXPECT_EQ(decoded, s["decoded"].get<std::string>()) << source << ": " << s["name"];
      }
    }
    EXPECT_GT(checked, 80) << source;
    EXPECT_EQ(mismatches, 0) << source;
  }
}

TEST_F(ModelTokenizerTest, MatchesTokenizersOnTexts) {
  if (!fs::is_directory(TextsDir()))
    GTEST_SKIP() << "texts not found at " << TextsDir() << " (set KVSHARD_TEXTS)";
  const Json& fixtures = Fixtures();
  const size_t prefix = fixtures["text_prefix_bytes"].get<size_t>();
  for (const Json& entry : fixtures["texts"]) {
    const fs::path path = TextsDir() / entry["file"].get<std::string>();
    const std::string text = Utf8Prefix(ReadFileOrEmpty(path), prefix);
    ASSERT_EQ(text.size(), entry["bytes"].get<size_t>()) << path << ": missing or of another size";
    ASSERT_EQ(Sha256Hex(text), entry["text_sha256"].get<std::string>())
        << path << ": not the text the fixtures were made from";
    const std::vector<int32_t> first = JsonIds(entry["first_ids"]);
    for (const auto& [source, tok] : Tokenizers()) {
      const std::vector<int32_t> ids = tok->Encode(text);
      const std::vector<int32_t> head(ids.begin(), ids.begin() + std::min(ids.size(), first.size()));
      EXPECT_EQ(head, first) << source << ": " << path;
      EXPECT_EQ(ids.size(), entry["count"].get<size_t>()) << source << ": " << path;
      EXPECT_EQ(IdsSha256(ids), entry["ids_sha256"].get<std::string>()) << source << ": " << path;
      EXPECT_EQ(tok->Decode(ids), text) << source << ": " << path;
    }
  }
}

TEST_F(ModelTokenizerTest, ChatPromptTokens) {
  const Tokenizer& tok = *gguf_tokenizer_;
  const std::string prompt = ApplyChatTemplate(tok.DefaultChatTemplate(), {{"user", "hi"}}, true);
  const std::vector<int32_t> ids = tok.Encode(prompt, /*parse_special=*/true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids.front(), 1);  // <|im_start|>
  EXPECT_EQ(tok.Decode(ids), prompt);
  EXPECT_EQ(tok.Decode(ids, /*skip_special=*/true).find("<|im_start|>"), std::string::npos);
  // Streaming the tokens one at a time reassembles the text.
  const std::vector<int32_t> emoji =
      tok.Encode("a \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9 b \xE6\x97\xA5");
  Utf8StreamDecoder decoder;
  std::string streamed;
  for (int32_t id : emoji) streamed += decoder.Push(tok.TokenBytes(id));
  streamed += decoder.Flush();
  EXPECT_EQ(streamed, tok.Decode(emoji));
}

// Throughput of Encode on about 1 MB of prose; logged, and checked against a loose floor
// (the target is > 1 MB/s on one core; the floor leaves room for a loaded machine or an unoptimized build).
TEST_F(ModelTokenizerTest, EncodesAMegabyteQuickly) {
  const std::string text = Utf8Prefix(ReadFileOrEmpty(TextsDir() / "mobydick.txt"), 1 << 20);
  if (text.empty()) GTEST_SKIP() << "texts not found at " << TextsDir() << " (set KVSHARD_TEXTS)";
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = gguf_tokenizer_->Encode(text);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double mb_per_s = text.size() / 1e6 / seconds;
  std::printf("encoded %zu bytes into %zu tokens in %.3f s: %.2f MB/s\n", text.size(), ids.size(), seconds,
              mb_per_s);
  EXPECT_GT(mb_per_s, 0.2);
}

}  // namespace
}  // namespace kvshard
