// One worker's KV cache on its GPU: the token ranges ("sequences") of many requests, for every layer,
// in one scheme, with pages drawn from one pool sized when the store is made. The device twin of
// kvstore's shards (MakeKvShard): for every call below, the partials equal those of a CPU shard of the
// same scheme and calibration that got the same appends (within the bounds of the kernel tests), and
// quantized schemes store the bytes the CPU codecs do.
//
// Schemes: fp16 (keys stored after RoPE, as MakeFullPrecisionKvShard(kFp16)) and kvq<b> (b = 2..4;
// keys pre-RoPE, rotated inside attention; sink, residual window and outliers as QuantizedKvShard).
// Others are refused with Unimplemented, naming the schemes this store has.
//
// Pointers are device memory unless said; work is enqueued on `stream` and later work on that stream
// sees its results. Host-side bookkeeping (lengths, page tables) is updated when a call returns, so the
// calls of one sequence must come in order, as the model makes them: for each layer, append then attend.
//
// Streams and waits: per-call metadata (page rows, lengths, token moves) goes up through pinned staging
// without waiting for the device, into buffers reused in stream order, so calls must come on one stream
// (or on streams the caller orders). AddSequence (it zeroes the new pages), Memory and CodePage wait for
// the device; nothing else does.
//
// Partials (DESIGN.md, "Attention partials"): out = softmax-weighted mean of the visible values (fp32),
// lse = ln sum exp(scale * q.k), natural log; a row that sees nothing gets out = 0, lse = -inf.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_scheme.h"
#include "kvstore/kv_shard.h"

namespace kvshard {

struct DeviceKvStoreOptions {
  // Device memory for KV pages (and the per-sequence sink/residual slots), at most; never more than the
  // memory free once the store's scratch is allocated, less `reserve_bytes`. 0: all of that.
  int64_t pool_bytes = 0;
  int64_t reserve_bytes = int64_t{2} << 30;
  // > 0: instead of pool_bytes, a pool of exactly the pages one sequence of this many tokens from position 0
  // needs (single-process mode sizes the store to its request).
  int64_t pool_tokens = 0;
  int max_sequences = 64;  // sequences held at once
  int max_rows = 64;       // decode rows per AttendRows/AppendRows call
  int max_chunk = 512;     // queries per AttendChunk call, tokens per Append call
  // kvq key outliers: each (page, KV head) brings room for headroom * outlier_fraction * 128 * head_dim
  // of them (or key_outlier_capacity when that is > 0), rounded up to a power of two (at least 16). The
  // pages a sequence reserves pool their room per layer, for all KV heads, so one page or head may hold
  // many times its share (real text has pages with 10-20x the calibrated fraction, and heads with several
  // times it on average) as long as the sequence's pages together hold the layer's outliers. A sequence
  // whose outliers do not fit keeps what fits, and every later call naming it returns ResourceExhausted
  // (Health says so too); other sequences are not affected.
  double key_outlier_headroom = 3.0;
  int key_outlier_capacity = 0;
  // kvq AttendChunk dequantizes the visible tokens to fp16 in tiles of this many tokens (a multiple of 64):
  // 4 * n_kv_heads * head_dim bytes per token of scratch (none with prefill_reads_packed).
  int64_t chunk_tile_tokens = 32768;
  // kvq3 AttendChunk reads the packed pages in one kernel (KvqPrefillAttentionCuda: no tile scratch) instead
  // of the kvq2/kvq4 path through dequantized fp16 tiles. Off by default: on an H100 it is 0.55-0.75x the
  // speed of the tiles at 4K-131K tokens (bench/RESULTS.md), as each block of 128 query rows dequantizes the
  // whole visible context again.
  bool prefill_reads_packed = false;
  // SyntheticFill appends in chunks of this many tokens (device scratch: 8 * n_kv_heads * head_dim bytes
  // per token).
  int fill_chunk = 8192;
};

// A store for one sequence of `tokens` positions fed in chunks of at most `max_chunk` (single-process
// mode: a request's whole KV), never filled synthetically (no larger fill scratch).
DeviceKvStoreOptions OneSequenceStoreOptions(int64_t tokens, int max_chunk);

class DeviceKvStore {
 public:
  // Checks the scheme against the geometry and (kvq) the calibration, then allocates the pool.
  // ResourceExhausted, naming the bytes, when the GPU cannot hold the pool.
  static absl::StatusOr<std::unique_ptr<DeviceKvStore>> Create(const KvGeometry& geometry,
                                                               const KvSchemeConfig& scheme,
                                                               const Calibration* calibration,
                                                               const DeviceKvStoreOptions& options);
  virtual ~DeviceKvStore() = default;

  virtual const KvGeometry& geometry() const = 0;
  virtual std::string scheme() const = 0;

  // Reserves room for `capacity` tokens of a new sequence `id` whose first token sits at absolute
  // position `start_position`. ResourceExhausted (naming the tokens that still fit) when the pool
  // cannot hold them; AlreadyExists for a live id.
  virtual absl::Status AddSequence(int64_t id, int64_t start_position, int64_t capacity) = 0;
  // Frees the sequence's pages (no-op for an unknown id).
  virtual void RemoveSequence(int64_t id) = 0;
  // OK while the sequence can be served; ResourceExhausted once a page of it got more kvq key outliers
  // than the page holds (every later call naming it fails the same way, the other sequences carry on);
  // NotFound for an unknown id.
  virtual absl::Status Health(int64_t id) const = 0;
  virtual bool Contains(int64_t id) const = 0;
  virtual int64_t start_position(int64_t id) const = 0;
  virtual int64_t length(int64_t id, int layer) const = 0;
  // Tokens a new sequence could still reserve (admission control).
  virtual int64_t FreeTokens() const = 0;

  // Appends `n_tokens` (at most max_chunk) tokens to sequence `id` at `layer`, at positions
  // start_position + length onwards. k (pre-RoPE) and v: fp32, token t's KV head h at
  // k + t * row_stride + h * head_dim. OutOfRange past the reserved capacity; FailedPrecondition
  // after Seal.
  virtual absl::Status Append(int layer, int64_t id, int n_tokens, const float* k, const float* v,
                              int64_t row_stride, cudaStream_t stream) = 0;
  // Decode: appends one token per row, row i to sequence ids[i] (ids[i] < 0: this row is not held
  // here; skipped). Same layout as Append with n_tokens = ids.size().
  virtual absl::Status AppendRows(int layer, std::span<const int64_t> ids, const float* k, const float* v,
                                  int64_t row_stride, cudaStream_t stream) = 0;

  // Decode partials: row i (of ids.size(), at most max_rows) sees every stored token of ids[i]
  // (ids[i] < 0: none). q fp32, row i at q + i * q_stride ([n_heads][head_dim]), rotated, unscaled.
  // out fp32 [rows][n_heads][head_dim], lse fp32 [rows][n_heads].
  virtual absl::Status AttendRows(int layer, std::span<const int64_t> ids, const float* q, int64_t q_stride,
                                  float* out, float* lse, cudaStream_t stream) = 0;
  // Chunk partials (prefill; pass-Q): n_queries (at most max_chunk) queries at positions first_position
  // + i; query i sees the stored tokens of `id` at positions <= first_position + i, as the store holds
  // them now. Layouts as AttendRows.
  virtual absl::Status AttendChunk(int layer, int64_t id, int n_queries, const float* q, int64_t q_stride,
                                   int64_t first_position, float* out, float* lse, cudaStream_t stream) = 0;

  // Appends synthetic keys/values for absolute positions [start_position + length, end) to every layer
  // of `id` (worker/synthetic.h's generator, made on the device: kernels/cuda/synthetic_kv.h, the same
  // values as SyntheticKvTokens, so the store holds the bytes a CPU shard holds after SyntheticFill).
  // Each layer must hold the same length. kvq: the key outliers follow the calibration's thresholds; a
  // calibration from other data than the generator's can make most keys outliers and overflow the pages'
  // outlier capacity (ResourceExhausted) — calibrate on the generator's output with the same seed for
  // capacity runs (the seed also sets the generator's per-channel offsets and scales).
  virtual absl::Status SyntheticFill(int64_t id, int64_t end, uint64_t seed, cudaStream_t stream) = 0;

  // The sequence gets no more tokens (its tail lives on another worker): as QuantizedKvShard::Seal,
  // kvq quantizes its residual window.
  virtual absl::Status Seal(int64_t id, cudaStream_t stream) = 0;

  // Bytes held for the sequence's tokens, as KvShard::Memory counts them (codes, thresholds, outliers
  // with their indices, sink, residual; page slack excluded), and all sequences together.
  virtual KvMemory Memory(int64_t id) const = 0;
  virtual KvMemory Memory() const = 0;
  // Device bytes of the pool.
  virtual int64_t pool_bytes() const = 0;

  // For tests: the bytes of kvq code page `page` (the sequence's page index, as
  // QuantizedKvShard::key_codes(layer, kv_head).page(page)) of keys or values. Waits for the device.
  virtual absl::StatusOr<std::vector<uint8_t>> CodePage(int64_t id, int layer, int kv_head, int64_t page,
                                                        KvPart part) const = 0;
};

}  // namespace kvshard
