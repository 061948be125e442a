// A minimal GGUF v3 writer for tests: metadata of every value type, tensors with raw bytes, alignment.
// Also the tiny Llama-family models the loader tests build (GGUF and Hugging Face directories).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace kvshard::testing_gguf {

using kvshard::testing::FreshTempDir;

// GGUF metadata value type ids.
enum ValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9,
  kU64 = 10, kI64 = 11, kF64 = 12,
};

class GgufWriter {
 public:
  template <typename T>
  void AddScalar(const std::string& key, ValueType type, T value) {
    Entry e{key, type, {}};
    Append(e.payload, value);
    entries_.push_back(std::move(e));
  }
  void AddU32(const std::string& key, uint32_t v) { AddScalar(key, kU32, v); }
  void AddF32(const std::string& key, float v) { AddScalar(key, kF32, v); }
  void AddBool(const std::string& key, bool v) { AddScalar(key, kBool, static_cast<uint8_t>(v)); }
  void AddString(const std::string& key, const std::string& v) {
    Entry e{key, kString, {}};
    AppendString(e.payload, v);
    entries_.push_back(std::move(e));
  }
  template <typename T>
  void AddArray(const std::string& key, ValueType element_type, const std::vector<T>& values) {
    Entry e{key, kArray, {}};
    Append(e.payload, static_cast<uint32_t>(element_type));
    Append(e.payload, static_cast<uint64_t>(values.size()));
    for (const T& v : values) Append(e.payload, v);
    entries_.push_back(std::move(e));
  }
  void AddStringArray(const std::string& key, const std::vector<std::string>& values) {
    Entry e{key, kArray, {}};
    Append(e.payload, static_cast<uint32_t>(kString));
    Append(e.payload, static_cast<uint64_t>(values.size()));
    for (const std::string& v : values) AppendString(e.payload, v);
    entries_.push_back(std::move(e));
  }
  // A metadata entry with arbitrary bytes after the type (for malformed files).
  void AddRaw(const std::string& key, uint32_t type, std::vector<uint8_t> payload) {
    entries_.push_back(Entry{key, type, std::move(payload)});
  }

  // ne in ggml order (ne[0] = row length); `data` is the tensor's bytes as stored.
  void AddTensor(const std::string& name, std::vector<int64_t> ne, GgmlType type, std::vector<uint8_t> data) {
    tensors_.push_back(Tensor{name, std::move(ne), static_cast<uint32_t>(type), std::move(data)});
  }
  void AddF32Tensor(const std::string& name, std::vector<int64_t> ne, const std::vector<float>& values) {
    std::vector<uint8_t> bytes(values.size() * 4);
    std::memcpy(bytes.data(), values.data(), bytes.size());
    AddTensor(name, std::move(ne), GgmlType::kF32, std::move(bytes));
  }
  // Removes a tensor or metadata entry added before (to build files that lack one).
  void RemoveTensor(const std::string& name) {
    std::erase_if(tensors_, [&](const Tensor& t) { return t.name == name; });
  }
  void RemoveKey(const std::string& key) {
    std::erase_if(entries_, [&](const Entry& e) { return e.key == key; });
  }

  uint32_t magic = 0x46554747;  // "GGUF"
  uint32_t version = 3;
  uint64_t alignment = 32;  // must match general.alignment when that key is added

  std::vector<uint8_t> Bytes() const {
    std::vector<uint8_t> out;
    Append(out, magic);
    Append(out, version);
    Append(out, static_cast<uint64_t>(tensors_.size()));
    Append(out, static_cast<uint64_t>(entries_.size()));
    for (const Entry& e : entries_) {
      AppendString(out, e.key);
      Append(out, e.type);
      out.insert(out.end(), e.payload.begin(), e.payload.end());
    }
    uint64_t offset = 0;
    std::vector<uint64_t> offsets;
    for (const Tensor& t : tensors_) {
      offsets.push_back(offset);
      offset = AlignUp(offset + t.data.size());
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      AppendString(out, t.name);
      Append(out, static_cast<uint32_t>(t.ne.size()));
      for (int64_t d : t.ne) Append(out, static_cast<uint64_t>(d));
      Append(out, t.type);
      Append(out, offsets[i]);
    }
    if (!tensors_.empty()) {
      out.resize(AlignUp(out.size()), 0);
      const size_t data_start = out.size();
      for (size_t i = 0; i < tensors_.size(); ++i) {
        out.resize(data_start + offsets[i], 0);
        out.insert(out.end(), tensors_[i].data.begin(), tensors_[i].data.end());
      }
    }
    return out;
  }

  void WriteTo(const std::string& path) const { WriteFile(path, Bytes()); }

  static void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }

 private:
  struct Entry {
    std::string key;
    uint32_t type;
    std::vector<uint8_t> payload;
  };
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    uint32_t type;
    std::vector<uint8_t> data;
  };

  template <typename T>
  static void Append(std::vector<uint8_t>& out, T value) {
    uint8_t bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    out.insert(out.end(), bytes, bytes + sizeof(T));
  }
  static void AppendString(std::vector<uint8_t>& out, const std::string& s) {
    Append(out, static_cast<uint64_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  uint64_t AlignUp(uint64_t n) const { return (n + alignment - 1) / alignment * alignment; }

  std::vector<Entry> entries_;
  std::vector<Tensor> tensors_;
};

inline std::vector<float> RandomValues(size_t n, uint32_t seed, float scale = 0.1f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Geometry of the tiny test models: GQA (4 query heads on 2 KV heads), head_dim 16.
struct TinyGeometry {
  int n_layers = 2;
  int hidden = 64;
  int n_heads = 4;
  int n_kv_heads = 2;
  int head_dim = 16;
  int ffn = 96;
  int vocab = 40;
  int64_t context = 512;
};

// The Hugging Face-layout weights of a tiny model, keyed by Hugging Face tensor name, shape outermost first.
struct TinyTensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

inline std::vector<std::pair<std::string, TinyTensor>> TinyHfWeights(const TinyGeometry& g, bool qkv_bias,
                                                                      bool tied, uint32_t seed) {
  std::vector<std::pair<std::string, TinyTensor>> w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    w.push_back({name, TinyTensor{shape, RandomValues(static_cast<size_t>(n), seed++)}});
  };
  const int64_t q = int64_t{g.n_heads} * g.head_dim, kv = int64_t{g.n_kv_heads} * g.head_dim;
  add("model.embed_tokens.weight", {g.vocab, g.hidden});
  for (int l = 0; l < g.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {g.hidden});
    add(p + "self_attn.q_proj.weight", {q, g.hidden});
    add(p + "self_attn.k_proj.weight", {kv, g.hidden});
    add(p + "self_attn.v_proj.weight", {kv, g.hidden});
    add(p + "self_attn.o_proj.weight", {g.hidden, q});
    if (qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q});
      add(p + "self_attn.k_proj.bias", {kv});
      add(p + "self_attn.v_proj.bias", {kv});
    }
    add(p + "post_attention_layernorm.weight", {g.hidden});
    add(p + "mlp.gate_proj.weight", {g.ffn, g.hidden});
    add(p + "mlp.up_proj.weight", {g.ffn, g.hidden});
    add(p + "mlp.down_proj.weight", {g.hidden, g.ffn});
  }
  add("model.norm.weight", {g.hidden});
  if (!tied) add("lm_head.weight", {g.vocab, g.hidden});
  return w;
}

// llama.cpp's convert-time permutation of Q/K rows for adjacent-pair RoPE, written as its numpy original
// reads: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols).
inline std::vector<float> LlamaCppPermute(const std::vector<float>& w, int64_t rows, int64_t cols, int n_head) {
  const int64_t half = rows / n_head / 2;
  std::vector<float> out(w.size());
  // out index (h, i, s, c) <- in index (h, s, i, c)
  for (int64_t h = 0; h < n_head; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t s = 0; s < 2; ++s)
        for (int64_t c = 0; c < cols; ++c)
          out[((h * half + i) * 2 + s) * cols + c] = w[((h * 2 + s) * half + i) * cols + c];
  return out;
}

// GGUF name of a Hugging Face tensor name.
inline std::string GgufName(const std::string& hf) {
  static const std::vector<std::pair<std::string, std::string>> kParts = {
      {"input_layernorm.weight", "attn_norm.weight"}, {"self_attn.q_proj.", "attn_q."},
      {"self_attn.k_proj.", "attn_k."},               {"self_attn.v_proj.", "attn_v."},
      {"self_attn.o_proj.", "attn_output."},          {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.", "ffn_gate."},                {"mlp.up_proj.", "ffn_up."},
      {"mlp.down_proj.", "ffn_down."},
  };
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  std::string name = hf;
  name.replace(0, std::string("model.layers.").size(), "blk.");
  for (const auto& [from, to] : kParts) {
    if (auto pos = name.find(from); pos != std::string::npos) name.replace(pos, from.size(), to);
  }
  return name;
}

// A GGUF writer holding a tiny model of architecture `arch` ("llama" permutes Q/K as llama.cpp does).
inline GgufWriter TinyGguf(const std::string& arch, const TinyGeometry& g,
                           const std::vector<std::pair<std::string, TinyTensor>>& hf_weights) {
  GgufWriter w;
  w.AddString("general.architecture", arch);
  w.AddString("general.name", "tiny " + arch);
  w.AddU32(arch + ".block_count", g.n_layers);
  w.AddU32(arch + ".context_length", static_cast<uint32_t>(g.context));
  w.AddU32(arch + ".embedding_length", g.hidden);
  w.AddU32(arch + ".feed_forward_length", g.ffn);
  w.AddU32(arch + ".attention.head_count", g.n_heads);
  w.AddU32(arch + ".attention.head_count_kv", g.n_kv_heads);
  w.AddF32(arch + ".rope.freq_base", 10000.0f);
  w.AddF32(arch + ".attention.layer_norm_rms_epsilon", 1e-5f);
  w.AddU32(arch + ".rope.dimension_count", g.head_dim);
  std::vector<std::string> tokens;
  for (int i = 0; i < g.vocab; ++i) tokens.push_back(std::to_string(i) + "t");  // (GCC 12 warns on "t" + s)
  w.AddStringArray("tokenizer.ggml.tokens", tokens);
  for (const auto& [name, t] : hf_weights) {
    std::vector<float> values = t.values;
    const bool is_q = name.find("q_proj") != std::string::npos, is_k = name.find("k_proj") != std::string::npos;
    if (arch == "llama" && (is_q || is_k)) {
      const int64_t cols = t.shape.size() > 1 ? t.shape[1] : 1;
      values = LlamaCppPermute(values, t.shape[0], cols, is_q ? g.n_heads : g.n_kv_heads);
    }
    std::vector<int64_t> ne(t.shape.rbegin(), t.shape.rend());
    w.AddF32Tensor(GgufName(name), ne, values);
  }
  return w;
}

}  // namespace kvshard::testing_gguf
