// Pre-tokenizers of byte-level BPE vocabularies: they cut text into the pieces BPE merges within.
// Each regex is implemented as a hand-written scanner over code points whose character classes come from
// ICU, matching Hugging Face `tokenizers` (Oniguruma): \p{L} is general category L*, \p{N} is N*, and \s
// is the Unicode White_Space property.
#pragma once

#include <cstddef>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
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

// Calls `emit` with each piece of `text`, in order; the pieces cover `text` exactly. Ill-formed UTF-8 is
// taken as punctuation-like characters (one per maximal ill-formed run), so any byte string round-trips.
// The text is scanned in windows of about `window_bytes` (grown when one piece is longer), so memory stays
// bounded on texts of any length; the pieces do not depend on it.
void PreTokenize(PreTokenizerKind kind, std::string_view text, absl::FunctionRef<void(std::string_view)> emit,
                 size_t window_bytes = 64 * 1024);

// Appends the pieces of `text` to `pieces`.
void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* pieces);

}  // namespace kvshard
