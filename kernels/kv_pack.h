// Dense bit packing of quantization codes: CPU twin of the CUDA packer (which must produce the same bytes).
//
// Layout (the contract a GPU packer and the fused attention kernels follow):
// - A code stream of n codes of `bits` bits (1 <= bits <= 8) is one little-endian bit stream: code i
//   occupies stream bits [bits * i, bits * i + bits), least significant bit first; stream bit j is bit
//   (j % 8) of byte j / 8. So a b-bit code never takes more than b bits (3-bit codes: 3 bits).
// - 128 consecutive codes take exactly 16 * bits bytes, so every block of 128 codes (codes 128 m ..
//   128 m + 127) starts on a 16-byte boundary of the stream and is read with `bits` 16-byte loads
//   (3 bits: 48 bytes = three 16-byte words). A code may straddle two bytes or two 32-bit words inside
//   its block (3-bit code 10 is stream bits 30..32); it never straddles two blocks.
// - Stream storage is rounded up to whole blocks (PackedBytes); padding bits are zero.
// The KV store's pages are such streams of 128 * head_dim codes; kvstore/quantized_shard.h says which
// (token, channel) maps to which code index.
#pragma once

#include <cstdint>

namespace kvshard {

inline constexpr int kPackBlockCodes = 128;

// Bytes a stream of n codes takes, whole 16*bits-byte blocks.
inline int64_t PackedBytes(int64_t n_codes, int bits) {
  const int64_t blocks = (n_codes + kPackBlockCodes - 1) / kPackBlockCodes;
  return blocks * 16 * bits;
}

// Writes code `code` (< 2^bits) at index i of the stream, leaving the other codes unchanged.
inline void SetPackedCode(uint8_t* stream, int64_t i, int bits, uint32_t code) {
  const int64_t bit = i * bits;
  uint8_t* p = stream + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  const uint32_t mask = ((1u << bits) - 1u) << shift;
  const uint32_t shifted = code << shift;
  p[0] = static_cast<uint8_t>((p[0] & ~mask) | (shifted & mask));
  if (shift + bits > 8) {
    p[1] = static_cast<uint8_t>((p[1] & ~(mask >> 8)) | ((shifted & mask) >> 8));
  }
}

// Reads the code at index i of the stream.
inline uint32_t GetPackedCode(const uint8_t* stream, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const uint8_t* p = stream + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  uint32_t word = p[0];
  if (shift + bits > 8) word |= static_cast<uint32_t>(p[1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

// Packs n codes (each < 2^bits) into `stream`, which has PackedBytes(n, bits) bytes; padding bits are
// zeroed.
void PackCodesCpu(const uint8_t* codes, int64_t n_codes, int bits, uint8_t* stream);

// Unpacks codes [first, first + n) of `stream` into codes[0 .. n).
void UnpackCodesCpu(const uint8_t* stream, int64_t first, int64_t n_codes, int bits, uint8_t* codes);

}  // namespace kvshard
