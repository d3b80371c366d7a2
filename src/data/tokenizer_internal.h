// Internals of the tokenizer (not part of the engine's API): the pieces of the HF pipeline
// (normalizer -> added-token split -> pre-tokenizer -> BPE model -> post-processor, and the
// decoder chain), each built from its tokenizer.json object by a make_* factory that throws
// moetune::Error naming the unsupported type and the file. Text flows as a list of Pieces:
// a Piece either carries an added token's id (final) or normalized text still to split.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.h"

struct pcre2_real_code_8;

namespace moetune::tokenizer_detail {

using json = nlohmann::json;

struct Piece {
  std::string text;       // normalized text, valid UTF-8
  int32_t added_id = -1;  // >= 0: an added token (no further splitting or modelling)
  bool at_origin = true;  // starts at offset 0 of the original text (Metaspace "first")
};

// Hash for unordered_map<std::string, ...> that also accepts string_view keys.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// Reads a required/optional member of a JSON object with an error naming the context.
const json& member(const json& object, const char* key, const std::string& context);
std::string string_member(const json& object, const char* key, const std::string& context,
                          const std::string& fallback = {});
bool bool_member(const json& object, const char* key, const std::string& context, bool fallback);

// A PCRE2 regex (UTF + UCP, JIT when available) with Oniguruma's \s (which also matches
// U+0085) so that the patterns of tokenizer.json behave as in HF tokenizers.
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& context);
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex();
  // Non-overlapping matches, left to right, as (begin, end) byte offsets. An empty match
  // advances by one character. text must be valid UTF-8.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const;
  // Whether the pattern matches somewhere in text.
  bool search(std::string_view text) const;

 private:
  pcre2_real_code_8* code_ = nullptr;
  bool jit_ = false;
};
// The regex source matching literal text (for the {"String": ...} patterns).
std::string regex_escape(std::string_view literal);

// SplitDelimiterBehavior of HF: how matches of a pattern cut a piece.
enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
SplitBehavior parse_split_behavior(const json& value, const std::string& context);
// Cuts text by (begin, end, is_match) spans per the behavior; appends non-empty parts.
void split_by_matches(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
                      SplitBehavior behavior, bool invert, std::vector<Piece>& out);

// ---- normalizers (tokenizer_normalizers.cpp) ------------------------------------------------
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& text) const = 0;
};
std::unique_ptr<Normalizer> make_normalizer(const json& config, const std::string& source);

// ---- pre-tokenizers (tokenizer_pre_tokenizers.cpp) ------------------------------------------
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits every piece that is not an added token; empty pieces are dropped.
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& config, const std::string& source);

// The GPT-2 byte <-> unicode-character table of ByteLevel.
const std::string& byte_to_unicode(uint8_t byte);  // UTF-8 of the char standing for byte
int unicode_to_byte(char32_t code_point);          // -1 when not a byte-level char

// ---- BPE model (tokenizer_bpe.cpp) ----------------------------------------------------------
class BpeModel {
 public:
  BpeModel(const json& model, const std::string& source);
  // Appends the ids of one pre-token (non-empty).
  void tokenize(std::string_view word, std::vector<int32_t>& ids) const;
  const Vocab& vocab() const { return vocab_; }
  const std::vector<std::string>& id_to_token() const { return id_to_token_; }

 private:
  struct MergeInfo {
    int32_t rank, new_id;
  };
  void merge_word(std::string_view word, std::vector<int32_t>& ids) const;
  const MergeInfo* find_merge(int32_t left, int32_t right) const;

  Vocab vocab_;
  std::vector<std::string> id_to_token_;  // "" for holes
  std::unordered_map<uint64_t, MergeInfo> merges_;
  std::string continuing_subword_prefix_, end_of_word_suffix_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  int32_t byte_ids_[256];  // <0xXX> ids for byte_fallback (-1 when missing)

  // Bounded cache of pre-token -> ids (cleared when full); guarded for concurrent encode().
  static constexpr size_t kCacheCapacity = 50000, kCacheMaxWordBytes = 256;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

// ---- added tokens (tokenizer_added_tokens.cpp) ----------------------------------------------
struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

class AddedVocabulary {
 public:
  AddedVocabulary(const json& added_tokens, const Vocab& model_vocab, const Normalizer* normalizer,
                  const std::string& source);
  // HF's extract_and_normalize: splits out non-normalized tokens on the raw text, normalizes
  // the rest piecewise, then splits out the normalized tokens.
  std::vector<Piece> extract_and_normalize(std::string_view text,
                                           const Normalizer* normalizer) const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  // A byte trie over token contents for leftmost-longest matching.
  struct Trie {
    struct Node {
      std::unordered_map<unsigned char, int32_t> next;
      int32_t token = -1;  // index into tokens_
    };
    std::vector<Node> nodes{Node{}};
    bool first_byte[256] = {};
    bool empty() const { return nodes.size() == 1; }
    void insert(std::string_view key, int32_t token);
  };
  void split(Piece piece, const Trie& trie, std::vector<Piece>& out) const;

  std::vector<AddedToken> tokens_;
  Trie raw_trie_, normalized_trie_;
  std::unique_ptr<Regex> word_start_, word_end_;  // \w at the start / end (single_word)
};

// ---- post-processors (tokenizer_post_processors.cpp) ----------------------------------------
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual void process(std::vector<int32_t>& ids, bool add_special_tokens) const = 0;
};
std::unique_ptr<PostProcessor> make_post_processor(const json& config, const Vocab& vocab,
                                                   const std::string& source);

// ---- decoders (tokenizer_decoders.cpp) ------------------------------------------------------
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const json& config, const std::string& source);

}  // namespace moetune::tokenizer_detail
