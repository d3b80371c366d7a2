// Pre-tokenizers of tokenizer.json: ByteLevel (GPT-2 regex + byte->char mapping),
// Split (regex or string, any behavior, invert), Metaspace (replacement char, prepend_scheme
// first/always/never, split), Whitespace, WhitespaceSplit, Digits, Sequence. Each splits
// every piece that is not an added token; empty pieces are dropped as in HF.
#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

namespace {

// GPT-2's table: printable bytes map to themselves, the rest to U+0100.. in byte order.
struct ByteTable {
  std::string to_unicode[256];
  int from_unicode[512];
  ByteTable() {
    std::fill(std::begin(from_unicode), std::end(from_unicode), -1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp =
          printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++);
      append_utf8(to_unicode[b], cp);
      from_unicode[cp] = b;
    }
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}

// Applies fn(piece, out) to every splittable piece; keeps added tokens; drops empty pieces.
template <typename Fn>
void split_each(std::vector<Piece>& pieces, Fn&& fn) {
  std::vector<Piece> out;
  out.reserve(pieces.size() * 4);
  for (Piece& piece : pieces) {
    if (piece.added_id >= 0) {
      out.push_back(std::move(piece));
      continue;
    }
    const size_t first = out.size();
    fn(piece, out);
    size_t kept = first;
    for (size_t i = first; i < out.size(); ++i)
      if (!out[i].text.empty()) {
        if (kept != i) out[kept] = std::move(out[i]);
        ++kept;
      }
    out.resize(kept);
  }
  pieces = std::move(out);
}

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(const json& config, const std::string& context)
      : add_prefix_space_(bool_member(config, "add_prefix_space", context, true)),
        use_regex_(bool_member(config, "use_regex", context, true)) {
    if (use_regex_) regex_ = std::make_unique<Regex>(kGpt2Pattern, context);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      if (add_prefix_space_ && (piece.text.empty() || piece.text[0] != ' ') && !piece.text.empty())
        piece.text.insert(0, " ");
      if (use_regex_) {
        regex_->find_all(piece.text, matches);
        split_by_matches(piece, matches, SplitBehavior::Isolated, false, out);
      } else {
        out.push_back(std::move(piece));
      }
    });
    const ByteTable& table = byte_table();
    for (Piece& piece : pieces) {
      if (piece.added_id >= 0) continue;
      std::string mapped;
      mapped.reserve(piece.text.size() * 2);
      for (unsigned char byte : piece.text) mapped += table.to_unicode[byte];
      piece.text = std::move(mapped);
    }
  }

 private:
  bool add_prefix_space_, use_regex_;
  std::unique_ptr<Regex> regex_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(const json& config, const std::string& context)
      : behavior_(parse_split_behavior(member(config, "behavior", context), context)),
        invert_(bool_member(config, "invert", context, false)) {
    const json& pattern = member(config, "pattern", context);
    if (pattern.is_object() && pattern.contains("Regex") && pattern.at("Regex").is_string())
      regex_ = std::make_unique<Regex>(pattern.at("Regex").get<std::string>(), context);
    else if (pattern.is_object() && pattern.contains("String") && pattern.at("String").is_string())
      regex_ =
          std::make_unique<Regex>(regex_escape(pattern.at("String").get<std::string>()), context);
    else
      fail(context, ": pattern must be {\"Regex\": ...} or {\"String\": ...}");
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      regex_->find_all(piece.text, matches);
      split_by_matches(piece, matches, behavior_, invert_, out);
    });
  }

 private:
  SplitBehavior behavior_;
  bool invert_;
  std::unique_ptr<Regex> regex_;
};

enum class PrependScheme { First, Always, Never };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(const json& config, const std::string& context) {
    const std::string replacement = string_member(config, "replacement", context, "\xE2\x96\x81");
    size_t len = 0;
    if (replacement.empty() || find_invalid_utf8(replacement) != std::string::npos ||
        (decode_utf8(replacement, 0, len), len != replacement.size()))
      fail(context, ": replacement must be one character");
    replacement_ = replacement;
    const std::string scheme = string_member(config, "prepend_scheme", context, "always");
    if (scheme == "first")
      scheme_ = PrependScheme::First;
    else if (scheme == "always")
      scheme_ = PrependScheme::Always;
    else if (scheme == "never")
      scheme_ = PrependScheme::Never;
    else
      fail(context, ": unsupported prepend_scheme '", scheme, "'");
    if (config.contains("add_prefix_space") && config.at("add_prefix_space") == false) {
      if (scheme_ != PrependScheme::Never && config.contains("prepend_scheme"))
        fail(context, ": add_prefix_space does not match declared prepend_scheme");
      scheme_ = PrependScheme::Never;
    }
    split_ = bool_member(config, "split", context, true);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      std::string& text = piece.text;
      if (text.find(' ') != std::string::npos) {
        std::string replaced;
        replaced.reserve(text.size() + 16);
        for (char c : text) {
          if (c == ' ')
            replaced += replacement_;
          else
            replaced += c;
        }
        text = std::move(replaced);
      }
      const bool starts = text.compare(0, replacement_.size(), replacement_) == 0;
      if (!text.empty() && !starts &&
          (scheme_ == PrependScheme::Always ||
           (scheme_ == PrependScheme::First && piece.at_origin)))
        text.insert(0, replacement_);
      if (!split_) {
        out.push_back(std::move(piece));
        return;
      }
      // MergedWithNext on each replacement character.
      size_t begin = 0;
      for (size_t hit = text.find(replacement_, 1); hit != std::string::npos;
           hit = text.find(replacement_, hit + replacement_.size())) {
        if (hit == begin) continue;
        Piece sub;
        sub.text.assign(text, begin, hit - begin);
        sub.at_origin = piece.at_origin && begin == 0;
        out.push_back(std::move(sub));
        begin = hit;
      }
      Piece last;
      last.text.assign(text, begin, std::string::npos);
      last.at_origin = piece.at_origin && begin == 0;
      out.push_back(std::move(last));
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_ = PrependScheme::Always;
  bool split_ = true;
};

// Splits on a per-code-point predicate (HF's `impl Pattern for Fn(char) -> bool`).
template <typename Predicate>
void split_on_chars(Piece& piece, Predicate&& is_match, SplitBehavior behavior,
                    std::vector<Piece>& out) {
  std::vector<std::pair<size_t, size_t>> matches;
  const std::string& text = piece.text;
  for (size_t i = 0, len = 0; i < text.size(); i += len)
    if (is_match(decode_utf8(text, i, len))) matches.emplace_back(i, i + len);
  split_by_matches(piece, matches, behavior, false, out);
}

bool is_whitespace(char32_t cp) {
  return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

class WhitespaceSplitPreTokenizer final : public PreTokenizer {
 public:
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      split_on_chars(piece, is_whitespace, SplitBehavior::Removed, out);
    });
  }
};

// Digits: Rust's char::is_numeric (any \p{N}), each digit alone or runs kept together.
class DigitsPreTokenizer final : public PreTokenizer {
 public:
  DigitsPreTokenizer(bool individual, const std::string& context)
      : individual_(individual), regex_(R"(\p{N})", context) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      regex_.find_all(piece.text, matches);
      split_by_matches(piece, matches,
                       individual_ ? SplitBehavior::Isolated : SplitBehavior::Contiguous, false,
                       out);
    });
  }

 private:
  bool individual_;
  Regex regex_;
};

// Whitespace: keeps the matches of \w+|[^\w\s]+ (the rest is removed).
class WhitespacePreTokenizer final : public PreTokenizer {
 public:
  explicit WhitespacePreTokenizer(const std::string& context)
      : regex_(R"(\w+|[^\w\s]+)", context) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    split_each(pieces, [&](Piece& piece, std::vector<Piece>& out) {
      regex_.find_all(piece.text, matches);
      split_by_matches(piece, matches, SplitBehavior::Removed, true, out);
    });
  }

 private:
  Regex regex_;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (const auto& part : parts_) part->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

}  // namespace

const std::string& byte_to_unicode(uint8_t byte) { return byte_table().to_unicode[byte]; }

int unicode_to_byte(char32_t code_point) {
  return code_point < 512 ? byte_table().from_unicode[code_point] : -1;
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& config, const std::string& source) {
  if (config.is_null()) return nullptr;
  const std::string type = string_member(config, "type", source + ": pre_tokenizer");
  const std::string context = source + ": pre_tokenizer " + type;
  if (type == "ByteLevel") return std::make_unique<ByteLevelPreTokenizer>(config, context);
  if (type == "Split") return std::make_unique<SplitPreTokenizer>(config, context);
  if (type == "Metaspace") return std::make_unique<MetaspacePreTokenizer>(config, context);
  if (type == "WhitespaceSplit") return std::make_unique<WhitespaceSplitPreTokenizer>();
  if (type == "Whitespace") return std::make_unique<WhitespacePreTokenizer>(context);
  if (type == "Digits")
    return std::make_unique<DigitsPreTokenizer>(
        bool_member(config, "individual_digits", context, false), context);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const json& part : member(config, "pretokenizers", context))
      if (auto made = make_pre_tokenizer(part, source)) parts.push_back(std::move(made));
    return std::make_unique<SequencePreTokenizer>(std::move(parts));
  }
  fail(source, ": unsupported pre_tokenizer type '", type, "'");
}

}  // namespace moetune::tokenizer_detail
