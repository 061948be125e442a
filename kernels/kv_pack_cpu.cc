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

void UnpackCodesCpu(const uint8_t* stream, int64_t first, int64_t n_codes, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, stream + first, static_cast<size_t>(n_codes));
    return;
  }
  for (int64_t i = 0; i < n_codes; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(stream, first + i, bits));
}

}  // namespace kvshard
