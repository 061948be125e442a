// Attention on the GPU over an unquantized (fp16/bf16) KV cache: split-KV decode, causal flash-style
// prefill, and the merge of partials. Host launchers; pointers are device memory; launches are
// asynchronous on `stream`. CPU twins: kernels/attention.h (AttentionPartialsCpu, MergePartialsCpu).
//
// Conventions (DESIGN.md, "Attention partials"), shared with the CPU twins:
// - scores are scale * q.k in fp32, with q unscaled on input and keys stored after RoPE;
// - every output row is a partial: o = softmax-weighted mean of the visible values (fp32), and
//   lse = ln sum_t exp(score_t), the NATURAL log, fp32;
// - a row that sees no key has o = 0 and lse = -inf, and merges as a no-op.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "kernels/cuda/dtype.h"

namespace kvshard {

// The keys (after RoPE) and values of one layer, in pages of `page_size` tokens:
//   k, v: [n_pages][n_kv_heads][page_size][head_dim] of `dtype` (kF16 or kBF16), 16-byte aligned.
//   Request b's token t lives in page page_table[b * pages_per_request + t / page_size], at row
//   t % page_size. page_table == nullptr means pages are laid out in request order: page index
//   b * pages_per_request + t / page_size. A contiguous cache [batch][n_kv_heads][capacity][head_dim]
//   is page_table = nullptr, pages_per_request = 1, page_size = capacity.
// page_size must be a multiple of 64 (a kernel tile never straddles two pages).
struct PagedKv {
  DType dtype = DType::kF16;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t page_size = 0;
  const int32_t* page_table = nullptr;
  int64_t pages_per_request = 0;
};

// Decode: one query token per request, a batch of requests with different context lengths.
//   q:       fp32 [batch][n_heads][head_dim], RoPE applied, unscaled; request b's row starts at
//            q + b * q_row_stride (0: n_heads * head_dim, packed), so a fused QKV buffer needs no copy.
//   kv_lens: int32 [batch], tokens of each request in `kv` (0 is allowed: an empty shard).
//   max_kv_len: host-side upper bound of kv_lens (plans the split; larger is safe, only slower).
//   out:     fp32 [batch][n_heads][head_dim];  lse: fp32 [batch][n_heads].
//   workspace: device scratch of at least DecodeAttentionWorkspaceBytes(...) bytes (may be null when
//   that is 0); it holds the per-split partials, merged on the GPU by MergePartialsCuda.
// GQA: query head h reads KV head h / (n_heads / n_kv_heads); one block reads each KV tile once for
// the whole query group. Supported head_dim: 64, 128.
struct DecodeAttentionArgs {
  const float* q = nullptr;
  int64_t q_row_stride = 0;  // floats; 0 or a multiple of 4 no less than n_heads * head_dim
  PagedKv kv;
  const int32_t* kv_lens = nullptr;
  int64_t max_kv_len = 0;
  int batch = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 0.0f;  // usually 1/sqrt(head_dim)
  float* out = nullptr;
  float* lse = nullptr;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  int max_splits = 0;  // 0: choose; otherwise an upper bound on the KV splits per request (tests, tuning)
  // Optional int32 [batch]: request b reads page-table row page_rows[b] (a store whose sequences keep
  // their rows while batches change); null: row b. Needs kv.page_table.
  const int32_t* page_rows = nullptr;
};

// Bytes of workspace that DecodeAttentionCuda may use for this batch shape (an upper bound).
int64_t DecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim);

absl::Status DecodeAttentionCuda(const DecodeAttentionArgs& args, cudaStream_t stream);

// The KV split DecodeAttentionCuda would choose (for benchmarks and tests): splits per request.
int DecodeAttentionSplits(const DecodeAttentionArgs& args);

// Prefill: a chunk of `n_queries` consecutive query tokens of ONE request, causal.
//   q:    [n_queries][n_heads][head_dim] of kv.dtype, RoPE applied, unscaled; query i sits at absolute
//         position query_first_position + i.
//   kv:   the request's keys/values (use page_table / pages_per_request for this one request, as for
//         batch index 0); key j (< n_keys) sits at absolute position key_first_position + j.
//   Query i sees key j iff key_first_position + j <= query_first_position + i.
//   out:  fp32 [n_queries][n_heads][head_dim];  lse: fp32 [n_queries][n_heads].
// Tiled with an online softmax on tensor cores (no n_queries x n_keys matrix); a tile of rows packs
// the query heads of one KV head so each K/V tile read serves the whole group. Supported head_dim: 64, 128.
// kv.page_size must be a multiple of 64.
//
// Two kernels: mma.sync (any sm_80+ GPU; 64 rows and 64-key tiles) and warpgroup MMAs (Hopper; 128 rows
// and 128-key tiles). kAuto takes the second on compute capability 9.x; tests and benchmarks name one.
enum class PrefillKernel { kAuto, kMmaSync, kWgmma };

struct PrefillAttentionArgs {
  const void* q = nullptr;
  PagedKv kv;
  int64_t n_queries = 0;
  int64_t n_keys = 0;
  int64_t query_first_position = 0;
  int64_t key_first_position = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 0.0f;
  float* out = nullptr;
  float* lse = nullptr;
  PrefillKernel kernel = PrefillKernel::kAuto;
};

absl::Status PrefillAttentionCuda(const PrefillAttentionArgs& args, cudaStream_t stream);

// Appends n_tokens tokens' keys and values to a paged cache, at token indices first_index.. of request
// `request` (the page-table row; see PagedKv). cache.k / cache.v are written (16-bit, round to nearest
// even). k, v: fp32, token t's KV head h at k + t * row_stride + h * head_dim. When inv_freq is not null
// the keys are pre-RoPE and are rotated ("rotate_half", positions[t], the same angles as RopeCuda and
// ApplyRopeCpu) before they are stored; values are stored as given. positions: int64 [n_tokens] (device).
struct KvWriteArgs {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  int n_tokens = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  const int64_t* positions = nullptr;
  const float* inv_freq = nullptr;
  PagedKv cache;
  int request = 0;
  int64_t first_index = 0;
  // Optional, device int32/int64 [n_tokens]: token t goes to page-table row token_requests[t] at index
  // token_indices[t] (one decode token of each of many requests); `request` and `first_index` are then
  // ignored and the range check is the caller's.
  const int32_t* token_requests = nullptr;
  const int64_t* token_indices = nullptr;
};

absl::Status WriteKvCacheCuda(const KvWriteArgs& args, cudaStream_t stream);

// Merges partials of `n_sources` sources for `n_rows` rows of head_dim values (the GPU twin of
// MergePartialsCpu):  lse = ln sum_s exp(lse_s);  out = sum_s exp(lse_s - lse) out_s.
//   outs: fp32 [n_sources][n_rows][head_dim]; lses: fp32 [n_sources][n_rows] (an all-gather's layout);
//   out: fp32 [n_rows][head_dim]; lse: fp32 [n_rows]. Must not alias the sources. head_dim: a multiple
//   of 4, at most 256; pointers 16-byte aligned.
// Sources with lse = -inf are skipped; a row where all are -inf gets out = 0, lse = -inf.
absl::Status MergePartialsCuda(const float* outs, const float* lses, int n_sources, int64_t n_rows,
                               int head_dim, float* out, float* lse, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Partials on the wire between workers (the cross-worker merge, worker/cuda/nccl_merge.h). CPU twins:
// MergeByAllGather and MergeByTree in worker/distributed_attention.cc; `wire` is kF32 or kBF16 (round to
// nearest even, as common/half.h), and lse always travels as fp32. Same shape rules as MergePartialsCuda.

// One worker's partials as one record: [n_rows * head_dim out in `wire`][n_rows lse fp32], zero-padded
// to a multiple of 16 bytes so that records laid end to end (an all-gather) keep 16-byte alignment.
int64_t PartialsRecordBytes(int64_t n_rows, int head_dim, DType wire);
absl::Status PackPartialsCuda(const float* out, const float* lse, int64_t n_rows, int head_dim, DType wire,
                              void* record, cudaStream_t stream);
// MergePartialsCuda over `n_sources` records laid end to end (`records`, each PartialsRecordBytes long):
// the merge after an all-gather. Every caller that passes the same records gets bit-identical results.
absl::Status MergePartialRecordsCuda(const void* records, DType wire, int n_sources, int64_t n_rows, int head_dim,
                                     float* out, float* lse, cudaStream_t stream);

// The tree merge around its two all-reduces: with max_lse = max over workers of lse (all-reduce max),
//   scale:  a = exp(lse - max_lse) (0 for an empty row or source), numerators = a * out in `wire`,
//           weights = a;
//   (all-reduce sum of numerators and of weights)
//   finish: out = numerators / weights, lse = max_lse + ln(weights); weights == 0 gives out = 0,
//           lse = -inf.
// numerators: [n_rows][head_dim] of `wire`; weights, max_lse: fp32 [n_rows]. finish may write `out` and
// `lse` over the inputs of scale.
absl::Status TreeMergeScaleCuda(const float* out, const float* lse, const float* max_lse, int64_t n_rows,
                                int head_dim, DType wire, void* numerators, float* weights, cudaStream_t stream);
absl::Status TreeMergeFinishCuda(const void* numerators, const float* weights, const float* max_lse,
                                 int64_t n_rows, int head_dim, DType wire, float* out, float* lse,
                                 cudaStream_t stream);

}  // namespace kvshard
