// Causal prefill attention of a chunk over one sequence of the paged kvq3 store, reading the packed pages
// directly (kvq_store.h, KvqPrefillAttentionCuda).
//
// A block owns 128 rows and one KV head; rows pack the query heads of the KV head's group as in
// prefill_attention.cu, and each of the eight warps owns 16 of them (prefill_tile.cuh's tensor-core step).
// Keys come in tiles of 64: first the quantized part, 64 tokens of a page at a time, then the fp16 sink and
// residual tokens gathered into tiles. The block turns each tile into fp16 K (rotated; channel-major, so a
// thread's 16 keys of a channel are two 16-byte stores) and V in shared memory itself, in a pipeline with
// one barrier per tile. In iteration j:
//   S (tile j + 4): cp.async stages the tile's key and value codes, value metadata and its page's key
//      outlier counts;
//   A (tile j + 2): writes the tile's key positions and RoPE anchors, and puts its key outliers (pre-RoPE
//      values; every warp a few tokens, a lane an outlier) into the tile's K buffer, marking them in a bit
//      mask per (channel, 16 tokens);
//   B (tile j + 1): dequantizes the staged codes: keys through a per-channel lookup table of the 8 fp16
//      values (codebook and calibrated thresholds), a marked outlier in place of its code, then rotated in
//      fp16 by factors stepped in fp32 from the anchor; values through the codebook and the per-token
//      range, their outliers written over them;
//   C (tile j): the MMAs and the online softmax of the eight warps.
// So a tile's K buffer lives three iterations (three buffers), its V buffer two, its staged data four.
// Doing the dequantization here instead of in a pass to global fp16 tiles saves their write and read, their
// scratch and the merges of the tiles' partials; but each block dequantizes the visible context once for
// its 128 rows, so a 512-token chunk of a group-4 model dequantizes it 16 times per KV head. On an H100 that
// makes it 0.55-0.75x the speed of the two-pass path (about 1,900 instructions per warp and tile, half of
// them the dequantization; two warps per scheduler do not hide their latencies). Sharing each dequantized
// tile across a cluster of blocks (distributed shared memory) is the way to remove the repeats.
#include <algorithm>
#include <climits>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/kvq_codes.cuh"
#include "kernels/cuda/kvq_store.h"
#include "kernels/cuda/kvq_tiles.cuh"
#include "kernels/cuda/prefill_tile.cuh"
#include "kernels/cuda/reduce.cuh"

namespace kvshard {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;
constexpr int kTile = kPrefillTileKeys;
constexpr int kTokenGroups = kTile / 16;  // a key work item covers 16 tokens of a channel pair
constexpr int64_t kNoPosition = LLONG_MAX;
constexpr int kStages = 4;  // staged tiles: B's, A's, one landed, one in flight

// Shared memory layout (bytes).
template <int HEAD_DIM>
struct PrefillSmem {
  static constexpr int kTileBytes = kTile * HEAD_DIM * 2;
  static constexpr int kKeyCodeBytes = HEAD_DIM * 24;            // two plane groups (32 tokens) per channel
  static constexpr int kValueCodeBytes = kTile * HEAD_DIM * 3 / 8;
  // Staged per quantized tile: key codes, value codes, value low / high (fp16), value outlier channels
  // and values (up to kKvqMaxValueOutliers per token).
  static constexpr int kStageKeyCodes = 0;
  static constexpr int kStageValueCodes = kStageKeyCodes + kKeyCodeBytes;
  static constexpr int kStageLow = kStageValueCodes + kValueCodeBytes;
  static constexpr int kStageHigh = kStageLow + kTile * 2;
  static constexpr int kStageOutlierChannel = kStageHigh + kTile * 2;
  static constexpr int kStageOutlierValue = kStageOutlierChannel + kTile * kKvqMaxValueOutliers;
  // The page's key outlier counts (all 128 tokens: a tile's tokens follow the page's earlier ones in the
  // list) and the page's first list entry.
  static constexpr int kStageKeyCounts = kStageOutlierValue + kTile * kKvqMaxValueOutliers * 2;
  static constexpr int kStageKeyStart = kStageKeyCounts + kKvqPageTokens;
  static constexpr int kStageBytes = kStageKeyStart + 16;
  static constexpr int kMaskWords = HEAD_DIM * kTokenGroups;

  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kRows * HEAD_DIM * 2;
  static constexpr int kV = kK + 3 * kTileBytes;
  static constexpr int kStage = kV + 2 * kTileBytes;
  static constexpr int kMask = kStage + kStages * kStageBytes;
  static constexpr int kAnchor = kMask + 3 * kMaskWords * 4;
  static constexpr int kPosition = kAnchor + 3 * (HEAD_DIM / 2) * 8;
  static constexpr int kBytes = kPosition + 3 * kTile * 8;
  static_assert(kStageBytes % 16 == 0 && kTileBytes % 16 == 0, "16-byte aligned areas");
};

struct PrefillParams {
  KvqPrefillArgs a;
  float scale_log2;
  int group;
  int64_t total_rows;
};

// The key work item of a thread: RoPE pair (c, c + HEAD_DIM / 2) of tokens 16 g .. 16 g + 15 of a tile.
// The value work item: channels 32 u .. 32 u + 31 of token t.
template <int HEAD_DIM>
struct WorkItems {
  static constexpr int kPairs = HEAD_DIM / 2;
  static constexpr int kKeyItems = kPairs * kTokenGroups;
  static constexpr int kValueItems = kTile * HEAD_DIM / 32;
  static_assert(kKeyItems + kValueItems <= 2 * kThreads, "two items a thread at most");
};

// 8-byte cp.async (the key codes of a tile are 24 bytes a channel, 8-byte aligned).
__device__ __forceinline__ void CpAsync8(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem));
}


template <int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 1) KvqPrefillKernel(const PrefillParams p) {
  using L = PrefillSmem<HEAD_DIM>;
  using W = WorkItems<HEAD_DIM>;
  constexpr int kHalf = HEAD_DIM / 2;
  extern __shared__ uint4 smem_raw[];
  char* smem = reinterpret_cast<char*>(smem_raw);
  __half* s_q = reinterpret_cast<__half*>(smem + L::kQ);
  const KvqPrefillArgs& a = p.a;
  const KvqStoreLayer& layer = a.layer;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int h = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kRows;  // longest rows first
  const int64_t last_row = min(row0 + kRows, p.total_rows) - 1;
  const int64_t first_pos = a.query_first_position + row0 / p.group;
  const int64_t last_pos = a.query_first_position + last_row / p.group;

  // The tiles: local tokens [0, visible) may be seen by a row of the block.
  const int64_t visible = max(int64_t{0}, min(a.length, last_pos - a.start_position + 1));
  const int64_t quantized_visible = max(int64_t{0}, min(a.quantized_end, visible) - a.sink);
  const int64_t sink_visible = min(a.sink, visible);
  const int64_t fp16_tokens = sink_visible + max(int64_t{0}, visible - a.quantized_end);
  const int n_quantized_tiles = static_cast<int>((quantized_visible + kTile - 1) / kTile);
  const int n_tiles = n_quantized_tiles + static_cast<int>((fp16_tokens + kTile - 1) / kTile);
  const int64_t stream = static_cast<int64_t>(a.slot) * a.n_kv_heads + h;
  constexpr int64_t kCodeBytes = 16 * 3 * HEAD_DIM;

  // Local token of entry i of the fp16 tiles: the sink, then the residual.
  auto fp16_local = [&](int64_t i) { return i < sink_visible ? i : a.quantized_end + (i - sink_visible); };
  auto page_head = [&](int tile) {
    return static_cast<int64_t>(a.page_table[(static_cast<int64_t>(tile) * kTile) / kKvqPageTokens]) * a.n_kv_heads + h;
  };

  LoadQueryTileAsync<HEAD_DIM, kRows, kThreads>(s_q, a.q, row0, p.total_rows, p.group, h, a.n_heads, tid);
  CpAsyncCommit();
  for (int i = tid; i < 3 * L::kMaskWords; i += kThreads) reinterpret_cast<uint32_t*>(smem + L::kMask)[i] = 0u;

  // This thread's key item (channel pair, token group) and its tables, fixed for the whole kernel.
  const bool has_key_item = tid < W::kKeyItems;
  const int key_c = tid % W::kPairs, key_g = tid / W::kPairs;
  HalfLut key_lut[2];
  float step_c = 1.0f, step_s = 0.0f, group_c = 1.0f, group_s = 0.0f, inv_freq = 0.0f;
  if (has_key_item) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int c = key_c + u * kHalf;
      const float lo = layer.key_low[h * HEAD_DIM + c], hi = layer.key_high[h * HEAD_DIM + c];
      float values[8];  // KvqKeyCodec::Decode's arithmetic, then fp16
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        values[k] = __fadd_rn(lo, __fmul_rn(__fmul_rn(__fadd_rn(layer.key_codebook[k], 1.0f), 0.5f), __fsub_rn(hi, lo)));
      }
      key_lut[u] = MakeHalfLut(values);
    }
    inv_freq = layer.inv_freq[key_c];
    SmallAngle(1, inv_freq, &step_c, &step_s);
    SmallAngle(16 * key_g, inv_freq, &group_c, &group_s);
  }
  const HalfLut value_lut = MakeHalfLut(layer.value_codebook);

  // ---- S: stage tile `tile`'s codes and value metadata (quantized tiles only) ----
  auto stage = [&](int tile) {
    if (tile >= n_quantized_tiles) return;
    char* s = smem + L::kStage + (tile % kStages) * L::kStageBytes;
    const int64_t ph = page_head(tile);
    const int half_page = static_cast<int>((static_cast<int64_t>(tile) * kTile) % kKvqPageTokens) / kTile;
    const char* kc = reinterpret_cast<const char*>(layer.key_codes + ph * kCodeBytes) + 24 * half_page;
    for (int i = tid; i < HEAD_DIM * 3; i += kThreads) {
      const int c = i / 3, w = i % 3;
      CpAsync8(s + L::kStageKeyCodes + c * 24 + w * 8, kc + c * 48 + w * 8);
    }
    const int64_t token0 = ph * kKvqPageTokens + half_page * kTile;  // the tile's first row of the page arrays
    const char* vc = reinterpret_cast<const char*>(layer.value_codes + ph * kCodeBytes) + half_page * L::kValueCodeBytes;
    for (int i = tid; i < L::kValueCodeBytes / 16; i += kThreads) CpAsync16(s + L::kStageValueCodes + 16 * i, vc + 16 * i, true);
    const int n_out = a.n_value_outliers;
    const int meta_chunks = kTile * 2 / 16;
    for (int i = tid; i < 2 * meta_chunks; i += kThreads) {
      const bool high = i >= meta_chunks;
      const int j = high ? i - meta_chunks : i;
      const uint16_t* src = (high ? layer.value_high : layer.value_low) + token0;
      CpAsync16(s + (high ? L::kStageHigh : L::kStageLow) + 16 * j, reinterpret_cast<const char*>(src) + 16 * j, true);
    }
    if (tid < kKvqPageTokens / 16) {
      CpAsync16(s + L::kStageKeyCounts + 16 * tid, layer.key_outlier_count + ph * kKvqPageTokens + 16 * tid, true);
    } else if (tid == kKvqPageTokens / 16) {
      CpAsync8(s + L::kStageKeyStart, layer.key_outlier_start + ph);
    }
    if (n_out > 0) {
      const int channel_chunks = kTile * n_out / 16, value_chunks = kTile * n_out * 2 / 16;
      for (int i = tid; i < channel_chunks + value_chunks; i += kThreads) {
        if (i < channel_chunks) {
          CpAsync16(s + L::kStageOutlierChannel + 16 * i, layer.value_outlier_channel + token0 * n_out + 16 * i, true);
        } else {
          const int j = i - channel_chunks;
          CpAsync16(s + L::kStageOutlierValue + 16 * j,
                    reinterpret_cast<const char*>(layer.value_outlier_value + token0 * n_out) + 16 * j, true);
        }
      }
    }
  };

  // Position of tile entry r (kNoPosition when absent) and the tile's last position.
  auto tile_tokens = [&](int tile) -> int64_t {
    if (tile < n_quantized_tiles) return min(static_cast<int64_t>(kTile), quantized_visible - static_cast<int64_t>(tile) * kTile);
    return min(static_cast<int64_t>(kTile), fp16_tokens - static_cast<int64_t>(tile - n_quantized_tiles) * kTile);
  };
  auto tile_position = [&](int tile, int64_t r) -> int64_t {
    if (tile < n_quantized_tiles) return a.start_position + a.sink + static_cast<int64_t>(tile) * kTile + r;
    return a.start_position + fp16_local(static_cast<int64_t>(tile - n_quantized_tiles) * kTile + r);
  };

  // ---- A: positions, anchors and key outliers of tile `tile` (its staging has landed) ----
  // The anchors cos/sin(position0 * f) of consecutive quantized tiles are stepped in double by 64 f from
  // the first tile's (one sincos per frequency, not one per tile).
  double anchor_c = 1.0, anchor_s = 0.0, tile_step_c = 1.0, tile_step_s = 0.0;
  if (tid < kHalf && n_quantized_tiles > 0) {
    const double f = layer.inv_freq[tid];
    sincos(static_cast<double>(tile_position(0, 0)) * f, &anchor_s, &anchor_c);
    sincos(static_cast<double>(kTile) * f, &tile_step_s, &tile_step_c);
  }
  auto prepare = [&](int tile) {
    const int buffer = tile % 3;
    const int64_t n = tile_tokens(tile);
    if (tid < kTile) {
      reinterpret_cast<int64_t*>(smem + L::kPosition)[buffer * kTile + tid] = tid < n ? tile_position(tile, tid) : kNoPosition;
    }
    if (tile >= n_quantized_tiles) return;
    if (tid < kHalf) {
      reinterpret_cast<float2*>(smem + L::kAnchor)[buffer * kHalf + tid] =
          make_float2(static_cast<float>(anchor_c), static_cast<float>(anchor_s));
      const double c = anchor_c * tile_step_c - anchor_s * tile_step_s;
      anchor_s = anchor_s * tile_step_c + anchor_c * tile_step_s;
      anchor_c = c;
    }
    // Key outliers: warp w takes tokens 8 w .. 8 w + 7 of the tile, a lane an outlier. A token's outliers
    // follow those of the page's earlier tokens in the stream's list.
    const char* st = smem + L::kStage + (tile % kStages) * L::kStageBytes;
    const uint8_t* counts = reinterpret_cast<const uint8_t*>(st + L::kStageKeyCounts);
    const int64_t page_first = *reinterpret_cast<const int64_t*>(st + L::kStageKeyStart);
    const int page_token0 = static_cast<int>((static_cast<int64_t>(tile) * kTile) % kKvqPageTokens);  // 0 or 64
    int four = 0;  // lane l: the page's tokens 4 l .. 4 l + 3, an exclusive scan over the lanes
#pragma unroll
    for (int k = 0; k < 4; ++k) four += counts[4 * lane + k];
    const int scan = WarpInclusiveSum(four) - four;
    // Lanes 0..8: the list place of the warp's token 8 w + lane (lane 8: the end of its last token).
    const int t_first = 8 * warp;  // tile token
    const int page_token = page_token0 + t_first + min(lane, 8);
    const int quad_scan = __shfl_sync(0xffffffffu, scan, min(page_token >> 2, 31));
    int place = quad_scan;
    for (int k = page_token & ~3; k < page_token; ++k) place += counts[k];
    const int page_total = __shfl_sync(0xffffffffu, scan + four, 31);
    if (page_token >= kKvqPageTokens) place = page_total;
    // Tokens past the visible quantized ones have no outliers here.
    const int valid_tokens = static_cast<int>(max(int64_t{0}, min(int64_t{8}, n - t_first)));
    int places[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) places[k] = __shfl_sync(0xffffffffu, place, k);
    const int end_place = __shfl_sync(0xffffffffu, place, valid_tokens);
    const int begin_place = places[0];
    __half* tile_k = reinterpret_cast<__half*>(smem + L::kK + buffer * L::kTileBytes);
    uint32_t* mask = reinterpret_cast<uint32_t*>(smem + L::kMask) + buffer * L::kMaskWords;
    for (int f = begin_place + lane; f < end_place; f += 32) {
      int i = 0;  // the token holding place f: the last of the warp's tokens starting at or before it
#pragma unroll
      for (int k = 1; k < 8; ++k) i = places[k] <= f ? k : i;
      const int t = t_first + i;
      const int64_t o = KvqKeyOutlierIndex(page_first + f, a.page_table, layer.key_outlier_segments, a.n_kv_heads, h,
                                           layer.key_outlier_segment_shift);
      const int ch = layer.key_outlier_channel[o];
      tile_k[TileOffset<kTile>(ch, t >> 3) + (t & 7)] = __ushort_as_half(layer.key_outlier_value[o]);
      atomicOr(mask + ch * kTokenGroups + (t >> 4), 1u << (t & 15));
    }
  };

  // ---- B: fp16 K (rotated) and V of tile `tile` in shared memory ----
  auto dequantize = [&](int tile) {
    const int buffer = tile % 3;
    __half* tile_k = reinterpret_cast<__half*>(smem + L::kK + buffer * L::kTileBytes);
    __half* tile_v = reinterpret_cast<__half*>(smem + L::kV + (tile & 1) * L::kTileBytes);
    const int n = static_cast<int>(tile_tokens(tile));
    const bool quantized = tile < n_quantized_tiles;
    const char* s = smem + L::kStage + (tile % kStages) * L::kStageBytes;
    for (int item = tid; item < W::kKeyItems + W::kValueItems; item += kThreads) {
      if (item < W::kKeyItems) {
        const int c = key_c, g = key_g;
        if (quantized) {
          const uint32_t* kc = reinterpret_cast<const uint32_t*>(s + L::kStageKeyCodes);
          uint32_t even[2], odd[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const uint32_t* group = kc + (c + u * kHalf) * 6 + 3 * (g >> 1);
            ThreeBitPlaneNibbles(group[g & 1], group[2], g & 1, &even[u], &odd[u]);
          }
          uint32_t* mask = reinterpret_cast<uint32_t*>(smem + L::kMask) + buffer * L::kMaskWords;
          const uint32_t marked[2] = {mask[c * kTokenGroups + g], mask[(c + kHalf) * kTokenGroups + g]};
          mask[c * kTokenGroups + g] = 0u;
          mask[(c + kHalf) * kTokenGroups + g] = 0u;
          // cos/sin of the group's first token: the tile anchor plus 16 g tokens, then stepped per token.
          uint32_t rotated[2][8];  // [channel c or c + half][tokens 16 g + {2 w, 2 w + 1}] as fp16x2
          float cs, sn;
          AddAngle(reinterpret_cast<const float2*>(smem + L::kAnchor)[buffer * kHalf + c], group_c, group_s, &cs, &sn);
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // tokens 16 g + 4 i .. + 3
            uint32_t x[2][2];            // [channel c or c + half][tokens {0, 1} or {2, 3}]
#pragma unroll
            for (int u = 0; u < 2; ++u) LutLookup(key_lut[u], JoinBytes(even[u], odd[u], i), &x[u][0], &x[u][1]);
            const int t0 = 16 * g + 4 * i;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const uint32_t bits = (marked[u] >> (4 * i)) & 0xFu;
              if (bits != 0u) {  // outliers replace the pre-RoPE value
                const int ch = c + u * kHalf;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                  if (bits & (1u << k)) {
                    const uint32_t v = __half_as_ushort(tile_k[TileOffset<kTile>(ch, (t0 + k) >> 3) + ((t0 + k) & 7)]);
                    uint32_t& w = x[u][k >> 1];
                    w = (k & 1) ? ((w & 0xFFFFu) | (v << 16)) : ((w & 0xFFFF0000u) | v);
                  }
                }
              }
            }
            float cos4[4], sin4[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              cos4[k] = cs;
              sin4[k] = sn;
              const float nc = fmaf(cs, step_c, -sn * step_s);
              sn = fmaf(sn, step_c, cs * step_s);
              cs = nc;
            }
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {
              const __half2 c2 = __floats2half2_rn(cos4[2 * pair], cos4[2 * pair + 1]);
              const __half2 s2 = __floats2half2_rn(sin4[2 * pair], sin4[2 * pair + 1]);
              RotateHalf2(AsHalf2(x[0][pair]), AsHalf2(x[1][pair]), make_uint2(AsWord(c2), AsWord(s2)),
                          &rotated[0][2 * i + pair], &rotated[1][2 * i + pair]);
            }
          }
          // Absent tokens (the tile's last, past n) hold zeros: their weight is 0, and NaN * 0 is not.
#pragma unroll
          for (int w = 0; w < 8; ++w) {
            const int t = 16 * g + 2 * w;
            const uint32_t keep = t + 1 < n ? 0xFFFFFFFFu : (t < n ? 0x0000FFFFu : 0u);
            rotated[0][w] &= keep;
            rotated[1][w] &= keep;
          }
#pragma unroll
          for (int u = 0; u < 2; ++u) {  // channel c + u * half: tokens 16 g .. 16 g + 15, two 16-byte chunks
            const int ch = c + u * kHalf;
            *reinterpret_cast<uint4*>(tile_k + TileOffset<kTile>(ch, 2 * g)) =
                make_uint4(rotated[u][0], rotated[u][1], rotated[u][2], rotated[u][3]);
            *reinterpret_cast<uint4*>(tile_k + TileOffset<kTile>(ch, 2 * g + 1)) =
                make_uint4(rotated[u][4], rotated[u][5], rotated[u][6], rotated[u][7]);
          }
        } else {  // fp16 tokens: the sink as stored (after RoPE), residual keys rotated here
#pragma unroll 4
          for (int k = 0; k < 16; ++k) {
            const int t = 16 * g + k;
            float k0 = 0.0f, k1 = 0.0f;
            if (t < n) {
              const int64_t local = fp16_local(static_cast<int64_t>(tile - n_quantized_tiles) * kTile + t);
              const uint16_t* row = local < a.sink
                                        ? layer.sink_k + (stream * layer.max_sink + local) * HEAD_DIM
                                        : layer.residual_k + (stream * layer.ring + (local - a.sink) % layer.ring) * HEAD_DIM;
              k0 = __half2float(__ushort_as_half(row[c]));
              k1 = __half2float(__ushort_as_half(row[c + kHalf]));
              if (local >= a.sink) RotatePair(&k0, &k1, a.start_position + local, inv_freq);
            }
            tile_k[TileOffset<kTile>(c, t >> 3) + (t & 7)] = __float2half_rn(k0);
            tile_k[TileOffset<kTile>(c + kHalf, t >> 3) + (t & 7)] = __float2half_rn(k1);
          }
        }
      } else {
        const int v_item = item - W::kKeyItems;
        const int t = v_item % kTile, u = v_item / kTile;  // token, 32-channel block
        if (t >= n) {
#pragma unroll
          for (int c8 = 0; c8 < 4; ++c8) *reinterpret_cast<uint4*>(tile_v + TileOffset<HEAD_DIM>(t, 4 * u + c8)) = make_uint4(0, 0, 0, 0);
          continue;
        }
        if (quantized) {
          const uint32_t* vc = reinterpret_cast<const uint32_t*>(s + L::kStageValueCodes);
          const float lo = __half2float(reinterpret_cast<const __half*>(s + L::kStageLow)[t]);
          const float hi = __half2float(reinterpret_cast<const __half*>(s + L::kStageHigh)[t]);
          // KvqValueCodec::Decode: lo + ((cb + 1) / 2) (hi - lo) = (lo + r) + r cb with r = (hi - lo) / 2.
          const float r = __fmul_rn(__fsub_rn(hi, lo), 0.5f);
          const __half2 r2 = __float2half2_rn(r), m2 = __float2half2_rn(__fadd_rn(lo, r));
#pragma unroll
          for (int hb = 0; hb < 2; ++hb) {
            const int index = t * HEAD_DIM + 32 * u + 16 * hb;  // code index in the tile's token-major codes
            const uint32_t* group = vc + (index / kPlaneGroupCodes) * 3;
            const int r16 = (index % kPlaneGroupCodes) >> 4;
            uint32_t even, odd;
            ThreeBitPlaneNibbles(group[r16], group[2], r16, &even, &odd);
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // channels 32 u + 16 hb + 4 i .. + 3
              uint32_t x01, x23;
              LutLookup(value_lut, JoinBytes(even, odd, i), &x01, &x23);
              const uint32_t y01 = AsWord(__hfma2(AsHalf2(x01), r2, m2)), y23 = AsWord(__hfma2(AsHalf2(x23), r2, m2));
              const int c = 32 * u + 16 * hb + 4 * i;
              *reinterpret_cast<uint2*>(tile_v + TileOffset<HEAD_DIM>(t, c >> 3) + (c & 7)) = make_uint2(y01, y23);
            }
          }
          const int n_out = a.n_value_outliers;
          const uint8_t* och = reinterpret_cast<const uint8_t*>(s + L::kStageOutlierChannel) + t * n_out;
          const __half* oval = reinterpret_cast<const __half*>(s + L::kStageOutlierValue) + t * n_out;
          for (int e = 0; e < n_out; ++e) {
            const int ch = och[e];
            if ((ch >> 5) == u) tile_v[TileOffset<HEAD_DIM>(t, ch >> 3) + (ch & 7)] = oval[e];
          }
        } else {
          const int64_t local = fp16_local(static_cast<int64_t>(tile - n_quantized_tiles) * kTile + t);
          const uint16_t* row = local < a.sink
                                    ? layer.sink_v + (stream * layer.max_sink + local) * HEAD_DIM
                                    : layer.residual_v + (stream * layer.ring + (local - a.sink) % layer.ring) * HEAD_DIM;
#pragma unroll
          for (int c8 = 0; c8 < 4; ++c8) {
            *reinterpret_cast<uint4*>(tile_v + TileOffset<HEAD_DIM>(t, 4 * u + c8)) =
                *reinterpret_cast<const uint4*>(row + 32 * u + 8 * c8);
          }
        }
      }
    }
  };

  const PrefillRowPositions pos = RowPositions(a.query_first_position, row0, p.group, warp, lane);
  PrefillRows<HEAD_DIM> rows;
  rows.Init();
  uint32_t q_frag[HEAD_DIM / 16][4];

  for (int j = -4; j < n_tiles; ++j) {
    if (j + 4 < n_tiles) stage(j + 4);
    CpAsyncCommit();  // one group per iteration, empty or not, so the wait below counts tiles
    if (j + 2 >= 0 && j + 2 < n_tiles) prepare(j + 2);
    if (j + 1 >= 0 && j + 1 < n_tiles) dequantize(j + 1);
    if (j >= 0) {
      if (j == 0) LoadQueryFragments<HEAD_DIM>(s_q, warp * 16, lane, q_frag);
      const int buffer = j % 3;
      const int64_t* positions = reinterpret_cast<const int64_t*>(smem + L::kPosition) + buffer * kTile;
      const int64_t last_key = tile_position(j, tile_tokens(j) - 1);
      const auto masked = [&](int key, int upper) { return positions[key] > (upper ? pos.b : pos.a); };
      PrefillTileStep<HEAD_DIM, __half, /*KEYS_BY_CHANNEL=*/true>(q_frag, reinterpret_cast<const __half*>(smem + L::kK + buffer * L::kTileBytes),
                                        reinterpret_cast<const __half*>(smem + L::kV + (j & 1) * L::kTileBytes),
                                        p.scale_log2, last_key > first_pos || tile_tokens(j) < kTile, masked, lane,
                                        rows);
    }
    CpAsyncWait<1>();  // tile j + 3's staging has landed (tile j + 4's may still fly)
    __syncthreads();
  }
  CpAsyncWait<0>();
  StorePrefillRows<HEAD_DIM>(rows, row0 + warp * 16, p.total_rows, p.group, h, a.n_heads, lane, a.out, a.lse);
}

template <int HEAD_DIM>
absl::Status LaunchKvqPrefill(const KvqPrefillArgs& a, cudaStream_t stream) {
  auto kernel = KvqPrefillKernel<HEAD_DIM>;
  constexpr int kSmem = PrefillSmem<HEAD_DIM>::kBytes;
  static bool configured = false;
  KV_RETURN_IF_ERROR(AllowSharedMemory(kernel, kSmem, &configured));
  PrefillParams p;
  p.a = a;
  p.group = a.n_heads / a.n_kv_heads;
  p.scale_log2 = a.scale * kLog2e;
  p.total_rows = a.n_queries * p.group;
  const int64_t row_blocks = (p.total_rows + kRows - 1) / kRows;
  if (row_blocks > INT_MAX) return absl::InvalidArgumentError("KvqPrefillAttentionCuda: too many queries");
  kernel<<<dim3(static_cast<unsigned>(row_blocks), a.n_kv_heads), kThreads, kSmem, stream>>>(p);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace

absl::Status KvqPrefillAttentionCuda(const KvqPrefillArgs& a, cudaStream_t stream) {
  if (a.head_dim != 64 && a.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("KvqPrefillAttentionCuda: head_dim ", a.head_dim, " not 64 or 128"));
  }
  if (a.bits != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvqPrefillAttentionCuda: kvq", a.bits, " pages (only kvq3 is read directly; dequantize others)"));
  }
  if (a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0 || a.n_kv_heads > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvqPrefillAttentionCuda: bad heads n_heads=", a.n_heads, " n_kv_heads=", a.n_kv_heads));
  }
  if (a.n_value_outliers < 0 || a.n_value_outliers > kKvqMaxValueOutliers) {
    return absl::InvalidArgumentError(absl::StrCat("KvqPrefillAttentionCuda: ", a.n_value_outliers,
                                                   " value outliers per token; at most ", kKvqMaxValueOutliers));
  }
  if (a.sink < 0 || a.sink > a.quantized_end || a.quantized_end > a.length || a.n_queries < 0 ||
      (a.length > a.sink && a.layer.ring <= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("KvqPrefillAttentionCuda: bad stream layout (sink ", a.sink,
                                                   ", quantized to ", a.quantized_end, ", length ", a.length,
                                                   ") or ", a.n_queries, " queries"));
  }
  if (a.n_queries == 0) return absl::OkStatus();
  if (a.q == nullptr || a.out == nullptr || a.lse == nullptr || a.page_table == nullptr) {
    return absl::InvalidArgumentError("KvqPrefillAttentionCuda: null pointer");
  }
  return a.head_dim == 128 ? LaunchKvqPrefill<128>(a, stream) : LaunchKvqPrefill<64>(a, stream);
}

}  // namespace kvshard
