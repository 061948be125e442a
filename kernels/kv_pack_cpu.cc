#include <algorithm>
#include <array>
#include <cstring>

#include "kernels/kv_pack.h"

namespace kvshard {

void PackCodesCpu(const uint8_t* codes, int64_t n_codes, int bits, uint8_t* stream) {
  const int64_t bytes = PackedBytes(n_codes, bits);
  std::memset(stream, 0, static_cast<size_t>(bytes));
  if (bits == 8) {
    std::memcpy(stream, codes, static_cast<size_t>(n_codes));
    return;
  }
  if (bits == 3) {  // plane groups of 32 codes (kv_pack.h)
    for (int64_t g0 = 0; g0 < n_codes; g0 += kPlaneGroupCodes) {
      uint32_t words[3] = {0u, 0u, 0u};
      const int n = static_cast<int>(std::min<int64_t>(kPlaneGroupCodes, n_codes - g0));
      for (int r = 0; r < n; ++r) {
        const uint32_t code = codes[g0 + r] & 7u;
        words[r >> 4] |= (code & 3u) << (2 * (r & 15));
        words[2] |= (code >> 2) << ThreeBitHighBit(r);
      }
      uint8_t* out = stream + g0 / kPlaneGroupCodes * 12;
      for (int w = 0; w < 3; ++w) {
        for (int b = 0; b < 4; ++b) out[4 * w + b] = static_cast<uint8_t>(words[w] >> (8 * b));
      }
    }
    return;
  }
  // Accumulate into a 64-bit register and flush whole bytes: the stream is little-endian.
  uint64_t acc = 0;
  int acc_bits = 0;
  int64_t out = 0;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < n_codes; ++i) {
    acc |= static_cast<uint64_t>(codes[i] & mask) << acc_bits;
    acc_bits += bits;
    while (acc_bits >= 8) {
      stream[out++] = static_cast<uint8_t>(acc);
      acc >>= 8;
      acc_bits -= 8;
    }
  }
  if (acc_bits > 0) stream[out] = static_cast<uint8_t>(acc);
}

namespace {

// 8 codes of BITS bits (the low 8 * BITS bits of x) to 8 bytes, one code per byte, by halving: two
// 4-code lanes 32 bits apart, then 2-code lanes 16 apart, then codes 8 apart (a handful of shifts and masks
// per 8 codes; parallel bit deposit would do it in one, but it is microcoded and slow on some CPUs).
template <int BITS>
inline uint64_t SpreadCodes(uint64_t x) {
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  constexpr uint64_t k4 = (uint64_t{1} << (4 * BITS)) - 1, k2 = (uint64_t{1} << (2 * BITS)) - 1;
  constexpr uint64_t k1 = (uint64_t{1} << BITS) - 1;
  x = (x & k4) | ((x >> (4 * BITS)) << 32);
  x = (x & (k2 | (k2 << 32))) | (((x >> (2 * BITS)) & (k2 | (k2 << 32))) << 16);
  x = (x & (k1 * 0x0001000100010001ull)) | (((x >> BITS) & (k1 * 0x0001000100010001ull)) << 8);
  return x & (kOnes * k1);
}

template <int BITS>
void UnpackGroups(const uint8_t* src, int64_t groups, uint8_t* codes) {
  for (int64_t g = 0; g < groups; ++g) {
    // Byte by byte: a BITS-byte memcpy into a wider word goes through the stack and stalls the load.
    uint64_t group = 0;
    for (int b = 0; b < BITS; ++b) group |= static_cast<uint64_t>(src[g * BITS + b]) << (8 * b);
    const uint64_t bytes = SpreadCodes<BITS>(group);  // little-endian hosts
    std::memcpy(codes + 8 * g, &bytes, 8);
  }
}

// Codes [first, first + n) for a width known at compile time: code by code up to a multiple of 8 (where
// the stream is byte-aligned), then 8 codes (BITS bytes) per step, then the tail.
template <int BITS>
void UnpackCodesFixed(const uint8_t* stream, int64_t first, int64_t n, uint8_t* codes) {
  int64_t i = 0;
  for (; i < n && (first + i) % 8 != 0; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, BITS));
  const int64_t groups = (n - i) / 8;
  UnpackGroups<BITS>(stream + (first + i) / 8 * BITS, groups, codes + i);
  i += 8 * groups;
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, BITS));
}

// 3-bit plane groups, four codes a step through byte tables: byte b of a group's word h holds the low
// bits of codes 16 h + 4 b .. + 3, byte b of word 2 their high bits (ThreeBitHighBit), for both halves.
struct ThreeBitTables {
  std::array<uint32_t, 256> low;      // 4 two-bit fields to 4 bytes
  std::array<uint32_t, 256> high[2];  // [h]: the high bits of half h's 4 codes, at bit 2 of their bytes
  ThreeBitTables() {
    for (uint32_t x = 0; x < 256; ++x) {
      low[x] = 0;
      high[0][x] = high[1][x] = 0;
      for (int j = 0; j < 4; ++j) {
        low[x] |= ((x >> (2 * j)) & 3u) << (8 * j);
        for (int h = 0; h < 2; ++h) high[h][x] |= ((x >> (ThreeBitHighBit(16 * h + j) & 7)) & 1u) << (8 * j + 2);
      }
    }
  }
};

void UnpackThreeBit(const uint8_t* stream, int64_t first, int64_t n, uint8_t* codes) {
  static const ThreeBitTables tables;
  int64_t i = 0;
  for (; i < n && (first + i) % kPlaneGroupCodes != 0; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, 3));
  for (; i + kPlaneGroupCodes <= n; i += kPlaneGroupCodes) {
    const uint8_t* group = stream + (first + i) / kPlaneGroupCodes * 12;
    for (int h = 0; h < 2; ++h) {
      for (int b = 0; b < 4; ++b) {
        const uint32_t four = tables.low[group[4 * h + b]] | tables.high[h][group[8 + b]];
        std::memcpy(codes + i + 16 * h + 4 * b, &four, 4);  // little-endian hosts
      }
    }
  }
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, 3));
}

}  // namespace

void UnpackCodesCpu(const uint8_t* stream, int64_t first, int64_t n_codes, int bits, uint8_t* codes) {
  switch (bits) {
    case 8:
      std::memcpy(codes, stream + first, static_cast<size_t>(n_codes));
      return;
    case 2:
      return UnpackCodesFixed<2>(stream, first, n_codes, codes);
    case 3:
      return UnpackThreeBit(stream, first, n_codes, codes);
    case 4:
      return UnpackCodesFixed<4>(stream, first, n_codes, codes);
    default:
      for (int64_t i = 0; i < n_codes; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, bits));
  }
}

}  // namespace kvshard
