#include "common/progress.h"

#include <unistd.h>

#include <cstdio>

#include "absl/strings/str_format.h"

namespace kvshard {

ProgressLine::ProgressLine(std::string label, std::string unit, int64_t total, int64_t already_done)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      already_done_(already_done),
      done_(already_done),
      is_tty_(isatty(STDERR_FILENO) == 1),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

double ProgressLine::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void ProgressLine::Update(int64_t done) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  const double since_draw = std::chrono::duration<double>(now - last_draw_).count();
  if (since_draw >= (is_tty_ ? 0.2 : 5.0)) Draw(false);
}

void ProgressLine::Finish() {
  if (finished_) return;
  finished_ = true;
  Draw(true);
}

void ProgressLine::Draw(bool final) {
  last_draw_ = std::chrono::steady_clock::now();
  const double elapsed = elapsed_seconds();
  const double rate = elapsed > 0 ? (done_ - already_done_) / elapsed : 0.0;
  std::string eta = "--:--";
  if (rate > 0 && total_ > done_) eta = FormatDuration((total_ - done_) / rate);
  if (final) eta = FormatDuration(elapsed) + " total";
  const double percent = total_ > 0 ? 100.0 * done_ / total_ : 100.0;
  std::string line = absl::StrFormat("%s %lld/%lld %s (%.0f%%)  %.1f %s/s%s%s  %s %s", label_, done_, total_,
                                     unit_, percent, rate, unit_, detail_.empty() ? "" : "  ", detail_,
                                     final ? "in" : "ETA", eta);
  if (is_tty_) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

std::string FormatDuration(double seconds) {
  if (seconds < 0) seconds = 0;
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

}  // namespace kvshard
