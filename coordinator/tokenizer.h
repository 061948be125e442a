// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen2) and chat templates.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/gguf.h"

namespace kvshard {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};

enum class ChatTemplate {
  // ChatML as SmolLM2's template renders it: "<|im_start|>role\ncontent<|im_end|>\n" per message, and
  // when the first message is not a system one, SmolLM2's default system message before it.
  kChatML,
  // Llama 3 Instruct: "<|begin_of_text|>" then "<|start_header_id|>role<|end_header_id|>\n\n" +
  // trimmed content + "<|eot_id|>" per message.
  kLlama3,
};

class Tokenizer {
 public:
  // From GGUF metadata: tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,...}.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);
  // From a Hugging Face tokenizer.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonFile(const std::string& path);
  virtual ~Tokenizer() = default;

  // Encodes text. With `parse_special`, special tokens written in the text ("<|im_start|>") become
  // their ids; otherwise they are encoded as plain text. Adds no BOS.
  virtual std::vector<int32_t> Encode(std::string_view text, bool parse_special = false) const = 0;
  // Decodes ids to UTF-8 bytes. Special tokens are written as their text unless `skip_special`.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;
  // The raw bytes of one token (may be an incomplete UTF-8 sequence; see Utf8StreamDecoder).
  virtual std::string TokenBytes(int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  // Ids that end generation: EOS, plus the special end-of-turn (<|im_end|>, <|eot_id|>, <|eom_id|>) and
  // end-of-text (<|endoftext|>, <|end_of_text|>) tokens the vocabulary has.
  virtual std::vector<int32_t> stop_ids() const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  // The id of a token given as the vocabulary spells it ("Ġthe", "<|im_end|>") or as its bytes (" the").
  virtual std::optional<int32_t> TokenId(std::string_view token_text) const = 0;

  // Which template suits this vocabulary: Llama 3 when <|start_header_id|> exists, else ChatML.
  virtual ChatTemplate DefaultChatTemplate() const = 0;
};

// Renders messages with a template, ending with the assistant header when `add_generation_prompt`.
std::string ApplyChatTemplate(ChatTemplate tmpl, const std::vector<ChatMessage>& messages,
                              bool add_generation_prompt);

// Turns a stream of token byte strings into complete UTF-8 text, holding back a split character.
class Utf8StreamDecoder {
 public:
  std::string Push(std::string_view bytes);  // returns the text that is complete so far
  std::string Flush();                       // the remainder (invalid bytes become U+FFFD)
 private:
  std::string pending_;
};

}  // namespace kvshard
