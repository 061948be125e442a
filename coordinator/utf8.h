// UTF-8 decoding that tells a valid sequence from an invalid one and from one cut short by the buffer end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvshard {

struct Utf8Char {
  char32_t code_point = 0;  // meaningful only when `valid`
  uint8_t length = 1;       // bytes taken: the sequence, or the maximal ill-formed subpart (at least 1)
  bool valid = false;
  bool incomplete = false;  // the bytes are a valid start that the buffer end cuts off
};

// Decodes the character at `p` (`n` >= 1 bytes available). Rejects overlong forms, surrogates and code
// points above U+10FFFF, as the Unicode standard requires.
inline Utf8Char DecodeUtf8(const unsigned char* p, size_t n) {
  Utf8Char out;
  const unsigned char b0 = p[0];
  if (b0 < 0x80) {
    out.code_point = b0;
    out.valid = true;
    return out;
  }
  int continuation = 0;
  unsigned char second_lo = 0x80, second_hi = 0xBF;
  char32_t cp = 0;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    continuation = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    continuation = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) second_lo = 0xA0;  // overlong
    if (b0 == 0xED) second_hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    continuation = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) second_lo = 0x90;  // overlong
    if (b0 == 0xF4) second_hi = 0x8F;  // above U+10FFFF
  } else {
    return out;  // a stray continuation byte, C0/C1, or F5..FF
  }
  size_t i = 1;
  for (int k = 0; k < continuation; ++k, ++i) {
    if (i >= n) {
      out.length = static_cast<uint8_t>(i);
      out.incomplete = true;
      return out;
    }
    const unsigned char lo = k == 0 ? second_lo : 0x80, hi = k == 0 ? second_hi : 0xBF;
    if (p[i] < lo || p[i] > hi) {
      out.length = static_cast<uint8_t>(i);
      return out;
    }
    cp = (cp << 6) | (p[i] & 0x3F);
  }
  out.code_point = cp;
  out.length = static_cast<uint8_t>(i);
  out.valid = true;
  return out;
}

// Appends the UTF-8 encoding of a valid code point.
inline void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace kvshard
