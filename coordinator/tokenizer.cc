// Byte-level BPE: added-token split, pre-tokenization, then BPE merges on the bytes of each piece.
// Tokens are handled as ids throughout: a piece starts as one token per byte and a merge rule is an id
// pair -> (rank, merged id), so no strings are built while encoding.
#include "coordinator/tokenizer.h"

#include <unicode/uchar.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"
#include "coordinator/bpe_vocabulary.h"
#include "coordinator/utf8.h"

namespace kvshard {

const std::array<char32_t, 256>& ByteToAlphabetCodePoint() {
  // Printable bytes spell themselves; the others (controls, space, 0x7F..0xA0, 0xAD) take the code
  // points from U+0100 upwards, in byte order.
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

namespace {

constexpr char kReplacementChar[] = "\xEF\xBF\xBD";

// The raw bytes a token spelling stands for; nullopt when it uses code points outside the byte alphabet
// (such tokens decode to their own UTF-8 text, as the `tokenizers` ByteLevel decoder does).
std::optional<std::string> AlphabetToBytes(std::string_view spelling) {
  static const std::array<int16_t, 512> inverse = [] {
    std::array<int16_t, 512> t;
    t.fill(-1);
    const auto& forward = ByteToAlphabetCodePoint();
    for (int b = 0; b < 256; ++b) t[forward[b]] = static_cast<int16_t>(b);
    return t;
  }();
  std::string bytes;
  bytes.reserve(spelling.size());
  const auto* p = reinterpret_cast<const unsigned char*>(spelling.data());
  for (size_t i = 0; i < spelling.size();) {
    const Utf8Char ch = DecodeUtf8(p + i, spelling.size() - i);
    if (!ch.valid || ch.code_point >= inverse.size() || inverse[ch.code_point] < 0) return std::nullopt;
    bytes.push_back(static_cast<char>(inverse[ch.code_point]));
    i += ch.length;
  }
  return bytes;
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

struct MergeRule {
  int32_t rank;
  int32_t merged;
};

// Scratch space reused across the pieces of one Encode call.
struct EncodeScratch {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t left;
    int32_t right;
    int32_t merged;
    // Min-heap on (rank, pos): the best merge first, the leftmost among equals.
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
  // Piece text -> where its ids were first written in the output (offset, count).
  absl::flat_hash_map<absl::string_view, std::pair<uint32_t, uint32_t>> cache;
};

class BpeTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(BpeVocabulary v);

  std::vector<int32_t> Encode(std::string_view text, bool parse_special) const override;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override;
  std::string TokenBytes(int32_t id) const override { return InRange(id) ? token_bytes_[id] : std::string(); }
  int32_t vocab_size() const override { return static_cast<int32_t>(token_bytes_.size()); }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  std::vector<int32_t> stop_ids() const override { return stop_ids_; }
  bool IsSpecial(int32_t id) const override { return InRange(id) && special_[id]; }
  std::optional<int32_t> TokenId(std::string_view token_text) const override;
  ChatTemplate DefaultChatTemplate() const override {
    return TokenId("<|start_header_id|>") ? ChatTemplate::kLlama3 : ChatTemplate::kChatML;
  }

 private:
  struct Added {
    int32_t id;
    bool special;
    std::string content;
  };

  bool InRange(int32_t id) const { return id >= 0 && id < vocab_size(); }
  void EncodeText(std::string_view text, std::vector<int32_t>* ids, EncodeScratch* scratch) const;
  void EncodePiece(std::string_view piece, std::vector<int32_t>* ids, EncodeScratch* scratch) const;
  const MergeRule* FindMerge(int32_t left, int32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }

  std::vector<std::string> token_bytes_;
  std::vector<uint8_t> special_;
  absl::flat_hash_map<std::string, int32_t> spelling_to_id_;
  absl::flat_hash_map<std::string, int32_t> bytes_to_id_;  // tokens spelled in the byte alphabet
  std::array<int32_t, 256> byte_token_;                    // the one-byte token of each byte, or -1
  absl::flat_hash_map<uint64_t, MergeRule> merges_;
  std::vector<Added> added_;
  std::array<std::vector<int32_t>, 256> added_by_first_byte_;  // indexes into added_, longest first
  PreTokenizerKind pre_tokenizer_ = PreTokenizerKind::kGpt2;
  bool ignore_merges_ = false;
  std::optional<int32_t> bos_id_, eos_id_, unk_id_;
  std::vector<int32_t> stop_ids_;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> BpeTokenizer::Build(BpeVocabulary v) {
  auto tok = std::make_unique<BpeTokenizer>();
  const int32_t n = static_cast<int32_t>(v.tokens.size());
  if (n == 0) return absl::InvalidArgumentError("tokenizer vocabulary is empty");
  auto check_id = [n](std::optional<int32_t> id, std::string_view what) -> absl::Status {
    if (id && (*id < 0 || *id >= n)) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what), " id ", *id, " is outside the vocabulary of ", n));
    }
    return absl::OkStatus();
  };
  KV_RETURN_IF_ERROR(check_id(v.bos_id, "BOS"));
  KV_RETURN_IF_ERROR(check_id(v.eos_id, "EOS"));
  KV_RETURN_IF_ERROR(check_id(v.unk_id, "unknown-token"));

  tok->token_bytes_.resize(n);
  tok->special_.assign(n, 0);
  for (const auto& added : v.added_tokens) {
    KV_RETURN_IF_ERROR(check_id(added.id, absl::StrCat("added token '", added.content, "'")));
    if (added.content.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("added token ", added.id, " has empty text"));
    }
    v.tokens[added.id] = added.content;
    tok->special_[added.id] = added.special;
    tok->token_bytes_[added.id] = added.content;
    tok->added_.push_back({added.id, added.special, added.content});
  }
  for (int32_t id = 0; id < n; ++id) {
    const std::string& spelling = v.tokens[id];
    if (spelling.empty()) continue;
    if (!tok->spelling_to_id_.emplace(spelling, id).second) {
      return absl::InvalidArgumentError(absl::StrCat("token '", spelling,
                                                     "' appears twice in the vocabulary (ids ",
                                                     tok->spelling_to_id_[spelling], " and ", id, ")"));
    }
    std::optional<std::string> bytes = AlphabetToBytes(spelling);
    if (bytes) tok->bytes_to_id_.emplace(*bytes, id);
    if (tok->token_bytes_[id].empty()) tok->token_bytes_[id] = bytes ? *std::move(bytes) : spelling;
  }

  const auto& alphabet = ByteToAlphabetCodePoint();
  for (int b = 0; b < 256; ++b) {
    std::string spelling;
    AppendUtf8(alphabet[b], &spelling);
    auto it = tok->spelling_to_id_.find(spelling);
    tok->byte_token_[b] = it == tok->spelling_to_id_.end() ? -1 : it->second;
  }

  tok->merges_.reserve(v.merges.size());
  for (size_t rank = 0; rank < v.merges.size(); ++rank) {
    const auto& [left, right] = v.merges[rank];
    auto find = [&](const std::string& s) -> absl::StatusOr<int32_t> {
      auto it = tok->spelling_to_id_.find(s);
      if (it == tok->spelling_to_id_.end()) {
        return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " ('", left, "' '", right, "') uses '",
                                                       s, "', which is not in the vocabulary"));
      }
      return it->second;
    };
    KV_ASSIGN_OR_RETURN(const int32_t left_id, find(left));
    KV_ASSIGN_OR_RETURN(const int32_t right_id, find(right));
    KV_ASSIGN_OR_RETURN(const int32_t merged_id, find(left + right));
    // A repeated pair keeps its first (best) rank.
    tok->merges_.try_emplace(PairKey(left_id, right_id), MergeRule{static_cast<int32_t>(rank), merged_id});
  }

  for (size_t i = 0; i < tok->added_.size(); ++i) {
    tok->added_by_first_byte_[static_cast<unsigned char>(tok->added_[i].content[0])].push_back(
        static_cast<int32_t>(i));
  }
  for (auto& list : tok->added_by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [&](int32_t a, int32_t b) {
      return tok->added_[a].content.size() > tok->added_[b].content.size();
    });
  }

  tok->pre_tokenizer_ = v.pre_tokenizer;
  tok->ignore_merges_ = v.ignore_merges;
  tok->bos_id_ = v.bos_id;
  tok->eos_id_ = v.eos_id;
  tok->unk_id_ = v.unk_id;
  if (v.eos_id) tok->stop_ids_.push_back(*v.eos_id);
  // End-of-turn and end-of-text tokens of the ChatML and Llama 3 families.
  for (std::string_view text :
       {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>"}) {
    if (auto id = tok->TokenId(text); id && tok->special_[*id]) tok->stop_ids_.push_back(*id);
  }
  std::sort(tok->stop_ids_.begin(), tok->stop_ids_.end());
  tok->stop_ids_.erase(std::unique(tok->stop_ids_.begin(), tok->stop_ids_.end()), tok->stop_ids_.end());
  return tok;
}

std::optional<int32_t> BpeTokenizer::TokenId(std::string_view token_text) const {
  const absl::string_view key(token_text.data(), token_text.size());
  if (auto it = spelling_to_id_.find(key); it != spelling_to_id_.end()) return it->second;
  if (auto it = bytes_to_id_.find(key); it != bytes_to_id_.end()) return it->second;
  return std::nullopt;
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool parse_special) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 4 + 16);
  EncodeScratch scratch;
  size_t segment_begin = 0;
  for (size_t i = 0; i < text.size();) {
    const auto& candidates = added_by_first_byte_[static_cast<unsigned char>(text[i])];
    const Added* match = nullptr;
    for (int32_t index : candidates) {
      const Added& a = added_[index];
      if (text.size() - i >= a.content.size() &&
          std::memcmp(text.data() + i, a.content.data(), a.content.size()) == 0) {
        match = &a;
        break;
      }
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    // A special token written in the text stays plain text without parse_special; like `tokenizers`, the
    // match is still consumed so no other added token is looked for inside it.
    if (match->special && !parse_special) {
      i += match->content.size();
      continue;
    }
    EncodeText(text.substr(segment_begin, i - segment_begin), &ids, &scratch);
    ids.push_back(match->id);
    i += match->content.size();
    segment_begin = i;
  }
  EncodeText(text.substr(segment_begin), &ids, &scratch);
  return ids;
}

void BpeTokenizer::EncodeText(std::string_view text, std::vector<int32_t>* ids,
                              EncodeScratch* scratch) const {
  PreTokenize(pre_tokenizer_, text, [&](std::string_view piece) {
    const absl::string_view key(piece.data(), piece.size());
    if (auto it = scratch->cache.find(key); it != scratch->cache.end()) {
      const auto [offset, count] = it->second;
      for (uint32_t k = 0; k < count; ++k) ids->push_back((*ids)[offset + k]);
      return;
    }
    const size_t before = ids->size();
    EncodePiece(piece, ids, scratch);
    scratch->cache.emplace(
        key, std::make_pair(static_cast<uint32_t>(before), static_cast<uint32_t>(ids->size() - before)));
  });
}

void BpeTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* ids,
                               EncodeScratch* scratch) const {
  if (ignore_merges_) {
    if (auto it = bytes_to_id_.find(absl::string_view(piece.data(), piece.size()));
        it != bytes_to_id_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  auto& symbols = scratch->symbols;
  symbols.clear();
  for (unsigned char byte : piece) {
    int32_t id = byte_token_[byte];
    if (id < 0) {
      if (!unk_id_) continue;  // `tokenizers` drops a character it has no token for
      id = *unk_id_;
    }
    const int32_t pos = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, pos - 1, -1});
    if (pos > 0) symbols[pos - 1].next = pos;
  }
  if (symbols.empty()) return;

  auto& heap = scratch->heap;
  heap.clear();
  auto push_candidate = [&](int32_t pos) {
    if (pos < 0) return;
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    if (const MergeRule* rule = FindMerge(symbols[pos].id, symbols[next].id)) {
      heap.push_back({rule->rank, pos, symbols[pos].id, symbols[next].id, rule->merged});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) push_candidate(pos);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const EncodeScratch::Candidate top = heap.back();
    heap.pop_back();
    // Skip candidates made stale by an earlier merge: a symbol only ever grows (its id changes) or is
    // removed (id -1), so the pair is current exactly when both ids still match.
    auto& left = symbols[top.pos];
    if (left.id != top.left || left.next < 0 || symbols[left.next].id != top.right) continue;
    const int32_t removed = left.next;
    left.id = top.merged;
    left.next = symbols[removed].next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    symbols[removed].id = -1;
    push_candidate(left.prev);
    push_candidate(top.pos);
  }
  for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) ids->push_back(symbols[pos].id);
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (!InRange(id) || (skip_special && special_[id])) continue;
    out += token_bytes_[id];
  }
  return out;
}

bool IsPythonWhitespace(char32_t cp) {
  // str.isspace(): White_Space plus the information separators U+001C..U+001F.
  return (cp >= 0x1C && cp <= 0x1F) || u_isUWhiteSpace(static_cast<UChar32>(cp));
}

// Strips leading and trailing whitespace as Jinja's `trim` filter (Python's str.strip) does.
std::string_view TrimWhitespace(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t begin = s.size(), end = 0;
  for (size_t i = 0; i < s.size();) {
    const Utf8Char ch = DecodeUtf8(p + i, s.size() - i);
    if (!ch.valid || !IsPythonWhitespace(ch.code_point)) {
      begin = std::min(begin, i);
      end = i + ch.length;
    }
    i += ch.length;
  }
  return begin >= end ? std::string_view() : s.substr(begin, end - begin);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> BuildBpeTokenizer(BpeVocabulary vocabulary) {
  return BpeTokenizer::Build(std::move(vocabulary));
}

std::string ApplyChatTemplate(ChatTemplate tmpl, const std::vector<ChatMessage>& messages,
                              bool add_generation_prompt) {
  std::string out;
  switch (tmpl) {
    case ChatTemplate::kChatML:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && messages[0].role != "system") {
          out +=
              "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
              "Face<|im_end|>\n";
        }
        out.append("<|im_start|>").append(messages[i].role).append("\n");
        out.append(messages[i].content).append("<|im_end|>\n");
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    case ChatTemplate::kLlama3:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0) out += "<|begin_of_text|>";
        out.append("<|start_header_id|>").append(messages[i].role).append("<|end_header_id|>\n\n");
        out.append(TrimWhitespace(messages[i].content)).append("<|eot_id|>");
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
  }
  return out;
}

std::string Utf8StreamDecoder::Push(std::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  std::string out;
  out.reserve(pending_.size());
  const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
  size_t i = 0;
  while (i < pending_.size()) {
    const Utf8Char ch = DecodeUtf8(p + i, pending_.size() - i);
    if (ch.incomplete) break;  // may complete with the next token's bytes
    if (ch.valid) {
      out.append(pending_, i, ch.length);
    } else {
      out += kReplacementChar;
    }
    i += ch.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8StreamDecoder::Flush() {
  // What is left is the start of one character that never completed.
  std::string out = pending_.empty() ? std::string() : std::string(kReplacementChar);
  pending_.clear();
  return out;
}

}  // namespace kvshard
