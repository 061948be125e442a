#include "coordinator/placement.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvshard {
namespace {

int64_t RoundToMultiple(int64_t x, int64_t g) { return g <= 1 ? x : (x + g / 2) / g * g; }

std::string Mib(int64_t bytes) { return absl::StrFormat("%.1f MiB", bytes / 1048576.0); }

// Fills workers in order, each up to its room.
std::vector<int64_t> SequentialShares(int64_t total, const std::vector<int64_t>& room) {
  std::vector<int64_t> shares(room.size(), 0);
  for (size_t w = 0; w < room.size() && total > 0; ++w) {
    shares[w] = std::min(room[w], total);
    total -= shares[w];
  }
  return shares;
}

}  // namespace

int Placement::OwnerOf(int64_t position) const {
  for (size_t w = 0; w < ranges.size(); ++w) {
    if (ranges[w].contains(position)) return static_cast<int>(w);
  }
  return -1;
}

absl::StatusOr<Placement> PlaceContext(int64_t total_tokens, int64_t bytes_per_token,
                                       const std::vector<WorkerRoom>& workers, const PlacementOptions& options,
                                       const std::string& scheme) {
  if (workers.empty()) return absl::FailedPreconditionError("no workers to place the context on");
  if (total_tokens <= 0) return absl::InvalidArgumentError("a context of no tokens");
  if (bytes_per_token <= 0) return absl::InvalidArgumentError("bytes per token must be positive");
  const int n = static_cast<int>(workers.size());
  std::vector<int64_t> room(n), full_room(n);
  int64_t total_room = 0, total_full_room = 0;
  for (int w = 0; w < n; ++w) {
    room[w] = std::max<int64_t>(0, workers[w].free_bytes) / bytes_per_token;
    full_room[w] = std::max<int64_t>(0, workers[w].budget_bytes) / bytes_per_token;
    total_room += room[w];
    total_full_room += full_room[w];
  }
  if (total_tokens > total_full_room) {
    int64_t total_budget = 0;
    for (const WorkerRoom& r : workers) total_budget += r.budget_bytes;
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request needs ", total_tokens, " tokens of KV cache (", Mib(total_tokens * bytes_per_token),
        " under scheme ", scheme, "), more than the workers' capacity of ", total_full_room, " tokens (", n,
        " workers, ", Mib(total_budget), " of KV budget in all, ", bytes_per_token, " bytes per token)"));
  }
  if (total_tokens > total_room) {
    return absl::UnavailableError(absl::StrCat("the request needs ", total_tokens, " tokens of KV cache; ",
                                               total_room, " are free now (", total_full_room, " when idle)"));
  }

  std::vector<int64_t> shares(n, 0);
  const int roomiest = static_cast<int>(std::max_element(room.begin(), room.end()) - room.begin());
  if (total_tokens <= options.single_worker_threshold && room[roomiest] >= total_tokens) {
    shares[roomiest] = total_tokens;
  } else {
    // Boundaries at the capacity-proportional points, rounded to the granularity.
    std::vector<int64_t> bounds(n + 1, 0);
    int64_t room_before = 0;
    for (int w = 1; w < n; ++w) {
      room_before += room[w - 1];
      const int64_t ideal = static_cast<int64_t>(static_cast<long double>(total_tokens) * room_before / total_room);
      bounds[w] = std::clamp(RoundToMultiple(ideal, options.granularity), bounds[w - 1], total_tokens);
    }
    bounds[n] = total_tokens;
    bool fits = true;
    for (int w = 0; w < n; ++w) {
      shares[w] = bounds[w + 1] - bounds[w];
      fits = fits && shares[w] <= room[w];
    }
    if (!fits) shares = SequentialShares(total_tokens, room);  // rounding overflowed a nearly full worker
  }
  Placement placement;
  int64_t start = 0;
  for (int w = 0; w < n; ++w) {
    placement.ranges.push_back({start, start + shares[w]});
    start += shares[w];
  }
  return placement;
}

}  // namespace kvshard
