// Fused split-KV decode attention over the KVQuant-style (kvq<b>) quantized KV store on the GPU. Host
// launchers; pointers are device memory; launches are asynchronous on `stream`.
// CPU twin: kvstore/quantized_shard.h, QuantizedKvShard::Attend for a kvq scheme (which dequantizes,
// rotates and calls kernels/attention.h's AttentionPartialsCpu).
//
// Conventions (DESIGN.md, "Attention partials"), the same as kernels/cuda/attention.h and the CPU twins:
// - scores are scale * q.k in fp32, q unscaled on input and already rotated to its position;
// - every output row is a partial: o = softmax-weighted mean of the visible values (fp32), and
//   lse = ln sum_t exp(score_t), the NATURAL log, fp32;
// - a row that sees no key (an empty shard) has o = 0 and lse = -inf, and merges as a no-op.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace kvshard {

// Entries per (page, KV head) of a store's key outlier segment tables (KvqStoreView::key_outlier_segments):
// one KV head of one layer may own this many outlier segments per page of its sequence.
inline constexpr int kKvqSegmentTableWidth = 16;

// One layer of a batch of kvq stores, as kvstore/kv_codecs.h lays them out. Request b's stream for KV
// head h holds local tokens 0 .. sink_lens[b] + quantized_lens[b] + residual_lens[b] - 1 at absolute
// positions start_positions[b] + local index:
//   [0, sink)                     fp16, keys after RoPE:  sink_k/sink_v [batch][n_kv_heads][max_sink][head_dim]
//   [sink, sink + quantized)      codes and metadata, in pages of 128 quantized tokens (part index t =
//                                 local - sink lives in page page_table[b * pages_per_request + t / 128],
//                                 at row t % 128); keys pre-RoPE
//   [sink + quantized, end)       fp16, keys pre-RoPE:   residual_k/residual_v
//                                 [batch][n_kv_heads][max_residual][head_dim]
// Per physical page p and KV head h (index ph = p * n_kv_heads + h):
//   key_codes, value_codes:  PackedBytes(128 * head_dim, bits) bytes at ph * that size; keys
//                            channel-major (code c * 128 + t), values token-major (t * head_dim + c)
//                            (kernels/kv_pack.h: 128 codes of a block are 16 * bits bytes).
//   value_low, value_high:   fp16 bits [ph][128], the per-token thresholds.
//   value_outlier_channel:   uint8 [ph][128][n_value_outliers] ascending; value_outlier_value: fp16 bits,
//                            same shape. They replace the dequantized value.
//   key_outlier_count:       uint8 [ph][128], outliers of each token (0 for absent tokens).
//   key_outlier_offset:      int64 [ph], the index of the page's first outlier in its list; a token's
//                            outliers follow those of earlier tokens of the page, in ascending channel
//                            order (kv_codecs.cc's flat list, paged). The list is key_outlier_channel /
//                            key_outlier_value itself when key_outlier_segment_shift < 0; otherwise it is
//                            the stream's chain of segments (kvq_codes.cuh, KvqKeyOutlierIndex).
// Calibration of this layer: key_low, key_high fp32 [n_kv_heads][head_dim] (per-channel thresholds),
// key_codebook, value_codebook fp32 [2^bits]. RoPE: inv_freq fp32 [head_dim / 2] (RopeInverseFrequencies),
// angles in double as ApplyRopeCpu.
// All code and metadata arrays must be 16-byte aligned; the per-page strides above then are too.
struct KvqStoreView {
  int bits = 3;
  int n_value_outliers = 0;  // KvqValueOutliersPerToken, at most head_dim - 1
  const uint8_t* key_codes = nullptr;
  const uint8_t* value_codes = nullptr;
  const uint16_t* value_low = nullptr;
  const uint16_t* value_high = nullptr;
  const uint8_t* value_outlier_channel = nullptr;
  const uint16_t* value_outlier_value = nullptr;
  const uint8_t* key_outlier_count = nullptr;
  const int64_t* key_outlier_offset = nullptr;
  // >= 0 (DeviceKvStore): the outlier list of request b's KV head h is a chain of 2^shift-entry segments
  // drawn from the request's pool, listed in key_outlier_segments (kvq_codes.cuh, KvqKeyOutlierIndex), so
  // pages, heads and layers share their room.
  int key_outlier_segment_shift = -1;
  const int32_t* key_outlier_segments = nullptr;  // int32 [ph][kKvqSegmentTableWidth]
  const uint8_t* key_outlier_channel = nullptr;
  const uint16_t* key_outlier_value = nullptr;
  const int32_t* page_table = nullptr;  // [batch][pages_per_request]
  int64_t pages_per_request = 0;
  const uint16_t* sink_k = nullptr;
  const uint16_t* sink_v = nullptr;
  int max_sink = 0;
  const uint16_t* residual_k = nullptr;
  const uint16_t* residual_v = nullptr;
  int max_residual = 0;
  const int32_t* sink_lens = nullptr;       // [batch]
  const int32_t* quantized_lens = nullptr;  // [batch]
  const int32_t* residual_lens = nullptr;   // [batch]
  const int64_t* start_positions = nullptr; // [batch]
  // Optional, for stores of many sequences with a slot each (DeviceKvStore):
  // slots: int32 [batch], the slot of each request: its row of page_table and the first index of sink_k
  //   and residual_k, instead of the request index; null: request b uses slot b.
  // residual_ring: the residual area is a ring: the token of part index t = local - sink sits at row
  //   t % max_residual (residual tokens move to the quantized range one at a time without copies);
  //   false: residual token r (0 = oldest) sits at row r.
  const int32_t* slots = nullptr;
  bool residual_ring = false;
  const float* key_low = nullptr;
  const float* key_high = nullptr;
  const float* key_codebook = nullptr;
  const float* value_codebook = nullptr;
  const float* inv_freq = nullptr;
  // The fp16 RoPE factors of the offsets inside a page, for bits 3 (the tensor-core kernel rotates keys in
  // fp16): 128 * head_dim / 4 entries {fp16x2 cos, fp16x2 sin} of t * inv_freq[2j] and t * inv_freq[2j + 1]
  // for every page offset t < 128 and j < head_dim / 4, in the order the kernel's lanes read them (one
  // warp-wide load covers 256 contiguous bytes). Its contents are KvqRopeTable(inv_freq): upload once per store.
  const uint2* rope_table = nullptr;
};

// The host-side contents of KvqStoreView::rope_table for inv_freq (head_dim / 2 entries), angles in double.
std::vector<uint2> KvqRopeTable(const std::vector<float>& inv_freq);

// Decode: one query token per request, which sees every token of its stream.
//   q:   fp32 [batch][n_heads][head_dim], RoPE applied at the query's position, unscaled; request b's row
//        starts at q + b * q_row_stride (0: n_heads * head_dim, packed).
//   max_quantized_len: host-side upper bound of quantized_lens (plans the split; larger is safe).
//   out: fp32 [batch][n_heads][head_dim];  lse: fp32 [batch][n_heads] (natural log).
//   workspace: device scratch of at least KvqDecodeAttentionWorkspaceBytes(...) bytes.
// One thread block owns (KV split, KV head, group tile of up to 4 query heads, request) and reads each
// page of its split once for the whole group (GQA); one more block per (KV head, tile, request) takes
// the fp16 sink and residual. The splits' partials are merged by MergePartialsCuda. Keys are
// dequantized (codebook, per-channel thresholds, exact outliers) and rotated at their positions inside
// the kernel. Supported: head_dim 64, 128; bits 3 (2 and 4 too unless KVSHARD_QUICK_KERNELS). Bits 3
// runs QK and PV on tensor cores with fp16 operands (keys dequantized and rotated in fp16, fp32
// accumulation); 2 and 4 run in fp32 on the CUDA cores.
struct KvqDecodeAttentionArgs {
  const float* q = nullptr;
  int64_t q_row_stride = 0;  // floats; 0 or at least n_heads * head_dim
  KvqStoreView kv;
  int64_t max_quantized_len = 0;
  int batch = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 0.0f;  // usually 1/sqrt(head_dim)
  float* out = nullptr;
  float* lse = nullptr;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  int max_splits = 0;  // 0: choose; otherwise an upper bound on the quantized splits per request
};

int64_t KvqDecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim);

absl::Status KvqDecodeAttentionCuda(const KvqDecodeAttentionArgs& args, cudaStream_t stream);

// The number of quantized splits per request KvqDecodeAttentionCuda would use (benchmarks, tests).
int KvqDecodeAttentionSplits(const KvqDecodeAttentionArgs& args);

}  // namespace kvshard
