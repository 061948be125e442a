// Append and dequantize kernels of the paged kvq store (kvq_store.h).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kvq_codes.cuh"
#include "kernels/cuda/kvq_store.h"
#include "kernels/cuda/kvq_tiles.cuh"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr int kPage = 128;        // quantized tokens per page (kv_codecs.h's kPageTokens)
constexpr int kWordTokens = 32;   // a channel's codes of 32 tokens are BITS whole words (keys)
constexpr int kMaxKeyOutliers = 255;  // kvstore's kMaxKeyOutliersPerToken

// fp16 source of part token t of a flush run, KV head h: the residual ring or a new token.
__device__ __forceinline__ const uint16_t* RingRow(const uint16_t* ring, int32_t slot, int h, int n_kv_heads,
                                                   int ring_rows, int64_t t, int head_dim) {
  return ring + ((static_cast<int64_t>(slot) * n_kv_heads + h) * ring_rows + t % ring_rows) * head_dim;
}

__device__ __forceinline__ float FlushSource(const KvqAppendArgs& a, const KvqFlushRun& r, const float* chunk,
                                             const uint16_t* ring, int64_t t, int h, int c) {
  if (t >= r.fp_from) {
    const int64_t token = r.chunk0 + (t - r.fp_from);
    return RoundToHalf(chunk[token * a.row_stride + static_cast<int64_t>(h) * a.head_dim + c]);
  }
  return __half2float(__ushort_as_half(
      RingRow(ring, r.slot, h, a.n_kv_heads, a.layer.ring, t, a.head_dim)[c]));
}

// Keys: one block per (run, KV head) of kFlushKeyGroups * head_dim threads: thread (channel c, token group
// tg) encodes tokens tg * 8 .. tg * 8 + 7 of the run at its channel. The run owns its word group in this
// launch: a group's first token writes its words whole (absent tokens 0, as the CPU pages), later tokens
// read-modify-write them; the token groups' codes are ORed together in shared memory first. Outliers of
// each token go to its scratch row in ascending channel order: every warp ballots its tokens, and after
// one barrier a thread counts the channels before its own from the ballots, at most 255 per token. (One
// thread per channel taking all 32 tokens in turn, with a barrier per token, was latency-bound: 35 us a
// call in an 8B-shaped prefill, the largest of the pack kernels.)
constexpr int kFlushKeyGroups = 4;
constexpr int kFlushKeyTokens = kWordTokens / kFlushKeyGroups;  // tokens per thread

template <int BITS>
__global__ void __launch_bounds__(kFlushKeyGroups * 128) FlushKeysKernel(const KvqAppendArgs a) {
  __shared__ uint32_t group_words[128][BITS];
  __shared__ uint32_t ballots[kWordTokens][4];  // [run token][warp of the channel range]
  const KvqFlushRun r = a.runs[blockIdx.x];
  const int h = blockIdx.y;
  const int c = threadIdx.x % a.head_dim;
  const int tg = threadIdx.x / a.head_dim;
  const int lane = threadIdx.x & 31, channel_warp = c >> 5;
  const int channel_warps = a.head_dim / 32;
  const KvqStoreLayer& L = a.layer;
  const float lo = L.key_low[h * a.head_dim + c], hi = L.key_high[h * a.head_dim + c];
  float cb[1 << BITS];
#pragma unroll
  for (int i = 0; i < (1 << BITS); ++i) cb[i] = L.key_codebook[i];
  const int64_t code_bytes = static_cast<int64_t>(16 * BITS) * a.head_dim;
  const int64_t ph = static_cast<int64_t>(r.page) * a.n_kv_heads + h;
  const int row0 = r.part0 % kPage;
  uint32_t* out = reinterpret_cast<uint32_t*>(L.key_codes + ph * code_bytes) +
                  (static_cast<int64_t>(c) * kPage + row0 / kWordTokens * kWordTokens) * BITS / 32;
  if (tg == 0) {
#pragma unroll
    for (int w = 0; w < BITS; ++w) group_words[c][w] = 0u;
  }
  __syncthreads();
  uint32_t words[BITS] = {};
  float xs[kFlushKeyTokens];
#pragma unroll
  for (int j = 0; j < kFlushKeyTokens; ++j) {
    const int i = tg * kFlushKeyTokens + j;
    xs[j] = 0.0f;
    if (i < r.n) {
      const float x = FlushSource(a, r, a.k, L.residual_k, r.part0 + i, h, c);
      xs[j] = x;
      PutCodeInGroupWords<BITS>(words, (row0 + i) % kWordTokens, KvqNearest<BITS>(cb, KvqNormalize(x, lo, hi)));
    }
    // Outliers: x < lo or x > hi, as KvqKeyCodec::Encode.
    const uint32_t mask = __ballot_sync(0xffffffffu, i < r.n && (xs[j] < lo || xs[j] > hi));
    if (lane == 0) ballots[i][channel_warp] = mask;
  }
#pragma unroll
  for (int w = 0; w < BITS; ++w) {
    if (words[w] != 0u) atomicOr(&group_words[c][w], words[w]);
  }
  __syncthreads();
  if (tg == 0) {
    const bool fresh = row0 % kWordTokens == 0;
#pragma unroll
    for (int w = 0; w < BITS; ++w) out[w] = (fresh ? 0u : out[w]) | group_words[c][w];
  }
#pragma unroll
  for (int j = 0; j < kFlushKeyTokens; ++j) {
    const int i = tg * kFlushKeyTokens + j;
    if (i >= r.n) break;
    const uint32_t mask = ballots[i][channel_warp];
    int before = __popc(mask & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < channel_warps; ++w) {
      const int n = __popc(ballots[i][w]);
      before += w < channel_warp ? n : 0;
      total += n;
    }
    const int64_t row = static_cast<int64_t>(r.scratch0 + i) * a.n_kv_heads + h;
    if (((mask >> lane) & 1u) != 0u && before < kMaxKeyOutliers) {
      a.scratch_channel[row * a.head_dim + before] = static_cast<uint8_t>(c);
      a.scratch_value[row * a.head_dim + before] = __half_as_ushort(__float2half_rn(xs[j]));
    }
    if (c == 0) a.scratch_count[row] = static_cast<uint8_t>(min(total, kMaxKeyOutliers));
  }
}

// Values: one block per (run, KV head), a warp per run token (kvq_codes.cuh's warp encoder into the token's
// page row). One thread per token, with the selection of the extreme channels done serially, took 157 us
// a call, 12% of an 8B-shaped kvq3 prefill's GPU time.
constexpr int kFlushValueWarps = 8;

template <int BITS, int HEAD_DIM>
__global__ void __launch_bounds__(32 * kFlushValueWarps) FlushValuesKernel(const KvqAppendArgs a) {
  const KvqFlushRun r = a.runs[blockIdx.x];
  const int h = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const KvqStoreLayer& L = a.layer;
  float cb[1 << BITS];
#pragma unroll
  for (int j = 0; j < (1 << BITS); ++j) cb[j] = L.value_codebook[j];
  const int64_t ph = static_cast<int64_t>(r.page) * a.n_kv_heads + h;
  const int n_out = a.n_value_outliers;
  constexpr int kWords = HEAD_DIM * BITS / 32;
  for (int i = threadIdx.x >> 5; i < r.n; i += kFlushValueWarps) {
    const int64_t t = r.part0 + i;
    float x[HEAD_DIM / 32];
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 32; ++j) x[j] = FlushSource(a, r, a.v, L.residual_v, t, h, lane + 32 * j);
    const int row = static_cast<int>(t % kPage);
    const int64_t token = ph * kPage + row;
    uint32_t* words = reinterpret_cast<uint32_t*>(L.value_codes + ph * (16 * BITS * HEAD_DIM)) + row * kWords;
    KvqEncodeValueTokenWarp<BITS, HEAD_DIM>(x, n_out, cb, lane, words, L.value_low + token, L.value_high + token,
                                            L.value_outlier_channel + token * n_out,
                                            L.value_outlier_value + token * n_out);
  }
}

// Key outliers into their streams' lists, in token order: one block per (run of page entries of one slot,
// KV head). The run's tokens, across its entries, are taken as one sequence in tiles of kCompactThreads (a
// 512-token prefill chunk is one tile), one thread per token. The tokens always extend the stream's newest
// page, so its list grows at the stream's end (the key_outliers counter); a fresh page records that end as
// its start. A scan of the tokens' counts gives each token its place in the list, so the outliers are
// copied in parallel. (One warp walking the tokens took 0.55 ms per 512-token chunk of an 8B-shaped model;
// a tile per page entry, the entries one after another, 88 us.) When the list needs new segments, thread 0
// takes them from the sequence's pool one at a time, as a token-by-token walk would, so the pool counter and
// the segment table come out the same. A token whose outliers do not fit once the pool is used up keeps
// what fits (its count says so; later tokens keep none) and raises its sequence slot's overflow flag, so no
// list runs into another sequence's segments.
constexpr int kCompactThreads = 512;

__global__ void __launch_bounds__(kCompactThreads) CompactKeyOutliersKernel(const KvqAppendArgs a) {
  __shared__ int token_offset[kCompactThreads];     // exclusive prefix of the counts: a token's place
  __shared__ int64_t token_source[kCompactThreads];  // a token's scratch row
  __shared__ int warp_totals[kCompactThreads / 32];
  __shared__ int64_t shared_room;
  const int first = blockIdx.x;
  const int32_t slot = a.pages[first].slot;
  if (first > 0 && a.pages[first - 1].slot == slot) return;  // the block of an earlier entry takes this one
  int64_t run_tokens = 0;
  for (int e = first; e < a.n_pages && a.pages[e].slot == slot; ++e) run_tokens += a.pages[e].n;
  const int h = blockIdx.y;
  const int t = threadIdx.x;
  const KvqStoreLayer& L = a.layer;
  const int shift = L.key_outlier_segment_shift;
  const int64_t segment_size = int64_t{1} << shift;
  const int32_t* stream_pages = a.page_table + static_cast<int64_t>(slot) * a.page_table_stride;
  int64_t* stream_end = L.key_outliers + static_cast<int64_t>(slot) * a.n_kv_heads + h;
  int64_t end = *stream_end;
  int64_t room = (end + segment_size - 1) >> shift << shift;  // the list's segments hold this many
  const int64_t pool = static_cast<int64_t>(a.pages[first].stream_pages) * a.n_kv_heads * L.n_layers;
  const int64_t table = static_cast<int64_t>(a.pages[first].stream_pages) * kKvqSegmentTableWidth;
  bool full = false;  // thread 0's: no more segments for the rest of the launch
  int entry = first;  // this thread's token's entry and the entry's first token in the run
  int64_t entry_base = 0;
  for (int64_t tile = 0; tile < run_tokens; tile += kCompactThreads) {
    const int n = static_cast<int>(min(run_tokens - tile, static_cast<int64_t>(kCompactThreads)));
    const int64_t token = tile + t;  // this thread's token of the run
    KvqFlushPage pg{};
    int i = 0, count = 0;
    if (t < n) {
      while (token >= entry_base + a.pages[entry].n) entry_base += a.pages[entry++].n;
      pg = a.pages[entry];
      i = static_cast<int>(token - entry_base);
      token_source[t] = static_cast<int64_t>(pg.scratch0 + i) * a.n_kv_heads + h;
      count = a.scratch_count[token_source[t]];
    }
    int total = 0;
    const int offset = BlockExclusiveSum(count, warp_totals, &total);
    token_offset[t] = offset;
    if (t == 0) {
      // Room for every token of the tile, segment by segment: the takes a token-by-token walk makes,
      // in its order, up to its first failed take.
      while (!full && room < end + total) {
        int taken = static_cast<int>(pool);
        if ((room >> shift) < table) {
          // Pool entry n: layer n % n_layers, then (page, head) of the sequence, so the first takers
          // spread over layers.
          taken = atomicAdd(L.key_outlier_segments_taken + slot, 1);
          if (taken < pool) {
            const int64_t layer = taken % L.n_layers, rest = taken / L.n_layers;
            const int64_t page = rest / a.n_kv_heads;
            const int64_t segment =
                layer * L.layer_segments + stream_pages[page] * a.n_kv_heads + (rest - page * a.n_kv_heads);
            L.key_outlier_segments[KvqKeyOutlierSegmentEntry(room >> shift, stream_pages, a.n_kv_heads, h)] =
                static_cast<int32_t>(segment);
          }
        }
        if (taken >= pool) {
          full = true;
        } else {
          room += segment_size;
        }
      }
      shared_room = room;
    }
    __syncthreads();  // thread 0's table entries and room, and the offsets and sources, are visible to the block
    room = shared_room;
    // The tokens keep the first room - end outliers of the tile: all of theirs until the list is full,
    // then what fits for the first token that does not fit, and none for later ones.
    const int kept_total = static_cast<int>(max(int64_t{0}, min(static_cast<int64_t>(total), room - end)));
    for (int f = t; f < kept_total; f += kCompactThreads) {
      int lo = 0, hi = n - 1;  // the last token whose place is at or before f (it has outliers)
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (token_offset[mid] <= f) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      const int64_t from = token_source[lo] * a.head_dim + (f - token_offset[lo]);
      const int64_t dst = KvqKeyOutlierIndex(end + f, stream_pages, L.key_outlier_segments, a.n_kv_heads, h, shift);
      L.key_outlier_channel[dst] = a.scratch_channel[from];
      L.key_outlier_value[dst] = a.scratch_value[from];
    }
    if (t < n) {
      const int64_t ph = static_cast<int64_t>(pg.page) * a.n_kv_heads + h;
      if (i == 0 && pg.row0 == 0) L.key_outlier_start[ph] = end + min(offset, kept_total);
      const int kept = max(0, min(count, kept_total - offset));
      L.key_outlier_count[ph * kPage + pg.row0 + i] = static_cast<uint8_t>(kept);
      if (kept < count) reinterpret_cast<volatile int*>(L.overflow)[slot] = 1;  // may be mapped host memory
    }
    end += kept_total;
    __syncthreads();  // the next tile rewrites the offsets, sources and warp totals
  }
  if (t == 0) *stream_end = end;
}

// New fp16 tokens: one block per (token, KV head), one thread per RoPE pair (i, i + head_dim / 2). Sink
// keys are rotated as QuantizedKvShard::Rotate (angle in double, products in fp32, not fused).
__global__ void WriteFp16TokensKernel(const KvqAppendArgs a) {
  const KvqWriteToken w = a.writes[blockIdx.x];
  const int h = blockIdx.y;
  const int half = a.head_dim / 2;
  const int i = threadIdx.x;
  if (i >= half) return;
  const KvqStoreLayer& L = a.layer;
  const int64_t src = static_cast<int64_t>(w.chunk_token) * a.row_stride + static_cast<int64_t>(h) * a.head_dim;
  float k0 = a.k[src + i], k1 = a.k[src + i + half];
  const float v0 = a.v[src + i], v1 = a.v[src + i + half];
  uint16_t *kd, *vd;
  if (w.dest >= 0) {
    const int64_t row = ((static_cast<int64_t>(w.slot) * a.n_kv_heads + h) * L.ring + w.dest) * a.head_dim;
    kd = L.residual_k + row;
    vd = L.residual_v + row;
  } else {
    const int64_t row = ((static_cast<int64_t>(w.slot) * a.n_kv_heads + h) * L.max_sink + (-1 - w.dest)) * a.head_dim;
    kd = L.sink_k + row;
    vd = L.sink_v + row;
    RotatePair(&k0, &k1, w.position, L.inv_freq[i]);
  }
  kd[i] = __half_as_ushort(__float2half_rn(k0));
  kd[i + half] = __half_as_ushort(__float2half_rn(k1));
  vd[i] = __half_as_ushort(__float2half_rn(v0));
  vd[i + half] = __half_as_ushort(__float2half_rn(v1));
}

constexpr int kDequantThreads = 128;
constexpr int kMaxKvHeads = 16;
constexpr int kDequantStagedOutliers = 2048;  // a page's key outliers read once into shared memory (else: per item)

// The fp16 tokens of [first, first + n) of KV head h: the sink as stored, the residual ring's keys rotated.
template <int HEAD_DIM>
__device__ __forceinline__ void DequantizeFp16Tokens(const KvqDequantizeArgs& a, int h) {
  constexpr int kHalf = HEAD_DIM / 2;
  const KvqStoreLayer& L = a.layer;
  const int64_t end = a.first + a.n;
  const int64_t n_sink = max(int64_t{0}, min(a.sink, end) - a.first);
  const int64_t res_begin = max(a.quantized_end, a.first);
  const int64_t n_res = max(int64_t{0}, end - res_begin);
  const int64_t n_tok = n_sink + n_res;
  const int64_t stream = static_cast<int64_t>(a.slot) * a.n_kv_heads + h;
  for (int64_t item = threadIdx.x; item < n_tok * kHalf; item += blockDim.x) {
    const int64_t j = item / kHalf;
    const int i = static_cast<int>(item % kHalf);
    const bool in_sink = j < n_sink;
    const int64_t local = in_sink ? a.first + j : res_begin + (j - n_sink);
    const uint16_t* kp;
    const uint16_t* vp;
    if (in_sink) {
      kp = L.sink_k + (stream * L.max_sink + local) * HEAD_DIM;
      vp = L.sink_v + (stream * L.max_sink + local) * HEAD_DIM;
    } else {
      const int64_t r = (local - a.sink) % L.ring;
      kp = L.residual_k + (stream * L.ring + r) * HEAD_DIM;
      vp = L.residual_v + (stream * L.ring + r) * HEAD_DIM;
    }
    float k0 = __half2float(__ushort_as_half(kp[i])), k1 = __half2float(__ushort_as_half(kp[i + kHalf]));
    if (!in_sink) RotatePair(&k0, &k1, a.start_position + local, L.inv_freq[i]);
    const int64_t out = (static_cast<int64_t>(h) * a.out_stride + (local - a.first)) * HEAD_DIM;
    a.k[out + i] = __float2half_rn(k0);
    a.k[out + i + kHalf] = __float2half_rn(k1);
    a.v[out + i] = __ushort_as_half(vp[i]);
    a.v[out + i + kHalf] = __ushort_as_half(vp[i + kHalf]);
  }
}

// Blocks (x, h), x < n_pages: KV head h of quantized page page_begin + x (codes as KvqKeyCodec::Decode /
// KvqValueCodec::Decode, outliers replace, keys rotated at their positions); x = n_pages: head h of the
// fp16 tokens. A block per (page, KV head): the page's codes, thresholds and outlier lists go to shared
// memory first (independent loads, all in flight at once), then thread t writes channels 2j, 2j + 1 and
// their RoPE partners 2j + h, 2j + 1 + h (j = t % kQuads, h = HEAD_DIM / 2) of rows t / kQuads + k *
// kRowStep: fp16x2 stores, a warp's store a whole 128-byte line. A thread's rows of one 32-row word group
// share its key code words, read once. RoPE: the page's anchor angles in double once per frequency, a
// thread's first row of a word group by SmallAngle + AddAngle (within 4e-7 of the double angle), the next
// rows stepped by kRowStep rows in fp32 (7 steps: within 2e-6, far below the outputs' fp16 rounding). Key
// outliers: each row's channels as a bitmask built once, so a thread tests its 4 channels with two shared
// reads instead of walking the row's list; 3-bit code shifts split into a per-thread part applied to the
// words once per group and a constant per unrolled row (kv_pack.h, ThreeBitCodeAtStep). The
// values before rounding are the CPU codec's bit for bit (same fp32 operations). (Thread per (token, RoPE
// pair) with every code, threshold and outlier read from global memory per item was latency-bound: about
// a twentieth of the device's bandwidth, a fifth of a kvq3 prefill's GPU time at 8K tokens.)
template <int HEAD_DIM, int BITS>
__global__ void __launch_bounds__(kDequantThreads) DequantizeKernel(const KvqDequantizeArgs a, int64_t page_begin,
                                                                     int n_pages) {
  constexpr int kHalf = HEAD_DIM / 2;
  constexpr int kQuads = kHalf / 2;                     // threads per row: 32 (d 128) or 16 (d 64)
  constexpr int kRowStep = kDequantThreads / kQuads;    // 4 or 8
  constexpr int kChannelWords = 4 * BITS;               // a channel's 128 codes
  constexpr int kCodeWords = kChannelWords * HEAD_DIM;  // a page's codes of one part
  constexpr int kKeyStride = kChannelWords + 1;         // padded, so lanes' channels spread over the banks
  static_assert(kDequantThreads == kPage && kRowStep * kQuads == kDequantThreads, "a thread per page row");
  __shared__ uint32_t key_words[HEAD_DIM * kKeyStride];
  __shared__ __align__(16) uint32_t value_words[kCodeWords];
  __shared__ float2 key_range[HEAD_DIM];  // low, high - low
  __shared__ float2 value_range[kPage];   // per token
  __shared__ float key_weight[1 << BITS], value_weight[1 << BITS];  // (codebook + 1) / 2
  __shared__ int prefix[kPage];
  constexpr int kMaskWords = HEAD_DIM / 32;
  __shared__ uint32_t outlier_mask[kPage * kMaskWords];  // per row, its key outlier channels
  __shared__ int warp_total[kDequantThreads / 32];
  __shared__ float2 anchor[kHalf];
  __shared__ uint8_t staged_channel[kDequantStagedOutliers];
  __shared__ uint16_t staged_value[kDequantStagedOutliers];
  __shared__ uint8_t value_channel[kPage * kKvqMaxValueOutliers];
  __shared__ uint16_t value_value[kPage * kKvqMaxValueOutliers];
  const KvqStoreLayer& L = a.layer;
  const int h = blockIdx.y;
  if (static_cast<int>(blockIdx.x) >= n_pages) {
    DequantizeFp16Tokens<HEAD_DIM>(a, h);
    return;
  }
  const int t = threadIdx.x;
  const int n_out = a.n_value_outliers;
  const int64_t end = a.first + a.n;
  const int64_t pg = page_begin + blockIdx.x;
  const int64_t phys = a.page_table[pg];
  const int64_t quantized = a.quantized_end - a.sink;
  const int n_valid = static_cast<int>(min(static_cast<int64_t>(kPage), quantized - pg * kPage));
  const int64_t ph = phys * a.n_kv_heads + h;
  const int64_t local0 = a.sink + pg * kPage;  // local index of the page's row 0

  // ---- staging ----
  {
    const uint32_t* kc = reinterpret_cast<const uint32_t*>(L.key_codes) + ph * kCodeWords;
    for (int e = t; e < kCodeWords; e += kDequantThreads) {
      key_words[(e / kChannelWords) * kKeyStride + e % kChannelWords] = kc[e];
    }
    const uint4* vc = reinterpret_cast<const uint4*>(L.value_codes) + ph * (kCodeWords / 4);
    for (int e = t; e < kCodeWords / 4; e += kDequantThreads) reinterpret_cast<uint4*>(value_words)[e] = vc[e];
  }
  for (int c = t; c < HEAD_DIM; c += kDequantThreads) {
    const float lo = L.key_low[h * HEAD_DIM + c], hi = L.key_high[h * HEAD_DIM + c];
    key_range[c] = make_float2(lo, __fsub_rn(hi, lo));
  }
  if (t < (1 << BITS)) {
    key_weight[t] = __fmul_rn(__fadd_rn(L.key_codebook[t], 1.0f), 0.5f);
    value_weight[t] = __fmul_rn(__fadd_rn(L.value_codebook[t], 1.0f), 0.5f);
  }
  {
    const int64_t token = ph * kPage + t;
    const float lo = __half2float(__ushort_as_half(L.value_low[token]));
    const float hi = __half2float(__ushort_as_half(L.value_high[token]));
    value_range[t] = make_float2(lo, __fsub_rn(hi, lo));
  }
  for (int e = t; e < kPage * n_out; e += kDequantThreads) {
    value_channel[e] = L.value_outlier_channel[ph * kPage * n_out + e];
    value_value[e] = L.value_outlier_value[ph * kPage * n_out + e];
  }
  if (t < kHalf) RopeAngle(a.start_position + local0, L.inv_freq[t], &anchor[t].x, &anchor[t].y);
  // Exclusive prefix of the key outlier counts (a token's outliers follow those of earlier tokens).
  const int count = t < n_valid ? L.key_outlier_count[ph * kPage + t] : 0;
  int page_outliers = 0;
  const int first_outlier = BlockExclusiveSum(count, warp_total, &page_outliers);
  prefix[t] = first_outlier;
  // The page's key outliers in list order, when they fit.
  const bool staged = page_outliers <= kDequantStagedOutliers;
  if (staged) {
    for (int e = t; e < page_outliers; e += kDequantThreads) {
      const int64_t o = KvqKeyOutlierIndex(L.key_outlier_start[ph] + e, a.page_table, L.key_outlier_segments,
                                           a.n_kv_heads, h, L.key_outlier_segment_shift);
      staged_channel[e] = L.key_outlier_channel[o];
      staged_value[e] = L.key_outlier_value[o];
    }
  }
  __syncthreads();
  // Row t's outlier channels as a bitmask, so that the row's threads find theirs without walking the list
  // (a row's entries are in ascending channel order: an entry's index is a popcount of the mask).
  {
    uint32_t bits[kMaskWords] = {};
    for (int e = 0; e < count; ++e) {
      int ch;
      if (staged) {
        ch = staged_channel[first_outlier + e];
      } else {
        ch = L.key_outlier_channel[KvqKeyOutlierIndex(L.key_outlier_start[ph] + first_outlier + e, a.page_table,
                                                      L.key_outlier_segments, a.n_kv_heads, h,
                                                      L.key_outlier_segment_shift)];
      }
#pragma unroll
      for (int w = 0; w < kMaskWords; ++w) bits[w] |= (ch >> 5) == w ? 1u << (ch & 31) : 0u;
    }
#pragma unroll
    for (int w = 0; w < kMaskWords; ++w) outlier_mask[t * kMaskWords + w] = bits[w];
  }
  __syncthreads();

  // ---- rows ----
  const int j = t % kQuads, tq = t / kQuads;
  const int c0 = 2 * j;
  const int channel[4] = {c0, c0 + 1, c0 + kHalf, c0 + 1 + kHalf};
  float2 range[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) range[u] = key_range[channel[u]];
  float inv_freq[2], step_c[2], step_s[2];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    inv_freq[p] = L.inv_freq[c0 + p];
    SmallAngle(kRowStep, inv_freq[p], &step_c[p], &step_s[p]);
  }
  const int row_begin = static_cast<int>(max(int64_t{0}, a.first - local0));
  const int row_end = static_cast<int>(min(static_cast<int64_t>(n_valid), end - local0));
  __half2* k_out = reinterpret_cast<__half2*>(a.k + (static_cast<int64_t>(h) * a.out_stride + (local0 - a.first)) * HEAD_DIM);
  __half2* v_out = reinterpret_cast<__half2*>(a.v + (static_cast<int64_t>(h) * a.out_stride + (local0 - a.first)) * HEAD_DIM);
#pragma unroll 1
  for (int group = 0; group < kPage / 32; ++group) {
    if (32 * group + 32 <= row_begin || 32 * group >= row_end) continue;
    uint32_t words[4][BITS];  // a channel's codes of the 32-row group (3 bits: shifted for this thread's rows)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int w = 0; w < BITS; ++w) words[u][w] = key_words[channel[u] * kKeyStride + group * BITS + w];
      if constexpr (BITS == 3) {
        const uint32_t read[3] = {words[u][0], words[u][1], words[u][2]};
        ThreeBitWordsOfThread(read, tq, words[u]);
      }
    }
    float cs[2], sn[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      float small_c, small_s;
      SmallAngle(32 * group + tq, inv_freq[p], &small_c, &small_s);
      AddAngle(anchor[c0 + p], small_c, small_s, &cs[p], &sn[p]);
    }
#pragma unroll
    for (int k = 0; k < 32 / kRowStep; ++k) {
      const int r = k * kRowStep + tq;  // row in the word group
      const int row = 32 * group + r;
      if (row >= row_begin && row < row_end) {
        float x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t code;
          if constexpr (BITS == 3) {
            code = ThreeBitCodeAtStep(words[u], kRowStep, k);
          } else {
            code = CodeInGroupWords<BITS>(words[u], r);
          }
          x[u] = __fadd_rn(range[u].x, __fmul_rn(key_weight[code], range[u].y));
        }
        const uint32_t* mask = outlier_mask + row * kMaskWords;
        const uint32_t near = (mask[c0 >> 5] >> (c0 & 31)) & 3u;  // channels c0, c0 + 1
        const uint32_t far = (mask[(c0 + kHalf) >> 5] >> ((c0 + kHalf) & 31)) & 3u;
        if ((near | far) != 0u) {  // about 1% of the elements: the outliers replace the codes
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int ch = channel[u];
            if ((mask[ch >> 5] >> (ch & 31)) & 1u) {
              int e = prefix[row] + __popc(mask[ch >> 5] & ((1u << (ch & 31)) - 1u));
              for (int w = 0; w < (ch >> 5); ++w) e += __popc(mask[w]);
              uint16_t value;
              if (staged) {
                value = staged_value[e];
              } else {
                value = L.key_outlier_value[KvqKeyOutlierIndex(L.key_outlier_start[ph] + e, a.page_table,
                                                               L.key_outlier_segments, a.n_kv_heads, h,
                                                               L.key_outlier_segment_shift)];
              }
              x[u] = __half2float(__ushort_as_half(value));
            }
          }
        }
        RotatePairBy(&x[0], &x[2], cs[0], sn[0]);
        RotatePairBy(&x[1], &x[3], cs[1], sn[1]);
        k_out[row * kHalf + j] = __floats2half2_rn(x[0], x[1]);
        k_out[row * kHalf + kQuads + j] = __floats2half2_rn(x[2], x[3]);
        // Values: token-major codes; channels 2j, 2j + 1 share a word group, as do their partners.
        const float2 vr = value_range[row];
        float y[4];
#pragma unroll
        for (int side = 0; side < 2; ++side) {
          const int index = row * HEAD_DIM + channel[2 * side];
          const uint32_t* group_words = value_words + (index / 32) * BITS;
          uint32_t vw[BITS];
#pragma unroll
          for (int w = 0; w < BITS; ++w) vw[w] = group_words[w];
#pragma unroll
          for (int o = 0; o < 2; ++o) {
            y[2 * side + o] = __fadd_rn(vr.x, __fmul_rn(value_weight[CodeInGroupWords<BITS>(vw, index % 32 + o)], vr.y));
          }
        }
        for (int e = 0; e < n_out; ++e) {
          const int ch = value_channel[row * n_out + e];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (ch == channel[u]) y[u] = __half2float(__ushort_as_half(value_value[row * n_out + e]));
          }
        }
        v_out[row * kHalf + j] = __floats2half2_rn(y[0], y[1]);
        v_out[row * kHalf + kQuads + j] = __floats2half2_rn(y[2], y[3]);
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) AddAngle(make_float2(cs[p], sn[p]), step_c[p], step_s[p], &cs[p], &sn[p]);
    }
  }
}

absl::Status CheckShape(const char* what, int n_kv_heads, int head_dim, int n_out) {
  if (head_dim != 64 && head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": head_dim ", head_dim, " not 64 or 128"));
  }
  if (n_kv_heads <= 0 || n_kv_heads > kMaxKvHeads) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n_kv_heads, " KV heads; 1..", kMaxKvHeads, " supported"));
  }
  if (n_out < 0 || n_out > kKvqMaxValueOutliers) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n_out, " value outliers per token; at most ",
                                                   kKvqMaxValueOutliers, " supported"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status KvqStoreAppendCuda(const KvqAppendArgs& a, cudaStream_t stream) {
  if (auto s = CheckShape("KvqStoreAppendCuda", a.n_kv_heads, a.head_dim, a.n_value_outliers); !s.ok()) return s;
  if (a.n_runs < 0 || a.n_pages < 0 || a.n_writes < 0 || a.n_flush < 0) {
    return absl::InvalidArgumentError("KvqStoreAppendCuda: negative counts");
  }
  if (a.n_writes > 0 && (a.k == nullptr || a.v == nullptr)) {  // runs may read only the ring (Seal)
    return absl::InvalidArgumentError("KvqStoreAppendCuda: null k or v");
  }
  if (a.layer.ring <= 0) return absl::InvalidArgumentError("KvqStoreAppendCuda: the residual ring needs a row");
  if (a.n_pages > 0 && (a.page_table == nullptr || a.layer.key_outlier_start == nullptr ||
                        a.layer.key_outlier_segments == nullptr || a.layer.key_outlier_segments_taken == nullptr ||
                        a.layer.key_outlier_segment_shift < 0 || a.layer.key_outlier_segment_shift > 24)) {
    return absl::InvalidArgumentError("KvqStoreAppendCuda: key outliers need the page table, their page starts, "
                                      "segment tables and a segment shift in [0, 24]");
  }
  return KV_DISPATCH_KVQ_BITS(a.bits, BITS, {
    if (a.n_runs > 0) {
      FlushKeysKernel<BITS><<<dim3(a.n_runs, a.n_kv_heads), kFlushKeyGroups * a.head_dim, 0, stream>>>(a);
      CUDA_RETURN_IF_LAUNCH_ERROR();
      const dim3 grid(a.n_runs, a.n_kv_heads);
      if (a.head_dim == 128) {
        FlushValuesKernel<BITS, 128><<<grid, 32 * kFlushValueWarps, 0, stream>>>(a);
      } else {
        FlushValuesKernel<BITS, 64><<<grid, 32 * kFlushValueWarps, 0, stream>>>(a);
      }
      CUDA_RETURN_IF_LAUNCH_ERROR();
    }
    if (a.n_pages > 0) {
      CompactKeyOutliersKernel<<<dim3(a.n_pages, a.n_kv_heads), kCompactThreads, 0, stream>>>(a);
      CUDA_RETURN_IF_LAUNCH_ERROR();
    }
    if (a.n_writes > 0) {
      WriteFp16TokensKernel<<<dim3(a.n_writes, a.n_kv_heads), std::max(32, a.head_dim / 2), 0, stream>>>(a);
      CUDA_RETURN_IF_LAUNCH_ERROR();
    }
    return absl::OkStatus();
  });
}

absl::Status KvqDequantizeCuda(const KvqDequantizeArgs& a, cudaStream_t stream) {
  if (auto s = CheckShape("KvqDequantizeCuda", a.n_kv_heads, a.head_dim, a.n_value_outliers); !s.ok()) return s;
  if (a.first < 0 || a.n < 0 || a.first + a.n > a.length || a.n > a.out_stride || a.sink > a.quantized_end ||
      a.quantized_end > a.length) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDequantizeCuda: bad range [", a.first, ", ", a.first + a.n,
                                                   ") of ", a.length, " tokens (sink ", a.sink, ", quantized to ",
                                                   a.quantized_end, ", out stride ", a.out_stride, ")"));
  }
  if (a.n == 0) return absl::OkStatus();
  // Quantized pages overlapping [first, first + n).
  const int64_t q0 = std::max(a.first, a.sink), q1 = std::min(a.first + a.n, a.quantized_end);
  int64_t page_begin = 0;
  int n_pages = 0;
  if (q1 > q0) {
    page_begin = (q0 - a.sink) / kPage;
    n_pages = static_cast<int>((q1 - a.sink - 1) / kPage - page_begin + 1);
  }
  return KV_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, {
    return KV_DISPATCH_KVQ_BITS(a.bits, BITS, {
      DequantizeKernel<HEAD_DIM, BITS><<<dim3(n_pages + 1, a.n_kv_heads), kDequantThreads, 0, stream>>>(
          a, page_begin, n_pages);
      CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

}  // namespace kvshard
