// Dense bit packing of quantization codes: CPU twin of the CUDA packer (which must produce the same bytes).
//
// Layout (the contract a GPU packer and the fused attention kernels follow):
// - A code stream of n codes of `bits` bits (1 <= bits <= 8) other than 3 is one little-endian bit
//   stream: code i occupies stream bits [bits * i, bits * i + bits), least significant bit first; stream
//   bit j is bit (j % 8) of byte j / 8. So a b-bit code never takes more than b bits.
// - 3-bit streams are bit planes in groups of 32 codes, so that a GPU lane turns 16 codes into one
//   nibble each with a few masks (ThreeBitPlaneNibbles) instead of a shift per code: group m (codes 32 m
//   .. 32 m + 31) is three little-endian 32-bit words at byte 12 m. For r = i % 32 = 16 h + 2 k + o
//   (h, o in {0, 1}, k < 8), code i keeps its low two bits at bits 2 (r % 16), 2 (r % 16) + 1 of word h
//   and its high bit at bit ThreeBitHighBit(r) = 4 k + 2 - 2 h + o of word 2. Still 3 bits a code.
// - 128 consecutive codes take exactly 16 * bits bytes, so every block of 128 codes (codes 128 m ..
//   128 m + 127) starts on a 16-byte boundary of the stream and is read with `bits` 16-byte loads
//   (3 bits: 48 bytes = three 16-byte words = four plane groups). A code may straddle two bytes or two
//   32-bit words inside its block (in a bit stream); it never straddles two blocks.
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

inline constexpr int kPlaneGroupCodes = 32;  // 3-bit streams: codes per plane group (12 bytes)

// Bit of word 2 of a 3-bit plane group that holds the high bit of the group's code r (0..31).
constexpr int ThreeBitHighBit(int r) { return 4 * ((r & 15) >> 1) + 2 - 2 * (r >> 4) + (r & 1); }

// Codes 16 h .. 16 h + 15 of a 3-bit plane group (word h = `low`, word 2 = `high`) as nibbles, bit 3 of
// each clear: *even holds code 16 h + 2 k in nibble k, *odd code 16 h + 2 k + 1.
constexpr void ThreeBitPlaneNibbles(uint32_t low, uint32_t high, int h, uint32_t* even, uint32_t* odd) {
  const uint32_t hs = high << (2 * h);
  *even = (low & 0x33333333u) | (hs & 0x44444444u);
  *odd = ((low >> 2) & 0x33333333u) | ((hs >> 1) & 0x44444444u);
}

// Code r (0..31) of a 32-code group held as its BITS 32-bit words (the layouts above; a 2- or 4-bit code
// never straddles two words of its group). The GPU kernels keep a group's words in registers and take
// several codes from them; with r known at compile time the word choice folds away.
template <int BITS>
constexpr uint32_t CodeInGroupWords(const uint32_t (&words)[BITS], int r) {
  if constexpr (BITS == 3) {
    const uint32_t low = r < 16 ? words[0] : words[1];
    return ((low >> (2 * (r & 15))) & 3u) | (((words[2] >> ThreeBitHighBit(r)) & 1u) << 2);
  } else {
    static_assert(32 % BITS == 0, "2- and 4-bit codes stay inside a word");
    const int bit = r * BITS;
    uint32_t word = words[0];
    for (int w = 1; w < BITS; ++w) word = (bit >> 5) == w ? words[w] : word;
    return (word >> (bit & 31)) & ((1u << BITS) - 1u);
  }
}

// CodeInGroupWords<3> for the codes r = step * k + t (k = 0, 1, ...) of one thread (step 4 or 8, t < step):
// the shifts split into a part of t, applied to the words once (ThreeBitWordsOfThread), and a part of k
// that is a constant once k is (ThreeBitCodeAtStep, in an unrolled loop: two shifts and masks a code).
constexpr void ThreeBitWordsOfThread(const uint32_t (&words)[3], int t, uint32_t (&shifted)[3]) {
  shifted[0] = words[0] >> (2 * t);
  shifted[1] = words[1] >> (2 * t);
  shifted[2] = words[2] >> (4 * (t >> 1) + (t & 1));
}
constexpr uint32_t ThreeBitCodeAtStep(const uint32_t (&shifted)[3], int step, int k) {
  const int base = step * k;  // the code's index less t: a multiple of step, so t adds without a carry
  const uint32_t low = (base >= 16 ? shifted[1] : shifted[0]) >> (2 * (base & 15));
  return (low & 3u) | (((shifted[2] >> (4 * ((base & 15) >> 1) + 2 - 2 * (base >> 4))) & 1u) << 2);
}

// ORs code `code` (< 2^BITS) in as code r (0..31) of a 32-code group held as its BITS words, the inverse of
// CodeInGroupWords: r may vary at run time without a kernel's words going to local memory (each word takes
// its part by a select).
template <int BITS>
constexpr void PutCodeInGroupWords(uint32_t (&words)[BITS], int r, uint32_t code) {
  if constexpr (BITS == 3) {
    const uint32_t low = (code & 3u) << (2 * (r & 15));
    words[0] |= r < 16 ? low : 0u;
    words[1] |= r < 16 ? 0u : low;
    words[2] |= (code >> 2) << ThreeBitHighBit(r);
  } else {
    static_assert(32 % BITS == 0, "2- and 4-bit codes stay inside a word");
    const int bit = r * BITS;
    for (int w = 0; w < BITS; ++w) words[w] |= (bit >> 5) == w ? code << (bit & 31) : 0u;
  }
}

// Writes code `code` (< 2^bits) at index i of the stream, leaving the other codes unchanged.
inline void SetPackedCode(uint8_t* stream, int64_t i, int bits, uint32_t code) {
  if (bits == 3) {
    uint8_t* group = stream + (i / kPlaneGroupCodes) * 12;
    const int r = static_cast<int>(i % kPlaneGroupCodes);
    const int low_bit = 32 * (r >> 4) + 2 * (r & 15), high_bit = 64 + ThreeBitHighBit(r);
    uint8_t& low = group[low_bit >> 3];
    low = static_cast<uint8_t>((low & ~(3u << (low_bit & 7))) | ((code & 3u) << (low_bit & 7)));
    uint8_t& high = group[high_bit >> 3];
    high = static_cast<uint8_t>((high & ~(1u << (high_bit & 7))) | (((code >> 2) & 1u) << (high_bit & 7)));
    return;
  }
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
  if (bits == 3) {
    const uint8_t* group = stream + (i / kPlaneGroupCodes) * 12;
    const int r = static_cast<int>(i % kPlaneGroupCodes);
    const int low_bit = 32 * (r >> 4) + 2 * (r & 15), high_bit = 64 + ThreeBitHighBit(r);
    return ((group[low_bit >> 3] >> (low_bit & 7)) & 3u) | (((group[high_bit >> 3] >> (high_bit & 7)) & 1u) << 2);
  }
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
