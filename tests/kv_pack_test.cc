// Dense code packing (kernels/kv_pack.h): exact round trips, the documented byte layout, block alignment.
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/kv_pack.h"

namespace kvshard {
namespace {

std::vector<uint8_t> RandomCodes(int64_t n, int bits, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> codes(n);
  for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
  return codes;
}

// (bits, head_dim, tokens): streams of head_dim * tokens codes, odd sizes and block boundaries +-1.
class PackTest : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(PackTest, RoundTripIsExact) {
  const auto [bits, head_dim, tokens] = GetParam();
  const int64_t n = static_cast<int64_t>(head_dim) * tokens;
  const std::vector<uint8_t> codes = RandomCodes(n, bits, static_cast<uint32_t>(n * 31 + bits));
  std::vector<uint8_t> stream(PackedBytes(n, bits), 0xAB);
  PackCodesCpu(codes.data(), n, bits, stream.data());

  // Dense: b bits per code, rounded up to whole 128-code blocks of 16*b bytes; padding is zero. The bits
  // codes own are those that n codes of all ones set.
  EXPECT_EQ(static_cast<int64_t>(stream.size()), (n + 127) / 128 * 16 * bits);
  std::vector<uint8_t> owned(stream.size(), 0);
  const std::vector<uint8_t> ones(n, static_cast<uint8_t>((1u << bits) - 1u));
  PackCodesCpu(ones.data(), n, bits, owned.data());
  int64_t owned_bits = 0;
  for (size_t b = 0; b < stream.size(); ++b) {
    ASSERT_EQ(stream[b] & ~owned[b], 0) << "padding bits of byte " << b;
    owned_bits += __builtin_popcount(owned[b]);
  }
  EXPECT_EQ(owned_bits, n * bits);

  std::vector<uint8_t> unpacked(n, 0xFF);
  UnpackCodesCpu(stream.data(), 0, n, bits, unpacked.data());
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) mismatches += unpacked[i] != codes[i];
  EXPECT_EQ(mismatches, 0);

  // Partial unpacks from odd and aligned offsets, with odd lengths (the unaligned head and the tail).
  for (const int64_t first : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{13}, n / 3}) {
    if (first >= n) continue;
    for (const int64_t count : {n - first, n - first - 1, int64_t{9}}) {
      if (count <= 0 || first + count > n) continue;
      std::vector<uint8_t> part(count);
      UnpackCodesCpu(stream.data(), first, count, bits, part.data());
      for (int64_t i = 0; i < count; ++i) ASSERT_EQ(part[i], codes[first + i]) << "code " << first + i;
    }
  }

  // Writing codes one by one, in any order, gives the same bytes.
  std::vector<uint8_t> one_by_one(stream.size(), 0);
  for (int64_t i = n - 1; i >= 0; --i) SetPackedCode(one_by_one.data(), i, bits, codes[i]);
  EXPECT_EQ(one_by_one, stream);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(GetPackedCode(stream.data(), i, bits), codes[i]) << "code " << i;
}

TEST_P(PackTest, BlocksAreIndependentSixteenByteUnits) {
  const auto [bits, head_dim, tokens] = GetParam();
  const int64_t n = static_cast<int64_t>(head_dim) * tokens;
  std::vector<uint8_t> codes = RandomCodes(n, bits, 7);
  std::vector<uint8_t> a(PackedBytes(n, bits)), b(PackedBytes(n, bits));
  PackCodesCpu(codes.data(), n, bits, a.data());
  // Change the last code of a block: only that block's 16*bits bytes change.
  const int64_t i = std::min<int64_t>(n - 1, 127);
  codes[i] ^= 1;
  PackCodesCpu(codes.data(), n, bits, b.data());
  const int64_t block_bytes = 16 * bits, block = i / 128;
  for (int64_t byte = 0; byte < static_cast<int64_t>(a.size()); ++byte) {
    if (byte / block_bytes != block) {
      ASSERT_EQ(a[byte], b[byte]) << "byte " << byte;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    BitsDimsTokens, PackTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4, 5, 8), ::testing::Values(1, 37, 63, 64, 65, 128),
                       ::testing::Values(1, 2, 37, 127, 128, 129)));

TEST(PackLayout, ThreeBitGolden) {
  // Plane groups of 32 codes: codes 0..7 = 000 .. 111 put their low bits 00 01 10 11 00 01 10 11 at bits
  // 0..15 of word 0 (bytes 0xE4 0xE4) and the high bits of codes 4..7 at bits 10, 11, 14, 15 of word 2
  // (byte 9 = 0xCC); code 16 = 7 puts 11 at bits 0, 1 of word 1 (byte 4) and its high bit at bit 0 of
  // word 2 (byte 8). The rest of the 48-byte block is zero.
  std::vector<uint8_t> codes = {0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 7};
  std::vector<uint8_t> stream(PackedBytes(codes.size(), 3));
  ASSERT_EQ(stream.size(), 48u);
  PackCodesCpu(codes.data(), static_cast<int64_t>(codes.size()), 3, stream.data());
  std::vector<uint8_t> want(48, 0);
  want[0] = 0xE4;
  want[1] = 0xE4;
  want[4] = 0x03;
  want[8] = 0x01;
  want[9] = 0xCC;
  EXPECT_EQ(stream, want);
}

TEST(PackLayout, ThreeBitPlaneNibbles) {
  // The GPU kernels' extraction: 16 codes of a half group as even and odd nibbles.
  std::vector<uint8_t> codes = RandomCodes(32, 3, 11);
  std::vector<uint8_t> stream(PackedBytes(32, 3));
  PackCodesCpu(codes.data(), 32, 3, stream.data());
  uint32_t words[3];
  std::memcpy(words, stream.data(), 12);  // little-endian hosts
  for (int h = 0; h < 2; ++h) {
    uint32_t even = 0, odd = 0;
    ThreeBitPlaneNibbles(words[h], words[2], h, &even, &odd);
    for (int k = 0; k < 8; ++k) {
      EXPECT_EQ((even >> (4 * k)) & 15u, codes[16 * h + 2 * k]) << "half " << h << " nibble " << k;
      EXPECT_EQ((odd >> (4 * k)) & 15u, codes[16 * h + 2 * k + 1]) << "half " << h << " nibble " << k;
    }
  }
}

// The GPU kernels' code extraction from, and insertion into, a group's words held in registers, for every
// width: the same words as the CPU packer.
template <int BITS>
void ExpectCodeInGroupWords() {
  std::vector<uint8_t> codes = RandomCodes(64, BITS, 12 + BITS);
  std::vector<uint8_t> stream(PackedBytes(64, BITS));
  PackCodesCpu(codes.data(), 64, BITS, stream.data());
  for (int group = 0; group < 2; ++group) {
    uint32_t words[BITS];
    std::memcpy(words, stream.data() + group * 4 * BITS, 4 * BITS);  // little-endian hosts
    uint32_t put[BITS] = {};
    for (int r = 0; r < 32; ++r) {
      EXPECT_EQ(CodeInGroupWords<BITS>(words, r), codes[32 * group + r]) << BITS << " bits, code " << 32 * group + r;
      PutCodeInGroupWords<BITS>(put, r, codes[32 * group + r]);
    }
    for (int w = 0; w < BITS; ++w) EXPECT_EQ(put[w], words[w]) << BITS << " bits, group " << group << " word " << w;
  }
}

TEST(PackLayout, CodeInGroupWordsAndPut) {
  ExpectCodeInGroupWords<2>();
  ExpectCodeInGroupWords<3>();
  ExpectCodeInGroupWords<4>();
}

// The split extraction of one thread's rows (the dequantize kernel's key codes) against the packer.
TEST(PackLayout, ThreeBitCodesOfAThreadByStep) {
  std::vector<uint8_t> codes = RandomCodes(64, 3, 21);
  std::vector<uint8_t> stream(PackedBytes(64, 3));
  PackCodesCpu(codes.data(), 64, 3, stream.data());
  for (int group = 0; group < 2; ++group) {
    uint32_t words[3];
    std::memcpy(words, stream.data() + group * 12, 12);
    for (int step : {4, 8}) {
      for (int t = 0; t < step; ++t) {
        uint32_t shifted[3];
        ThreeBitWordsOfThread(words, t, shifted);
        for (int k = 0; k < 32 / step; ++k) {
          EXPECT_EQ(ThreeBitCodeAtStep(shifted, step, k), codes[32 * group + step * k + t])
              << "group " << group << " step " << step << " t " << t << " k " << k;
        }
      }
    }
  }
}

TEST(PackLayout, FourBitNibblesLowFirst) {
  std::vector<uint8_t> codes = {0x1, 0x2, 0xF, 0x3};
  std::vector<uint8_t> stream(PackedBytes(4, 4));
  PackCodesCpu(codes.data(), 4, 4, stream.data());
  EXPECT_EQ(stream[0], 0x21);
  EXPECT_EQ(stream[1], 0x3F);
}

TEST(PackLayout, EmptyStream) {
  EXPECT_EQ(PackedBytes(0, 3), 0);
  PackCodesCpu(nullptr, 0, 3, nullptr);
}

}  // namespace
}  // namespace kvshard
