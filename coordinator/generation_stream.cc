#include "coordinator/generation_stream.h"

#include <algorithm>

namespace kvshard {

GenerationStream::GenerationStream(const Tokenizer& tokenizer, const GenerationRequest& request,
                                   const TokenCallback& on_token, GenerationResult& result)
    : tokenizer_(tokenizer),
      on_token_(on_token),
      result_(result),
      stop_ids_(tokenizer.stop_ids()),
      stops_(request.stop) {
  result_.finish_reason = FinishReason::kLength;
}

bool GenerationStream::Push(int32_t token) {
  if (std::find(stop_ids_.begin(), stop_ids_.end(), token) != stop_ids_.end()) {
    result_.finish_reason = FinishReason::kStop;
    return false;
  }
  result_.token_ids.push_back(token);
  std::string piece = stops_.Push(utf8_.Push(tokenizer_.TokenBytes(token)));
  if (on_token_ && !on_token_(token, piece)) return false;
  if (stops_.stopped()) {
    result_.finish_reason = FinishReason::kStop;
    return false;
  }
  return true;
}

void GenerationStream::Finish() {
  if (!stops_.stopped()) {
    std::string tail = stops_.Push(utf8_.Flush());
    tail += stops_.Flush();
    if (!tail.empty() && on_token_) on_token_(-1, tail);
  }
  result_.text = stops_.text();
}

}  // namespace kvshard
