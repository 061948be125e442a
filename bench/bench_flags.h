// Host-side helpers for the benchmarks' command lines.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace kvshard::bench {

// "4096,65536" -> {4096, 65536}; pieces that are not integers are skipped.
inline std::vector<int64_t> ParseList(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view piece : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (absl::SimpleAtoi(piece, &v)) out.push_back(v);
  }
  return out;
}

}  // namespace kvshard::bench
