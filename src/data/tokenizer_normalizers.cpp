// Normalizers of tokenizer.json: NFC/NFD/NFKC/NFKD, Prepend, Replace (string or regex),
// Strip, ByteLevel, Lowercase (ASCII only: non-ASCII input fails clearly rather than being
// lowercased wrongly), Sequence. Each applies to one piece of text in place.

#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

namespace {

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalizationForm form) : form_(form) {}
  void normalize(std::string& text) const override { text = unicode_normalize(text, form_); }

 private:
  NormalizationForm form_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prefix_);  // HF prepends only to non-empty strings
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(const json& config, const std::string& context)
      : content_(string_member(config, "content", context)) {
    const json& pattern = member(config, "pattern", context);
    if (pattern.contains("String")) {
      literal_ = pattern.at("String").get<std::string>();
      is_literal_ = true;
    } else if (pattern.contains("Regex")) {
      regex_ = std::make_unique<Regex>(pattern.at("Regex").get<std::string>(), context);
    } else {
      fail(context, ": Replace pattern must be {\"String\": ...} or {\"Regex\": ...}");
    }
  }
  void normalize(std::string& text) const override {
    if (is_literal_) {
      if (literal_.empty() || text.find(literal_) == std::string::npos) return;
      std::string out;
      out.reserve(text.size());
      size_t pos = 0;
      for (size_t hit; (hit = text.find(literal_, pos)) != std::string::npos;
           pos = hit + literal_.size())
        out.append(text, pos, hit - pos).append(content_);
      out.append(text, pos, std::string::npos);
      text = std::move(out);
      return;
    }
    std::vector<std::pair<size_t, size_t>> matches;
    regex_->find_all(text, matches);
    if (matches.empty()) return;
    std::string out;
    size_t pos = 0;
    for (auto [begin, end] : matches) {
      out.append(text, pos, begin - pos).append(content_);
      pos = end;
    }
    out.append(text, pos, std::string::npos);
    text = std::move(out);
  }

 private:
  std::string literal_, content_;
  bool is_literal_ = false;
  std::unique_ptr<Regex> regex_;
};

bool is_unicode_whitespace(char32_t cp) {  // Rust char::is_whitespace (White_Space)
  return (cp >= 9 && cp <= 13) || cp == 32 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text) const override {
    size_t begin = 0, end = text.size();
    if (left_) {
      for (size_t len = 0; begin < end; begin += len)
        if (!is_unicode_whitespace(decode_utf8(text, begin, len))) break;
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        size_t len = 0;
        if (!is_unicode_whitespace(decode_utf8(text, start, len))) break;
        end = start;
      }
    }
    text = text.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

class ByteLevelNormalizer final : public Normalizer {
 public:
  void normalize(std::string& text) const override {
    std::string out;
    out.reserve(text.size() * 2);
    for (unsigned char byte : text) out += byte_to_unicode(byte);
    text = std::move(out);
  }
};

class LowercaseNormalizer final : public Normalizer {
 public:
  explicit LowercaseNormalizer(std::string context) : context_(std::move(context)) {}
  void normalize(std::string& text) const override {
    for (char& c : text) {
      if (static_cast<unsigned char>(c) >= 0x80)
        fail(context_, ": the Lowercase normalizer supports only ASCII text here");
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
  }

 private:
  std::string context_;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  void normalize(std::string& text) const override {
    for (const auto& part : parts_) part->normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& config, const std::string& source) {
  if (config.is_null()) return nullptr;
  const std::string type = string_member(config, "type", source + ": normalizer");
  const std::string context = source + ": normalizer " + type;
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormalizationForm::NFC);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormalizationForm::NFD);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormalizationForm::NFKC);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormalizationForm::NFKD);
  if (type == "Prepend")
    return std::make_unique<PrependNormalizer>(string_member(config, "prepend", context));
  if (type == "Replace") return std::make_unique<ReplaceNormalizer>(config, context);
  if (type == "Strip")
    return std::make_unique<StripNormalizer>(bool_member(config, "strip_left", context, true),
                                             bool_member(config, "strip_right", context, true));
  if (type == "ByteLevel") return std::make_unique<ByteLevelNormalizer>();
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>(context);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const json& part : member(config, "normalizers", context))
      if (auto made = make_normalizer(part, source)) parts.push_back(std::move(made));
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  fail(source, ": unsupported normalizer type '", type, "'");
}

}  // namespace moetune::tokenizer_detail
