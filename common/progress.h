// A one-line progress display on stderr: "label  done/total unit  rate/s  ETA m:ss", redrawn in place
// on a terminal, and printed at most every few seconds as plain lines otherwise (logs, CI).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace kvshard {

class ProgressLine {
 public:
  // `already_done` counts work finished before this run (a resumed job): it shows in done/total but not
  // in the rate or the ETA.
  ProgressLine(std::string label, std::string unit, int64_t total, int64_t already_done = 0);
  // Updates the count; draws when enough time has passed since the last draw.
  void Update(int64_t done);
  // Text shown after the rate, e.g. "312.4 tok/s"; drawn with the next update.
  void set_detail(std::string detail) { detail_ = std::move(detail); }
  // Draws the final state and ends the line.
  void Finish();
  double elapsed_seconds() const;

 private:
  void Draw(bool final);
  std::string label_;
  std::string unit_;
  std::string detail_;
  int64_t total_;
  int64_t already_done_;
  int64_t done_ = 0;
  bool is_tty_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

std::string FormatDuration(double seconds);  // "1:05", "1:02:03"

}  // namespace kvshard
