// Decoders of tokenizer.json, as HF's decode_chain over the token strings: ByteLevel (chars
// back to bytes, invalid UTF-8 -> U+FFFD), Metaspace, Replace, ByteFallback (<0xXX> runs ->
// UTF-8, or one U+FFFD per byte when invalid), Fuse, Strip, BPEDecoder (suffix -> space),
// Sequence. The final string is the concatenation of the chain's output.
#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

namespace {

const std::string kReplacementChar = "\xEF\xBF\xBD";

// Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t bad = find_invalid_utf8(bytes.substr(pos));
    if (bad == std::string_view::npos) {
      out.append(bytes.substr(pos));
      break;
    }
    out.append(bytes.substr(pos, bad));
    pos += bad;
    // Length of the maximal prefix of a valid sequence (at least 1 byte), as Rust does.
    const auto* s = reinterpret_cast<const unsigned char*>(bytes.data()) + pos;
    const size_t left = bytes.size() - pos;
    size_t skip = 1;
    const unsigned char c = s[0];
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
      need = 1;
    else if (c >= 0xE0 && c <= 0xEF)
      need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
      need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    if (need > 0 && left > 1 && s[1] >= lo && s[1] <= hi) {
      skip = 2;
      while (skip <= need && skip < left && (s[skip] & 0xC0) == 0x80) ++skip;
    }
    out += kReplacementChar;
    pos += skip;
  }
  return out;
}

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      const size_t start = bytes.size();
      bool all = true;
      for (size_t i = 0, len = 0; i < token.size(); i += len) {
        const int byte = unicode_to_byte(decode_utf8(token, i, len));
        if (byte < 0) {
          all = false;
          break;
        }
        bytes.push_back(static_cast<char>(byte));
      }
      if (!all) {
        bytes.resize(start);
        bytes += token;
      }
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(const json& config, const std::string& context)
      : replacement_(string_member(config, "replacement", context, "\xE2\x96\x81")) {
    std::string scheme = string_member(config, "prepend_scheme", context, "always");
    if (config.contains("add_prefix_space") && config.at("add_prefix_space") == false)
      scheme = "never";
    strip_first_ = scheme != "never";
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string out;
      const std::string& token = tokens[i];
      for (size_t pos = 0; pos < token.size();) {
        if (!replacement_.empty() && token.compare(pos, replacement_.size(), replacement_) == 0) {
          if (!(i == 0 && strip_first_)) out += ' ';
          pos += replacement_.size();
        } else {
          out += token[pos++];
        }
      }
      tokens[i] = std::move(out);
    }
  }

 private:
  std::string replacement_;
  bool strip_first_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(const json& config, const std::string& context) {
    const json& pattern = member(config, "pattern", context);
    content_ = string_member(config, "content", context);
    if (pattern.contains("String"))
      literal_ = pattern.at("String").get<std::string>();
    else if (pattern.contains("Regex"))
      regex_ = std::make_unique<Regex>(pattern.at("Regex").get<std::string>(), context);
    else
      fail(context, ": pattern must be {\"String\": ...} or {\"Regex\": ...}");
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::pair<size_t, size_t>> matches;
    for (std::string& token : tokens) {
      matches.clear();
      if (regex_) {
        regex_->find_all(token, matches);
      } else if (!literal_.empty()) {
        for (size_t hit = token.find(literal_); hit != std::string::npos;
             hit = token.find(literal_, hit + literal_.size()))
          matches.emplace_back(hit, hit + literal_.size());
      }
      if (matches.empty()) continue;
      std::string out;
      size_t pos = 0;
      for (auto [begin, end] : matches) {
        out.append(token, pos, begin - pos).append(content_);
        pos = end;
      }
      out.append(token, pos, std::string::npos);
      token = std::move(out);
    }
  }

 private:
  std::string literal_, content_;
  std::unique_ptr<Regex> regex_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (find_invalid_utf8(pending) == std::string::npos)
        out.push_back(pending);
      else
        for (size_t i = 0; i < pending.size(); ++i) out.push_back(kReplacementChar);
      pending.clear();
    };
    for (std::string& token : tokens) {
      int byte = -1;
      if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>') {
        auto hex = [](char c) {
          return c >= '0' && c <= '9'   ? c - '0'
                 : c >= 'a' && c <= 'f' ? c - 'a' + 10
                 : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                        : -1;
        };
        const int high = hex(token[3]), low = hex(token[4]);
        if (high >= 0 && low >= 0) byte = high * 16 + low;
      }
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
        continue;
      }
      flush();
      out.push_back(std::move(token));
    }
    flush();
    tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string joined;
    for (const std::string& token : tokens) joined += token;
    tokens.assign(1, std::move(joined));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(const json& config, const std::string& context)
      : content_(string_member(config, "content", context, " ")),
        start_(member(config, "start", context).get<size_t>()),
        stop_(member(config, "stop", context).get<size_t>()) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      // Work on code points: strip up to start_ leading and stop_ trailing `content` chars.
      std::vector<std::pair<size_t, size_t>> chars;  // (byte offset, length)
      for (size_t i = 0, len = 0; i < token.size(); i += len) {
        decode_utf8(token, i, len);
        chars.emplace_back(i, len);
      }
      auto is_content = [&](size_t k) {
        return token.compare(chars[k].first, chars[k].second, content_) == 0;
      };
      size_t begin = 0, end = chars.size();
      for (size_t k = 0; k < start_ && k < chars.size() && is_content(k); ++k) begin = k + 1;
      for (size_t k = 0; k < stop_ && k < chars.size(); ++k) {
        const size_t index = chars.size() - k - 1;
        if (!is_content(index)) break;
        end = index;
      }
      if (end <= begin) {
        token.clear();
        continue;
      }
      const size_t byte_begin = chars[begin].first;
      const size_t byte_end = end == chars.size() ? token.size() : chars[end].first;
      token = token.substr(byte_begin, byte_end - byte_begin);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

class BpeDecoder final : public Decoder {
 public:
  BpeDecoder(const json& config, const std::string& context)
      : suffix_(string_member(config, "suffix", context, "</w>")) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& token = tokens[i];
      const std::string replacement = i + 1 == tokens.size() ? "" : " ";
      std::string out;
      for (size_t hit, pos = 0;; pos = hit + suffix_.size()) {
        hit = suffix_.empty() ? std::string::npos : token.find(suffix_, pos);
        out.append(token, pos, hit == std::string::npos ? std::string::npos : hit - pos);
        if (hit == std::string::npos) break;
        out += replacement;
      }
      token = std::move(out);
    }
  }

 private:
  std::string suffix_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& part : parts_) part->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& config, const std::string& source) {
  if (config.is_null()) return nullptr;
  const std::string type = string_member(config, "type", source + ": decoder");
  const std::string context = source + ": decoder " + type;
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") return std::make_unique<MetaspaceDecoder>(config, context);
  if (type == "Replace") return std::make_unique<ReplaceDecoder>(config, context);
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") return std::make_unique<StripDecoder>(config, context);
  if (type == "BPEDecoder") return std::make_unique<BpeDecoder>(config, context);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const json& part : member(config, "decoders", context))
      if (auto made = make_decoder(part, source)) parts.push_back(std::move(made));
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  fail(source, ": unsupported decoder type '", type, "'");
}

}  // namespace moetune::tokenizer_detail
