// Stop strings for streamed generation.
#pragma once

#include <string>
#include <vector>

namespace kvshard {

// Streams generated text while holding back what could still become a stop string.
class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stops);
  // Adds text; returns the part now safe to emit. Sets stopped() when a stop string appears.
  std::string Push(const std::string& text);
  std::string Flush();  // the held-back remainder (none when stopped)
  bool stopped() const { return stopped_; }
  const std::string& text() const { return text_; }  // everything accepted, stop string excluded

 private:
  std::vector<std::string> stops_;
  size_t longest_ = 0;
  std::string text_;
  size_t emitted_ = 0;
  bool stopped_ = false;
};

}  // namespace kvshard
