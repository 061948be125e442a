// A deterministic Engine for the serving tests: a byte-level tokenizer (one token per byte, plus the
// ChatML markers as special tokens) and an engine that "generates" a fixed sentence, so the front ends
// can be tested without a model and in milliseconds.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "coordinator/engine.h"
#include "coordinator/stop_strings.h"

namespace kvshard::testing {

class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kImStart = 256;
  static constexpr int32_t kImEnd = 257;
  static constexpr int32_t kEndOfText = 258;

  std::vector<int32_t> Encode(std::string_view text, bool parse_special) const override {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < text.size();) {
      bool special = false;
      if (parse_special) {
        for (int32_t id : {kImStart, kImEnd, kEndOfText}) {
          const std::string& name = Special(id);
          if (text.substr(i, name.size()) == name) {
            ids.push_back(id);
            i += name.size();
            special = true;
            break;
          }
        }
      }
      if (!special) ids.push_back(static_cast<unsigned char>(text[i++]));
    }
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::string out;
    for (int32_t id : ids) {
      if (!(skip_special && IsSpecial(id))) out += TokenBytes(id);
    }
    return out;
  }
  std::string TokenBytes(int32_t id) const override {
    return id < 256 ? std::string(1, static_cast<char>(id)) : Special(id);
  }
  int32_t vocab_size() const override { return 259; }
  std::optional<int32_t> bos_id() const override { return std::nullopt; }
  std::optional<int32_t> eos_id() const override { return kEndOfText; }
  std::vector<int32_t> stop_ids() const override { return {kImEnd, kEndOfText}; }
  bool IsSpecial(int32_t id) const override { return id >= 256; }
  std::optional<int32_t> TokenId(std::string_view text) const override {
    for (int32_t id : {kImStart, kImEnd, kEndOfText}) {
      if (text == Special(id)) return id;
    }
    return std::nullopt;
  }
  ChatTemplate DefaultChatTemplate() const override { return ChatTemplate::kChatML; }

 private:
  static const std::string& Special(int32_t id) {
    static const std::string names[] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"};
    return names[id - 256];
  }
};

// Generates kSentence from an offset (0 at temperature 0, else seed-dependent), one byte per token,
// applying max_tokens, the context and stop strings like a real engine. Requests whose prompt contains
// "FAIL" fail with an internal error. set_token_delay slows it; Hold() blocks generation until Release().
// set_max_concurrent(n) makes it an engine that batches n requests (Generate is thread-safe either way).
class FakeEngine final : public Engine {
 public:
  static constexpr std::string_view kSentence = "The quick brown fox jumps over the lazy dog. ";

  explicit FakeEngine(int64_t max_context = 512) : max_context_(max_context) {}

  const Tokenizer& tokenizer() const override { return tokenizer_; }
  std::string model_name() const override { return "fake-model"; }
  int64_t max_context() const override { return max_context_; }
  std::vector<WorkerKvMemory> kv_memory() const override {
    return {{0, "fp16", kv_bytes_.load(), 1 << 20, 16.0}};
  }
  void set_observer(EngineObserver* observer) override { observer_ = observer; }

  int max_concurrent_requests() const override { return max_concurrent_; }
  void set_max_concurrent(int n) { max_concurrent_ = n; }
  void set_token_delay(std::chrono::milliseconds delay) { delay_ = delay; }
  void Hold() {
    std::lock_guard<std::mutex> lock(mutex_);
    held_ = true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      held_ = false;
    }
    released_.notify_all();
  }
  int calls() const { return calls_.load(); }
  bool running() const { return in_flight_.load() > 0; }
  int in_flight() const { return in_flight_.load(); }
  int peak_in_flight() const { return peak_in_flight_.load(); }

  absl::StatusOr<GenerationResult> Generate(const GenerationRequest& request, const TokenCallback& on_token,
                                            const PrefillCallback& on_prefill) override {
    ++calls_;
    const int now_in_flight = ++in_flight_;
    for (int peak = peak_in_flight_.load(); now_in_flight > peak && !peak_in_flight_.compare_exchange_weak(peak, now_in_flight);) {
    }
    struct Done {
      std::atomic<int>& count;
      ~Done() { --count; }
    } done{in_flight_};
    {
      std::unique_lock<std::mutex> lock(mutex_);
      released_.wait(lock, [&] { return !held_; });
    }
    const std::string prompt = tokenizer_.Decode(request.prompt_ids, false);
    if (prompt.find("FAIL") != std::string::npos) return absl::InternalError("the fake engine failed");
    const int64_t n_prompt = static_cast<int64_t>(request.prompt_ids.size());
    for (int64_t done_tokens = 0; done_tokens < n_prompt;) {
      done_tokens = std::min<int64_t>(n_prompt, done_tokens + 16);
      if (on_prefill) on_prefill({done_tokens, n_prompt, 0.001});
    }
    kv_bytes_ = n_prompt * 64;
    GenerationResult result;
    result.prompt_tokens = n_prompt;
    result.prefill_seconds = 0.001;
    result.finish_reason = FinishReason::kLength;
    StopStringFilter stops(request.stop);
    const size_t offset =
        request.sampling.temperature > 0 ? request.sampling.seed % kSentence.size() : 0;
    const int64_t budget = std::min<int64_t>(request.max_tokens, max_context_ - n_prompt);
    for (int64_t step = 0; step < budget; ++step) {
      if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
      if (observer_ != nullptr) observer_->OnDecodeStep(0, 0.001);
      const char byte = kSentence[(offset + step) % kSentence.size()];
      result.token_ids.push_back(static_cast<unsigned char>(byte));
      const std::string piece = stops.Push(std::string(1, byte));
      if (on_token && !on_token(result.token_ids.back(), piece)) break;
      if (stops.stopped()) {
        result.finish_reason = FinishReason::kStop;
        break;
      }
    }
    if (!stops.stopped()) {
      const std::string tail = stops.Flush();
      if (!tail.empty() && on_token) on_token(-1, tail);
    }
    result.text = stops.text();
    return result;
  }

 private:
  ByteTokenizer tokenizer_;
  int64_t max_context_;
  std::chrono::milliseconds delay_{0};
  EngineObserver* observer_ = nullptr;
  std::atomic<int64_t> kv_bytes_{0};
  std::atomic<int> calls_{0};
  std::atomic<int> in_flight_{0}, peak_in_flight_{0};
  int max_concurrent_ = 1;
  std::mutex mutex_;
  std::condition_variable released_;
  bool held_ = false;
};

}  // namespace kvshard::testing
