#include "coordinator/stop_strings.h"

#include <algorithm>

namespace kvshard {

StopStringFilter::StopStringFilter(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
  for (const auto& s : stops_) longest_ = std::max(longest_, s.size());
}

std::string StopStringFilter::Push(const std::string& text) {
  if (stopped_) return "";
  const size_t search_from = text_.size() >= longest_ ? text_.size() - longest_ + 1 : 0;
  text_ += text;
  size_t cut = std::string::npos;
  for (const auto& s : stops_) {
    const size_t at = text_.find(s, search_from);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    text_.resize(cut);
    std::string out = cut > emitted_ ? text_.substr(emitted_) : "";
    emitted_ = text_.size();
    return out;
  }
  // Hold back the last longest-1 bytes: they may begin a stop string.
  const size_t safe = longest_ > 0 && text_.size() >= longest_ - 1 ? text_.size() - (longest_ - 1)
                      : longest_ > 0                              ? 0
                                                                  : text_.size();
  if (safe <= emitted_) return "";
  std::string out = text_.substr(emitted_, safe - emitted_);
  emitted_ = safe;
  return out;
}

std::string StopStringFilter::Flush() {
  if (stopped_ || emitted_ >= text_.size()) return "";
  std::string out = text_.substr(emitted_);
  emitted_ = text_.size();
  return out;
}

}  // namespace kvshard
