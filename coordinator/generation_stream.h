// From sampled token ids to what a front end sees, the same for every engine: a stop id ends generation
// unseen; text streams as complete UTF-8 pieces; stop strings end it and are trimmed; held-back text is
// flushed at the end with token_id -1.
#pragma once

#include <cstdint>

#include "coordinator/engine.h"
#include "coordinator/stop_strings.h"
#include "coordinator/tokenizer.h"

namespace kvshard {

class GenerationStream {
 public:
  // `result` receives token_ids, finish_reason (kLength until a stop) and, at Finish, text.
  GenerationStream(const Tokenizer& tokenizer, const GenerationRequest& request, const TokenCallback& on_token,
                   GenerationResult& result);
  // Takes the next sampled token; false when generation is over (a stop id or stop string, or the
  // callback cancelled).
  bool Push(int32_t token);
  // Flushes held-back text and sets result.text. Call once, at the end.
  void Finish();

 private:
  const Tokenizer& tokenizer_;
  const TokenCallback& on_token_;
  GenerationResult& result_;
  std::vector<int32_t> stop_ids_;
  Utf8StreamDecoder utf8_;
  StopStringFilter stops_;
};

}  // namespace kvshard
