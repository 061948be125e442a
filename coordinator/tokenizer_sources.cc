// Reading a byte-level BPE tokenizer from GGUF metadata or from a Hugging Face tokenizer.json.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "coordinator/bpe_vocabulary.h"
#include "coordinator/tokenizer.h"

namespace kvshard {
namespace {

// llama.cpp token types (tokenizer.ggml.token_type).
constexpr int64_t kTokenTypeControl = 3;
constexpr int64_t kTokenTypeUserDefined = 4;
// Upper bound on token ids, so that a corrupt file cannot make us allocate without limit.
constexpr int64_t kMaxVocabulary = int64_t{1} << 24;

absl::StatusOr<std::optional<int32_t>> OptionalGgufId(const GgufFile& file, std::string_view key) {
  if (!file.Has(key)) return std::optional<int32_t>();
  KV_ASSIGN_OR_RETURN(const int64_t id, file.GetInt(key));
  if (id < 0 || id >= kMaxVocabulary)
    return absl::InvalidArgumentError(absl::StrCat(std::string(key), " is ", id));
  return std::optional<int32_t>(static_cast<int32_t>(id));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> FromGgufImpl(const GgufFile& file) {
  KV_ASSIGN_OR_RETURN(const std::string model, file.GetString("tokenizer.ggml.model"));
  if (model != "gpt2") {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.ggml.model is '", model, "'; only byte-level BPE ('gpt2') is supported"));
  }
  BpeVocabulary v;
  std::string pre = "gpt-2";
  if (file.Has("tokenizer.ggml.pre")) {
    KV_ASSIGN_OR_RETURN(pre, file.GetString("tokenizer.ggml.pre"));
  }
  KV_ASSIGN_OR_RETURN(v.pre_tokenizer, PreTokenizerFromGgufName(pre));
  // Llama 3's tokenizer.json sets ignore_merges; llama.cpp applies it to this pre-tokenizer.
  v.ignore_merges = pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3";

  KV_ASSIGN_OR_RETURN(v.tokens, file.GetStringArray("tokenizer.ggml.tokens"));
  if (v.tokens.size() > static_cast<size_t>(kMaxVocabulary)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.ggml.tokens has ", v.tokens.size(), " entries"));
  }
  if (file.Has("tokenizer.ggml.token_type")) {
    KV_ASSIGN_OR_RETURN(const std::vector<int64_t> types, file.GetIntArray("tokenizer.ggml.token_type"));
    if (types.size() != v.tokens.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ", types.size(),
                                                     " entries for ", v.tokens.size(), " tokens"));
    }
    for (size_t id = 0; id < types.size(); ++id) {
      if (types[id] == kTokenTypeControl || types[id] == kTokenTypeUserDefined) {
        v.added_tokens.push_back({static_cast<int32_t>(id), v.tokens[id], types[id] == kTokenTypeControl});
      }
    }
  }
  KV_ASSIGN_OR_RETURN(const std::vector<std::string> merges, file.GetStringArray("tokenizer.ggml.merges"));
  v.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const size_t space = merges[i].find(' ');
    if (space == std::string::npos || space == 0 || space + 1 == merges[i].size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.merges[", i, "] is '", merges[i],
                                                     "', not two tokens separated by a space"));
    }
    v.merges.emplace_back(merges[i].substr(0, space), merges[i].substr(space + 1));
  }
  KV_ASSIGN_OR_RETURN(v.bos_id, OptionalGgufId(file, "tokenizer.ggml.bos_token_id"));
  KV_ASSIGN_OR_RETURN(v.eos_id, OptionalGgufId(file, "tokenizer.ggml.eos_token_id"));
  return BuildBpeTokenizer(std::move(v));
}

using Json = nlohmann::json;

absl::Status JsonError(const std::string& what) { return absl::InvalidArgumentError(what); }

// A token written as "text" or as {"content": "text", ...} (tokenizer_config.json uses both).
std::optional<std::string> TokenContent(const Json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return std::nullopt;
}

absl::StatusOr<PreTokenizerKind> ParseJsonPreTokenizer(const Json& pre) {
  auto describe = [&] { return absl::StrCat("pre_tokenizer ", pre.dump(), " is not supported"); };
  auto byte_level = [&](const Json& p, bool with_regex) {
    return p.is_object() && p.value("type", "") == "ByteLevel" && !p.value("add_prefix_space", false) &&
           p.value("use_regex", true) == with_regex;
  };
  if (byte_level(pre, true)) return PreTokenizerKind::kGpt2;
  if (!pre.is_object() || pre.value("type", "") != "Sequence" || !pre.contains("pretokenizers") ||
      !pre["pretokenizers"].is_array() || pre["pretokenizers"].size() != 2) {
    return absl::UnimplementedError(describe());
  }
  const Json& first = pre["pretokenizers"][0];
  const Json& second = pre["pretokenizers"][1];
  if (first.is_object() && first.value("type", "") == "Digits" && first.value("individual_digits", false) &&
      byte_level(second, true)) {
    return PreTokenizerKind::kGpt2IndividualDigits;
  }
  if (first.is_object() && first.value("type", "") == "Split" && first.value("behavior", "") == "Isolated" &&
      !first.value("invert", false) && first.contains("pattern") && first["pattern"].is_object() &&
      first["pattern"].contains("Regex") && first["pattern"]["Regex"].is_string() &&
      byte_level(second, false)) {
    return PreTokenizerFromSplitRegex(first["pattern"]["Regex"].get<std::string>());
  }
  return absl::UnimplementedError(describe());
}

absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonImpl(const Json& j, const Json* config) {
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
    return JsonError("no \"model\" object");
  const Json& model = j["model"];
  if (model.contains("type") && model["type"] != "BPE") {
    return absl::UnimplementedError(absl::StrCat("model type ", model["type"].dump(), " is not BPE"));
  }
  if (model.value("byte_fallback", false))
    return absl::UnimplementedError("BPE with byte_fallback is not supported");
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    return absl::UnimplementedError(absl::StrCat("normalizer ", j["normalizer"].dump(), " is not supported"));
  }
  if (!model.contains("vocab") || !model["vocab"].is_object())
    return JsonError("model.vocab is not an object");

  BpeVocabulary v;
  auto place = [&](int64_t id, const std::string& text) -> absl::Status {
    if (id < 0 || id >= kMaxVocabulary) return JsonError(absl::StrCat("token '", text, "' has id ", id));
    if (static_cast<size_t>(id) >= v.tokens.size()) v.tokens.resize(id + 1);
    if (!v.tokens[id].empty() && v.tokens[id] != text) {
      return JsonError(absl::StrCat("id ", id, " is given to both '", v.tokens[id], "' and '", text, "'"));
    }
    v.tokens[id] = text;
    return absl::OkStatus();
  };
  for (const auto& [text, id] : model["vocab"].items()) {
    if (!id.is_number_integer())
      return JsonError(absl::StrCat("model.vocab['", text, "'] is not an integer"));
    KV_RETURN_IF_ERROR(place(id.get<int64_t>(), text));
  }
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) return JsonError("added_tokens is not an array");
    for (const Json& added : j["added_tokens"]) {
      if (!added.is_object() || !added.contains("id") || !added["id"].is_number_integer() ||
          !added.contains("content") || !added["content"].is_string()) {
        return JsonError(
            absl::StrCat("added token ", added.dump(), " lacks an integer id or a content string"));
      }
      const std::string content = added["content"].get<std::string>();
      const int64_t id = added["id"].get<int64_t>();
      KV_RETURN_IF_ERROR(place(id, content));
      v.added_tokens.push_back({static_cast<int32_t>(id), content, added.value("special", false)});
    }
  }

  if (!model.contains("merges") || !model["merges"].is_array())
    return JsonError("model.merges is not an array");
  const Json& merges = model["merges"];
  v.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& m = merges[i];
    if (m.is_string()) {  // "left right"
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == s.size() ||
          s.find(' ', space + 1) != std::string::npos) {
        return JsonError(
            absl::StrCat("model.merges[", i, "] is '", s, "', not two tokens separated by a space"));
      }
      v.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {  // ["left", "right"]
      v.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return JsonError(absl::StrCat("model.merges[", i, "] is ", m.dump(), ", not a pair of tokens"));
    }
  }
  v.ignore_merges = model.value("ignore_merges", false);
  if (!j.contains("pre_tokenizer") || j["pre_tokenizer"].is_null()) {
    return absl::UnimplementedError("a byte-level BPE tokenizer without pre_tokenizer is not supported");
  }
  KV_ASSIGN_OR_RETURN(v.pre_tokenizer, ParseJsonPreTokenizer(j["pre_tokenizer"]));

  auto id_of = [&](const std::string& text) -> std::optional<int32_t> {
    for (size_t id = 0; id < v.tokens.size(); ++id) {
      if (v.tokens[id] == text) return static_cast<int32_t>(id);
    }
    return std::nullopt;
  };
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    v.unk_id = id_of(model["unk_token"].get<std::string>());
  }
  // BOS/EOS live in tokenizer_config.json; without it, fall back on the usual names.
  auto special_id = [&](const char* key, std::initializer_list<const char*> names) -> std::optional<int32_t> {
    if (config != nullptr && config->contains(key)) {
      if (auto content = TokenContent((*config)[key])) return id_of(*content);
      return std::nullopt;
    }
    for (const char* name : names) {
      if (auto id = id_of(name)) return id;
    }
    return std::nullopt;
  };
  v.bos_id = special_id("bos_token", {"<|begin_of_text|>", "<s>"});
  v.eos_id = special_id("eos_token", {"<|end_of_text|>", "<|endoftext|>", "</s>"});
  return BuildBpeTokenizer(std::move(v));
}

absl::StatusOr<Json> ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  Json j = Json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  auto tok = FromGgufImpl(file);
  if (!tok.ok()) return Annotate(tok.status(), absl::StrCat(file.path(), ": tokenizer"));
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonFile(const std::string& path) {
  KV_ASSIGN_OR_RETURN(const Json j, ReadJson(path));
  // A tokenizer_config.json beside it names BOS and EOS.
  const std::filesystem::path config_path =
      std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::optional<Json> config;
  if (std::error_code ec; std::filesystem::is_regular_file(config_path, ec)) {
    KV_ASSIGN_OR_RETURN(config, ReadJson(config_path.string()));
  }
  auto tok = FromJsonImpl(j, config ? &*config : nullptr);
  if (!tok.ok()) return Annotate(tok.status(), path);
  return tok;
}

}  // namespace kvshard
