// Added and special tokens, matched in text as HF's AddedVocabulary does: tokens with
// normalized=false are found in the raw text first; the remaining pieces are normalized and
// searched for the normalized=true tokens (whose patterns are normalized too). Matching is
// leftmost-longest over a byte trie (as HF's Aho-Corasick LeftmostLongest), and a match
// rejected by single_word still consumes its span; lstrip/rstrip swallow the whitespace
// around a match (\s as Rust's regex sees it).
#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

namespace {

bool is_rust_whitespace(char32_t cp) {  // Unicode White_Space, as Rust regex \s
  return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// Start of the run of whitespace that ends text (text.size() when none).
size_t whitespace_run_start(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    size_t len = 0;
    if (!is_rust_whitespace(decode_utf8(text, start, len))) break;
    end = start;
  }
  return end;
}

// Length of the run of whitespace that starts text.
size_t whitespace_run_length(std::string_view text) {
  size_t pos = 0;
  for (size_t len = 0; pos < text.size(); pos += len)
    if (!is_rust_whitespace(decode_utf8(text, pos, len))) break;
  return pos;
}

}  // namespace

void AddedVocabulary::Trie::insert(std::string_view key, int32_t token) {
  int32_t node = 0;
  for (unsigned char c : key) {
    auto it = nodes[node].next.find(c);
    if (it == nodes[node].next.end()) {
      nodes.emplace_back();
      it = nodes[node].next.emplace(c, static_cast<int32_t>(nodes.size() - 1)).first;
    }
    node = it->second;
  }
  if (nodes[node].token < 0) nodes[node].token = token;  // the first pattern wins ties
  first_byte[static_cast<unsigned char>(key[0])] = true;
}

AddedVocabulary::AddedVocabulary(const json& added_tokens, const Vocab& model_vocab,
                                 const Normalizer* normalizer, const std::string& source) {
  const std::string context = source + ": added_tokens";
  if (!added_tokens.is_null() && !added_tokens.is_array()) fail(context, " must be an array");
  // HF ignores the ids written in the file: each token takes its id in the vocab when it has
  // one, else the next free id (AddedVocabulary::add_tokens); a warning is all HF gives.
  Vocab assigned;
  int64_t max_assigned = -1;
  const auto model_size = static_cast<int64_t>(model_vocab.size());
  for (const json& entry : added_tokens.is_array() ? added_tokens : json::array()) {
    AddedToken token;
    token.content = string_member(entry, "content", context);
    token.single_word = bool_member(entry, "single_word", context, false);
    token.lstrip = bool_member(entry, "lstrip", context, false);
    token.rstrip = bool_member(entry, "rstrip", context, false);
    token.special = bool_member(entry, "special", context, false);
    token.normalized = bool_member(entry, "normalized", context, !token.special);
    if (token.content.empty()) continue;
    bool duplicate = false;
    for (const AddedToken& other : tokens_)
      duplicate =
          duplicate || (other.content == token.content && other.single_word == token.single_word &&
                        other.lstrip == token.lstrip && other.rstrip == token.rstrip &&
                        other.normalized == token.normalized && other.special == token.special);
    if (duplicate) continue;
    int64_t id;
    if (auto it = assigned.find(token.content); it != assigned.end())
      id = it->second;
    else if (auto vit = model_vocab.find(token.content); vit != model_vocab.end())
      id = vit->second;
    else if (max_assigned < 0)
      id = model_size;
    else
      id = (max_assigned >= model_size || model_size == 0) ? max_assigned + 1 : model_size;
    if (id > INT32_MAX) fail(context, ": too many tokens");
    token.id = static_cast<int32_t>(id);
    assigned[token.content] = token.id;
    max_assigned = std::max(max_assigned, id);
    tokens_.push_back(std::move(token));
  }
  // HF orders the patterns special tokens first, then the others.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < tokens_.size(); ++i) {
      const AddedToken& token = tokens_[i];
      if (token.content.empty() || token.special != (pass == 0)) continue;
      if (!token.normalized) {
        raw_trie_.insert(token.content, static_cast<int32_t>(i));
      } else {
        std::string pattern = token.content;
        if (normalizer) normalizer->normalize(pattern);
        if (!pattern.empty()) normalized_trie_.insert(pattern, static_cast<int32_t>(i));
      }
    }
  }
  // Rust regex's \w (Alphabetic, marks, decimal numbers, connector punctuation, joiners);
  // \A and \z because the Regex class compiles in multiline mode.
  const std::string word = R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])";
  word_start_ = std::make_unique<Regex>("\\A" + word, context);
  word_end_ = std::make_unique<Regex>(word + "\\z", context);
}

void AddedVocabulary::split(Piece piece, const Trie& trie, std::vector<Piece>& out) const {
  const std::string& text = piece.text;
  if (trie.empty() || text.empty()) {
    out.push_back(std::move(piece));
    return;
  }
  size_t emitted = 0;  // start_offset of HF: text before it is already emitted
  auto emit_text = [&](size_t begin, size_t end) {
    Piece sub;
    sub.text.assign(text, begin, end - begin);
    sub.at_origin = piece.at_origin && begin == 0;
    out.push_back(std::move(sub));
  };
  size_t pos = 0;
  while (pos < text.size()) {
    if (!trie.first_byte[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    // Longest match starting at pos.
    int32_t node = 0, best_token = -1;
    size_t best_end = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      const auto& next = trie.nodes[node].next;
      auto it = next.find(static_cast<unsigned char>(text[i]));
      if (it == next.end()) break;
      node = it->second;
      if (trie.nodes[node].token >= 0) best_token = trie.nodes[node].token, best_end = i + 1;
    }
    if (best_token < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = tokens_[best_token];
    size_t start = pos, stop = best_end;
    pos = best_end;  // non-overlapping: the search resumes after this match either way
    if (token.single_word) {
      const bool start_space =
          start == 0 || !word_end_->search(std::string_view(text).substr(0, start));
      const bool stop_space =
          stop == text.size() || !word_start_->search(std::string_view(text).substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip)
      start = std::max(whitespace_run_start(std::string_view(text).substr(0, start)), emitted);
    if (token.rstrip) stop += whitespace_run_length(std::string_view(text).substr(stop));
    if (emitted < start) emit_text(emitted, start);
    Piece match;
    match.text.assign(text, start, stop - start);
    match.added_id = token.id;
    match.at_origin = false;
    out.push_back(std::move(match));
    emitted = stop;
    pos = std::max(pos, stop);
  }
  if (emitted < text.size()) emit_text(emitted, text.size());
}

std::vector<Piece> AddedVocabulary::extract_and_normalize(std::string_view text,
                                                          const Normalizer* normalizer) const {
  std::vector<Piece> raw_pieces, pieces;
  Piece whole;
  whole.text.assign(text);
  split(std::move(whole), raw_trie_, raw_pieces);
  for (Piece& piece : raw_pieces) {
    if (piece.added_id >= 0) {
      pieces.push_back(std::move(piece));
      continue;
    }
    if (normalizer) normalizer->normalize(piece.text);
    if (piece.text.empty()) continue;
    split(std::move(piece), normalized_trie_, pieces);
  }
  return pieces;
}

}  // namespace moetune::tokenizer_detail
