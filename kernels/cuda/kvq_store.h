// Maintenance kernels of a paged kvq<b> store of many sequences on the GPU (worker/cuda/device_kv_store.h):
// appending tokens (the fp16 sink and residual ring, and moving the oldest residual tokens into the
// quantized pages, flush unit 1), and dequantizing a stored range to fp16 for chunked (prefill)
// attention. Host launchers; pointers are device memory; launches are asynchronous on `stream`.
// CPU twin: kvstore/quantized_shard.h's QuantizedKvShard (Append, Flush, Seal, Dequantize) with
// kv_codecs.cc's kvq codecs; the codes are bit-exact (kvq_codes.cuh, shared with kv_pack.cu).
//
// Layout: kvq_attention.h's KvqStoreView with slots and residual_ring: per layer, pages p of 128
// quantized tokens for all KV heads (index ph = p * n_kv_heads + h), and per sequence slot s an fp16 sink
// [s][n_kv_heads][max_sink][head_dim] (keys after RoPE) and residual ring [s][n_kv_heads][ring][head_dim]
// (keys pre-RoPE) where the token of part index t (local index - sink) sits at row t % ring.
// Key outliers: every (layer l, page, head) brings a segment of 2^key_outlier_segment_shift entries to its
// sequence's pool: segment l * layer_segments + ph of the outlier arrays, which all layers share. A stream
// (slot, layer, KV head) keeps its outliers in one list, a chain of segments it takes from that pool as the
// list grows (kvq_codes.cuh, KvqKeyOutlierIndex); a page's outliers start where the previous page's end
// (key_outlier_start). So a page, KV head or layer may hold many times its share, as long as the
// sequence's pool holds all its outliers.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace kvshard {

// One layer's arrays of the store, and the calibration of that layer.
struct KvqStoreLayer {
  uint8_t* key_codes = nullptr;              // [ph] PackedBytes(128 * head_dim, bits), channel-major
  uint8_t* value_codes = nullptr;            // [ph] same size, token-major
  uint16_t* value_low = nullptr;             // fp16 [ph][128]
  uint16_t* value_high = nullptr;            // fp16 [ph][128]
  uint8_t* value_outlier_channel = nullptr;  // [ph][128][n_value_outliers]
  uint16_t* value_outlier_value = nullptr;   // fp16 [ph][128][n_value_outliers]
  uint8_t* key_outlier_count = nullptr;      // [ph][128]
  int64_t* key_outlier_start = nullptr;      // [ph]: the page's first outlier in its stream's list
  uint8_t* key_outlier_channel = nullptr;    // [n_layers][ph][2^key_outlier_segment_shift], every layer's
  uint16_t* key_outlier_value = nullptr;     // fp16, same shape
  int key_outlier_segment_shift = 0;
  int n_layers = 1;
  int64_t layer_segments = 0;                // segments per layer (pages * n_kv_heads)
  int32_t* key_outlier_segments = nullptr;   // [ph][kKvqSegmentTableWidth]: the streams' chains
  int* key_outlier_segments_taken = nullptr; // [slot]: segments of the sequence's pool in use (all layers)
  uint16_t* sink_k = nullptr;                // fp16 [slot][n_kv_heads][max_sink][head_dim], after RoPE
  uint16_t* sink_v = nullptr;
  int max_sink = 0;
  uint16_t* residual_k = nullptr;            // fp16 [slot][n_kv_heads][ring][head_dim], pre-RoPE
  uint16_t* residual_v = nullptr;
  int ring = 1;
  const float* key_low = nullptr;            // [n_kv_heads][head_dim]
  const float* key_high = nullptr;
  const float* key_codebook = nullptr;       // [2^bits]
  const float* value_codebook = nullptr;
  const float* inv_freq = nullptr;           // [head_dim / 2]
  int64_t* key_outliers = nullptr;           // [slot][n_kv_heads]: key outliers stored, the length of the
                                             // stream's list (memory accounting)
  int* overflow = nullptr;                   // [slot]: set to 1 when a stream of the slot's sequence gets more
                                             // key outliers than its pages' segments hold
};

// Tokens that move into the quantized range: n (1..32) consecutive part tokens part0.. of a slot, all in
// one 32-token word group of physical page `page`. Part token t's fp16 source is the residual ring
// (t < fp_from) or new token chunk0 + (t - fp_from) of the call's k/v. Its outlier scratch row is
// scratch0 + (t - part0).
struct KvqFlushRun {
  int32_t slot, page, part0, n, fp_from, chunk0, scratch0;
};
// The same tokens grouped by page (one entry per page and call, consecutive part tokens from row0), for
// the compaction of key outliers into the stream's list in token order. The entries of one slot must be
// consecutive and in page order; stream_pages: the pages the slot's sequence holds (its pool holds
// n_layers * stream_pages * n_kv_heads segments).
struct KvqFlushPage {
  int32_t slot, page, row0, n, scratch0, stream_pages;
};
// A new token that stays fp16: new token `chunk_token` of the call's k/v goes to the ring row `dest`
// (>= 0, pre-RoPE) or to the sink row -1 - dest (rotated at `position`).
struct KvqWriteToken {
  int32_t slot, chunk_token, dest, unused;
  int64_t position;
};

// Flushes `runs` (which must precede the writes: a write may reuse a ring row that a run reads), then
// writes `writes`. k, v: fp32, new token t's KV head h at k + t * row_stride + h * head_dim.
// scratch_*: [n_flush][n_kv_heads] counts and [n_flush][n_kv_heads][head_dim] outlier rows.
// Supported: head_dim 64, 128; bits 3 (2 and 4 unless KVSHARD_QUICK_KERNELS); n_value_outliers <= 8.
struct KvqAppendArgs {
  KvqStoreLayer layer;
  const int32_t* page_table = nullptr;  // [slot][page_table_stride]: the sequences' physical pages
  int64_t page_table_stride = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int bits = 3;
  int n_value_outliers = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  const KvqFlushRun* runs = nullptr;
  int n_runs = 0;
  const KvqFlushPage* pages = nullptr;
  int n_pages = 0;
  int n_flush = 0;
  uint8_t* scratch_count = nullptr;
  uint8_t* scratch_channel = nullptr;
  uint16_t* scratch_value = nullptr;
  const KvqWriteToken* writes = nullptr;
  int n_writes = 0;
};
absl::Status KvqStoreAppendCuda(const KvqAppendArgs& args, cudaStream_t stream);

// One sequence's stream of one layer in the store: its slot, its physical pages (page_table, device int32)
// and the layout now: local [0, sink) sink, [sink, quantized_end) quantized, [quantized_end, length)
// residual ring; local token i sits at absolute position start_position + i.
struct KvqStream {
  KvqStoreLayer layer;
  int n_kv_heads = 0;
  int head_dim = 0;
  int bits = 3;
  int n_value_outliers = 0;
  int32_t slot = 0;
  const int32_t* page_table = nullptr;
  int64_t start_position = 0;
  int64_t sink = 0;
  int64_t quantized_end = 0;
  int64_t length = 0;
};

// Keys (after RoPE) and values of local tokens [first, first + n) of the stream, as the store holds them
// now (QuantizedKvShard::Dequantize), rounded to fp16: k, v [n_kv_heads][out_stride][head_dim], token
// first + i at row i.
struct KvqDequantizeArgs : KvqStream {
  int64_t first = 0;
  int64_t n = 0;
  __half* k = nullptr;
  __half* v = nullptr;
  int64_t out_stride = 0;
};
absl::Status KvqDequantizeCuda(const KvqDequantizeArgs& args, cudaStream_t stream);

// Causal prefill attention of a chunk of `n_queries` consecutive query tokens over the stream's kvq3 pages,
// read directly (kvq_prefill_attention.cu): the fused twin of KvqDequantizeCuda followed by
// PrefillAttentionCuda over the dequantized tokens.
//   q:   fp16 [n_queries][n_heads][head_dim], RoPE applied, unscaled; query i sits at absolute position
//        query_first_position + i and sees the stream's tokens at positions <= its own.
//   out: fp32 [n_queries][n_heads][head_dim];  lse: fp32 [n_queries][n_heads], natural log (a row that sees
//        no key: o = 0, lse = -inf), as attention.h's partials.
// Keys and values are dequantized into shared memory in fp16 (keys rotated in fp16 by factors computed in
// fp32), and QK^T and PV run on tensor cores with fp32 accumulation. Supported: bits 3, head_dim 64 and 128,
// n_value_outliers <= 8. It needs no scratch, but each block of 128 query rows dequantizes the whole
// visible context again, so it is slower than the two-pass path for chunks of many rows (bench/RESULTS.md).
struct KvqPrefillArgs : KvqStream {
  int n_heads = 0;
  const __half* q = nullptr;
  int64_t n_queries = 0;
  int64_t query_first_position = 0;
  float scale = 0.0f;
  float* out = nullptr;
  float* lse = nullptr;
};
absl::Status KvqPrefillAttentionCuda(const KvqPrefillArgs& args, cudaStream_t stream);

}  // namespace kvshard
