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

// A window of the text as code points: class, code point (0xFFFFFFFF for an ill-formed byte run) and
// byte offset. offsets has one extra entry, the window's length, so piece [i, j) is bytes
// offsets[i]..offsets[j].
struct CodePoints {
  std::vector<uint8_t> classes;
  std::vector<char32_t> points;
  std::vector<uint32_t> offsets;

  void Decode(std::string_view text) {
    classes.clear();
    points.clear();
    offsets.clear();
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

// Regex matchers over one window. A match whose outcome depends on what lies past the window (it reached
// the window's end before the text's end) sets `truncated_`, and the caller rescans from that match in
// the next window.
class Scanner {
 public:
  Scanner(const CodePoints& cps, bool window_ends_text)
      : cls_(cps.classes.data()),
        cp_(cps.points.data()),
        size_(cps.size()),
        window_ends_text_(window_ends_text) {}

  bool truncated() const { return truncated_; }
  void ClearTruncated() { truncated_ = false; }

  // Whether index i is inside [.., end); noting when the answer depends on text past the window.
  bool Has(size_t i, size_t end) {
    if (i < end) return true;
    if (end == size_ && !window_ends_text_) truncated_ = true;
    return false;
  }

  // End of the run of class `cls` starting at i.
  size_t RunEnd(size_t i, size_t end, uint8_t cls) {
    while (Has(i, end) && cls_[i] == cls) ++i;
    return i;
  }

  bool IsNewline(size_t i) const { return cp_[i] == '\r' || cp_[i] == '\n'; }

  // 's|'t|'re|'ve|'m|'ll|'d at i: the match length in code points, or 0.
  size_t Contraction(size_t i, size_t end, bool ignore_case) {
    if (cp_[i] != '\'' || !Has(i + 1, end)) return 0;
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
    if ((first == 'r' || first == 'v' || first == 'l') && Has(i + 2, end)) {
      const char32_t second = folded(i + 2);
      if ((first == 'r' || first == 'v') && second == 'e') return 3;
      if (first == 'l' && second == 'l') return 3;
    }
    return 0;
  }

  // \s+(?!\S)|\s+ at a whitespace character i: the whole run when it ends the text or is one character
  // long, else the run less its last character (which then leads the next piece).
  size_t TrailingWhitespace(size_t i, size_t end) {
    const size_t run_end = RunEnd(i, end, kSpace);
    if (run_end == end || run_end - i == 1) return run_end;
    return run_end - 1;
  }

  // One GPT-2 regex match at i within [i, end).
  size_t Gpt2Match(size_t i, size_t end) {
    if (size_t n = Contraction(i, end, /*ignore_case=*/false)) return i + n;
    const uint8_t cls = cls_[i];
    if (cls == kLetter || cls == kNumber || cls == kOther) return RunEnd(i, end, cls);
    if (cp_[i] == ' ' && Has(i + 1, end) && cls_[i + 1] != kSpace) return RunEnd(i + 1, end, cls_[i + 1]);
    return TrailingWhitespace(i, end);
  }

  // One Llama 3 / Qwen2 regex match at i; `max_digits` is 3 for Llama 3, 1 for Qwen2.
  size_t Llama3Match(size_t i, size_t end, size_t max_digits) {
    if (size_t n = Contraction(i, end, /*ignore_case=*/true)) return i + n;
    const uint8_t cls = cls_[i];
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (cls == kLetter) return RunEnd(i, end, kLetter);
    if (cls != kNumber && !IsNewline(i) && Has(i + 1, end) && cls_[i + 1] == kLetter) {
      return RunEnd(i + 1, end, kLetter);
    }
    // \p{N}{1,3}
    if (cls == kNumber) return RunEnd(i, std::min(end, i + max_digits), kNumber);
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    size_t other_begin = end;
    if (cls == kOther) {
      other_begin = i;
    } else if (cp_[i] == ' ' && Has(i + 1, end) && cls_[i + 1] == kOther) {
      other_begin = i + 1;
    }
    if (other_begin != end) {
      size_t j = RunEnd(other_begin, end, kOther);
      while (Has(j, end) && IsNewline(j)) ++j;
      return j;
    }
    // \s*[\r\n]+ : through the last newline of the whitespace run
    const size_t run_end = RunEnd(i, end, kSpace);
    for (size_t k = run_end; k > i; --k) {
      if (IsNewline(k - 1)) return k;
    }
    return TrailingWhitespace(i, end);
  }

 private:
  const uint8_t* cls_;
  const char32_t* cp_;
  size_t size_;
  bool window_ends_text_;
  bool truncated_ = false;
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

void PreTokenize(PreTokenizerKind kind, std::string_view text, absl::FunctionRef<void(std::string_view)> emit,
                 size_t window_bytes) {
  CodePoints cps;
  window_bytes = std::max<size_t>(window_bytes, 1);
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = std::min(text.size(), begin + window_bytes);
    // Cut before a character, not inside one (ill-formed runs longer than 3 bytes may be cut anywhere).
    for (int k = 0; k < 3 && end < text.size() && end > begin + 1 &&
                    (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80;
         ++k) {
      --end;
    }
    const bool window_ends_text = end == text.size();
    const std::string_view window = text.substr(begin, end - begin);
    cps.Decode(window);
    Scanner scanner(cps, window_ends_text);
    const size_t n = cps.size();
    size_t number_at = 0;  // kGpt2IndividualDigits: the first numeric character at or after i
    size_t i = 0;
    while (i < n) {
      scanner.ClearTruncated();
      size_t next = 0;
      switch (kind) {
        case PreTokenizerKind::kGpt2:
          next = scanner.Gpt2Match(i, n);
          break;
        case PreTokenizerKind::kGpt2IndividualDigits:
          // Digits(individual_digits=true): each numeric character alone; the regex runs on the text
          // between two of them as if it were the whole text.
          if (number_at < i) number_at = i;
          while (number_at < n && cps.classes[number_at] != kNumber) ++number_at;
          next = number_at == i ? i + 1 : scanner.Gpt2Match(i, number_at);
          break;
        case PreTokenizerKind::kLlama3:
          next = scanner.Llama3Match(i, n, 3);
          break;
        case PreTokenizerKind::kQwen2:
          next = scanner.Llama3Match(i, n, 1);
          break;
      }
      if (scanner.truncated()) break;
      emit(window.substr(cps.offsets[i], cps.offsets[next] - cps.offsets[i]));
      i = next;
    }
    if (i == 0 && !window_ends_text) {
      window_bytes *= 2;  // one piece longer than the window
      continue;
    }
    begin += cps.offsets[i];
  }
}

void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* pieces) {
  PreTokenize(kind, text, [pieces](std::string_view piece) { pieces->push_back(piece); });
}

}  // namespace kvshard
