// Model loading: tiny GGUF models (llama with its Q/K permutation, qwen2 with biases), tiny Hugging Face
// directories (sharded safetensors in BF16/F16/F32), RoPE scaling, bad input, and the demo model against
// what transformers loads (tests/fixtures/demo_model_weights.json).
#include "worker/model_loader.h"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/half.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/gguf_writer.h"

namespace kvshard {
namespace {

namespace fs = std::filesystem;
using testing_gguf::FreshTempDir;
using testing_gguf::GgufWriter;
using testing_gguf::TinyGeometry;
using testing_gguf::TinyGguf;
using testing_gguf::TinyHfWeights;
using testing_gguf::TinyTensor;
using HfWeights = std::vector<std::pair<std::string, TinyTensor>>;

// Our tensor for a Hugging Face name.
const HostTensor* Find(const ModelWeights& w, const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return &w.token_embedding;
  if (hf == "model.norm.weight") return &w.output_norm;
  if (hf == "lm_head.weight") return &w.output;
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return nullptr;
  const size_t dot = hf.find('.', prefix.size());
  const LayerWeights& L = w.layers.at(std::stoi(hf.substr(prefix.size(), dot - prefix.size())));
  const std::string part = hf.substr(dot + 1);
  const std::map<std::string, const HostTensor*> parts = {
      {"input_layernorm.weight", &L.attn_norm}, {"self_attn.q_proj.weight", &L.wq},
      {"self_attn.k_proj.weight", &L.wk},       {"self_attn.v_proj.weight", &L.wv},
      {"self_attn.o_proj.weight", &L.wo},       {"self_attn.q_proj.bias", &L.bq},
      {"self_attn.k_proj.bias", &L.bk},         {"self_attn.v_proj.bias", &L.bv},
      {"post_attention_layernorm.weight", &L.ffn_norm}, {"mlp.gate_proj.weight", &L.w_gate},
      {"mlp.up_proj.weight", &L.w_up},          {"mlp.down_proj.weight", &L.w_down},
  };
  auto it = parts.find(part);
  return it == parts.end() ? nullptr : it->second;
}

// Every written tensor is loaded with its shape and exactly its values (conversions here are exact).
void ExpectWeightsEqual(const ModelWeights& w, const HfWeights& expected) {
  for (const auto& [name, t] : expected) {
    SCOPED_TRACE(name);
    const HostTensor* got = Find(w, name);
    ASSERT_NE(got, nullptr);
    EXPECT_EQ(got->shape, t.shape);
    ASSERT_EQ(got->data.size(), t.values.size());
    int mismatches = 0;
    for (size_t i = 0; i < t.values.size(); ++i) {
      if (got->data[i] != t.values[i] && ++mismatches <= 5) {
        ADD_FAILURE() << "element " << i << ": got " << got->data[i] << " expected " << t.values[i];
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

void ExpectConfig(const ModelConfig& c, const TinyGeometry& g) {
  EXPECT_EQ(c.n_layers, g.n_layers);
  EXPECT_EQ(c.hidden, g.hidden);
  EXPECT_EQ(c.n_heads, g.n_heads);
  EXPECT_EQ(c.n_kv_heads, g.n_kv_heads);
  EXPECT_EQ(c.head_dim, g.head_dim);
  EXPECT_EQ(c.ffn_hidden, g.ffn);
  EXPECT_EQ(c.vocab_size, g.vocab);
  EXPECT_EQ(c.max_context, g.context);
}

// Expects a one-line error of `code` containing every one of `parts`.
void ExpectError(const absl::Status& status, absl::StatusCode code, const std::vector<std::string>& parts) {
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.code(), code) << status;
  const std::string message(status.message());
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos) << "expected '" << part << "' in: " << message;
  }
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  std::cout << "  error: " << message << "\n";
}

std::string WriteTinyGguf(const std::string& test, const GgufWriter& w) {
  const std::string path = FreshTempDir(test) + "/tiny.gguf";
  w.WriteTo(path);
  return path;
}

// ---------------------------------------------------------------------------------------------------------
// GGUF

TEST(GgufModelTest, TinyLlamaLoadsWithQkInHuggingFaceOrder) {
  const TinyGeometry g;
  const HfWeights hf = TinyHfWeights(g, /*qkv_bias=*/false, /*tied=*/true, 1);
  const std::string path = WriteTinyGguf("tiny_llama", TinyGguf("llama", g, hf));
  auto w = LoadModel(path);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectConfig(w->config, g);
  EXPECT_EQ(w->config.architecture, "llama");
  EXPECT_EQ(w->config.name, "tiny llama");
  EXPECT_TRUE(w->config.tied_embeddings);
  EXPECT_FALSE(w->config.qkv_bias);
  EXPECT_TRUE(w->output.empty());
  EXPECT_EQ(&w->output_matrix(), &w->token_embedding);
  EXPECT_EQ(w->config.rope_theta, 10000.0f);
  EXPECT_EQ(w->config.norm_eps, 1e-5f);
  EXPECT_EQ(w->config.rope_scaling.type, RopeScalingType::kNone);
  ExpectWeightsEqual(*w, hf);
}

TEST(GgufModelTest, TinyQwen2HasBiasesAndNoPermutation) {
  const TinyGeometry g;
  const HfWeights hf = TinyHfWeights(g, /*qkv_bias=*/true, /*tied=*/false, 100);
  const std::string path = WriteTinyGguf("tiny_qwen2", TinyGguf("qwen2", g, hf));
  auto file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto w = LoadGgufModel(**file);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectConfig(w->config, g);
  EXPECT_EQ(w->config.architecture, "qwen2");
  EXPECT_TRUE(w->config.qkv_bias);
  EXPECT_FALSE(w->config.tied_embeddings);
  EXPECT_EQ(&w->output_matrix(), &w->output);
  ExpectWeightsEqual(*w, hf);
}

TEST(GgufModelTest, LlamaBiasesAreUnpermutedToo) {
  const TinyGeometry g;
  const HfWeights hf = TinyHfWeights(g, /*qkv_bias=*/true, /*tied=*/true, 200);
  auto w = LoadModel(WriteTinyGguf("llama_bias", TinyGguf("llama", g, hf)));
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectWeightsEqual(*w, hf);
}

TEST(GgufModelTest, OptionalKeysHaveLlamaCppDefaults) {
  TinyGeometry g;
  g.n_kv_heads = g.n_heads;  // no head_count_kv key: llama.cpp reads it as n_heads
  const HfWeights hf = TinyHfWeights(g, false, true, 300);
  GgufWriter w = TinyGguf("llama", g, hf);
  w.RemoveKey("llama.attention.head_count_kv");
  w.RemoveKey("llama.rope.freq_base");
  w.RemoveKey("general.name");
  auto file = GgufFile::Open(WriteTinyGguf("defaults", w));
  ASSERT_TRUE(file.ok()) << file.status();
  auto c = ModelConfigFromGguf(**file);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, g.n_heads);
  EXPECT_EQ(c->rope_theta, 10000.0f);
  EXPECT_EQ(c->name, "tiny");  // the file name without .gguf
}

TEST(GgufModelTest, KeyLengthSetsHeadDim) {
  TinyGeometry g;
  g.head_dim = 32;  // n_heads * head_dim = 128 != hidden 64
  const HfWeights hf = TinyHfWeights(g, false, true, 400);
  GgufWriter w = TinyGguf("llama", g, hf);
  w.AddU32("llama.attention.key_length", 32);
  w.AddU32("llama.attention.value_length", 32);
  w.RemoveKey("llama.rope.dimension_count");
  auto loaded = LoadModel(WriteTinyGguf("key_length", w));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->config.head_dim, 32);
  ExpectWeightsEqual(*loaded, hf);
}

TEST(GgufModelTest, LinearRopeScaling) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.AddString("llama.rope.scaling.type", "linear");
  w.AddF32("llama.rope.scaling.factor", 4.0f);
  auto file = GgufFile::Open(WriteTinyGguf("linear_rope", w));
  ASSERT_TRUE(file.ok());
  auto c = ModelConfigFromGguf(**file);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 4.0f);
}

TEST(GgufModelTest, YarnRopeScalingIsUnimplemented) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.AddString("llama.rope.scaling.type", "yarn");
  auto file = GgufFile::Open(WriteTinyGguf("yarn_rope", w));
  ASSERT_TRUE(file.ok());
  ExpectError(ModelConfigFromGguf(**file).status(), absl::StatusCode::kUnimplemented, {"rope scaling type 'yarn'"});
}

// llama.cpp's converter writes llama3 scaling as rope_freqs.weight, one divisor per frequency. The
// loader recovers parameters that give the same inverse frequencies as the original ones.
struct Llama3Case {
  const char* name;
  int head_dim;
  float theta;
  RopeScaling scaling;
};

class GgufLlama3RopeTest : public ::testing::TestWithParam<Llama3Case> {};

// The divisors as convert_hf_to_gguf.py computes them.
std::vector<float> LlamaCppRopeFactors(int head_dim, float theta, const RopeScaling& s) {
  const std::vector<float> freqs = RopeInverseFrequencies(RopeParams{head_dim, theta, {}});
  const double low_wavelen = s.original_max_position / s.low_freq_factor;
  const double high_wavelen = s.original_max_position / s.high_freq_factor;
  std::vector<float> factors;
  for (float f : freqs) {
    const double wavelen = 2 * M_PI / f;
    if (wavelen < high_wavelen) {
      factors.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      factors.push_back(s.factor);
    } else {
      const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      factors.push_back(static_cast<float>(1.0 / ((1 - smooth) / s.factor + smooth)));
    }
  }
  return factors;
}

TEST_P(GgufLlama3RopeTest, RopeFreqsGiveTheSameInverseFrequencies) {
  const Llama3Case& p = GetParam();
  TinyGeometry g;
  g.head_dim = p.head_dim;
  g.hidden = 2 * p.head_dim;
  g.n_heads = 2;
  g.n_kv_heads = 1;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveKey("llama.rope.freq_base");
  w.AddF32("llama.rope.freq_base", p.theta);
  w.AddU32("llama.attention.key_length", p.head_dim);
  w.RemoveKey("llama.rope.dimension_count");
  const std::vector<float> factors = LlamaCppRopeFactors(p.head_dim, p.theta, p.scaling);
  w.AddF32Tensor("rope_freqs.weight", {p.head_dim / 2}, factors);
  auto file = GgufFile::Open(WriteTinyGguf(std::string("llama3_rope_") + p.name, w));
  ASSERT_TRUE(file.ok()) << file.status();
  auto c = ModelConfigFromGguf(**file);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, p.scaling.factor);
  const std::vector<float> want = RopeInverseFrequencies(RopeParams{p.head_dim, p.theta, p.scaling});
  const std::vector<float> got = RopeInverseFrequencies(RopeParams{p.head_dim, p.theta, c->rope_scaling});
  ASSERT_EQ(got.size(), want.size());
  // The divisors went through fp32 and the fitted factors are fp32: allow a few fp32 ulps of the smooth
  // band's arithmetic (relative 1e-5); outside the band both sides compute the same expression.
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5 * want[i]) << "frequency " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Configs, GgufLlama3RopeTest,
    ::testing::Values(Llama3Case{"llama31", 128, 500000.0f, {RopeScalingType::kLlama3, 8.0f, 1.0f, 4.0f, 8192}},
                      Llama3Case{"llama32", 64, 500000.0f, {RopeScalingType::kLlama3, 32.0f, 1.0f, 4.0f, 8192}},
                      // Few frequencies: one (sparse) or none (narrow) falls inside the smooth band.
                      Llama3Case{"sparse", 16, 500000.0f, {RopeScalingType::kLlama3, 8.0f, 1.0f, 4.0f, 8192}},
                      Llama3Case{"narrow", 16, 10000.0f, {RopeScalingType::kLlama3, 4.0f, 1.0f, 1.5f, 4096}}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(GgufModelTest, RopeFreqsAllEqualAreLinearScaling) {
  TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.AddF32Tensor("rope_freqs.weight", {g.head_dim / 2}, std::vector<float>(g.head_dim / 2, 2.5f));
  auto file = GgufFile::Open(WriteTinyGguf("uniform_rope_freqs", w));
  ASSERT_TRUE(file.ok());
  auto c = ModelConfigFromGguf(**file);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 2.5f);
}

TEST(GgufModelTest, RopeFreqsThatAreNotLlama3AreRefused) {
  TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  std::vector<float> factors(g.head_dim / 2);
  for (size_t i = 0; i < factors.size(); ++i) factors[i] = (i % 2) ? 1.0f : 3.0f;
  w.AddF32Tensor("rope_freqs.weight", {g.head_dim / 2}, factors);
  auto file = GgufFile::Open(WriteTinyGguf("bad_rope_freqs", w));
  ASSERT_TRUE(file.ok());
  ExpectError(ModelConfigFromGguf(**file).status(), absl::StatusCode::kUnimplemented, {"rope_freqs.weight"});
}

// ---------------------------------------------------------------------------------------------------------
// Bad input: each a one-line error naming the problem.

TEST(LoaderBadInputTest, MissingModelPath) {
  const std::string path = "/nonexistent/kvshard/model.gguf";
  auto w = LoadModel(path);
  ExpectError(w.status(), absl::StatusCode::kNotFound, {"model path " + path + " does not exist"});
}

TEST(LoaderBadInputTest, TruncatedGguf) {
  const TinyGeometry g;
  const std::vector<uint8_t> full = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1)).Bytes();
  // In the header, in the metadata, in the tensor infos, in the data, one byte short.
  for (size_t n : {size_t{10}, size_t{100}, size_t{900}, full.size() / 2, full.size() - 1}) {
    SCOPED_TRACE(::testing::Message() << n << " of " << full.size() << " bytes");
    const std::string path = FreshTempDir("truncated_model") + "/cut.gguf";
    GgufWriter::WriteFile(path, std::vector<uint8_t>(full.begin(), full.begin() + n));
    ExpectError(LoadModel(path).status(), absl::StatusCode::kInvalidArgument, {path, "truncated"});
  }
}

TEST(LoaderBadInputTest, WrongMagic) {
  const TinyGeometry g;
  std::vector<uint8_t> bytes = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1)).Bytes();
  bytes[0] = 'X';
  const std::string path = FreshTempDir("wrong_magic") + "/magic.gguf";
  GgufWriter::WriteFile(path, bytes);
  ExpectError(LoadModel(path).status(), absl::StatusCode::kInvalidArgument, {path, "bad magic 'XGUF'"});
}

TEST(LoaderBadInputTest, UnsupportedTensorType) {
  const TinyGeometry g;
  HfWeights hf = TinyHfWeights(g, false, true, 1);
  GgufWriter w = TinyGguf("llama", g, hf);
  // IQ4_NL: 32-element blocks of 18 bytes, a type ggml has and kvshard does not dequantize.
  w.RemoveTensor("blk.1.ffn_up.weight");
  w.AddTensor("blk.1.ffn_up.weight", {g.hidden, g.ffn}, static_cast<GgmlType>(20),
              std::vector<uint8_t>(g.ffn * (g.hidden / 32) * 18));
  const std::string path = WriteTinyGguf("unsupported_type", w);
  ExpectError(LoadModel(path).status(), absl::StatusCode::kUnimplemented,
              {path, "tensor 'blk.1.ffn_up.weight' has type IQ4_NL"});
}

TEST(LoaderBadInputTest, GgufMissingBlockCount) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveKey("llama.block_count");
  const std::string path = WriteTinyGguf("missing_block_count", w);
  ExpectError(LoadModel(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "required metadata key 'llama.block_count' is missing"});
}

TEST(LoaderBadInputTest, GgufUnsupportedArchitecture) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveKey("general.architecture");
  w.AddString("general.architecture", "gpt2");
  ExpectError(LoadModel(WriteTinyGguf("gpt2", w)).status(), absl::StatusCode::kUnimplemented,
              {"architecture 'gpt2' is not supported"});
}

TEST(LoaderBadInputTest, GgufMissingTensor) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveTensor("blk.1.attn_v.weight");
  const std::string path = WriteTinyGguf("missing_tensor", w);
  ExpectError(LoadModel(path).status(), absl::StatusCode::kInvalidArgument,
              {path, "tensor 'blk.1.attn_v.weight' is missing"});
}

TEST(LoaderBadInputTest, GgufTensorShapeDisagreesWithConfig) {
  const TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveTensor("blk.0.ffn_down.weight");
  w.AddF32Tensor("blk.0.ffn_down.weight", {g.ffn + 1, g.hidden}, std::vector<float>((g.ffn + 1) * g.hidden));
  ExpectError(LoadModel(WriteTinyGguf("shape_mismatch", w)).status(), absl::StatusCode::kInvalidArgument,
              {"tensor 'blk.0.ffn_down.weight' has shape [64, 97], expected [64, 96]"});
}

TEST(LoaderBadInputTest, GgufHeadsNotDividingKvHeads) {
  TinyGeometry g;
  GgufWriter w = TinyGguf("llama", g, TinyHfWeights(g, false, true, 1));
  w.RemoveKey("llama.attention.head_count_kv");
  w.AddU32("llama.attention.head_count_kv", 3);
  ExpectError(LoadModel(WriteTinyGguf("bad_gqa", w)).status(), absl::StatusCode::kInvalidArgument,
              {"4 query heads are not a multiple of 3 KV heads"});
}

// ---------------------------------------------------------------------------------------------------------
// Hugging Face directories

struct StTensor {
  std::string name;
  std::string dtype;  // F32, BF16, F16
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Stores `values` in `dtype` and returns what reading them back must give.
StTensor Encode(const std::string& name, const std::string& dtype, const TinyTensor& t, std::vector<float>* stored) {
  StTensor st{name, dtype, t.shape, {}};
  stored->clear();
  for (float v : t.values) {
    if (dtype == "F32") {
      uint8_t b[4];
      std::memcpy(b, &v, 4);
      st.bytes.insert(st.bytes.end(), b, b + 4);
      stored->push_back(v);
    } else {
      const uint16_t h = dtype == "BF16" ? FloatToBf16(v) : FloatToHalf(v);
      st.bytes.push_back(h & 0xff);
      st.bytes.push_back(h >> 8);
      stored->push_back(dtype == "BF16" ? Bf16ToFloat(h) : HalfToFloat(h));
    }
  }
  return st;
}

void WriteSafetensors(const std::string& path, const std::vector<StTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const StTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');  // the format pads the header with spaces to 8 bytes
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(text.data(), static_cast<std::streamsize>(n));
  for (const StTensor& t : tensors) out.write(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
}

nlohmann::json TinyConfigJson(const TinyGeometry& g, const std::string& model_type, bool tied) {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", model_type},
          {"hidden_size", g.hidden},
          {"num_hidden_layers", g.n_layers},
          {"num_attention_heads", g.n_heads},
          {"num_key_value_heads", g.n_kv_heads},
          {"intermediate_size", g.ffn},
          {"vocab_size", g.vocab},
          {"max_position_embeddings", g.context},
          {"rope_theta", 100000.0},
          {"rms_norm_eps", 1e-5},
          {"tie_word_embeddings", tied},
          {"hidden_act", "silu"},
          {"torch_dtype", "bfloat16"}};
}

void WriteText(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// Writes `hf` into `dir` as `n_shards` safetensors files with an index (or one file without an index when
// n_shards is 1), cycling tensors through `dtypes`. Returns the values a loader must read back.
HfWeights WriteHfModel(const std::string& dir, const nlohmann::json& config, const HfWeights& hf, int n_shards,
                       const std::vector<std::string>& dtypes) {
  WriteText(dir + "/config.json", config.dump(2));
  std::vector<std::vector<StTensor>> shards(n_shards);
  nlohmann::json weight_map = nlohmann::json::object();
  HfWeights stored;
  for (size_t i = 0; i < hf.size(); ++i) {
    const auto& [name, t] = hf[i];
    TinyTensor back{t.shape, {}};
    const int shard = static_cast<int>(i * n_shards / hf.size());
    shards[shard].push_back(Encode(name, dtypes[i % dtypes.size()], t, &back.values));
    stored.push_back({name, back});
    weight_map[name] = n_shards == 1 ? "model.safetensors"
                                     : "model-0000" + std::to_string(shard + 1) + "-of-0000" +
                                           std::to_string(n_shards) + ".safetensors";
  }
  for (int s = 0; s < n_shards; ++s) {
    const std::string file = n_shards == 1 ? "model.safetensors"
                                           : "model-0000" + std::to_string(s + 1) + "-of-0000" +
                                                 std::to_string(n_shards) + ".safetensors";
    WriteSafetensors(dir + "/" + file, shards[s]);
  }
  if (n_shards > 1) {
    WriteText(dir + "/model.safetensors.index.json",
              nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(2));
  }
  return stored;
}

TEST(HfModelTest, TwoShardsWithIndexInBf16AndF32) {
  const TinyGeometry g;
  const HfWeights hf = TinyHfWeights(g, false, /*tied=*/false, 500);
  const std::string dir = FreshTempDir("hf_two_shards") + "/TinyLlama-Test";
  fs::create_directories(dir);
  const HfWeights stored = WriteHfModel(dir, TinyConfigJson(g, "llama", false), hf, 2, {"BF16", "F32"});
  auto w = LoadModel(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectConfig(w->config, g);
  EXPECT_EQ(w->config.name, "TinyLlama-Test");
  EXPECT_EQ(w->config.architecture, "llama");
  EXPECT_FALSE(w->config.tied_embeddings);
  EXPECT_FALSE(w->config.qkv_bias);
  EXPECT_EQ(w->config.rope_theta, 100000.0f);
  EXPECT_EQ(w->config.norm_eps, 1e-5f);
  ExpectWeightsEqual(*w, stored);
}

TEST(HfModelTest, SingleFileQwen2InF16WithBiases) {
  const TinyGeometry g;
  const HfWeights hf = TinyHfWeights(g, /*qkv_bias=*/true, /*tied=*/true, 600);
  const std::string dir = FreshTempDir("hf_single_qwen2");
  const HfWeights stored = WriteHfModel(dir, TinyConfigJson(g, "qwen2", true), hf, 1, {"F16"});
  auto w = LoadHfModel(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->config.architecture, "qwen2");
  EXPECT_TRUE(w->config.qkv_bias);
  EXPECT_TRUE(w->config.tied_embeddings);
  ExpectWeightsEqual(*w, stored);
}

TEST(HfModelTest, ConfigVariants) {
  const TinyGeometry g;
  nlohmann::json j = TinyConfigJson(g, "mistral", true);
  j.erase("rope_theta");
  j.erase("num_key_value_heads");
  j["head_dim"] = 32;
  j["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "llama3"}, {"factor", 8.0},
                          {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                          {"original_max_position_embeddings", 8192}};
  auto c = ModelConfigFromHfJson(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->n_kv_heads, g.n_heads);
  EXPECT_EQ(c->rope_theta, 500000.0f);
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position, 8192);

  nlohmann::json linear = TinyConfigJson(g, "llama", true);
  linear["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  c = ModelConfigFromHfJson(linear.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 2.0f);

  nlohmann::json dynamic = TinyConfigJson(g, "llama", true);
  dynamic["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  ExpectError(ModelConfigFromHfJson(dynamic.dump()).status(), absl::StatusCode::kUnimplemented,
              {"rope_scaling type 'dynamic'"});
  nlohmann::json llama3_missing = TinyConfigJson(g, "llama", true);
  llama3_missing["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  ExpectError(ModelConfigFromHfJson(llama3_missing.dump()).status(), absl::StatusCode::kInvalidArgument,
              {"'rope_scaling.low_freq_factor' is missing"});
}

TEST(LoaderBadInputTest, HfConfigMissingHiddenSize) {
  const TinyGeometry g;
  nlohmann::json j = TinyConfigJson(g, "llama", true);
  j.erase("hidden_size");
  ExpectError(ModelConfigFromHfJson(j.dump()).status(), absl::StatusCode::kInvalidArgument,
              {"config.json: required field 'hidden_size' is missing"});
  const std::string dir = FreshTempDir("hf_missing_hidden");
  WriteHfModel(dir, j, TinyHfWeights(g, false, true, 1), 1, {"F32"});
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument,
              {dir, "required field 'hidden_size' is missing"});
}

TEST(LoaderBadInputTest, HfConfigWrongTypeAndBadJson) {
  const TinyGeometry g;
  nlohmann::json j = TinyConfigJson(g, "llama", true);
  j["num_hidden_layers"] = "thirty";
  ExpectError(ModelConfigFromHfJson(j.dump()).status(), absl::StatusCode::kInvalidArgument,
              {"field 'num_hidden_layers' must be an integer, got \"thirty\""});
  ExpectError(ModelConfigFromHfJson("{\"hidden_size\": 5,").status(), absl::StatusCode::kInvalidArgument,
              {"config.json: not a JSON object"});
  j = TinyConfigJson(g, "gpt_neox", true);
  ExpectError(ModelConfigFromHfJson(j.dump()).status(), absl::StatusCode::kUnimplemented,
              {"model_type 'gpt_neox' is not supported"});
}

TEST(LoaderBadInputTest, HfDirectoryWithoutConfig) {
  const std::string dir = FreshTempDir("hf_no_config");
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kNotFound, {dir, "config.json is missing"});
}

TEST(LoaderBadInputTest, HfMissingTensor) {
  const TinyGeometry g;
  HfWeights hf = TinyHfWeights(g, false, true, 1);
  std::erase_if(hf, [](const auto& t) { return t.first == "model.layers.1.mlp.up_proj.weight"; });
  const std::string dir = FreshTempDir("hf_missing_tensor");
  WriteHfModel(dir, TinyConfigJson(g, "llama", true), hf, 2, {"F32"});
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument,
              {dir, "tensor 'model.layers.1.mlp.up_proj.weight' is missing"});
}

TEST(LoaderBadInputTest, HfUntiedWithoutLmHead) {
  const TinyGeometry g;
  const std::string dir = FreshTempDir("hf_no_lm_head");
  WriteHfModel(dir, TinyConfigJson(g, "llama", /*tied=*/false), TinyHfWeights(g, false, /*tied=*/true, 1), 1, {"F32"});
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument, {"tensor 'lm_head.weight' is missing"});
}

TEST(LoaderBadInputTest, HfIndexNamesMissingShard) {
  const TinyGeometry g;
  const std::string dir = FreshTempDir("hf_missing_shard");
  WriteHfModel(dir, TinyConfigJson(g, "llama", true), TinyHfWeights(g, false, true, 1), 2, {"F32"});
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kNotFound, {"model-00002-of-00002.safetensors"});
}

TEST(LoaderBadInputTest, HfCorruptSafetensors) {
  const TinyGeometry g;
  const std::string dir = FreshTempDir("hf_corrupt");
  WriteHfModel(dir, TinyConfigJson(g, "llama", true), TinyHfWeights(g, false, true, 1), 1, {"BF16"});
  const std::string file = dir + "/model.safetensors";
  // Truncated: the last tensor's bytes run past the end.
  fs::resize_file(file, fs::file_size(file) - 2);
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument, {file, "truncated or corrupt file"});
  // An absurd header length.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t absurd = uint64_t{1} << 50;
    f.write(reinterpret_cast<const char*>(&absurd), 8);
  }
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument, {file, "header length"});
  // Not JSON.
  WriteText(file, std::string("\x10\0\0\0\0\0\0\0", 8) + "not json at all!");
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kInvalidArgument, {file, "header is not a JSON object"});
}

TEST(LoaderBadInputTest, HfUnsupportedDtype) {
  const TinyGeometry g;
  const std::string dir = FreshTempDir("hf_dtype");
  WriteText(dir + "/config.json", TinyConfigJson(g, "llama", true).dump());
  std::vector<StTensor> tensors;
  for (const auto& [name, t] : TinyHfWeights(g, false, true, 1)) {
    std::vector<float> back;
    tensors.push_back(Encode(name, "F32", t, &back));
  }
  StTensor& embedding = tensors.front();
  embedding.dtype = "I32";  // same size as F32
  WriteSafetensors(dir + "/model.safetensors", tensors);
  ExpectError(LoadModel(dir).status(), absl::StatusCode::kUnimplemented,
              {"tensor 'model.embed_tokens.weight' has dtype I32"});
}

// ---------------------------------------------------------------------------------------------------------
// The demo model

std::string DemoModelPath() {
  if (const char* env = std::getenv("KVSHARD_MODEL")) return env;
  const char* home = std::getenv("HOME");
  return std::string(home ? home : "") + "/.cache/kvshard/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// Same checksum as the fixture script: sum of bits[i] * (2i + 1) modulo 2^64.
uint64_t Checksum(const std::vector<float>& values) {
  uint64_t sum = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], 4);
    sum += uint64_t{bits} * (2 * uint64_t{i} + 1);
  }
  return sum;
}

const HostTensor* FindOurs(const ModelWeights& w, const std::string& ours) {
  if (ours == "token_embedding") return &w.token_embedding;
  if (ours == "output_norm") return &w.output_norm;
  // layers.N.name
  const size_t dot = ours.find('.', 7);
  const LayerWeights& L = w.layers.at(std::stoi(ours.substr(7, dot - 7)));
  const std::string part = ours.substr(dot + 1);
  const std::map<std::string, const HostTensor*> parts = {
      {"wq", &L.wq}, {"wk", &L.wk}, {"wv", &L.wv}, {"wo", &L.wo}, {"w_gate", &L.w_gate}, {"w_up", &L.w_up},
      {"w_down", &L.w_down}, {"attn_norm", &L.attn_norm}, {"ffn_norm", &L.ffn_norm}};
  auto it = parts.find(part);
  return it == parts.end() ? nullptr : it->second;
}

TEST(DemoModelTest, LoadsFastAndMatchesTransformers) {
  const std::string path = DemoModelPath();
  if (!fs::exists(path)) {
    GTEST_SKIP() << "demo model not found at " << path << "; run deploy/fetch-demo-model.sh (or set KVSHARD_MODEL)";
  }
  const auto start = std::chrono::steady_clock::now();
  auto w = LoadModel(path);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(w.ok()) << w.status();
  std::cout << "  demo model loaded in " << seconds << " s\n";
  const ModelConfig& c = w->config;
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.ffn_hidden, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_context, 8192);
  EXPECT_EQ(c.rope_theta, 100000.0f);
  EXPECT_EQ(c.norm_eps, 1e-5f);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.name.empty());

  // Every checked tensor is bit-identical to transformers' fp32 load of the same file (same dequantization
  // arithmetic, same Q/K row order).
  std::ifstream in(std::string(KVSHARD_SOURCE_DIR) + "/tests/fixtures/demo_model_weights.json");
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json fixture = nlohmann::json::parse(text.str(), nullptr, false);
  ASSERT_FALSE(fixture.is_discarded()) << "tests/fixtures/demo_model_weights.json is missing or unreadable";
  int checked = 0;
  for (const auto& [ours, expected] : fixture["tensors"].items()) {
    SCOPED_TRACE(ours + " (transformers: " + expected["source"].get<std::string>() + ")");
    const HostTensor* t = FindOurs(*w, ours);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, expected["shape"].get<std::vector<int64_t>>());
    for (const auto& sample : expected["samples"]) {
      const int64_t index = sample[0].get<int64_t>();
      uint32_t bits;
      std::memcpy(&bits, &t->data.at(index), 4);
      float want;
      const uint32_t want_bits = sample[1].get<uint32_t>();
      std::memcpy(&want, &want_bits, 4);
      EXPECT_EQ(bits, want_bits) << "element " << index << ": got " << t->data[index] << " expected " << want;
    }
    EXPECT_EQ(std::to_string(Checksum(t->data)), expected["checksum"].get<std::string>());
    ++checked;
  }
  EXPECT_GE(checked, 29);
}

}  // namespace
}  // namespace kvshard
