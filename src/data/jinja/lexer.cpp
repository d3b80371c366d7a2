// Jinja lexer (see lexer.h). Mirrors jinja2.lexer with trim_blocks=True, lstrip_blocks=True:
// - the source's newlines are normalized to \n and one trailing newline is dropped;
// - text before {%- / {{- / {#- loses its trailing whitespace; text before {% or {# loses the
//   spaces/tabs between the last newline (or the template start, or a tag that ended a line)
//   and the tag (lstrip_blocks), unless the tag opens with {%+;
// - -%} / -}} / -#} eat all following whitespace; %} and #} eat one following newline
//   (trim_blocks) unless written +%};
// - inside a tag, an end delimiter only counts when no bracket is open ({{ {'a': {}} }}).
#include "data/jinja/lexer.h"

#include <cstring>

#include "data/jinja/unicode.h"
#include "data/jinja/value.h"

namespace moetune::jinja {

namespace {

[[noreturn]] void syntax_error(const std::string& message, int line) {
  throw JinjaError("TemplateSyntaxError", message, line);
}

std::string normalize_source(const std::string& source) {
  std::string out;
  out.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      out.push_back('\n');
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      out.push_back(source[i]);
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// Length in bytes of the Unicode whitespace character at s[i], 0 if none (Python's \s).
size_t space_at(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return is_space(c) ? 1 : 0;
  size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
  if (i + len > s.size()) return 0;
  const auto cps = decode_utf8(std::string_view(s).substr(i, len));
  return (cps.size() == 1 && is_space(cps[0])) ? len : 0;
}

// Python str.rstrip() for UTF-8 text.
std::string rstrip_unicode(const std::string& text) {
  auto cps = decode_utf8(text);
  size_t end = cps.size();
  while (end > 0 && is_space(cps[end - 1])) --end;
  if (end == cps.size()) return text;
  return encode_utf8(std::u32string_view(cps).substr(0, end));
}

int count_newlines(const std::string& s, size_t begin, size_t end) {
  int n = 0;
  for (size_t i = begin; i < end; ++i) n += s[i] == '\n';
  return n;
}

bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Python's unicode-escape decoding of a string literal body (after backslashreplace).
std::string decode_string_literal(const std::string& body, int line) {
  std::string out;
  size_t i = 0;
  auto hex = [&](size_t start, size_t count) -> char32_t {
    if (start + count > body.size()) syntax_error("invalid escape in string literal", line);
    char32_t v = 0;
    for (size_t k = 0; k < count; ++k) {
      const char c = body[start + k];
      int d;
      if (c >= '0' && c <= '9')
        d = c - '0';
      else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        d = c - 'A' + 10;
      else
        syntax_error("invalid escape in string literal", line);
      v = v * 16 + d;
    }
    return v;
  };
  while (i < body.size()) {
    const char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out.push_back(c);
      ++i;
      continue;
    }
    const char e = body[i + 1];
    i += 2;
    switch (e) {
      case '\n':
        break;
      case '\\':
        out.push_back('\\');
        break;
      case '\'':
        out.push_back('\'');
        break;
      case '"':
        out.push_back('"');
        break;
      case 'a':
        out.push_back('\a');
        break;
      case 'b':
        out.push_back('\b');
        break;
      case 'f':
        out.push_back('\f');
        break;
      case 'n':
        out.push_back('\n');
        break;
      case 'r':
        out.push_back('\r');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'v':
        out.push_back('\v');
        break;
      case 'x':
        append_utf8(out, hex(i, 2));
        i += 2;
        break;
      case 'u':
        append_utf8(out, hex(i, 4));
        i += 4;
        break;
      case 'U': {
        const char32_t cp = hex(i, 8);
        if (cp > 0x10FFFF) syntax_error("invalid escape in string literal", line);
        append_utf8(out, cp);
        i += 8;
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          char32_t v = e - '0';
          for (int k = 0; k < 2 && i < body.size() && body[i] >= '0' && body[i] <= '7'; ++k, ++i)
            v = v * 8 + (body[i] - '0');
          append_utf8(out, v);
        } else if (static_cast<unsigned char>(e) >= 0x80) {
          // backslashreplace turned the character into \xNN / \uNNNN / \UNNNNNNNN text, which
          // the escaped backslash leaves as is.
          size_t len = 1;
          const auto lead = static_cast<unsigned char>(e);
          len = (lead & 0xE0) == 0xC0   ? 2
                : (lead & 0xF0) == 0xE0 ? 3
                : (lead & 0xF8) == 0xF0 ? 4
                                        : 1;
          const auto cps = decode_utf8(std::string_view(body).substr(i - 1, len));
          char buf[16];
          const unsigned cp = cps.empty() ? 0xFFFD : static_cast<unsigned>(cps[0]);
          if (cp <= 0xFF)
            std::snprintf(buf, sizeof(buf), "\\x%02x", cp);
          else if (cp <= 0xFFFF)
            std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
          else
            std::snprintf(buf, sizeof(buf), "\\U%08x", cp);
          out += buf;
          i += len - 1;
        } else {
          out.push_back('\\');
          out.push_back(e);
        }
    }
  }
  return out;
}

const char* const kOperators[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/",
                                  "*",  "%",  "~",  "[",  "]",  "(",  ")", "{", "}",
                                  ">",  "<",  "=",  ".",  ":",  "|",  ",", ";"};

class Lexer {
 public:
  explicit Lexer(const std::string& source) : s_(normalize_source(source)) {}

  std::vector<Token> run() {
    while (pos_ < s_.size()) lex_root();
    tokens_.push_back({TokenType::End, "", line_});
    return std::move(tokens_);
  }

 private:
  void emit(TokenType type, std::string value, int line) {
    tokens_.push_back({type, std::move(value), line});
  }

  // Finds the next tag opener at or after pos_; returns npos if none.
  size_t find_tag(size_t from) const {
    for (size_t i = s_.find('{', from); i != std::string::npos; i = s_.find('{', i + 1))
      if (i + 1 < s_.size() && (s_[i + 1] == '{' || s_[i + 1] == '%' || s_[i + 1] == '#')) return i;
    return std::string::npos;
  }

  // Matches `{%(-|+|)\s*raw\s*(-%}\s*|%})` at `at`; returns the end of the match or npos.
  size_t match_raw_begin(size_t at, const char* word) const {
    size_t i = at + 2;
    if (i < s_.size() && (s_[i] == '-' || s_[i] == '+')) ++i;
    while (i < s_.size() && space_at(s_, i)) i += space_at(s_, i);
    const size_t wl = std::strlen(word);
    if (s_.compare(i, wl, word) != 0) return std::string::npos;
    i += wl;
    while (i < s_.size() && space_at(s_, i)) i += space_at(s_, i);
    return i;
  }

  // Applies the strip rules to the text before a tag; `sign` is '-', '+' or 0.
  std::string strip_text(std::string text, char sign, bool is_variable) const {
    if (sign == '-') return rstrip_unicode(text);
    if (sign != '+' && !is_variable) {
      const size_t nl = text.rfind('\n');
      const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
      if (l_pos > 0 || line_starting_) {
        bool only_blank = true;
        for (size_t i = l_pos; i < text.size(); ++i)
          if (text[i] != ' ' && text[i] != '\t') only_blank = false;
        if (only_blank) text.resize(l_pos);
      }
    }
    return text;
  }

  void lex_root() {
    const size_t tag = find_tag(pos_);
    if (tag == std::string::npos) {
      emit(TokenType::Data, s_.substr(pos_), line_);
      line_ += count_newlines(s_, pos_, s_.size());
      pos_ = s_.size();
      return;
    }
    const char kind = s_[tag + 1];
    char sign = 0;
    if (tag + 2 < s_.size() && (s_[tag + 2] == '-' || s_[tag + 2] == '+')) sign = s_[tag + 2];
    std::string text = strip_text(s_.substr(pos_, tag - pos_), sign, kind == '{');
    if (!text.empty()) emit(TokenType::Data, text, line_);
    line_ += count_newlines(s_, pos_, tag);
    const int tag_line = line_;
    size_t after = tag + 2 + (sign ? 1 : 0);

    if (kind == '%') {
      const size_t raw_end = match_raw_begin(tag, "raw");
      if (raw_end != std::string::npos) {
        if (s_.compare(raw_end, 3, "-%}") == 0) {
          size_t i = raw_end + 3;
          while (i < s_.size() && space_at(s_, i)) i += space_at(s_, i);
          lex_raw(tag, i);
          return;
        }
        if (s_.compare(raw_end, 2, "%}") == 0) {
          lex_raw(tag, raw_end + 2);
          return;
        }
      }
    }
    line_starting_ = false;
    if (kind == '#') {
      lex_comment(after, tag_line);
      return;
    }
    emit(kind == '%' ? TokenType::BlockBegin : TokenType::VariableBegin, "", tag_line);
    pos_ = after;
    lex_tag(kind == '%');
  }

  void lex_raw(size_t tag, size_t body_start) {
    line_ += count_newlines(s_, tag, body_start);
    // Find {%(-|+|)\s*endraw\s*(+%}|-%}\s*|%}\n?)
    for (size_t i = s_.find("{%", body_start); i != std::string::npos; i = s_.find("{%", i + 1)) {
      const size_t word_end = match_raw_begin(i, "endraw");
      if (word_end == std::string::npos) continue;
      size_t end;
      if (s_.compare(word_end, 3, "+%}") == 0) {
        end = word_end + 3;
      } else if (s_.compare(word_end, 3, "-%}") == 0) {
        end = word_end + 3;
        while (end < s_.size() && space_at(s_, end)) end += space_at(s_, end);
      } else if (s_.compare(word_end, 2, "%}") == 0) {
        end = word_end + 2;
        if (end < s_.size() && s_[end] == '\n') ++end;
      } else {
        continue;
      }
      char sign = (s_[i + 2] == '-' || s_[i + 2] == '+') ? s_[i + 2] : 0;
      line_starting_ = body_start > 0 && s_[body_start - 1] == '\n';
      std::string text = strip_text(s_.substr(body_start, i - body_start), sign, false);
      if (!text.empty()) emit(TokenType::Data, text, line_);
      line_ += count_newlines(s_, body_start, end);
      line_starting_ = s_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    syntax_error("Missing end of raw directive", line_);
  }

  void lex_comment(size_t body, int tag_line) {
    const size_t close = s_.find("#}", body);
    if (close == std::string::npos) syntax_error("Missing end of comment tag", tag_line);
    size_t end = close + 2;
    const char before = close > body ? s_[close - 1] : 0;
    if (before == '-') {
      while (end < s_.size() && space_at(s_, end)) end += space_at(s_, end);
    } else if (before != '+') {
      if (end < s_.size() && s_[end] == '\n') ++end;
    }
    line_ += count_newlines(s_, pos_, end);
    line_starting_ = s_[end - 1] == '\n';
    pos_ = end;
  }

  // Tokens of one {% ... %} or {{ ... }}.
  void lex_tag(bool is_block) {
    std::vector<char> brackets;
    const int start_line = line_;
    while (true) {
      if (pos_ >= s_.size())
        syntax_error(std::string("unexpected end of template, expected '") +
                         (is_block ? "end of statement block" : "end of print statement") + "'.",
                     start_line);
      if (brackets.empty() && try_tag_end(is_block)) return;
      const char c = s_[pos_];
      if (size_t sp = space_at(s_, pos_)) {
        if (c == '\n') ++line_;
        pos_ += sp;
        continue;
      }
      if (std::isdigit(static_cast<unsigned char>(c)) && lex_number()) continue;
      if (is_name_start(c)) {
        size_t end = pos_ + 1;
        while (end < s_.size() && is_name_char(s_[end])) ++end;
        emit(TokenType::Name, s_.substr(pos_, end - pos_), line_);
        pos_ = end;
        continue;
      }
      if (c == '\'' || c == '"') {
        size_t i = pos_ + 1;
        while (i < s_.size() && s_[i] != c) i += (s_[i] == '\\') ? 2 : 1;
        if (i >= s_.size())
          syntax_error(
              "unexpected char " + repr_string(std::string(1, c)) + " at " + std::to_string(pos_),
              line_);
        const std::string body = s_.substr(pos_ + 1, i - pos_ - 1);
        emit(TokenType::String, decode_string_literal(body, line_), line_);
        line_ += count_newlines(s_, pos_, i);
        pos_ = i + 1;
        continue;
      }
      const char* op = nullptr;
      for (const char* candidate : kOperators)
        if (s_.compare(pos_, std::strlen(candidate), candidate) == 0) {
          op = candidate;
          break;
        }
      if (!op) {
        std::string ch;
        append_utf8(ch, decode_utf8(std::string_view(s_).substr(pos_, 4)).at(0));
        syntax_error("unexpected char " + repr_string(ch) + " at " + std::to_string(pos_), line_);
      }
      const std::string o = op;
      if (o == "(" || o == "[" || o == "{") {
        brackets.push_back(o[0]);
      } else if (o == ")" || o == "]" || o == "}") {
        const char open = o == ")" ? '(' : o == "]" ? '[' : '{';
        if (brackets.empty()) syntax_error("unexpected '" + o + "'", line_);
        if (brackets.back() != open)
          syntax_error("unexpected '" + o + "', expected '" +
                           std::string(1, brackets.back() == '('   ? ')'
                                          : brackets.back() == '[' ? ']'
                                                                   : '}') +
                           "'",
                       line_);
        brackets.pop_back();
      }
      emit(TokenType::Operator, o, line_);
      pos_ += o.size();
    }
  }

  bool try_tag_end(bool is_block) {
    const char* close = is_block ? "%}" : "}}";
    size_t end = std::string::npos;
    if (s_[pos_] == '-' && s_.compare(pos_ + 1, 2, close) == 0) {
      end = pos_ + 3;
      while (end < s_.size() && space_at(s_, end)) end += space_at(s_, end);
    } else if (is_block && s_[pos_] == '+' && s_.compare(pos_ + 1, 2, close) == 0) {
      end = pos_ + 3;
    } else if (s_.compare(pos_, 2, close) == 0) {
      end = pos_ + 2;
      if (is_block && end < s_.size() && s_[end] == '\n') ++end;
    }
    if (end == std::string::npos) return false;
    emit(is_block ? TokenType::BlockEnd : TokenType::VariableEnd, "", line_);
    line_ += count_newlines(s_, pos_, end);
    line_starting_ = s_[end - 1] == '\n';
    pos_ = end;
    return true;
  }

  // Integer or float literal (underscores allowed between digits, like Jinja).
  bool lex_number() {
    if (pos_ > 0 && s_[pos_ - 1] == '.') {  // `x.0` is getattr by integer, not a float
      size_t end = pos_;
      while (end < s_.size() && std::isdigit(static_cast<unsigned char>(s_[end]))) ++end;
      emit(TokenType::Integer, s_.substr(pos_, end - pos_), line_);
      pos_ = end;
      return true;
    }
    auto digits = [&](size_t i) {
      size_t j = i;
      while (j < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[j])) ||
                               (s_[j] == '_' && j > i && j + 1 < s_.size() &&
                                std::isdigit(static_cast<unsigned char>(s_[j + 1])))))
        ++j;
      return j;
    };
    size_t end = digits(pos_);
    bool is_float = false;
    if (end + 1 < s_.size() && s_[end] == '.' &&
        std::isdigit(static_cast<unsigned char>(s_[end + 1]))) {
      end = digits(end + 1);
      is_float = true;
    }
    if (end < s_.size() && (s_[end] == 'e' || s_[end] == 'E')) {
      size_t k = end + 1;
      if (k < s_.size() && (s_[k] == '+' || s_[k] == '-')) ++k;
      if (k < s_.size() && std::isdigit(static_cast<unsigned char>(s_[k]))) {
        end = digits(k);
        is_float = true;
      }
    }
    std::string text;
    for (size_t i = pos_; i < end; ++i)
      if (s_[i] != '_') text.push_back(s_[i]);
    emit(is_float ? TokenType::Float : TokenType::Integer, text, line_);
    pos_ = end;
    return true;
  }

  std::string s_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> tokens_;
};

}  // namespace

std::vector<Token> tokenize(const std::string& source) { return Lexer(source).run(); }

std::string describe(const Token& token) {
  switch (token.type) {
    case TokenType::Data:
      return "template data / text";
    case TokenType::VariableBegin:
      return "begin of print statement";
    case TokenType::VariableEnd:
      return "end of print statement";
    case TokenType::BlockBegin:
      return "begin of statement block";
    case TokenType::BlockEnd:
      return "end of statement block";
    case TokenType::Name:
      return token.value;
    case TokenType::String:
      return "string";
    case TokenType::Integer:
      return "integer";
    case TokenType::Float:
      return "float";
    case TokenType::Operator:
      return token.value;
    case TokenType::End:
      return "end of template";
  }
  return "token";
}

}  // namespace moetune::jinja
