// The plain description of a byte-level BPE tokenizer that both sources (GGUF metadata, tokenizer.json)
// are read into, and the function that builds a Tokenizer from it.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "coordinator/pretokenizer.h"
#include "coordinator/tokenizer.h"

namespace kvshard {

struct BpeVocabulary {
  // Token spellings by id as the vocabulary writes them: ordinary tokens in the GPT-2 byte alphabet
  // ("Ġthe" for " the"), added tokens as their text ("<|im_end|>"). Empty for an id no token uses.
  std::vector<std::string> tokens;
  // Merge rules, best (lowest rank) first, each a pair of token spellings.
  std::vector<std::pair<std::string, std::string>> merges;
  // Tokens matched whole in the text before pre-tokenization. Special ones are matched only when
  // encoding with parse_special, and Decode(skip_special) drops them; the others are always matched.
  struct AddedToken {
    int32_t id = 0;
    std::string content;
    bool special = true;
  };
  std::vector<AddedToken> added_tokens;
  PreTokenizerKind pre_tokenizer = PreTokenizerKind::kGpt2;
  // A pre-token that is itself in the vocabulary becomes that token without merging (Llama 3).
  bool ignore_merges = false;
  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
  // Used for a byte with no token of its own; without it such bytes are dropped (as `tokenizers` does).
  std::optional<int32_t> unk_id;
};

// Checks the description (ids in range, every merge's parts and result in the vocabulary, ...) and
// builds the tokenizer. Errors name the offending token or merge.
absl::StatusOr<std::unique_ptr<Tokenizer>> BuildBpeTokenizer(BpeVocabulary vocabulary);

// GPT-2's byte alphabet (bytes_to_unicode): the code point that spells each byte in token strings.
const std::array<char32_t, 256>& ByteToAlphabetCodePoint();

}  // namespace kvshard
