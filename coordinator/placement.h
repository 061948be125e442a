// Placement of one request's context on the workers: contiguous token ranges in worker order, sized by
// each worker's free KV capacity under the request's scheme.
//
// The context is every position the request will hold: the synthetic fill (if any), the prompt, and the
// tokens it may generate (reserved up front, so decode never runs out of room). A short context goes
// whole to one worker (the one with the most free room): below the threshold the per-layer transfers of
// a split cost more than the attention they share out. Longer contexts are split in proportion to free
// capacity, with range boundaries on multiples of `granularity` tokens (the prefill chunk, so every
// chunk lies on one worker and chunks fall on the same positions as in single-process mode).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/distributed_attention.h"

namespace kvshard {

struct PlacementOptions {
  int64_t single_worker_threshold = 2048;  // contexts of at most this many tokens go to one worker
  int64_t granularity = 512;               // range boundaries on multiples of this (positions from 0)
};

struct WorkerRoom {
  int64_t free_bytes = 0;    // budget minus what the worker's current requests reserve
  int64_t budget_bytes = 0;  // the whole budget (for the refusal message)
};

struct Placement {
  std::vector<TokenRange> ranges;  // per worker; together exactly [0, total_tokens)
  // The worker holding position p.
  int OwnerOf(int64_t position) const;
};

// Places `total_tokens` tokens at `bytes_per_token` each. Errors:
//   - ResourceExhausted when the context exceeds what all workers hold even when idle; the message names
//     the need and the capacity, in tokens and MiB (never worth retrying);
//   - Unavailable when it fits the idle workers but not the free room now (retry when requests finish).
absl::StatusOr<Placement> PlaceContext(int64_t total_tokens, int64_t bytes_per_token,
                                       const std::vector<WorkerRoom>& workers, const PlacementOptions& options,
                                       const std::string& scheme);

}  // namespace kvshard
