// Shared helpers of the tokenizer pipeline: JSON member access with contextual errors, the
// PCRE2 regex wrapper and HF's split-by-matches behaviors. Trick: tokenizer.json regexes are
// Oniguruma syntax; PCRE2 agrees on what HF uses (\p{L}, \p{N}, (?i:...), lookahead) except
// that Oniguruma's \s also matches U+0085 (NEL), which the translation below adds.
#include <pcre2.h>

#include <algorithm>

#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

const json& member(const json& object, const char* key, const std::string& context) {
  if (!object.is_object() || !object.contains(key)) fail(context, ": missing key '", key, "'");
  return object.at(key);
}

std::string string_member(const json& object, const char* key, const std::string& context,
                          const std::string& fallback) {
  if (!object.is_object() || !object.contains(key) || object.at(key).is_null()) return fallback;
  const json& value = object.at(key);
  if (!value.is_string()) fail(context, ": key '", key, "' must be a string");
  return value.get<std::string>();
}

bool bool_member(const json& object, const char* key, const std::string& context, bool fallback) {
  if (!object.is_object() || !object.contains(key) || object.at(key).is_null()) return fallback;
  const json& value = object.at(key);
  if (!value.is_boolean()) fail(context, ": key '", key, "' must be true or false");
  return value.get<bool>();
}

namespace {

// Oniguruma -> PCRE2: \s gains U+0085 (inside and outside character classes).
std::string translate_pattern(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[i + 1];
      ++i;
      if (next == 's')
        out += in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
      else if (next == 'S' && !in_class)
        out += "[^\\s\\x{85}]";
      else
        out += c, out += next;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t close = pattern.find(":]", i + 2);
      if (close != std::string::npos) {
        out.append(pattern, i, close + 2 - i);
        i = close + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

}  // namespace

std::string regex_escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}-#/ \t\n").find(c) != std::string_view::npos &&
        c != '\0') {
      if (c == '\t')
        out += "\\t";
      else if (c == '\n')
        out += "\\n";
      else if (c == ' ')
        out += "\\x20";
      else
        out += '\\', out += c;
    } else {
      out += c;
    }
  }
  return out;
}

Regex::Regex(const std::string& pattern, const std::string& context) {
  const std::string translated = translate_pattern(pattern);
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  code_ =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error_code, &error_offset, nullptr);
  if (!code_) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof(message));
    fail(context, ": cannot compile regex '", pattern, "' at offset ", error_offset, ": ",
         reinterpret_cast<const char*>(message));
  }
  jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() { pcre2_code_free(code_); }

void Regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const {
  matches.clear();
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start <= text.size()) {
    const int rc =
        jit_ ? pcre2_jit_match(code_, subject, text.size(), start, 0, data, nullptr)
             : pcre2_match(code_, subject, text.size(), start, PCRE2_NO_UTF_CHECK, data, nullptr);
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH (or a resource limit: no further matches)
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    const size_t begin = ovector[0], end = ovector[1];
    matches.emplace_back(begin, end);
    if (end > begin) {
      start = end;
    } else {
      if (end >= text.size()) break;
      start = end + utf8_length(static_cast<unsigned char>(text[end]));
    }
  }
  pcre2_match_data_free(data);
}

bool Regex::search(std::string_view text) const {
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0,
                             PCRE2_NO_UTF_CHECK, data, nullptr);
  pcre2_match_data_free(data);
  return rc >= 0;
}

SplitBehavior parse_split_behavior(const json& value, const std::string& context) {
  const std::string name = value.is_string() ? value.get<std::string>() : std::string();
  if (name == "Removed") return SplitBehavior::Removed;
  if (name == "Isolated") return SplitBehavior::Isolated;
  if (name == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (name == "Contiguous") return SplitBehavior::Contiguous;
  fail(context, ": unsupported split behavior ", value.dump());
}

void split_by_matches(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
                      SplitBehavior behavior, bool invert, std::vector<Piece>& out) {
  // HF Pattern::find_matches: alternating (span, is_match), covering the whole text.
  struct Span {
    size_t begin, end;
    bool is_match;
  };
  const std::string& text = piece.text;
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  if (text.empty()) {
    spans.push_back({0, 0, false});
  } else {
    size_t prev = 0;
    for (auto [begin, end] : matches) {
      if (prev != begin) spans.push_back({prev, begin, false});
      spans.push_back({begin, end, true});
      prev = end;
    }
    if (prev != text.size()) spans.push_back({prev, text.size(), false});
  }
  if (invert)
    for (Span& span : spans) span.is_match = !span.is_match;

  // (begin, end, remove) per HF NormalizedString::split.
  struct Part {
    size_t begin, end;
    bool remove;
  };
  std::vector<Part> parts;
  parts.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::Isolated:
      for (const Span& s : spans) parts.push_back({s.begin, s.end, false});
      break;
    case SplitBehavior::Removed:
      for (const Span& s : spans) parts.push_back({s.begin, s.end, s.is_match});
      break;
    case SplitBehavior::Contiguous:
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !parts.empty())
          parts.back().end = s.end;
        else
          parts.push_back({s.begin, s.end, false});
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithPrevious:
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !parts.empty())
          parts.back().end = s.end;
        else
          parts.push_back({s.begin, s.end, false});
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithNext:
      for (size_t k = spans.size(); k-- > 0;) {
        const Span& s = spans[k];
        if (s.is_match && !previous_match && !parts.empty())
          parts.back().begin = s.begin;
        else
          parts.push_back({s.begin, s.end, false});
        previous_match = s.is_match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
  }
  for (const Part& part : parts) {
    if (part.remove || part.end == part.begin) continue;
    Piece sub;
    sub.text.assign(text, part.begin, part.end - part.begin);
    sub.at_origin = piece.at_origin && part.begin == 0;
    out.push_back(std::move(sub));
  }
}

}  // namespace moetune::tokenizer_detail
