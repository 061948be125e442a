#include "coordinator/pretokenizer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "coordinator/utf8.h"

namespace kvshard {
namespace {

enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

constexpr std::array<uint8_t, 128> MakeAsciiClasses() {
  std::array<uint8_t, 128> classes{};
  for (int c = 0; c < 128; ++c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
      classes[c] = kLetter;
    } else if (c >= '0' && c <= '9') {
      classes[c] = kNumber;
    } else if (c == ' ' || (c >= '\t' && c <= '\r')) {  // White_Space in ASCII; 0x1C..0x1F are not
      classes[c] = kSpace;
    } else {
      classes[c] = kOther;
    }
  }
  return classes;
}
constexpr std::array<uint8_t, 128> kAsciiClasses = MakeAsciiClasses();

uint8_t ClassOf(char32_t cp) {
  if (cp < 128) return kAsciiClasses[cp];
  if (u_isUWhiteSpace(static_cast<UChar32>(cp))) return kSpace;
  switch (u_charType(static_cast<UChar32>(cp))) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER:
      return kLetter;
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER:
      return kNumber;
    default:
      return kOther;
  }
}

// The text as code points: class, code point (0xFFFFFFFF for an ill-formed byte run) and byte offset.
// offsets has one extra entry, the text's length, so piece [i, j) is bytes offsets[i]..offsets[j].
struct CodePoints {
  std::vector<uint8_t> classes;
  std::vector<char32_t> points;
  std::vector<uint32_t> offsets;

  explicit CodePoints(std::string_view text) {
    classes.reserve(text.size());
    points.reserve(text.size());
    offsets.reserve(text.size() + 1);
    const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
    size_t pos = 0;
    while (pos < text.size()) {
      offsets.push_back(static_cast<uint32_t>(pos));
      if (bytes[pos] < 0x80) {
        points.push_back(bytes[pos]);
        classes.push_back(kAsciiClasses[bytes[pos]]);
        ++pos;
        continue;
      }
      const Utf8Char ch = DecodeUtf8(bytes + pos, text.size() - pos);
      points.push_back(ch.valid ? ch.code_point : 0xFFFFFFFFu);
      classes.push_back(ch.valid ? ClassOf(ch.code_point) : static_cast<uint8_t>(kOther));
      pos += ch.length;
    }
    offsets.push_back(static_cast<uint32_t>(text.size()));
  }
  size_t size() const { return points.size(); }
};

class Scanner {
 public:
  Scanner(const CodePoints& cps, std::string_view text, std::vector<std::string_view>* pieces)
      : cls_(cps.classes.data()),
        cp_(cps.points.data()),
        off_(cps.offsets.data()),
        text_(text),
        pieces_(pieces) {}

  void Emit(size_t begin, size_t end) {
    pieces_->push_back(text_.substr(off_[begin], off_[end] - off_[begin]));
  }

  // End of the run of class `cls` starting at i.
  size_t RunEnd(size_t i, size_t end, uint8_t cls) const {
    while (i < end && cls_[i] == cls) ++i;
    return i;
  }

  bool IsNewline(size_t i) const { return cp_[i] == '\r' || cp_[i] == '\n'; }

  // 's|'t|'re|'ve|'m|'ll|'d at i: the match length in code points, or 0.
  size_t Contraction(size_t i, size_t end, bool ignore_case) const {
    if (cp_[i] != '\'' || i + 1 >= end) return 0;
    auto folded = [&](size_t k) {
      char32_t c = cp_[k];
      if (ignore_case) {
        if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
        if (c == 0x17F) c = 's';  // LATIN SMALL LETTER LONG S case-folds to 's'
      }
      return c;
    };
    const char32_t first = folded(i + 1);
    if (first == 's' || first == 't' || first == 'm' || first == 'd') return 2;
    if (i + 2 < end) {
      const char32_t second = folded(i + 2);
      if ((first == 'r' || first == 'v') && second == 'e') return 3;
      if (first == 'l' && second == 'l') return 3;
    }
    return 0;
  }

  // \s+(?!\S)|\s+ at a whitespace character i: the whole run when it ends the text or is one character
  // long, else the run less its last character (which then leads the next piece).
  size_t TrailingWhitespace(size_t i, size_t end) const {
    const size_t run_end = RunEnd(i, end, kSpace);
    if (run_end == end || run_end - i == 1) return run_end;
    return run_end - 1;
  }

  // One GPT-2 regex match at i within [i, end).
  size_t Gpt2Match(size_t i, size_t end) const {
    if (size_t n = Contraction(i, end, /*ignore_case=*/false)) return i + n;
    const uint8_t cls = cls_[i];
    if (cls == kLetter || cls == kNumber || cls == kOther) return RunEnd(i, end, cls);
    if (cp_[i] == ' ' && i + 1 < end && cls_[i + 1] != kSpace) return RunEnd(i + 1, end, cls_[i + 1]);
    return TrailingWhitespace(i, end);
  }

  void Gpt2(size_t begin, size_t end) {
    for (size_t i = begin; i < end;) {
      const size_t next = Gpt2Match(i, end);
      Emit(i, next);
      i = next;
    }
  }

  // Digits(individual_digits=true), then the GPT-2 regex on the text between numeric characters.
  void Gpt2IndividualDigits(size_t begin, size_t end) {
    size_t run_begin = begin;
    for (size_t i = begin; i < end; ++i) {
      if (cls_[i] != kNumber) continue;
      Gpt2(run_begin, i);
      Emit(i, i + 1);
      run_begin = i + 1;
    }
    Gpt2(run_begin, end);
  }

  // One Llama 3 / Qwen2 regex match at i; `max_digits` is 3 for Llama 3, 1 for Qwen2.
  size_t Llama3Match(size_t i, size_t end, size_t max_digits) const {
    if (size_t n = Contraction(i, end, /*ignore_case=*/true)) return i + n;
    const uint8_t cls = cls_[i];
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (cls == kLetter) return RunEnd(i, end, kLetter);
    if (cls != kNumber && !IsNewline(i) && i + 1 < end && cls_[i + 1] == kLetter) {
      return RunEnd(i + 1, end, kLetter);
    }
    // \p{N}{1,3}
    if (cls == kNumber) return std::min(RunEnd(i, end, kNumber), i + max_digits);
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    size_t other_begin = end;
    if (cls == kOther) {
      other_begin = i;
    } else if (cp_[i] == ' ' && i + 1 < end && cls_[i + 1] == kOther) {
      other_begin = i + 1;
    }
    if (other_begin != end) {
      size_t j = RunEnd(other_begin, end, kOther);
      while (j < end && IsNewline(j)) ++j;
      return j;
    }
    // \s*[\r\n]+ : through the last newline of the whitespace run
    const size_t run_end = RunEnd(i, end, kSpace);
    for (size_t k = run_end; k > i; --k) {
      if (IsNewline(k - 1)) return k;
    }
    return TrailingWhitespace(i, end);
  }

  void Llama3(size_t begin, size_t end, size_t max_digits) {
    for (size_t i = begin; i < end;) {
      const size_t next = Llama3Match(i, end, max_digits);
      Emit(i, next);
      i = next;
    }
  }

 private:
  const uint8_t* cls_;
  const char32_t* cp_;
  const uint32_t* off_;
  std::string_view text_;
  std::vector<std::string_view>* pieces_;
};

constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

absl::StatusOr<PreTokenizerKind> PreTokenizerFromGgufName(std::string_view name) {
  // Names as llama.cpp's converter writes them; the ones listed share a split regex.
  for (std::string_view n : {"smollm", "starcoder", "refact", "codeshell"}) {
    if (name == n) return PreTokenizerKind::kGpt2IndividualDigits;
  }
  for (std::string_view n : {"gpt-2", "gpt2"}) {
    if (name == n) return PreTokenizerKind::kGpt2;
  }
  for (std::string_view n : {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}) {
    if (name == n) return PreTokenizerKind::kLlama3;
  }
  for (std::string_view n : {"qwen2", "deepseek-r1-qwen"}) {
    if (name == n) return PreTokenizerKind::kQwen2;
  }
  return absl::UnimplementedError(
      absl::StrCat("pre-tokenizer '", std::string(name),
                   "' is not supported (known: smollm, gpt-2, llama-bpe, qwen2 and aliases)"));
}

absl::StatusOr<PreTokenizerKind> PreTokenizerFromSplitRegex(std::string_view pattern) {
  if (pattern == kLlama3Regex) return PreTokenizerKind::kLlama3;
  if (pattern == kQwen2Regex) return PreTokenizerKind::kQwen2;
  if (pattern == kGpt2Regex) return PreTokenizerKind::kGpt2;
  return absl::UnimplementedError(absl::StrCat(
      "split regex is not one of the supported ones (GPT-2, Llama 3, Qwen2): ", std::string(pattern)));
}

void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* pieces) {
  if (text.empty()) return;
  const CodePoints cps(text);
  Scanner scanner(cps, text, pieces);
  switch (kind) {
    case PreTokenizerKind::kGpt2:
      scanner.Gpt2(0, cps.size());
      break;
    case PreTokenizerKind::kGpt2IndividualDigits:
      scanner.Gpt2IndividualDigits(0, cps.size());
      break;
    case PreTokenizerKind::kLlama3:
      scanner.Llama3(0, cps.size(), 3);
      break;
    case PreTokenizerKind::kQwen2:
      scanner.Llama3(0, cps.size(), 1);
      break;
  }
}

}  // namespace kvshard
