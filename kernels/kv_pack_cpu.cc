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

// Codes [first, first + n) for a width known at compile time: code by code up to a multiple of 8 (where
// the stream is byte-aligned), then 8 codes (BITS bytes) per step, then the tail.
template <int BITS>
void UnpackCodesFixed(const uint8_t* stream, int64_t first, int64_t n, uint8_t* codes) {
  constexpr uint64_t kMask = (1u << BITS) - 1u;
  int64_t i = 0;
  for (; i < n && (first + i) % 8 != 0; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, BITS));
  for (; i + 8 <= n; i += 8) {
    uint64_t group = 0;
    std::memcpy(&group, stream + (first + i) / 8 * BITS, BITS);  // little-endian hosts
    for (int j = 0; j < 8; ++j) codes[i + j] = static_cast<uint8_t>((group >> (BITS * j)) & kMask);
  }
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, BITS));
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
      return UnpackCodesFixed<3>(stream, first, n_codes, codes);
    case 4:
      return UnpackCodesFixed<4>(stream, first, n_codes, codes);
    default:
      for (int64_t i = 0; i < n_codes; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, bits));
  }
}

}  // namespace kvshard
