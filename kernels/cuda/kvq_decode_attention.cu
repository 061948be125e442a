// Fused split-KV decode attention over the kvq<b> store (kvq_attention.h).
//
// One thread block owns (split, KV head, group tile of up to 4 query heads, request); its four warps
// take the split's 128-token pages in turn. Per page a warp
//   A. has the page's key codes and outlier counts (one cp.async group) and value codes and per-token
//      metadata (another) staged into its shared memory with 16-byte cp.async loads; each group of the
//      next page is issued as soon as this page is done with it, so loads overlap the math; computes
//      the page's RoPE anchor cos/sin(position0 * f_i) in double once per frequency (stepped from the
//      warp's previous page by the angle addition formula);
//   B. computes the dense key scores: head_dim/8 lanes share a token, each lane owns 4 RoPE pairs
//      (i, i + head_dim/2), reads its channels' codes of 32 tokens as b whole 32-bit words (keys are
//      channel-major), dequantizes through the key codebook and the per-channel thresholds, rotates
//      (chunk start from the page anchor and a small fp32 angle, stepped in fp32 in between) and dots
//      with the query group held in registers; four tokens' partial sums are reduced at once by a
//      transposing butterfly (15 shuffles per 4 tokens instead of 64);
//   C. adds the key outliers of its 4 tokens (the first of each token prefetched before B) in registers: a
//      stored outlier replaces the pre-RoPE key value, so its score changes by (outlier - dequantized)
//      times the query rotated back at that channel (RoPE is linear);
//   D. runs the online softmax over the page (log2 domain), one lane per 4 tokens, and prepares the
//      values' per-token terms: x = (low + half) + u * half with half = (high - low) / 2, so the
//      channel-independent part p * (low + half) is summed here and E gets alpha = p * half;
//   F. adds the value outliers of its 4 tokens (p * (outlier - dequantized)) into the warp's correction
//      rows, which persist over its pages (scaled with the accumulators) and join them after the last
//      one; lanes that share a channel take turns, or are summed over the warp when many do;
//   E. accumulates values: each code costs a table read and the group's FMAs with alpha.
// kvq3 (the default scheme) replaces B and E by tensor-core versions (MmaKeyScores, MmaValues: fp16
// operands, fp32 accumulation; see "kvq3 on tensor cores" below), and its key outliers take the fp16 RoPE
// factors of B; A, D and F are shared, and bits 2 and 4 keep the fp32 B, C and E above.
// One more block per (KV head, tile, request) takes the fp16 sink (after RoPE) and residual (rotated
// here). The block's warps combine in shared memory; MergePartialsCuda merges the splits.
#include <algorithm>
#include <climits>
#include <cmath>

#include "common/half.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kvq_attention.h"
#include "kernels/cuda/kvq_codes.cuh"
#include "kernels/cuda/kvq_tiles.cuh"
#include "kernels/cuda/reduce.cuh"
#include "kernels/kv_pack.h"

namespace kvshard {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kGroupTile = 4;       // query heads per block (Llama-3: group 4; SmolLM2: group 3)
constexpr int kPage = kKvqPageTokens;
constexpr int kMaxSplits = 128;
// One page per warp at least. Short contexts need the splits: 8K tokens of a single request are 64 pages
// per KV head, and at two pages per warp they filled a quarter of an H100's block slots, each warp walking
// its pages one after another at its own latency. Long contexts are unaffected (PlanKvq's wave count).
constexpr int kMinPagesPerSplit = 4;
constexpr int kProbsStride = kPage + 16;  // kvq3: fp16 weights per head row, padded against bank conflicts
// A page's scores, float [token][kGroupTile] with 4 floats of padding after every 16 tokens: the MMA
// epilogue's stores (lanes 16 tokens apart) then hit distinct banks, and the softmax's float4 rows
// (lanes 4 tokens apart) conflict 2-way instead of 4-way.
constexpr int kScoreFloats = kPage * kGroupTile + (kPage / 16) * 4;
__host__ __device__ constexpr int ScoreIndex(int token) { return token * kGroupTile + (token >> 4) * 4; }

// Shared memory layout (bytes), the same on host and device.
template <int HEAD_DIM, int BITS>
struct Smem {
  static constexpr int kCodeBytes = 16 * BITS * HEAD_DIM;  // one page stream of 128 * HEAD_DIM codes
  // Block part.
  static constexpr int kQ = 0;                                      // float [4][HEAD_DIM], scaled (log2)
  static constexpr int kKeyMid = kQ + 4 * kGroupTile * HEAD_DIM;    // float [HEAD_DIM]
  static constexpr int kKeyHalf = kKeyMid + 4 * HEAD_DIM;           // float [HEAD_DIM]
  static constexpr int kCodebook = kKeyHalf + 4 * HEAD_DIM;         // float [16] keys, [16] values
  static constexpr int kInvFreq = kCodebook + 4 * 32;               // float [HEAD_DIM / 2]
  static constexpr int kStateM = kInvFreq + 2 * HEAD_DIM;           // float [kWarps][4]
  static constexpr int kStateL = kStateM + 4 * kWarps * kGroupTile; // float [kWarps][4]
  // kvq3 (tensor cores): fp16x2 {half, mid} of channels (2j, 2j + 1), then of (2j + h, 2j + 1 + h) with
  // h = HEAD_DIM / 2: uint4 [HEAD_DIM / 4].
  static constexpr int kKeyPairs = kStateL + 4 * kWarps * kGroupTile;
  // double2 [HEAD_DIM / 2]: cos/sin(kWarps * 128 * f_i), the step of a warp's page anchors.
  static constexpr int kAnchorStep = kKeyPairs + 4 * HEAD_DIM;
  static constexpr int kWarpBase = kAnchorStep + 8 * HEAD_DIM;
  // Per-warp part, at kWarpBase + warp * WarpBytes(n_out).
  // The code areas start on 128-byte lines (cp.async fills them in whole lines); each has 128 bytes
  // more than the stream, as reads may touch one word past it.
  static constexpr int kKeyCodes = 0;
  static constexpr int kValueCodes = kKeyCodes + kCodeBytes + 128;
  static constexpr int kLow = kValueCodes + kCodeBytes + 128;      // fp16 [128]
  static constexpr int kHigh = kLow + 2 * kPage;                   // fp16 [128]
  static constexpr int kCount = kHigh + 2 * kPage;                 // u8 [128]
  static constexpr int kScores = kCount + kPage;                   // float [ScoreIndex(128)]
  // float [128][4] alpha = p * half for E. The tensor-core path (kvq3) keeps fp16 p * half [4][kProbsStride]
  // there instead, and before that (B, C) the page's rotated query pairs float2 [4][HEAD_DIM / 2].
  static constexpr int kAlpha = kScores + 4 * kScoreFloats;
  static constexpr int kProbs = kAlpha;
  static constexpr int kQueryPairs = kAlpha;
  static constexpr int kAnchor = kAlpha + 4 * kGroupTile * (HEAD_DIM > kPage ? HEAD_DIM : kPage);  // float2 [HEAD_DIM / 2]
  static constexpr int kAnchorExact = kAnchor + 4 * HEAD_DIM;     // double2 [HEAD_DIM / 2], the next page's anchor
  // float4 [HEAD_DIM]: the warp's value outlier corrections of the 4 heads per channel, over all its pages
  // (scaled with the accumulators), added to them once at the end.
  static constexpr int kCorr = kAnchorExact + 8 * HEAD_DIM;
  static constexpr int kOutlierChannel = kCorr + 16 * HEAD_DIM;   // u8 [128][n_out]
  __host__ __device__ static int OutlierValue(int n_out) { return kOutlierChannel + kPage * n_out; }
  __host__ __device__ static int WarpBytes(int n_out) { return (OutlierValue(n_out) + 2 * kPage * n_out + 127) / 128 * 128; }
  __host__ __device__ static int Total(int n_out) { return kWarpBase + kWarps * WarpBytes(n_out); }
  static_assert(kWarpBase % 128 == 0 && kValueCodes % 128 == 0 && kKeyPairs % 16 == 0 && kProbs % 16 == 0 && kLow % 16 == 0 && kScores % 16 == 0 &&
                    kOutlierChannel % 16 == 0 && kAnchor % 16 == 0 && kAnchorStep % 16 == 0 && kAnchorExact % 16 == 0 &&
                    kCorr % 16 == 0,
                "cp.async destinations must be 16-byte aligned");
  // The block's combine reuses the warp area: float [kWarps][4][HEAD_DIM].
  static_assert(kWarps * kGroupTile * HEAD_DIM * 4 <= kWarps * kOutlierChannel, "combine state must fit");
  static_assert(kProbs + 2 * kGroupTile * kProbsStride <= kAnchor && kQueryPairs + kGroupTile * HEAD_DIM * 4 <= kAnchor,
                "kvq3 weights and query pairs must fit the alpha area");
};

struct KvqParams {
  const float* q;
  int64_t q_stride;  // floats between requests' query rows
  KvqStoreView kv;
  int n_heads;
  int n_kv_heads;
  int group;
  int n_group_tiles;
  float scale_log2;
  int64_t split_pages;
  int num_splits;  // quantized splits; block num_splits takes the fp16 tokens
  float* out;      // [num_splits + 1][rows][HEAD_DIM]
  float* lse;      // [num_splits + 1][rows]
  int64_t rows;
};

// Row of residual token r (0 = oldest) in its stream's residual area: r, or in a ring the token's part
// index (local - sink) modulo the capacity.
__device__ __forceinline__ int64_t ResidualIndex(const KvqStoreView& kv, int64_t quantized_len, int r) {
  return kv.residual_ring ? (quantized_len + r) % kv.max_residual : r;
}

// ---- kvq3 on tensor cores ----
// QK^T and PV run as m16n8k16 fp16 MMAs with fp32 accumulation. Codes go to fp16 through a register
// lookup table (byte permutes), so no shared-memory read per code:
//   * the store's 3-bit plane groups (kernels/kv_pack.h) give a lane 16 codes of a channel (keys) or a
//     token (values) as two words of nibbles, even and odd codes, with a few masks (KeyNibbles,
//     ValueNibbles); a byte of each of two such words is joined into a 4-nibble selector (one byte
//     permute), and two byte permutes on the codebook's low and high bytes give the four fp16 values, two
//     more pair them up (LutLookup). The fragments' rows are assigned to fit that order:
//   * keys (S^T = K Q^T): A = keys [16 tokens][16 channels], B = query group [16 channels][8 heads].
//     Lane (g = lane / 4, q = lane % 4) holds tokens KeyToken(g, mt, 0) and KeyToken(g, mt, 1) (rows g
//     and g + 8) of m-tile mt, and the RoPE pairs 8s + 2q + {0, 1} of k-step s (their channels i and
//     i + HEAD_DIM / 2 are the fragment's columns 2q, 2q + 1 and 2q + 8, 2q + 9), so each lane rotates its
//     own pairs: the key by the page offset t (fp16 factors from rope_table), the query by the page's
//     first position (fp32, then fp16).
//   * values (O^T = V^T P^T): A = values [16 channels][16 tokens], B = p times the token's half-range
//     [16 tokens][8 heads]. Lane (g, q) holds channels ValueChannel(g, mt, 0) and ValueChannel(g, mt, 1)
//     (rows g and g + 8) of m-tile mt, and tokens 16r + 4q + {0..3} of k-step r.
// Lanes of one query-column group read neighbouring words (the 8-byte RoPE factors, the fp16 weights), so
// those loads are coalesced and free of bank conflicts.
// Heads beyond the tile's four are zero columns.

// Token of row g (upper = 0) or g + 8 (upper = 1) of key m-tile mt: byte mt / 2 of the even (mt even) or
// odd nibble words, whose two nibbles are tokens two apart.
__host__ __device__ constexpr int KeyToken(int g, int mt, int upper) { return 16 * g + 4 * (mt >> 1) + 2 * upper + (mt & 1); }

// Entry of KvqStoreView::rope_table that lane (g, q) reads at k-step s for row `upper` of m-tile mt: the
// factors of token KeyToken(g, mt, upper) at pair column 4s + q. A warp's load is 32 consecutive entries.
__host__ __device__ constexpr int RopeTableIndex(int s, int mt, int upper, int g, int q) {
  return (((s * 8 + mt) * 2 + upper) * 8 + g) * 4 + q;
}

// The same entry for page offset t < 128 and pair column j < HEAD_DIM / 4 (KeyToken inverted).
__device__ __forceinline__ int RopeTableIndexOf(int t, int j) {
  return RopeTableIndex(j >> 2, 2 * ((t >> 2) & 3) + (t & 1), (t >> 1) & 1, t >> 4, j & 3);
}

// Channel of row g (upper = 0) or g + 8 (upper = 1) of value m-tile mt, by the same rule.
template <int HEAD_DIM>
__device__ __forceinline__ int ValueChannel(int g, int mt, int upper) {
  return (HEAD_DIM / 8) * g + 4 * (mt >> 1) + 2 * upper + (mt & 1);
}

// Dense key scores of a staged kvq3 page for the group tile, on tensor cores, into scores_s (ScoreIndex)
// (log2 domain: q_s is scaled). anchor_s: cos/sin of the page's first position per frequency. Also leaves
// the query pairs rotated back by that position in qpairs_s [4][HEAD_DIM / 2] (fp32, zero for absent heads)
// for the key outliers.
template <int HEAD_DIM>
__device__ __forceinline__ void MmaKeyScores(const uint32_t* kcodes, const float* q_s, const float2* anchor_s,
                                             const uint4* pairs_s, const uint2* __restrict__ rope_table,
                                             const HalfLut& lut, int n_group, int lane, float* scores_s,
                                             float2* qpairs_s) {
  constexpr int kHalf = HEAD_DIM / 2;
  constexpr int kSteps = HEAD_DIM / 16;
  const int g = lane >> 2, q = lane & 3;
  uint32_t qb0[kSteps], qb1[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    float ra[2] = {0.0f, 0.0f}, rb[2] = {0.0f, 0.0f};
    if (g < n_group) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 8 * s + 2 * q + e;
        const float qa = q_s[g * HEAD_DIM + i], qv = q_s[g * HEAD_DIM + i + kHalf];
        const float2 an = anchor_s[i];
        ra[e] = fmaf(qa, an.x, qv * an.y);
        rb[e] = fmaf(qv, an.x, -qa * an.y);
      }
    }
    if (g < kGroupTile) {
      *reinterpret_cast<float4*>(qpairs_s + g * kHalf + 8 * s + 2 * q) = make_float4(ra[0], rb[0], ra[1], rb[1]);
    }
    qb0[s] = PackPair<__half>(ra[0], ra[1]);
    qb1[s] = PackPair<__half>(rb[0], rb[1]);
  }
  float acc[8][4];
#pragma unroll
  for (int mt = 0; mt < 8; ++mt)
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[mt][k] = 0.0f;
  // The RoPE factors of tokens (t0, t0 + 1) at pair column 4s + q, loaded one m-tile ahead: the table is
  // read through L1, and its latency otherwise stalls the rotation right after the load. The table is in
  // the lanes' order, so a load is two 128-byte lines at a constant offset from this lane's entry.
  const uint2* rope_lane = rope_table + lane;
  const auto rope_at = [&](int s, int mt, int u) { return __ldg(rope_lane + RopeTableIndex(s, mt, u, 0, 0)); };
  uint2 rope0 = rope_at(0, 0, 0), rope1 = rope_at(0, 0, 1);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int i0 = 8 * s + 2 * q;
    uint32_t fa0[2], fa1[2], fb0[2], fb1[2];  // [even, odd] nibble words of channels i0, i0 + 1 (a), + kHalf (b)
    KeyNibbles(kcodes, i0, g, &fa0[0], &fa0[1]);
    KeyNibbles(kcodes, i0 + 1, g, &fa1[0], &fa1[1]);
    KeyNibbles(kcodes, i0 + kHalf, g, &fb0[0], &fb0[1]);
    KeyNibbles(kcodes, i0 + 1 + kHalf, g, &fb1[0], &fb1[1]);
    const uint4 dq = pairs_s[i0 / 2];
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) {
      uint2 next0 = rope0, next1 = rope1;
      if (mt < 7) {
        next0 = rope_at(s, mt + 1, 0);
        next1 = rope_at(s, mt + 1, 1);
      } else if (s + 1 < kSteps) {
        next0 = rope_at(s + 1, 0, 0);
        next1 = rope_at(s + 1, 0, 1);
      }
      uint32_t xa0, xa1, xb0, xb1;  // {channel i0, i0 + 1} of tokens KeyToken(g, mt, 0) and (.., 1), a and b sides
      LutLookup(lut, JoinBytes(fa0[mt & 1], fa1[mt & 1], mt >> 1), &xa0, &xa1);
      LutLookup(lut, JoinBytes(fb0[mt & 1], fb1[mt & 1], mt >> 1), &xb0, &xb1);
      const __half2 a0 = __hfma2(AsHalf2(xa0), AsHalf2(dq.x), AsHalf2(dq.y));
      const __half2 a1 = __hfma2(AsHalf2(xa1), AsHalf2(dq.x), AsHalf2(dq.y));
      const __half2 b0 = __hfma2(AsHalf2(xb0), AsHalf2(dq.z), AsHalf2(dq.w));
      const __half2 b1 = __hfma2(AsHalf2(xb1), AsHalf2(dq.z), AsHalf2(dq.w));
      uint32_t frag[4];
      RotateHalf2(a0, b0, rope0, &frag[0], &frag[2]);
      RotateHalf2(a1, b1, rope1, &frag[1], &frag[3]);
      Mma16816<__half>(acc[mt], frag, qb0[s], qb1[s]);
      rope0 = next0;
      rope1 = next1;
    }
  }
  if (q < 2) {
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) {
      *reinterpret_cast<float2*>(scores_s + ScoreIndex(KeyToken(g, mt, 0)) + 2 * q) = make_float2(acc[mt][0], acc[mt][1]);
      *reinterpret_cast<float2*>(scores_s + ScoreIndex(KeyToken(g, mt, 1)) + 2 * q) = make_float2(acc[mt][2], acc[mt][3]);
    }
  }
}

// acc[mt] += values of the staged kvq3 page times p, on tensor cores: O^T fragments (channel rows
// ValueChannel(g, mt, 0 and 1), head columns 2q, 2q + 1). p_s: fp16 [4][kProbsStride], p times the token's
// half-range (the value is low + half + half * codebook[code]; the rest is summed apart), so the codebook
// entries are the fragments as they are.
template <int HEAD_DIM>
__device__ __forceinline__ void MmaValues(const uint32_t* vcodes, const __half* p_s, const HalfLut& lut, int lane,
                                          float (&acc)[HEAD_DIM / 16][4]) {
  constexpr int kTiles = HEAD_DIM / 16;
  const int g = lane >> 2, q = lane & 3;
#pragma unroll 2
  for (int r = 0; r < 8; ++r) {
    const int t0 = 16 * r + 4 * q;
    uint32_t f[4][2];  // tokens t0 .. t0 + 3: [even, odd] nibble words
#pragma unroll
    for (int u = 0; u < 4; ++u) ValueNibbles<HEAD_DIM>(vcodes, t0 + u, g, &f[u][0], &f[u][1]);
    const uint2 pb = g < kGroupTile ? *reinterpret_cast<const uint2*>(p_s + g * kProbsStride + t0) : make_uint2(0u, 0u);
#pragma unroll
    for (int mt = 0; mt < kTiles; ++mt) {
      uint32_t frag[4];  // channel rows of tokens (t0, t0 + 1), then (t0 + 2, t0 + 3)
      LutLookup(lut, JoinBytes(f[0][mt & 1], f[1][mt & 1], mt >> 1), &frag[0], &frag[1]);
      LutLookup(lut, JoinBytes(f[2][mt & 1], f[3][mt & 1], mt >> 1), &frag[2], &frag[3]);
      Mma16816<__half>(acc[mt], frag, pb.x, pb.y);
    }
  }
}

// Adds add[u] (the 4 heads' corrections) to corr_s[ch[u]] for each of a lane's 4 entries with valid[u],
// without races between entries that share a channel (shared-memory float atomics would be
// compare-and-swap loops). The warp's 128 entries take turns: each pending entry writes its id to
// tag_s[ch] (int [HEAD_DIM] scratch), and the one whose id stayed adds; 128 entries on channels spread
// over tokens (real text) need about 5 turns (the largest number on one channel). Entries still pending
// after kTurns share a crowded channel and are summed over the warp, one channel at a time. All lanes must
// call it.
__device__ __forceinline__ void AddValueCorrections(float4* corr_s, int* tag_s, const int (&ch)[4],
                                                    const float4 (&add)[4], const bool (&valid)[4], int lane) {
  constexpr int kTurns = 5;
  bool pending[4] = {valid[0], valid[1], valid[2], valid[3]};
#pragma unroll
  for (int turn = 0; turn < kTurns; ++turn) {
    if (!__any_sync(0xffffffffu, pending[0] || pending[1] || pending[2] || pending[3])) return;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (pending[u]) tag_s[ch[u]] = 4 * lane + u;
    }
    __syncwarp();
    int tag[4];
    float4 row[4];  // read with the tag: only the winner of a channel writes it in this turn
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      tag[u] = tag_s[ch[u]];
      row[u] = corr_s[ch[u]];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (pending[u] && tag[u] == 4 * lane + u) {
        corr_s[ch[u]] = make_float4(row[u].x + add[u].x, row[u].y + add[u].y, row[u].z + add[u].z, row[u].w + add[u].w);
        pending[u] = false;
      }
    }
    __syncwarp();
  }
  unsigned crowded_lanes = __ballot_sync(0xffffffffu, pending[0] || pending[1] || pending[2] || pending[3]);
  while (crowded_lanes != 0) {
    const int leader = __ffs(crowded_lanes) - 1;
    int first = 0;
#pragma unroll
    for (int u = 3; u >= 0; --u) first = pending[u] ? ch[u] : first;
    const int key = __shfl_sync(0xffffffffu, first, leader);
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (pending[u] && ch[u] == key) {
        sum = make_float4(sum.x + add[u].x, sum.y + add[u].y, sum.z + add[u].z, sum.w + add[u].w);
        pending[u] = false;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      sum.x += __shfl_xor_sync(0xffffffffu, sum.x, off);
      sum.y += __shfl_xor_sync(0xffffffffu, sum.y, off);
      sum.z += __shfl_xor_sync(0xffffffffu, sum.z, off);
      sum.w += __shfl_xor_sync(0xffffffffu, sum.w, off);
    }
    if (lane == leader) {
      const float4 x = corr_s[key];
      corr_s[key] = make_float4(x.x + sum.x, x.y + sum.y, x.z + sum.z, x.w + sum.w);
    }
    crowded_lanes = __ballot_sync(0xffffffffu, pending[0] || pending[1] || pending[2] || pending[3]);
  }
  __syncwarp();
}

// kvq3 asks for two blocks per SM, not three: the registers it then gets (about 250) hold the MMA loops
// without spills, and the smaller shared-memory carveout leaves L1 room for the RoPE table. Measured
// 7-13% faster on H200 than three blocks of 168 registers (bench/RESULTS.md).
template <int HEAD_DIM, int BITS>
__global__ void __launch_bounds__(kThreads, BITS == 3 ? 2 : 1) KvqDecodeKernel(const KvqParams p) {
  using L = Smem<HEAD_DIM, BITS>;
  constexpr bool kMma = BITS == 3;  // kvq3 runs on tensor cores
  constexpr int kHalf = HEAD_DIM / 2;
  constexpr int kLanesPerToken = HEAD_DIM / 8;       // 16 (d=128) or 8 (d=64)
  constexpr int kTokenGroups = 32 / kLanesPerToken;  // 2 or 4
  constexpr int kGroupTokens = kPage / kTokenGroups; // 64 or 32 contiguous tokens per lane group
  constexpr int kChunks = kGroupTokens / 32;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  constexpr float kNegInf = -INFINITY;
  static_assert(kGroupTokens % 32 == 0, "chunks of 32 tokens");
  constexpr int kLevels = kLanesPerToken == 16 ? 4 : 3;  // log2(kLanesPerToken)
  static_assert((1 << kLevels) == kLanesPerToken && 4 * kGroupTile == 16, "butterfly levels");

  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem + L::kQ);
  float* mid_s = reinterpret_cast<float*>(smem + L::kKeyMid);
  float* half_s = reinterpret_cast<float*>(smem + L::kKeyHalf);
  float* cbk_s = reinterpret_cast<float*>(smem + L::kCodebook);
  float* cbv_s = cbk_s + 16;
  float* invf_s = reinterpret_cast<float*>(smem + L::kInvFreq);
  float* state_m = reinterpret_cast<float*>(smem + L::kStateM);
  float* state_l = reinterpret_cast<float*>(smem + L::kStateL);

  const int n_out = p.kv.n_value_outliers;
  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.n_group_tiles;
  const int g0 = (blockIdx.y % p.n_group_tiles) * kGroupTile;
  const int request = blockIdx.z;
  const int n_group = min(kGroupTile, p.group - g0);
  const int first_head = kv_head * p.group + g0;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  unsigned char* wbase = smem + L::kWarpBase + warp * L::WarpBytes(n_out);
  float* scores_s = reinterpret_cast<float*>(wbase + L::kScores);
  float4* corr_s = reinterpret_cast<float4*>(wbase + L::kCorr);
  float* alpha_s = reinterpret_cast<float*>(wbase + L::kAlpha);

  for (int i = threadIdx.x; i < kGroupTile * HEAD_DIM; i += kThreads) {
    const int g = i / HEAD_DIM;
    q_s[i] = g < n_group ? p.q[static_cast<int64_t>(request) * p.q_stride + (first_head + g) * HEAD_DIM +
                               i % HEAD_DIM] * p.scale_log2
                         : 0.0f;
  }
  for (int c = threadIdx.x; c < HEAD_DIM; c += kThreads) {
    const float lo = p.kv.key_low[kv_head * HEAD_DIM + c];
    const float hi = p.kv.key_high[kv_head * HEAD_DIM + c];
    const float half = (hi - lo) * 0.5f;
    mid_s[c] = lo + half;
    half_s[c] = half;
    if constexpr (kMma) {  // fp16 into the key pair table: uint4 j holds halves {h, h, m, m, h', h', m', m'}
      __half* pairs = reinterpret_cast<__half*>(smem + L::kKeyPairs) + ((c % kHalf) >> 1) * 8 + (c >= kHalf) * 4 + (c & 1);
      pairs[0] = __float2half_rn(half);
      pairs[2] = __float2half_rn(lo + half);
    }
  }
  if (threadIdx.x < (1 << BITS)) {
    cbk_s[threadIdx.x] = p.kv.key_codebook[threadIdx.x];
    cbv_s[threadIdx.x] = p.kv.value_codebook[threadIdx.x];
  }
  for (int i = threadIdx.x; i < kHalf; i += kThreads) {
    invf_s[i] = p.kv.inv_freq[i];
    double sn, cs;
    sincos(static_cast<double>(kWarps * kPage) * static_cast<double>(p.kv.inv_freq[i]), &sn, &cs);
    reinterpret_cast<double2*>(smem + L::kAnchorStep)[i] = make_double2(cs, sn);
  }
  __syncthreads();

  const int sink_len = p.kv.sink_lens[request];
  const int64_t quantized_len = p.kv.quantized_lens[request];
  const int residual_len = p.kv.residual_lens[request];
  const int64_t start_position = p.kv.start_positions[request];
  const int64_t slot = p.kv.slots != nullptr ? p.kv.slots[request] : request;
  const int64_t stream = slot * p.n_kv_heads + kv_head;

  float m[kGroupTile], l[kGroupTile];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  // This lane's output channels and their accumulators, written to the combine state at the end.
  float* state_acc = reinterpret_cast<float*>(smem + L::kWarpBase);  // valid after the last barrier

  if (split < p.num_splits) {
    // ---- quantized pages ----
    const int kg = lane % kLanesPerToken;  // channel group
    const int tg = lane / kLanesPerToken;  // token group
    float qr[kGroupTile][8], mid[8], half[8], step_c[4], step_s[4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = (j < 4) ? kg + kLanesPerToken * j : kHalf + kg + kLanesPerToken * (j - 4);
      mid[j] = mid_s[c];
      half[j] = half_s[c];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) qr[g][j] = q_s[g * HEAD_DIM + c];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) RopeAngle(1, invf_s[kg + kLanesPerToken * j], &step_c[j], &step_s[j]);
    float acc[kGroupTile][8], beta[kGroupTile];
    float oacc[HEAD_DIM / 16][4];  // kvq3: O^T fragments (MmaValues)
#pragma unroll
    for (int mt = 0; mt < HEAD_DIM / 16; ++mt)
#pragma unroll
      for (int k = 0; k < 4; ++k) oacc[mt][k] = 0.0f;
    HalfLut klut{}, vlut{};
    if constexpr (kMma) {
      klut = MakeHalfLut(cbk_s);
      vlut = MakeHalfLut(cbv_s);
    }
    const int mq = lane & 3;  // kvq3: this lane's head columns 2 mq, 2 mq + 1 (heads < 4 when mq < 2)
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      beta[g] = 0.0f;
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[g][c] = 0.0f;
    }

    const int64_t total_pages = (quantized_len + kPage - 1) / kPage;
    const int64_t page_begin = static_cast<int64_t>(split) * p.split_pages;
    const int64_t page_end = min(total_pages, page_begin + p.split_pages);
    const uint32_t* kcodes = reinterpret_cast<const uint32_t*>(wbase + L::kKeyCodes);
    const uint32_t* vcodes = reinterpret_cast<const uint32_t*>(wbase + L::kValueCodes);
    const __half* low_s = reinterpret_cast<const __half*>(wbase + L::kLow);
    const __half* high_s = reinterpret_cast<const __half*>(wbase + L::kHigh);
    const uint8_t* count_s = wbase + L::kCount;
    const uint8_t* och_s = wbase + L::kOutlierChannel;
    const __half* oval_s = reinterpret_cast<const __half*>(wbase + L::OutlierValue(n_out));
    float2* anchor_s = reinterpret_cast<float2*>(wbase + L::kAnchor);
    float2* qpairs_s = reinterpret_cast<float2*>(wbase + L::kQueryPairs);
    for (int c = lane; c < HEAD_DIM; c += 32) corr_s[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    // Software pipeline over the warp's pages with one staging area: the key group (key codes, outlier
    // counts) of the next page loads while this page's softmax and values run, and the value group
    // (value codes, thresholds, outliers) of the next page while its keys run. Every stage commits one
    // group (possibly empty), so "wait until one group is pending" always means "this stage's data".
    auto page_head = [&](int64_t pg) -> int64_t {
      const int64_t phys = p.kv.page_table[slot * p.kv.pages_per_request + pg];
      return phys * p.n_kv_heads + kv_head;
    };
    auto outlier_index = [&](int64_t v) -> int64_t {
      return KvqKeyOutlierIndex(v, p.kv.page_table + slot * p.kv.pages_per_request, p.kv.key_outlier_segments,
                                p.n_kv_heads, kv_head, p.kv.key_outlier_segment_shift);
    };
    auto stage_keys = [&](int64_t pg) {
      if (pg < page_end) {
        const int64_t ph = page_head(pg);
        StageAsync(wbase + L::kKeyCodes, p.kv.key_codes + ph * L::kCodeBytes, L::kCodeBytes, lane);
        StageAsync(wbase + L::kCount, p.kv.key_outlier_count + ph * kPage, kPage, lane);
      }
      CpAsyncCommit();
    };
    auto stage_values = [&](int64_t pg) {
      if (pg < page_end) {
        const int64_t ph = page_head(pg);
        StageAsync(wbase + L::kValueCodes, p.kv.value_codes + ph * L::kCodeBytes, L::kCodeBytes, lane);
        StageAsync(wbase + L::kLow, p.kv.value_low + ph * kPage, 2 * kPage, lane);
        StageAsync(wbase + L::kHigh, p.kv.value_high + ph * kPage, 2 * kPage, lane);
        if (n_out > 0) {
          StageAsync(wbase + L::kOutlierChannel, p.kv.value_outlier_channel + ph * kPage * n_out, kPage * n_out,
                     lane);
          StageAsync(wbase + L::OutlierValue(n_out), p.kv.value_outlier_value + ph * kPage * n_out,
                     2 * kPage * n_out, lane);
        }
      }
      CpAsyncCommit();
    };
    stage_keys(page_begin + warp);
    stage_values(page_begin + warp);
    // The pages' RoPE anchors cos/sin(position0 * f_i) in double: the warp's first page's from sincos, each
    // next one (kWarps pages on) by the angle addition formula in double (4 roundings of 1e-16 a page,
    // where a sincos per frequency and page cost 2.4% of the kernel's instructions).
    double2* anchor_exact = reinterpret_cast<double2*>(wbase + L::kAnchorExact);
    if (page_begin + warp < page_end) {
      for (int i = lane; i < kHalf; i += 32) {
        double sn, cs;
        sincos(static_cast<double>(start_position + sink_len + (page_begin + warp) * kPage) * static_cast<double>(invf_s[i]),
               &sn, &cs);
        anchor_exact[i] = make_double2(cs, sn);
      }
    }

    for (int64_t pg = page_begin + warp; pg < page_end; pg += kWarps) {
      const int64_t ph = page_head(pg);
      const int n_valid = static_cast<int>(min(static_cast<int64_t>(kPage), quantized_len - pg * kPage));
      const int64_t outlier_base = p.kv.key_outlier_offset[ph];

      // A. The page's RoPE anchor: cos/sin(position0 * f_i) in double (the angles reach ~1e6 rad; the CPU
      // twin takes every angle in double), rounded to fp32, then stepped to the warp's next page. Token t
      // of the page then only needs the small angle t f_i (SmallAngle) and the angle addition formula in
      // fp32 (AddAngle): < 4e-7 absolute in cos and sin, against the test's 2e-5 relative bound on the scores.
      for (int i = lane; i < kHalf; i += 32) {
        const double2 a = anchor_exact[i], st = reinterpret_cast<const double2*>(smem + L::kAnchorStep)[i];
        anchor_s[i] = make_float2(static_cast<float>(a.x), static_cast<float>(a.y));
        anchor_exact[i] = make_double2(fma(a.x, st.x, -a.y * st.y), fma(a.y, st.x, a.x * st.y));
      }
      CpAsyncWait<1>();  // this page's key group
      __syncwarp();

      // Key outliers of this lane's tokens 4 * lane .. 4 * lane + 3: the first one of each token is
      // loaded now, so its latency hides behind the dense scores.
      int counts[4], local = 0;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        counts[u] = (4 * lane + u < n_valid) ? count_s[4 * lane + u] : 0;
        local += counts[u];
      }
      const int incl = WarpInclusiveSum(local);
      const int64_t lane_first = outlier_base + (incl - local);
      int first_ch[4];
      uint16_t first_val[4];
      {
        int64_t idx = lane_first;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t at = counts[u] > 0 ? outlier_index(idx) : 0;
          first_ch[u] = counts[u] > 0 ? p.kv.key_outlier_channel[at] : 0;
          first_val[u] = counts[u] > 0 ? p.kv.key_outlier_value[at] : 0;
          idx += counts[u];
        }
      }

      if constexpr (kMma) {
        MmaKeyScores<HEAD_DIM>(kcodes, q_s, anchor_s, reinterpret_cast<const uint4*>(smem + L::kKeyPairs),
                               p.kv.rope_table, klut, n_group, lane, scores_s, qpairs_s);
      } else {
        // B. Dense key scores of this lane group's tokens, 32 at a time, four tokens per reduction: the
        // lanes of a token exchange halves of their 16 partial sums (4 tokens x 4 query heads) at each
        // butterfly level, so a lane ends with 16 / kLanesPerToken finished scores.
  #pragma unroll 1
        for (int chunk = 0; chunk < kChunks; ++chunk) {
          const int t0 = tg * kGroupTokens + chunk * 32;
          uint32_t words[8][BITS + 1];
  #pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int c = (j < 4) ? kg + kLanesPerToken * j : kHalf + kg + kLanesPerToken * (j - 4);
            // Channel c's 128 codes are 4 * BITS words; tokens t0 .. t0 + 31 are BITS of them.
  #pragma unroll
            for (int w = 0; w < BITS; ++w) words[j][w] = kcodes[c * 4 * BITS + (t0 / 32) * BITS + w];
            words[j][BITS] = 0;
          }
          float cs[4], sn[4];
  #pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int i = kg + kLanesPerToken * j;
            float tc, ts;
            SmallAngle(t0, invf_s[i], &tc, &ts);
            AddAngle(anchor_s[i], tc, ts, &cs[j], &sn[j]);
          }
  #pragma unroll
          for (int tq = 0; tq < 8; ++tq) {
            float s[4 * kGroupTile];
  #pragma unroll
            for (int v = 0; v < 4 * kGroupTile; ++v) s[v] = 0.0f;
  #pragma unroll
            for (int tt = 0; tt < 4; ++tt) {
              const int t = 4 * tq + tt;
  #pragma unroll
              for (int j = 0; j < 4; ++j) {
                const int bit = t * BITS;
                const uint32_t ca = __funnelshift_r(words[j][bit >> 5], words[j][(bit >> 5) + 1], bit & 31) & kMask;
                const uint32_t cb = __funnelshift_r(words[j + 4][bit >> 5], words[j + 4][(bit >> 5) + 1], bit & 31) & kMask;
                const float a = fmaf(half[j], cbk_s[ca], mid[j]);
                const float b = fmaf(half[j + 4], cbk_s[cb], mid[j + 4]);
                const float ra = a * cs[j] - b * sn[j];
                const float rb = b * cs[j] + a * sn[j];
  #pragma unroll
                for (int g = 0; g < kGroupTile; ++g)
                  s[tt * kGroupTile + g] = fmaf(qr[g][j], ra, fmaf(qr[g][j + 4], rb, s[tt * kGroupTile + g]));
                const float nc = cs[j] * step_c[j] - sn[j] * step_s[j];
                sn[j] = sn[j] * step_c[j] + cs[j] * step_s[j];
                cs[j] = nc;
              }
            }
            // Transposing butterfly over the kLanesPerToken lanes of a token (xor offsets below 16). Each
            // level is its own loop with a constant trip count, so s stays in registers.
            {
              const bool up1 = (lane & (kLanesPerToken / 2)) != 0;
  #pragma unroll
              for (int k = 0; k < 8; ++k) {
                const float send = up1 ? s[k] : s[k + 8];
                s[k] = (up1 ? s[k + 8] : s[k]) + __shfl_xor_sync(0xffffffffu, send, kLanesPerToken / 2);
              }
              const bool up2 = (lane & (kLanesPerToken / 4)) != 0;
  #pragma unroll
              for (int k = 0; k < 4; ++k) {
                const float send = up2 ? s[k] : s[k + 4];
                s[k] = (up2 ? s[k + 4] : s[k]) + __shfl_xor_sync(0xffffffffu, send, kLanesPerToken / 4);
              }
              const bool up3 = (lane & (kLanesPerToken / 8)) != 0;
  #pragma unroll
              for (int k = 0; k < 2; ++k) {
                const float send = up3 ? s[k] : s[k + 2];
                s[k] = (up3 ? s[k + 2] : s[k]) + __shfl_xor_sync(0xffffffffu, send, kLanesPerToken / 8);
              }
              if constexpr (kLevels == 4) {
                const bool up4 = (lane & 1) != 0;
                const float send = up4 ? s[0] : s[1];
                s[0] = (up4 ? s[1] : s[0]) + __shfl_xor_sync(0xffffffffu, send, 1);
              }
            }
            // Lane kg holds entries kg * kPer .. of the 16 (token-major, then query head).
            constexpr int kPer = 4 * kGroupTile / kLanesPerToken;
  #pragma unroll
            for (int k = 0; k < kPer; ++k) scores_s[ScoreIndex(t0 + 4 * tq) + kg * kPer + k] = s[k];
          }
        }
      }
      __syncwarp();

      // C. Key outliers of this lane's tokens: a stored outlier replaces the pre-RoPE key value, so the score
      // changes by (outlier - dequantized) times the query rotated back at that channel. kvq3 takes the
      // query pair rotated back by the page's first position (qpairs_s) and the fp16 factors of the token's
      // page offset, as its dense scores do; bits 2 and 4 take the whole angle in fp32 (page anchor plus
      // tok f_i). The changes stay in registers: D reads the same lane's tokens.
      float score_delta[4][kGroupTile];
      {
        // Token u's outlier (channel, value) scaled by `weight` (0 or 1) into score_delta[u].
        const auto add_key_outlier = [&](int u, int ch, uint16_t value_bits, float weight) {
          const int tok = 4 * lane + u;
          const uint32_t code = CodeAt<BITS>(kcodes, ch * kPage + tok);
          const float delta =
              weight * (__half2float(__ushort_as_half(value_bits)) - fmaf(half_s[ch], cbk_s[code], mid_s[ch]));
          const int i = ch % kHalf;
          if constexpr (kMma) {
            const uint2 f = __ldg(p.kv.rope_table + RopeTableIndexOf(tok, i >> 1));
            const __half2 c2 = AsHalf2(f.x), s2 = AsHalf2(f.y);
            const float c = (i & 1) ? __high2float(c2) : __low2float(c2);
            const float s = (i & 1) ? __high2float(s2) : __low2float(s2);
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
              const float2 qp = qpairs_s[g * kHalf + i];
              const float w = ch < kHalf ? fmaf(qp.x, c, qp.y * s) : fmaf(qp.y, c, -qp.x * s);
              score_delta[u][g] = fmaf(delta, w, score_delta[u][g]);
            }
          } else {
            float tc, ts, c, s;
            SmallAngle(tok, invf_s[i], &tc, &ts);
            AddAngle(anchor_s[i], tc, ts, &c, &s);
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
              const float qa = q_s[g * HEAD_DIM + i], qb = q_s[g * HEAD_DIM + i + kHalf];
              const float w = ch < kHalf ? qa * c + qb * s : qb * c - qa * s;
              score_delta[u][g] = fmaf(delta, w, score_delta[u][g]);
            }
          }
        };
        // Each token's first outlier (prefetched) without branches, the four tokens independent of each
        // other; a token without one adds zero.
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int g = 0; g < kGroupTile; ++g) score_delta[u][g] = 0.0f;
          add_key_outlier(u, first_ch[u], first_val[u], counts[u] > 0 ? 1.0f : 0.0f);
        }
        // The rest (real text: about a third of the tokens have more than one).
        int64_t idx = lane_first;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          for (int e = 1; e < counts[u]; ++e) {
            const int64_t at = outlier_index(idx + e);
            add_key_outlier(u, p.kv.key_outlier_channel[at], p.kv.key_outlier_value[at], 1.0f);
          }
          idx += counts[u];
        }
      }
      __syncwarp();
      stage_keys(pg + kWarps);  // the key codes and counts of this page are consumed

      CpAsyncWait<1>();  // this page's value group
      __syncwarp();

      // D. Online softmax over the page (log2 domain). Each lane also takes its tokens' value terms:
      // alpha = p * half for E, and the channel-independent p * (low + half) into beta.
      float4 sv[4];           // p of this lane's tokens 4 * lane + u, per head
      float low[4], half_range[4];
      float corr[kGroupTile];
      {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          sv[u] = make_float4(kNegInf, kNegInf, kNegInf, kNegInf);
          if (4 * lane + u < n_valid) {
            const float4 x = *reinterpret_cast<const float4*>(scores_s + ScoreIndex(4 * lane + u));
            sv[u] = make_float4(x.x + score_delta[u][0], x.y + score_delta[u][1], x.z + score_delta[u][2],
                                x.w + score_delta[u][3]);
          }
        }
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          float page_max = kNegInf;
#pragma unroll
          for (int u = 0; u < 4; ++u) page_max = fmaxf(page_max, reinterpret_cast<const float*>(&sv[u])[g]);
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) page_max = fmaxf(page_max, __shfl_xor_sync(0xffffffffu, page_max, off));
          const float new_max = fmaxf(m[g], page_max);  // finite: the page has a valid token
          corr[g] = exp2f(m[g] - new_max);
          float sum = 0.0f;
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            float* x = reinterpret_cast<float*>(&sv[u]) + g;
            *x = exp2f(*x - new_max);
            sum += *x;
          }
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
          l[g] = l[g] * corr[g] + sum;
          m[g] = new_max;
          beta[g] *= corr[g];
          if constexpr (!kMma) {
#pragma unroll
            for (int c = 0; c < 8; ++c) acc[g][c] *= corr[g];
          }
        }
        if constexpr (kMma) {
          const float ce = mq == 0 ? corr[0] : corr[2], co = mq == 0 ? corr[1] : corr[3];
#pragma unroll
          for (int mt = 0; mt < HEAD_DIM / 16; ++mt) {
            oacc[mt][0] *= ce;
            oacc[mt][1] *= co;
            oacc[mt][2] *= ce;
            oacc[mt][3] *= co;
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int tok = 4 * lane + u;
          float4 al = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          low[u] = 0.0f;
          half_range[u] = 0.0f;
          if (tok < n_valid) {
            low[u] = __half2float(low_s[tok]);
            half_range[u] = (__half2float(high_s[tok]) - low[u]) * 0.5f;
            const float hh = half_range[u], base = low[u] + hh;
            al = make_float4(sv[u].x * hh, sv[u].y * hh, sv[u].z * hh, sv[u].w * hh);
            beta[0] = fmaf(sv[u].x, base, beta[0]);
            beta[1] = fmaf(sv[u].y, base, beta[1]);
            beta[2] = fmaf(sv[u].z, base, beta[2]);
            beta[3] = fmaf(sv[u].w, base, beta[3]);
          }
          if constexpr (!kMma) reinterpret_cast<float4*>(alpha_s)[tok] = al;
        }
        if constexpr (kMma) {  // fp16 p * half [4][128] for MmaValues
          __half* p16 = reinterpret_cast<__half*>(wbase + L::kProbs);
#pragma unroll
          for (int g = 0; g < kGroupTile; ++g) {
            const float* f = reinterpret_cast<const float*>(sv) + g;
            reinterpret_cast<uint2*>(p16 + g * kProbsStride)[lane] =
                make_uint2(PackPair<__half>(f[0] * half_range[0], f[4] * half_range[1]),
                           PackPair<__half>(f[8] * half_range[2], f[12] * half_range[3]));
          }
        }
      }

      // F. Value outliers of this lane's tokens: p * (outlier - dequantized) into the warp's correction
      // rows, which are scaled with the accumulators (when the running maximum moved) and added to them
      // after the last page. The page's score area, read by now, holds AddValueCorrections' tags.
      if (n_out > 0) {
        if (corr[0] != 1.0f || corr[1] != 1.0f || corr[2] != 1.0f || corr[3] != 1.0f) {  // the same on every lane
          for (int c = lane; c < HEAD_DIM; c += 32) {
            const float4 x = corr_s[c];
            corr_s[c] = make_float4(x.x * corr[0], x.y * corr[1], x.z * corr[2], x.w * corr[3]);
          }
        }
        for (int k = 0; k < n_out; ++k) {
          int ch[4];
          float4 add[4];
          bool valid[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int tok = 4 * lane + u;
            valid[u] = tok < n_valid;
            ch[u] = valid[u] ? och_s[tok * n_out + k] : 0;
            const uint32_t code = CodeAt<BITS>(vcodes, tok * HEAD_DIM + ch[u]);
            const float delta = valid[u] ? __half2float(oval_s[tok * n_out + k]) -
                                               fmaf(cbv_s[code], half_range[u], low[u] + half_range[u])
                                         : 0.0f;
            add[u] = make_float4(sv[u].x * delta, sv[u].y * delta, sv[u].z * delta, sv[u].w * delta);
          }
          __syncwarp();
          AddValueCorrections(corr_s, reinterpret_cast<int*>(scores_s), ch, add, valid, lane);
        }
      }
      __syncwarp();

      // E. Values: lane owns channels 8 * kg .. 8 * kg + 7 of its token group's tokens.
      if constexpr (kMma) {
        MmaValues<HEAD_DIM>(vcodes, reinterpret_cast<const __half*>(wbase + L::kProbs), vlut, lane, oacc);
      } else {
        const int t_begin = tg * kGroupTokens;
        const int t_end = min(t_begin + kGroupTokens, n_valid);
#pragma unroll 4
        for (int tok = t_begin; tok < t_end; ++tok) {
          const float4 al = reinterpret_cast<const float4*>(alpha_s)[tok];
          const float alpha[kGroupTile] = {al.x, al.y, al.z, al.w};
          const int bit = (tok * (HEAD_DIM / 8) + kg) * 8 * BITS;
          const uint32_t packed = __funnelshift_r(vcodes[bit >> 5], vcodes[(bit >> 5) + 1], bit & 31);
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            const float u = cbv_s[(packed >> (BITS * c)) & kMask];
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) acc[g][c] = fmaf(alpha[g], u, acc[g][c]);
          }
        }
      }
      __syncwarp();
      stage_values(pg + kWarps);  // the value group of this page is consumed
    }
    CpAsyncWait<0>();
    // The value outlier corrections into the accumulators (the rows are this warp's own).
    if (n_out > 0) {
      __syncwarp();
      if constexpr (kMma) {
        if (mq < 2) {
#pragma unroll
          for (int mt = 0; mt < HEAD_DIM / 16; ++mt) {
            const float2 a = reinterpret_cast<const float2*>(corr_s + ValueChannel<HEAD_DIM>(lane >> 2, mt, 0))[mq];
            const float2 b = reinterpret_cast<const float2*>(corr_s + ValueChannel<HEAD_DIM>(lane >> 2, mt, 1))[mq];
            oacc[mt][0] += a.x;
            oacc[mt][1] += a.y;
            oacc[mt][2] += b.x;
            oacc[mt][3] += b.y;
          }
        }
      } else if (tg == 0) {
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const float4 x = corr_s[8 * kg + c];
          acc[0][c] += x.x;
          acc[1][c] += x.y;
          acc[2][c] += x.z;
          acc[3][c] += x.w;
        }
      }
    }

    // The warp's state: sum the token groups' accumulators, plus the token-independent part (every lane
    // holds that of its own tokens).
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) beta[g] += __shfl_xor_sync(0xffffffffu, beta[g], off);
      if constexpr (!kMma) {
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          float x = acc[g][c];
#pragma unroll
          for (int off = kLanesPerToken; off < 32; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
          acc[g][c] = x + beta[g];
        }
      }
    }
    __syncthreads();  // every warp is done with its staging area, which the combine state reuses
    if constexpr (kMma) {
      if (mq < 2) {
        const float be = mq == 0 ? beta[0] : beta[2], bo = mq == 0 ? beta[1] : beta[3];
        float* even = &state_acc[(warp * kGroupTile + 2 * mq) * HEAD_DIM];
        float* odd = even + HEAD_DIM;
#pragma unroll
        for (int mt = 0; mt < HEAD_DIM / 16; ++mt) {
          const int ch = ValueChannel<HEAD_DIM>(lane >> 2, mt, 0), ch2 = ValueChannel<HEAD_DIM>(lane >> 2, mt, 1);
          even[ch] = oacc[mt][0] + be;
          odd[ch] = oacc[mt][1] + bo;
          even[ch2] = oacc[mt][2] + be;
          odd[ch2] = oacc[mt][3] + bo;
        }
      }
    } else if (tg == 0) {
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        float4* dst = reinterpret_cast<float4*>(&state_acc[(warp * kGroupTile + g) * HEAD_DIM + 8 * kg]);
        dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
        dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
      }
    }
  } else {
    // ---- fp16 tokens: the sink (after RoPE) and the residual (pre-RoPE, rotated here) ----
    constexpr int kPairs = kHalf / 32;  // RoPE pairs per lane: i = lane + 32 j
    float acc[kGroupTile][2 * kPairs];
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
      for (int c = 0; c < 2 * kPairs; ++c) acc[g][c] = 0.0f;
    const int n_fp = sink_len + residual_len;
    for (int f = warp; f < n_fp; f += kWarps) {
      const bool in_sink = f < sink_len;
      const int64_t row = in_sink ? (stream * p.kv.max_sink + f) * HEAD_DIM
                                  : (stream * p.kv.max_residual + ResidualIndex(p.kv, quantized_len, f - sink_len)) * HEAD_DIM;
      const uint16_t* kp = (in_sink ? p.kv.sink_k : p.kv.residual_k) + row;
      const uint16_t* vp = (in_sink ? p.kv.sink_v : p.kv.residual_v) + row;
      const int64_t position = start_position + (in_sink ? f : sink_len + quantized_len + (f - sink_len));
      float s[kGroupTile];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) s[g] = 0.0f;
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int i = lane + 32 * j;
        float a = __half2float(__ushort_as_half(kp[i]));
        float b = __half2float(__ushort_as_half(kp[i + kHalf]));
        if (!in_sink) {
          float c, sn;
          RopeAngle(position, invf_s[i], &c, &sn);
          const float ra = a * c - b * sn;
          b = b * c + a * sn;
          a = ra;
        }
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g)
          s[g] = fmaf(q_s[g * HEAD_DIM + i], a, fmaf(q_s[g * HEAD_DIM + i + kHalf], b, s[g]));
      }
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s[g] += __shfl_xor_sync(0xffffffffu, s[g], off);
        const float new_max = fmaxf(m[g], s[g]);
        const float corr = exp2f(m[g] - new_max);
        const float pr = exp2f(s[g] - new_max);
        l[g] = l[g] * corr + pr;
        m[g] = new_max;
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
          const int i = lane + 32 * j;
          acc[g][2 * j] = fmaf(pr, __half2float(__ushort_as_half(vp[i])), acc[g][2 * j] * corr);
          acc[g][2 * j + 1] = fmaf(pr, __half2float(__ushort_as_half(vp[i + kHalf])), acc[g][2 * j + 1] * corr);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g)
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int i = lane + 32 * j;
        state_acc[(warp * kGroupTile + g) * HEAD_DIM + i] = acc[g][2 * j];
        state_acc[(warp * kGroupTile + g) * HEAD_DIM + i + kHalf] = acc[g][2 * j + 1];
      }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      state_m[warp * kGroupTile + g] = m[g];
      state_l[warp * kGroupTile + g] = l[g];
    }
  }
  __syncthreads();

  // Combine the warps' softmax states; write this split's partial (natural-log lse).
  for (int idx = threadIdx.x; idx < n_group * HEAD_DIM; idx += kThreads) {
    const int g = idx / HEAD_DIM;
    const int c = idx % HEAD_DIM;
    float max_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_all = fmaxf(max_all, state_m[w * kGroupTile + g]);
    float total = 0.0f, value = 0.0f;
    if (max_all != kNegInf) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wt = exp2f(state_m[w * kGroupTile + g] - max_all);
        total = fmaf(state_l[w * kGroupTile + g], wt, total);
        value = fmaf(state_acc[(w * kGroupTile + g) * HEAD_DIM + c], wt, value);
      }
    }
    const int64_t row = static_cast<int64_t>(request) * p.n_heads + first_head + g;
    const int64_t out_row = static_cast<int64_t>(split) * p.rows + row;
    const bool empty = total == 0.0f;
    p.out[out_row * HEAD_DIM + c] = empty ? 0.0f : value / total;
    if (c == 0) p.lse[out_row] = empty ? kNegInf : (max_all + log2f(total)) * kLn2;
  }
}

absl::Status ValidateKvqDecode(const KvqDecodeAttentionArgs& a) {
  if (a.batch < 0 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: bad heads n_heads=", a.n_heads,
                                                   " n_kv_heads=", a.n_kv_heads, " batch=", a.batch));
  }
  if (a.batch > 65535) return absl::InvalidArgumentError("KvqDecodeAttentionCuda: batch over 65535");
  if (a.q_row_stride != 0 && a.q_row_stride < static_cast<int64_t>(a.n_heads) * a.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: q_row_stride ", a.q_row_stride,
                                                   " is below n_heads * head_dim"));
  }
  if (a.max_quantized_len < 0 || a.kv.pages_per_request * kPage < a.max_quantized_len) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: max_quantized_len ",
                                                   a.max_quantized_len, " exceeds pages_per_request * 128"));
  }
  if (a.kv.n_value_outliers < 0 || a.kv.n_value_outliers >= a.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: n_value_outliers ",
                                                   a.kv.n_value_outliers, " not in [0, head_dim)"));
  }
  if (a.kv.max_sink < 0 || a.kv.max_residual < 0) {
    return absl::InvalidArgumentError("KvqDecodeAttentionCuda: negative sink or residual capacity");
  }
  if (a.batch > 0) {
    const KvqStoreView& k = a.kv;
    if (a.q == nullptr || a.out == nullptr || a.lse == nullptr || k.sink_lens == nullptr ||
        k.quantized_lens == nullptr || k.residual_lens == nullptr || k.start_positions == nullptr ||
        k.key_low == nullptr || k.key_high == nullptr || k.key_codebook == nullptr ||
        k.value_codebook == nullptr || k.inv_freq == nullptr || a.workspace == nullptr) {
      return absl::InvalidArgumentError("KvqDecodeAttentionCuda: null pointer");
    }
    if (a.max_quantized_len > 0 &&
        (k.key_codes == nullptr || k.value_codes == nullptr || k.value_low == nullptr ||
         k.value_high == nullptr || k.key_outlier_count == nullptr || k.key_outlier_offset == nullptr ||
         k.page_table == nullptr ||
         (k.n_value_outliers > 0 && (k.value_outlier_channel == nullptr || k.value_outlier_value == nullptr)))) {
      return absl::InvalidArgumentError("KvqDecodeAttentionCuda: null page pointer");
    }
    if (k.key_outlier_segment_shift > 24 || (k.key_outlier_segment_shift >= 0 && k.key_outlier_segments == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: key_outlier_segment_shift ",
                                                     k.key_outlier_segment_shift,
                                                     " needs key_outlier_segments and is at most 24"));
    }
    if (a.max_quantized_len > 0 && k.bits == 3 && k.rope_table == nullptr) {
      return absl::InvalidArgumentError("KvqDecodeAttentionCuda: kvq3 needs rope_table (KvqRopeTable)");
    }
    if ((k.max_sink > 0 && (k.sink_k == nullptr || k.sink_v == nullptr)) ||
        (k.max_residual > 0 && (k.residual_k == nullptr || k.residual_v == nullptr))) {
      return absl::InvalidArgumentError("KvqDecodeAttentionCuda: null sink or residual pointer");
    }
  }
  return absl::OkStatus();
}

struct KvqPlan {
  int splits = 1;
  int64_t split_pages = 1;
};

// Minimises waves of blocks times pages per warp, plus a per-block setup cost of about a page.
KvqPlan PlanKvq(const KvqDecodeAttentionArgs& a, int blocks_per_sm, int sm_count) {
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t base = static_cast<int64_t>(a.batch) * a.n_kv_heads * CeilDiv(group, kGroupTile);
  const int64_t capacity = std::max<int64_t>(1, static_cast<int64_t>(blocks_per_sm) * sm_count);
  const int64_t pages = std::max<int64_t>(1, CeilDiv(a.max_quantized_len, kPage));
  int64_t limit = std::min<int64_t>(kMaxSplits, CeilDiv(pages, kMinPagesPerSplit));
  if (a.max_splits > 0) limit = std::min<int64_t>(limit, a.max_splits);
  const int64_t partial_bytes = static_cast<int64_t>(a.batch) * a.n_heads * (a.head_dim + 1) * 4;
  if (partial_bytes > 0) limit = std::min<int64_t>(limit, a.workspace_bytes / partial_bytes - 1);
  limit = std::max<int64_t>(limit, 1);
  KvqPlan best;
  double best_cost = -1.0;
  for (int64_t s = 1; s <= limit; ++s) {
    const int64_t chunk = CeilDiv(pages, s);
    if (s > 1 && (s - 1) * chunk >= pages) continue;
    const double waves = static_cast<double>(CeilDiv(base * s, capacity));
    const double cost = waves * (static_cast<double>(CeilDiv(chunk, kWarps)) + 1.0);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best.splits = static_cast<int>(s);
      best.split_pages = chunk;
    }
  }
  return best;
}

template <int HEAD_DIM, int BITS>
absl::Status LaunchKvq(const KvqDecodeAttentionArgs& a, cudaStream_t stream, int* splits_only) {
  auto kernel = KvqDecodeKernel<HEAD_DIM, BITS>;
  const int smem = Smem<HEAD_DIM, BITS>::Total(a.kv.n_value_outliers);
  CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int blocks_per_sm = 0;
  CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem));
  if (blocks_per_sm == 0) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: ", smem,
                                                   " bytes of shared memory per block do not fit"));
  }
  int device = 0, sm_count = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const KvqPlan plan = PlanKvq(a, blocks_per_sm, sm_count);
  if (splits_only != nullptr) {
    *splits_only = plan.splits;
    return absl::OkStatus();
  }
  if (a.batch == 0) return absl::OkStatus();
  const int64_t rows = static_cast<int64_t>(a.batch) * a.n_heads;
  if ((plan.splits + 1) * rows * (HEAD_DIM + 1) * 4 > a.workspace_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("KvqDecodeAttentionCuda: workspace of ", a.workspace_bytes,
                                                   " bytes is too small"));
  }
  KvqParams p;
  p.q = a.q;
  p.q_stride = a.q_row_stride != 0 ? a.q_row_stride : static_cast<int64_t>(a.n_heads) * a.head_dim;
  p.kv = a.kv;
  p.n_heads = a.n_heads;
  p.n_kv_heads = a.n_kv_heads;
  p.group = a.n_heads / a.n_kv_heads;
  p.n_group_tiles = static_cast<int>(CeilDiv(p.group, kGroupTile));
  p.scale_log2 = a.scale * kLog2e;
  p.split_pages = plan.split_pages;
  p.num_splits = a.max_quantized_len > 0 ? plan.splits : 0;
  p.rows = rows;
  p.out = static_cast<float*>(a.workspace);
  p.lse = p.out + static_cast<int64_t>(p.num_splits + 1) * rows * HEAD_DIM;
  const int64_t grid_y = static_cast<int64_t>(a.n_kv_heads) * p.n_group_tiles;
  if (grid_y > 65535) return absl::InvalidArgumentError("KvqDecodeAttentionCuda: too many KV heads");
  const dim3 grid(p.num_splits + 1, static_cast<unsigned>(grid_y), a.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return MergePartialsCuda(p.out, p.lse, p.num_splits + 1, rows, HEAD_DIM, a.out, a.lse, stream);
}

absl::Status DispatchKvq(const KvqDecodeAttentionArgs& a, cudaStream_t stream, int* splits_only) {
  if (absl::Status s = ValidateKvqDecode(a); !s.ok()) return s;
  return KV_DISPATCH_HEAD_DIM(a.head_dim, HEAD_DIM, {
    return KV_DISPATCH_KVQ_BITS(a.kv.bits, BITS, { return LaunchKvq<HEAD_DIM, BITS>(a, stream, splits_only); });
  });
}

}  // namespace

std::vector<uint2> KvqRopeTable(const std::vector<float>& inv_freq) {
  const int quads = static_cast<int>(inv_freq.size()) / 2;  // pair columns j; 4 per k-step
  std::vector<uint2> table(static_cast<size_t>(kPage) * quads);
  const auto pack = [](double lo, double hi) {
    return static_cast<uint32_t>(FloatToHalf(static_cast<float>(lo))) |
           (static_cast<uint32_t>(FloatToHalf(static_cast<float>(hi))) << 16);
  };
  for (int s = 0; s < quads / 4; ++s)
    for (int mt = 0; mt < 8; ++mt)
      for (int upper = 0; upper < 2; ++upper)
        for (int g = 0; g < 8; ++g)
          for (int q = 0; q < 4; ++q) {
            const int t = KeyToken(g, mt, upper), j = 4 * s + q;
            const double a0 = t * static_cast<double>(inv_freq[2 * j]), a1 = t * static_cast<double>(inv_freq[2 * j + 1]);
            table[RopeTableIndex(s, mt, upper, g, q)] =
                make_uint2(pack(std::cos(a0), std::cos(a1)), pack(std::sin(a0), std::sin(a1)));
          }
  return table;
}

int64_t KvqDecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim) {
  return static_cast<int64_t>(kMaxSplits + 1) * batch * n_heads * (head_dim + 1) * 4;
}

absl::Status KvqDecodeAttentionCuda(const KvqDecodeAttentionArgs& args, cudaStream_t stream) {
  return DispatchKvq(args, stream, nullptr);
}

int KvqDecodeAttentionSplits(const KvqDecodeAttentionArgs& args) {
  int splits = 0;
  if (!DispatchKvq(args, nullptr, &splits).ok()) return 0;
  return splits;
}

}  // namespace kvshard
