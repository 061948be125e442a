// A byte-level tokenizer for synthetic models, which come without a vocabulary: ids 0..255 are the bytes
// of the text; higher ids decode as "<id>". No BOS, EOS or stop ids, so generation always runs to
// max_tokens (what speed runs want).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "coordinator/tokenizer.h"

namespace kvshard {

// vocab_size must be at least 256.
absl::StatusOr<std::unique_ptr<Tokenizer>> MakeByteTokenizer(int vocab_size);

}  // namespace kvshard
