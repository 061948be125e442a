// Pre-tokenizers of byte-level BPE vocabularies: they cut text into the pieces BPE merges within.
// Each regex is implemented as a hand-written scanner over code points whose character classes come from
// ICU, matching Hugging Face `tokenizers` (Oniguruma): \p{L} is general category L*, \p{N} is N*, and \s
// is the Unicode White_Space property.
#pragma once

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvshard {

enum class PreTokenizerKind {
  // GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // SmolLM2 / StarCoder: Digits(individual_digits) first -- every \p{N} character is a piece of its own
  // and the regex sees the text between two of them as a whole string -- then the GPT-2 regex.
  kGpt2IndividualDigits,
  // Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
  //          | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // Qwen2: as Llama 3 with \p{N} (one digit per piece) instead of \p{N}{1,3}.
  kQwen2,
};

// The kind for a GGUF `tokenizer.ggml.pre` value ("smollm", "gpt-2", "llama-bpe", "qwen2", ...).
absl::StatusOr<PreTokenizerKind> PreTokenizerFromGgufName(std::string_view name);

// The kind whose split regex is `pattern` (as a tokenizer.json Split pre-tokenizer spells it).
absl::StatusOr<PreTokenizerKind> PreTokenizerFromSplitRegex(std::string_view pattern);

// Appends the pieces of `text` to `pieces`, in order; they cover `text` exactly. Bytes that are not valid
// UTF-8 are taken one at a time as punctuation-like characters, so any byte string round-trips.
void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* pieces);

}  // namespace kvshard
