#include "coordinator/byte_tokenizer.h"

#include "absl/strings/str_cat.h"

namespace kvshard {
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  explicit ByteTokenizer(int vocab_size) : vocab_size_(vocab_size) {}

  std::vector<int32_t> Encode(std::string_view text, bool parse_special) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(c);
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::string text;
    for (int32_t id : ids) text += TokenBytes(id);
    return text;
  }
  std::string TokenBytes(int32_t id) const override {
    if (id >= 0 && id < 256) return std::string(1, static_cast<char>(id));
    return absl::StrCat("<", id, ">");
  }
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> bos_id() const override { return std::nullopt; }
  std::optional<int32_t> eos_id() const override { return std::nullopt; }
  std::vector<int32_t> stop_ids() const override { return {}; }
  bool IsSpecial(int32_t id) const override { return false; }
  std::optional<int32_t> TokenId(std::string_view token_text) const override {
    if (token_text.size() == 1) return static_cast<unsigned char>(token_text[0]);
    return std::nullopt;
  }
  ChatTemplate DefaultChatTemplate() const override { return ChatTemplate::kChatML; }

 private:
  int vocab_size_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> MakeByteTokenizer(int vocab_size) {
  if (vocab_size < 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("a synthetic model needs a vocabulary of at least 256 (its byte tokenizer), got ", vocab_size));
  }
  return std::unique_ptr<Tokenizer>(new ByteTokenizer(vocab_size));
}

}  // namespace kvshard
