// Jinja builtins (see builtins.h), each written after its jinja2/filters.py, jinja2/tests.py or
// CPython counterpart. Strings are UTF-8; the str methods work on code points where Python's
// results depend on them (indexes, strip sets, case). Integers are 64-bit: where Python would
// grow a big int we raise OverflowError instead.
#include "data/jinja/builtins.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <optional>

#include "data/jinja/interpreter.h"
#include "data/jinja/parser.h"
#include "data/jinja/unicode.h"

namespace moetune::jinja {

namespace {

// ---- argument binding -------------------------------------------------------------------------

struct Param {
  const char* name;
  std::optional<Value> default_value;
};

std::vector<Value> bind(const CallArgs& args, const std::string& fn,
                        const std::vector<Param>& params) {
  std::vector<std::optional<Value>> out(params.size());
  if (args.positional.size() > params.size())
    raise("TypeError", fn + "() takes at most " + std::to_string(params.size()) + " argument(s) (" +
                           std::to_string(args.positional.size()) + " given)");
  for (size_t i = 0; i < args.positional.size(); ++i) out[i] = args.positional[i];
  for (const auto& [key, value] : args.keyword) {
    size_t idx = params.size();
    for (size_t i = 0; i < params.size(); ++i)
      if (key == params[i].name) idx = i;
    if (idx == params.size())
      raise("TypeError", fn + "() got an unexpected keyword argument '" + key + "'");
    if (out[idx]) raise("TypeError", fn + "() got multiple values for argument '" + key + "'");
    out[idx] = value;
  }
  std::vector<Value> result;
  result.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (out[i])
      result.push_back(*out[i]);
    else if (params[i].default_value)
      result.push_back(*params[i].default_value);
    else
      raise("TypeError", fn + "() missing required argument '" + params[i].name + "'");
  }
  return result;
}

int64_t to_index(const Value& v, const std::string& what) {
  if (v.is_int() || v.is_bool()) return v.int_value();
  if (v.is_undefined()) v.fail_undefined();
  raise("TypeError", "'" + type_name(v) + "' object cannot be interpreted as an integer" +
                         (what.empty() ? "" : " (" + what + ")"));
}

// ---- string helpers (code points) ---------------------------------------------------------------

std::u32string cps_of(const std::string& s) { return decode_utf8(s); }
std::string utf8_of(const std::u32string& s) { return encode_utf8(s); }

std::string strip_impl(const std::string& s, const Value& chars, bool left, bool right) {
  std::u32string cps = cps_of(s);
  std::u32string set;
  const bool whitespace = chars.is_none() || chars.is_undefined();
  if (!whitespace) {
    if (!chars.is_string()) raise("TypeError", "strip arg must be None or str");
    set = cps_of(chars.as_string());
  }
  auto strip_this = [&](char32_t c) {
    return whitespace ? is_space(c) : set.find(c) != std::u32string::npos;
  };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_this(cps[b])) ++b;
  if (right)
    while (e > b && strip_this(cps[e - 1])) --e;
  return utf8_of(cps.substr(b, e - b));
}

std::vector<Value> split_impl(const std::string& s, const Value& sep_value, int64_t maxsplit,
                              bool from_right) {
  std::vector<std::string> parts;
  if (sep_value.is_none() || sep_value.is_undefined()) {
    std::u32string cps = cps_of(s);
    std::vector<std::u32string> words;
    if (!from_right) {
      size_t i = 0;
      int64_t splits = 0;
      while (i < cps.size()) {
        while (i < cps.size() && is_space(cps[i])) ++i;
        if (i >= cps.size()) break;
        if (maxsplit >= 0 && splits >= maxsplit) {
          size_t e = cps.size();
          while (e > i && is_space(cps[e - 1])) --e;
          words.push_back(cps.substr(i, e - i));
          break;
        }
        size_t j = i;
        while (j < cps.size() && !is_space(cps[j])) ++j;
        words.push_back(cps.substr(i, j - i));
        ++splits;
        i = j;
      }
    } else {
      size_t i = cps.size();
      int64_t splits = 0;
      while (i > 0) {
        while (i > 0 && is_space(cps[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && splits >= maxsplit) {
          size_t b = 0;
          while (b < i && is_space(cps[b])) ++b;
          words.push_back(cps.substr(b, i - b));
          break;
        }
        size_t j = i;
        while (j > 0 && !is_space(cps[j - 1])) --j;
        words.push_back(cps.substr(j, i - j));
        ++splits;
        i = j;
      }
      std::reverse(words.begin(), words.end());
    }
    std::vector<Value> out;
    for (auto& w : words) out.emplace_back(utf8_of(w));
    return out;
  }
  if (!sep_value.is_string())
    raise("TypeError", "must be str or None, not " + type_name(sep_value));
  const std::string& sep = sep_value.as_string();
  if (sep.empty()) raise("ValueError", "empty separator");
  if (!from_right) {
    size_t start = 0;
    int64_t splits = 0;
    while (true) {
      if (maxsplit >= 0 && splits >= maxsplit) break;
      const size_t at = s.find(sep, start);
      if (at == std::string::npos) break;
      parts.push_back(s.substr(start, at - start));
      start = at + sep.size();
      ++splits;
    }
    parts.push_back(s.substr(start));
  } else {
    size_t end = s.size();
    int64_t splits = 0;
    while (true) {
      if (maxsplit >= 0 && splits >= maxsplit) break;
      if (end < sep.size()) break;
      const size_t at = s.rfind(sep, end - sep.size());
      if (at == std::string::npos) break;
      parts.push_back(s.substr(at + sep.size(), end - at - sep.size()));
      end = at;
      ++splits;
    }
    parts.push_back(s.substr(0, end));
    std::reverse(parts.begin(), parts.end());
  }
  std::vector<Value> out;
  for (auto& p : parts) out.emplace_back(std::move(p));
  return out;
}

std::vector<std::string> splitlines_impl(const std::string& s, bool keepends) {
  std::u32string cps = cps_of(s);
  std::vector<std::string> lines;
  size_t start = 0, i = 0;
  while (i < cps.size()) {
    if (is_linebreak(cps[i])) {
      size_t eol = i + 1;
      if (cps[i] == '\r' && i + 1 < cps.size() && cps[i + 1] == '\n') eol = i + 2;
      lines.push_back(utf8_of(cps.substr(start, (keepends ? eol : i) - start)));
      start = i = eol;
    } else {
      ++i;
    }
  }
  if (start < cps.size()) lines.push_back(utf8_of(cps.substr(start)));
  return lines;
}

std::string replace_impl(const std::string& s, const std::string& old, const std::string& repl,
                         int64_t count) {
  std::string out;
  if (old.empty()) {
    std::u32string cps = cps_of(s);
    int64_t done = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      if (i < cps.size()) append_utf8(out, cps[i]);
    }
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t at = s.find(old, start);
    if (at == std::string::npos) break;
    out.append(s, start, at - start);
    out += repl;
    start = at + old.size();
    ++done;
  }
  out.append(s, start, std::string::npos);
  return out;
}

std::string py_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : cps_of(s)) {
    const bool cased = is_upper_cp(c) || is_lower_cp(c);
    if (cased) {
      append_utf8(out, prev_cased ? to_lower(c) : to_upper(c));
    } else {
      append_utf8(out, c);
    }
    prev_cased = cased;
  }
  return out;
}

std::string py_capitalize(const std::string& s) {
  std::u32string cps = cps_of(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i)
    append_utf8(out, i == 0 ? to_upper(cps[i]) : to_lower(cps[i]));
  return out;
}

// jinja's title filter: words start after runs of [-\s({\[<].
std::string jinja_title(const std::string& s) {
  std::u32string cps = cps_of(s);
  auto is_sep = [](char32_t c) {
    return c == '-' || is_space(c) || c == '(' || c == '{' || c == '[' || c == '<';
  };
  std::string out;
  bool start = true;
  for (char32_t c : cps) {
    if (is_sep(c)) {
      append_utf8(out, to_upper(c));
      start = true;
      continue;
    }
    append_utf8(out, start ? to_upper(c) : to_lower(c));
    start = false;
  }
  return out;
}

bool starts_or_ends(const std::string& s, const Value& affix, bool starts, const std::string& fn) {
  auto test = [&](const Value& a) {
    if (!a.is_string())
      raise("TypeError", fn + " first arg must be str or a tuple of str, not " + type_name(a));
    const std::string& x = a.as_string();
    if (x.size() > s.size()) return false;
    return starts ? s.compare(0, x.size(), x) == 0
                  : s.compare(s.size() - x.size(), x.size(), x) == 0;
  };
  if (affix.is_list() && affix.as_list().is_tuple) {
    for (const auto& a : affix.as_list().items)
      if (test(a)) return true;
    return false;
  }
  return test(affix);
}

// Adjusts slice bounds like PySlice_AdjustIndices; returns the selected indices.
std::vector<int64_t> slice_indices(int64_t len, const Value& start_v, const Value& stop_v,
                                   const Value& step_v) {
  const int64_t step = step_v.is_none() ? 1 : to_index(step_v, "slice");
  if (step == 0) raise("ValueError", "slice step cannot be zero");
  const int64_t lower = step < 0 ? -1 : 0;
  const int64_t upper = step < 0 ? len - 1 : len;
  auto adjust = [&](const Value& v, int64_t fallback) {
    if (v.is_none()) return fallback;
    int64_t x = to_index(v, "slice");
    if (x < 0) {
      x += len;
      if (x < lower) x = lower;
    } else if (x > upper) {
      x = upper;
    }
    return x;
  };
  const int64_t start = adjust(start_v, step < 0 ? upper : lower);
  const int64_t stop = adjust(stop_v, step < 0 ? lower : upper);
  std::vector<int64_t> out;
  if (step > 0)
    for (int64_t i = start; i < stop; i += step) out.push_back(i);
  else
    for (int64_t i = start; i > stop; i += step) out.push_back(i);
  return out;
}

// ---- printf-style formatting (str % args)
// --------------------------------------------------------

std::string format_number_spec(char conv, const std::string& flags, int width, int precision,
                               const Value& v) {
  std::string fmt = "%" + flags;
  if (width >= 0) fmt += std::to_string(width);
  if (precision >= 0) fmt += "." + std::to_string(precision);
  char buf[512];
  if (conv == 'd' || conv == 'i' || conv == 'x' || conv == 'X' || conv == 'o') {
    int64_t iv;
    if (v.is_float())
      iv = static_cast<int64_t>(v.as_float());
    else if (v.is_number())
      iv = v.int_value();
    else
      raise("TypeError",
            std::string("%") + conv + " format: a real number is required, not " + type_name(v));
    fmt += "ll";
    fmt += (conv == 'i' ? 'd' : conv);
    std::snprintf(buf, sizeof(buf), fmt.c_str(), static_cast<long long>(iv));
  } else {
    if (!v.is_number()) raise("TypeError", "must be real number, not " + type_name(v));
    fmt += conv;
    std::snprintf(buf, sizeof(buf), fmt.c_str(), v.number_value());
  }
  return buf;
}

std::string percent_format(const std::string& fmt, const Value& args) {
  std::vector<Value> values;
  const bool is_mapping = args.is_dict();
  if (args.is_list() && args.as_list().is_tuple)
    values = args.as_list().items;
  else
    values.push_back(args);
  size_t next_arg = 0;
  std::string out;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out.push_back(fmt[i]);
      continue;
    }
    if (++i >= fmt.size()) raise("ValueError", "incomplete format");
    Value value;
    bool have_value = false;
    if (fmt[i] == '(') {
      const size_t close = fmt.find(')', i);
      if (close == std::string::npos) raise("ValueError", "incomplete format key");
      if (!is_mapping) raise("TypeError", "format requires a mapping");
      const Value* v = args.as_dict().find(Value(fmt.substr(i + 1, close - i - 1)));
      if (!v) raise("KeyError", repr_string(fmt.substr(i + 1, close - i - 1)));
      value = *v;
      have_value = true;
      i = close + 1;
    }
    std::string flags;
    while (i < fmt.size() && std::strchr("-+ #0", fmt[i])) flags.push_back(fmt[i++]);
    int width = -1, precision = -1;
    while (i < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[i])))
      width = (width < 0 ? 0 : width * 10) + (fmt[i++] - '0');
    if (i < fmt.size() && fmt[i] == '.') {
      ++i;
      precision = 0;
      while (i < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[i])))
        precision = precision * 10 + (fmt[i++] - '0');
    }
    if (i >= fmt.size()) raise("ValueError", "incomplete format");
    const char conv = fmt[i];
    if (conv == '%') {
      out.push_back('%');
      continue;
    }
    if (!have_value) {
      if (next_arg >= values.size()) raise("TypeError", "not enough arguments for format string");
      value = values[next_arg++];
    }
    std::string piece;
    if (conv == 's' || conv == 'r' || conv == 'a') {
      piece = conv == 's' ? py_str(value) : py_repr(value);
      if (precision >= 0) piece = utf8_of(cps_of(piece).substr(0, precision));
      const int64_t pad = width - static_cast<int64_t>(utf8_length(piece));
      if (pad > 0)
        piece = flags.find('-') != std::string::npos ? piece + std::string(pad, ' ')
                                                     : std::string(pad, ' ') + piece;
    } else if (std::strchr("diouxXeEfFgG", conv)) {
      piece = format_number_spec(conv == 'u' ? 'd' : conv, flags, width, precision, value);
    } else if (conv == 'c') {
      if (value.is_string())
        piece = value.as_string();
      else
        append_utf8(piece, static_cast<char32_t>(value.int_value()));
    } else {
      raise("ValueError", std::string("unsupported format character '") + conv + "'");
    }
    out += piece;
  }
  if (!is_mapping && next_arg < values.size() && !(args.is_dict()))
    raise("TypeError", "not all arguments converted during string formatting");
  return out;
}

// ---- str.format ---------------------------------------------------------------------------------

std::string apply_format_spec(const Value& v, const std::string& spec) {
  if (spec.empty()) return py_str(v);
  size_t i = 0;
  char fill = ' ', align = 0;
  if (spec.size() >= 2 && std::strchr("<>^=", spec[1]))
    fill = spec[0], align = spec[1], i = 2;
  else if (std::strchr("<>^=", spec[0]))
    align = spec[0], i = 1;
  std::string sign;
  if (i < spec.size() && std::strchr("+- ", spec[i])) sign = spec[i++];
  if (i < spec.size() && spec[i] == '0') {
    if (!align) fill = '0', align = '=';
    ++i;
  }
  int width = 0;
  while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i])))
    width = width * 10 + (spec[i++] - '0');
  int precision = -1;
  if (i < spec.size() && spec[i] == '.') {
    ++i;
    precision = 0;
    while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i])))
      precision = precision * 10 + (spec[i++] - '0');
  }
  char type = i < spec.size() ? spec[i] : 0;
  std::string body;
  if (type == 0 && !v.is_float() && !v.is_int()) {
    body = py_str(v);
    if (precision >= 0) body = utf8_of(cps_of(body).substr(0, precision));
    if (!align) align = '<';
  } else if (type == 's') {
    body = py_str(v);
    if (!align) align = '<';
  } else {
    if (!v.is_number())
      raise("ValueError", "Unknown format code for object of type '" + type_name(v) + "'");
    if (type == 0 && v.is_float() && precision < 0)
      body = repr_float(v.as_float());
    else if (type == 0 && !v.is_float())
      body = std::to_string(v.int_value());
    else
      body = format_number_spec(type == 0 ? 'g' : type, "", -1, precision, v);
    if (!sign.empty() && sign != "-" && body[0] != '-') body = sign + body;
    if (!align) align = '>';
  }
  const int64_t pad = width - static_cast<int64_t>(utf8_length(body));
  if (pad <= 0) return body;
  if (align == '<') return body + std::string(pad, fill);
  if (align == '^') return std::string(pad / 2, fill) + body + std::string(pad - pad / 2, fill);
  if (align == '=' && !body.empty() && (body[0] == '-' || body[0] == '+'))
    return body.substr(0, 1) + std::string(pad, fill) + body.substr(1);
  return std::string(pad, fill) + body;
}

std::string str_format(Interpreter& interp, const std::string& fmt, const CallArgs& args) {
  std::string out;
  size_t auto_index = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    const char c = fmt[i];
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') {
        out.push_back('}');
        ++i;
        continue;
      }
      raise("ValueError", "Single '}' encountered in format string");
    }
    if (c != '{') {
      out.push_back(c);
      continue;
    }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out.push_back('{');
      ++i;
      continue;
    }
    const size_t close = fmt.find('}', i);
    if (close == std::string::npos) raise("ValueError", "Single '{' encountered in format string");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    std::string spec, conversion;
    if (const size_t colon = field.find(':'); colon != std::string::npos) {
      spec = field.substr(colon + 1);
      field.resize(colon);
    }
    if (const size_t bang = field.find('!'); bang != std::string::npos) {
      conversion = field.substr(bang + 1);
      field.resize(bang);
    }
    // field: '' | digits | name, followed by .attr / [key] parts
    size_t end = 0;
    while (end < field.size() && field[end] != '.' && field[end] != '[') ++end;
    const std::string head = field.substr(0, end);
    Value v;
    if (head.empty() || std::all_of(head.begin(), head.end(), [](char ch) {
          return std::isdigit(static_cast<unsigned char>(ch));
        })) {
      const size_t idx = head.empty() ? auto_index++ : std::stoul(head);
      if (idx >= args.positional.size())
        raise("IndexError", "Replacement index " + std::to_string(idx) +
                                " out of range for positional args tuple");
      v = args.positional[idx];
    } else {
      bool found = false;
      for (const auto& [k, val] : args.keyword)
        if (k == head) v = val, found = true;
      if (!found) raise("KeyError", repr_string(head));
    }
    while (end < field.size()) {
      if (field[end] == '.') {
        size_t j = end + 1;
        while (j < field.size() && field[j] != '.' && field[j] != '[') ++j;
        v = interp.getattr(v, field.substr(end + 1, j - end - 1));
        end = j;
      } else {
        const size_t j = field.find(']', end);
        if (j == std::string::npos) raise("ValueError", "Missing ']' in format string");
        const std::string key = field.substr(end + 1, j - end - 1);
        const bool numeric = !key.empty() && std::all_of(key.begin(), key.end(), [](char ch) {
          return std::isdigit(static_cast<unsigned char>(ch));
        });
        v = interp.getitem(v, numeric ? Value(static_cast<int64_t>(std::stoll(key))) : Value(key));
        end = j + 1;
      }
    }
    if (conversion == "r" || conversion == "a")
      v = Value(py_repr(v));
    else if (conversion == "s")
      v = Value(py_str(v));
    out += apply_format_spec(v, spec);
  }
  return out;
}

// ---- misc helpers -------------------------------------------------------------------------------

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

// jinja's make_attrgetter: "a.b.0" walks getitem with ints for digit parts.
Value get_attribute_path(Interpreter& interp, const Value& item, const Value& attribute) {
  if (attribute.is_int()) return interp.getitem(item, attribute);
  const std::string path = py_str(attribute);
  Value v = item;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string part =
        path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char ch) {
      return std::isdigit(static_cast<unsigned char>(ch));
    });
    v = interp.getitem(v, numeric ? Value(static_cast<int64_t>(std::stoll(part))) : Value(part));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return v;
}

Value sort_key(Interpreter& interp, const Value& item, const Value& attribute,
               bool case_sensitive) {
  Value v = attribute.is_none() ? item : get_attribute_path(interp, item, attribute);
  if (!case_sensitive && v.is_string()) return Value(str_lower(v.as_string()));
  return v;
}

Value do_round(const Value& v, int64_t precision, const std::string& method) {
  if (v.is_undefined()) v.fail_undefined();
  if (!v.is_number())
    raise("TypeError", "type " + type_name(v) + " doesn't define __round__ method");
  if (method == "common") {
    if (!v.is_float()) {  // round(int, n) stays an int; negative n rounds half to even
      int64_t x = v.int_value();
      if (precision >= 0) return Value(x);
      if (precision < -18) return Value(static_cast<int64_t>(0));
      int64_t unit = 1;
      for (int64_t i = 0; i < -precision; ++i) unit *= 10;
      int64_t q = x / unit, r = x % unit;
      if (r < 0) r += unit, --q;
      if (2 * r > unit || (2 * r == unit && (q % 2 != 0))) ++q;
      int64_t result;
      if (__builtin_mul_overflow(q, unit, &result)) raise("OverflowError", "integer overflow");
      return Value(result);
    }
    const double x = v.as_float();
    if (!std::isfinite(x)) return v;
    if (precision == 0) return Value(std::nearbyint(x));
    char buf[512];
    if (precision > 0 && precision < 300) {
      std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(precision), x);
      return Value(std::strtod(buf, nullptr));
    }
    const double scale = std::pow(10.0, static_cast<double>(-precision));
    return Value(std::nearbyint(x / scale) * scale);
  }
  if (method != "ceil" && method != "floor")
    raise("FilterArgumentError", "method must be common, ceil or floor");
  const double scale = std::pow(10.0, static_cast<double>(precision));
  const double x = v.number_value() * scale;
  return Value((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

std::optional<Value> parse_python_int(const std::string& text, int64_t base) {
  std::string s = strip_impl(text, Value(nullptr), true, true);
  std::string digits;
  for (char c : s)
    if (c != '_') digits.push_back(c);
  if (digits.empty()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(digits.c_str(), &end, static_cast<int>(base));
  if (errno || *end != '\0') return std::nullopt;
  return Value(static_cast<int64_t>(v));
}

std::optional<double> parse_python_float(const std::string& text) {
  std::string s = strip_impl(text, Value(nullptr), true, true);
  if (s.empty()) return std::nullopt;
  std::string lower = str_lower(s);
  if (lower == "nan" || lower == "+nan" || lower == "-nan") return std::nan("");
  if (lower == "inf" || lower == "+inf" || lower == "infinity" || lower == "+infinity")
    return INFINITY;
  if (lower == "-inf" || lower == "-infinity") return -INFINITY;
  for (char c : s)
    if (!(std::isdigit(static_cast<unsigned char>(c)) || std::strchr("+-.eE_", c)))
      return std::nullopt;
  std::string clean;
  for (char c : s)
    if (c != '_') clean.push_back(c);
  char* end = nullptr;
  const double v = std::strtod(clean.c_str(), &end);
  if (*end != '\0') return std::nullopt;
  return v;
}

Value checked_int(bool overflow, int64_t v) {
  if (overflow) raise("OverflowError", "integer overflow (moetune's template integers are 64-bit)");
  return Value(v);
}

[[noreturn]] void unsupported_operands(const std::string& op, const Value& a, const Value& b) {
  if (a.is_undefined()) a.fail_undefined();
  if (b.is_undefined()) b.fail_undefined();
  if (op == "+" && a.is_string())
    raise("TypeError", "can only concatenate str (not \"" + type_name(b) + "\") to str");
  if (op == "+" && a.is_list())
    raise("TypeError", "can only concatenate " + type_name(a) + " (not \"" + type_name(b) +
                           "\") to " + type_name(a));
  raise("TypeError", "unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" +
                         type_name(b) + "'");
}

Value repeat(Interpreter& interp, const Value& seq, int64_t n) {
  if (n < 0) n = 0;
  if (seq.is_string()) {
    const std::string& s = seq.as_string();
    interp.check_size(s.size() * static_cast<size_t>(n));
    std::string out;
    out.reserve(s.size() * n);
    for (int64_t i = 0; i < n; ++i) out += s;
    return Value(std::move(out));
  }
  const auto& l = seq.as_list();
  interp.check_size(l.items.size() * static_cast<size_t>(n) * sizeof(Value));
  std::vector<Value> out;
  for (int64_t i = 0; i < n; ++i) out.insert(out.end(), l.items.begin(), l.items.end());
  return Value::list(std::move(out), l.is_tuple);
}

}  // namespace

// ---- operators
// ------------------------------------------------------------------------------------

Value unary_op(const std::string& op, const Value& a) {
  if (a.is_undefined()) a.fail_undefined();
  if (a.is_float()) return Value(op == "-" ? -a.as_float() : a.as_float());
  if (a.is_int() || a.is_bool()) {
    const int64_t v = a.int_value();
    if (op == "-") return v == INT64_MIN ? checked_int(true, 0) : Value(-v);
    return Value(v);
  }
  raise("TypeError", "bad operand type for unary " + op + ": '" + type_name(a) + "'");
}

Value binary_op(Interpreter& interp, const std::string& op, const Value& a, const Value& b) {
  if (op == "~") {
    std::string s = py_str(a);
    const std::string t = py_str(b);
    interp.check_size(s.size() + t.size());
    return Value(s + t);
  }
  const bool numbers = a.is_number() && b.is_number();
  const bool floats = numbers && (a.is_float() || b.is_float());
  if (op == "+") {
    if (floats) return Value(a.number_value() + b.number_value());
    if (numbers) {
      int64_t r;
      const bool overflow = __builtin_add_overflow(a.int_value(), b.int_value(), &r);
      return checked_int(overflow, r);
    }
    if (a.is_string() && b.is_string()) {
      interp.check_size(a.as_string().size() + b.as_string().size());
      return Value(a.as_string() + b.as_string());
    }
    if (a.is_list() && b.is_list() && a.as_list().is_tuple == b.as_list().is_tuple) {
      interp.check_size((a.as_list().items.size() + b.as_list().items.size()) * sizeof(Value));
      std::vector<Value> items = a.as_list().items;
      items.insert(items.end(), b.as_list().items.begin(), b.as_list().items.end());
      return Value::list(std::move(items), a.as_list().is_tuple);
    }
    unsupported_operands(op, a, b);
  }
  if (op == "-") {
    if (floats) return Value(a.number_value() - b.number_value());
    if (numbers) {
      int64_t r;
      const bool overflow = __builtin_sub_overflow(a.int_value(), b.int_value(), &r);
      return checked_int(overflow, r);
    }
    unsupported_operands(op, a, b);
  }
  if (op == "*") {
    if (floats) return Value(a.number_value() * b.number_value());
    if (numbers) {
      int64_t r;
      const bool overflow = __builtin_mul_overflow(a.int_value(), b.int_value(), &r);
      return checked_int(overflow, r);
    }
    if ((a.is_string() || a.is_list()) && (b.is_int() || b.is_bool()))
      return repeat(interp, a, b.int_value());
    if ((b.is_string() || b.is_list()) && (a.is_int() || a.is_bool()))
      return repeat(interp, b, a.int_value());
    unsupported_operands(op, a, b);
  }
  if (op == "/") {
    if (!numbers) unsupported_operands(op, a, b);
    if (b.number_value() == 0.0)
      raise("ZeroDivisionError", floats ? "float division by zero" : "division by zero");
    return Value(a.number_value() / b.number_value());
  }
  if (op == "//") {
    if (!numbers) unsupported_operands(op, a, b);
    if (floats) {
      if (b.number_value() == 0.0) raise("ZeroDivisionError", "float floor division by zero");
      return Value(std::floor(a.number_value() / b.number_value()));
    }
    const int64_t x = a.int_value(), y = b.int_value();
    if (y == 0) raise("ZeroDivisionError", "integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) checked_int(true, 0);
    int64_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
    return Value(q);
  }
  if (op == "%") {
    if (a.is_string()) return Value(percent_format(a.as_string(), b));
    if (!numbers) unsupported_operands(op, a, b);
    if (floats) {
      const double y = b.number_value();
      if (y == 0.0) raise("ZeroDivisionError", "float modulo");
      double r = std::fmod(a.number_value(), y);
      if (r != 0.0 && ((r < 0) != (y < 0))) r += y;
      return Value(r);
    }
    const int64_t x = a.int_value(), y = b.int_value();
    if (y == 0) raise("ZeroDivisionError", "integer modulo by zero");
    if (y == -1) return Value(static_cast<int64_t>(0));
    int64_t r = x % y;
    if (r != 0 && ((r < 0) != (y < 0))) r += y;
    return Value(r);
  }
  if (op == "**") {
    if (!numbers) unsupported_operands(op, a, b);
    if (!floats && b.int_value() >= 0) {
      int64_t base = a.int_value(), exp = b.int_value(), result = 1;
      bool overflow = false;
      while (exp > 0) {
        if (exp & 1) overflow |= __builtin_mul_overflow(result, base, &result);
        exp >>= 1;
        if (exp > 0) overflow |= __builtin_mul_overflow(base, base, &base);
      }
      return checked_int(overflow, result);
    }
    if (a.number_value() == 0.0 && b.number_value() < 0)
      raise("ZeroDivisionError", "0.0 cannot be raised to a negative power");
    return Value(std::pow(a.number_value(), b.number_value()));
  }
  raise("TemplateSyntaxError", "unknown operator " + op);
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::Undefined:
      return false;
    case Value::Kind::String:
      if (!item.is_string())
        raise("TypeError", "'in <string>' requires string as left operand, not " + type_name(item));
      return container.as_string().find(item.as_string()) != std::string::npos;
    case Value::Kind::List:
      for (const auto& v : container.as_list().items)
        if (py_eq(v, item)) return true;
      return false;
    case Value::Kind::Dict:
      return container.as_dict().find(item) != nullptr;
    case Value::Kind::Loop:
      for (const auto& v : container.as_loop().items->items)
        if (py_eq(v, item)) return true;
      return false;
    default:
      raise("TypeError", "argument of type '" + type_name(container) + "' is not iterable");
  }
}

std::optional<Value> slice_value(const Value& obj, const Value& start, const Value& stop,
                                 const Value& step) {
  for (const Value* v : {&start, &stop, &step})
    if (!v->is_none() && !v->is_int() && !v->is_bool()) return std::nullopt;
  if (obj.is_list()) {
    const auto& items = obj.as_list().items;
    std::vector<Value> out;
    for (int64_t i : slice_indices(static_cast<int64_t>(items.size()), start, stop, step))
      out.push_back(items[i]);
    return Value::list(std::move(out), obj.as_list().is_tuple);
  }
  if (obj.is_string()) {
    const std::u32string cps = cps_of(obj.as_string());
    std::u32string out;
    for (int64_t i : slice_indices(static_cast<int64_t>(cps.size()), start, stop, step))
      out.push_back(cps[i]);
    return Value(utf8_of(out));
  }
  return std::nullopt;
}

// ---- methods
// --------------------------------------------------------------------------------------

namespace {

Value method(const Value& self, const std::string& name,
             std::function<Value(Interpreter&, const Value&, CallArgs&)> fn) {
  return Value::callable(
      name, [self, fn = std::move(fn)](Interpreter& in, CallArgs& a) { return fn(in, self, a); });
}

Value unsafe(const Value& obj, const std::string& name) {
  return Value::undefined("access to attribute " + repr_string(name) + " of " +
                              repr_string(type_name(obj)) + " object is unsafe.",
                          "SecurityError");
}

std::optional<Value> string_method(const Value& self, const std::string& name) {
  using A = CallArgs;
  const std::string fn = "str." + name;
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize" ||
      name == "swapcase" || name == "casefold")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      bind(a, fn, {});
      const std::string& x = s.as_string();
      if (name == "upper") return Value(str_upper(x));
      if (name == "lower" || name == "casefold") return Value(str_lower(x));
      if (name == "title") return Value(py_title(x));
      if (name == "capitalize") return Value(py_capitalize(x));
      std::string out;
      for (char32_t c : cps_of(x)) append_utf8(out, is_upper_cp(c) ? to_lower(c) : to_upper(c));
      return Value(out);
    });
  if (name == "strip" || name == "lstrip" || name == "rstrip")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn, {{"chars", Value(nullptr)}});
      return Value(strip_impl(s.as_string(), p[0], name != "rstrip", name != "lstrip"));
    });
  if (name == "split" || name == "rsplit")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn, {{"sep", Value(nullptr)}, {"maxsplit", Value(-1)}});
      return Value::list(split_impl(s.as_string(), p[0], to_index(p[1], ""), name == "rsplit"));
    });
  if (name == "splitlines")
    return method(self, name, [fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn, {{"keepends", Value(false)}});
      std::vector<Value> out;
      for (auto& l : splitlines_impl(s.as_string(), truthy(p[0]))) out.emplace_back(std::move(l));
      return Value::list(std::move(out));
    });
  if (name == "startswith" || name == "endswith")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn,
                    {{"prefix", std::nullopt}, {"start", Value(nullptr)}, {"end", Value(nullptr)}});
      std::string x = s.as_string();
      if (!p[1].is_none() || !p[2].is_none())
        x = slice_value(s, p[1], p[2], Value(nullptr))->as_string();
      return Value(starts_or_ends(x, p[0], name == "startswith", name));
    });
  if (name == "replace")
    return method(self, name, [fn](Interpreter& in, const Value& s, A& a) {
      auto p = bind(a, fn, {{"old", std::nullopt}, {"new", std::nullopt}, {"count", Value(-1)}});
      if (!p[0].is_string() || !p[1].is_string())
        raise("TypeError",
              "replace() argument must be str, not " + type_name(p[0].is_string() ? p[1] : p[0]));
      std::string out =
          replace_impl(s.as_string(), p[0].as_string(), p[1].as_string(), to_index(p[2], ""));
      in.check_size(out.size());
      return Value(std::move(out));
    });
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p =
          bind(a, fn, {{"sub", std::nullopt}, {"start", Value(nullptr)}, {"end", Value(nullptr)}});
      if (!p[0].is_string()) raise("TypeError", "must be str, not " + type_name(p[0]));
      const std::u32string cps = cps_of(s.as_string());
      const int64_t len = static_cast<int64_t>(cps.size());
      auto clamp = [&](const Value& v, int64_t def) {
        if (v.is_none()) return def;
        int64_t x = to_index(v, "");
        if (x < 0) x = std::max<int64_t>(0, x + len);
        return std::min(x, len);
      };
      const int64_t start = clamp(p[1], 0), end = clamp(p[2], len);
      const std::u32string sub = cps_of(p[0].as_string());
      if (name == "count") {
        if (start > end) return Value(static_cast<int64_t>(0));
        const std::u32string hay = cps.substr(start, end - start);
        if (sub.empty()) return Value(static_cast<int64_t>(hay.size() + 1));
        int64_t n = 0;
        for (size_t at = hay.find(sub); at != std::u32string::npos;
             at = hay.find(sub, at + sub.size()))
          ++n;
        return Value(n);
      }
      int64_t found = -1;
      if (start <= end && end - start >= static_cast<int64_t>(sub.size())) {
        const std::u32string hay = cps.substr(start, end - start);
        const size_t at = (name[0] == 'r') ? hay.rfind(sub) : hay.find(sub);
        if (at != std::u32string::npos) found = start + static_cast<int64_t>(at);
      }
      if (found < 0 && (name == "index" || name == "rindex"))
        raise("ValueError", "substring not found");
      return Value(found);
    });
  if (name == "join")
    return method(self, name, [fn](Interpreter& in, const Value& s, A& a) {
      auto p = bind(a, fn, {{"iterable", std::nullopt}});
      std::string out;
      size_t i = 0;
      for (const auto& item : iterate(p[0])) {
        if (!item.is_string())
          raise("TypeError", "sequence item " + std::to_string(i) + ": expected str instance, " +
                                 type_name(item) + " found");
        if (i++) out += s.as_string();
        out += item.as_string();
        in.check_size(out.size());
      }
      return Value(std::move(out));
    });
  if (name == "format")
    return method(self, name, [](Interpreter& in, const Value& s, A& a) {
      std::string out = str_format(in, s.as_string(), a);
      in.check_size(out.size());
      return Value(std::move(out));
    });
  if (name == "isdigit" || name == "isdecimal" || name == "isnumeric" || name == "isalpha" ||
      name == "isalnum" || name == "isspace" || name == "isupper" || name == "islower")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      bind(a, fn, {});
      const std::u32string cps = cps_of(s.as_string());
      if (cps.empty()) return Value(false);
      if (name == "isupper" || name == "islower") {
        bool any_cased = false;
        for (char32_t c : cps) {
          if (name == "isupper" ? is_lower_cp(c) : is_upper_cp(c)) return Value(false);
          any_cased |= is_upper_cp(c) || is_lower_cp(c);
        }
        return Value(any_cased);
      }
      for (char32_t c : cps) {
        bool ok;
        if (name == "isspace")
          ok = is_space(c);
        else if (name == "isalpha")
          ok = is_alpha(c);
        else if (name == "isalnum")
          ok = is_alpha(c) || is_digit(c);
        else
          ok = is_digit(c);
        if (!ok) return Value(false);
      }
      return Value(true);
    });
  if (name == "zfill" || name == "ljust" || name == "rjust" || name == "center")
    return method(self, name, [name, fn](Interpreter& in, const Value& s, A& a) {
      auto p = bind(a, fn, {{"width", std::nullopt}, {"fillchar", Value(" ")}});
      const int64_t width = to_index(p[0], "");
      in.check_size(static_cast<size_t>(std::max<int64_t>(width, 0)));
      const std::string& x = s.as_string();
      const int64_t len = static_cast<int64_t>(utf8_length(x));
      if (width <= len) return s;
      const int64_t pad = width - len;
      const std::string fill = name == "zfill" ? "0" : py_str(p[1]);
      auto rep = [&](int64_t n) {
        std::string r;
        for (int64_t i = 0; i < n; ++i) r += fill;
        return r;
      };
      if (name == "zfill") {
        if (!x.empty() && (x[0] == '-' || x[0] == '+'))
          return Value(x.substr(0, 1) + rep(pad) + x.substr(1));
        return Value(rep(pad) + x);
      }
      if (name == "ljust") return Value(x + rep(pad));
      if (name == "rjust") return Value(rep(pad) + x);
      const int64_t left = pad / 2 + (pad & width & 1);
      return Value(rep(left) + x + rep(pad - left));
    });
  if (name == "partition" || name == "rpartition")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn, {{"sep", std::nullopt}});
      if (!p[0].is_string()) raise("TypeError", "must be str, not " + type_name(p[0]));
      const std::string& x = s.as_string();
      const std::string& sep = p[0].as_string();
      if (sep.empty()) raise("ValueError", "empty separator");
      const size_t at = name == "partition" ? x.find(sep) : x.rfind(sep);
      if (at == std::string::npos)
        return name == "partition" ? Value::list({Value(x), Value(""), Value("")}, true)
                                   : Value::list({Value(""), Value(""), Value(x)}, true);
      return Value::list({Value(x.substr(0, at)), Value(sep), Value(x.substr(at + sep.size()))},
                         true);
    });
  if (name == "removeprefix" || name == "removesuffix")
    return method(self, name, [name, fn](Interpreter&, const Value& s, A& a) {
      auto p = bind(a, fn, {{"affix", std::nullopt}});
      if (!p[0].is_string())
        raise("TypeError", name + "() argument must be str, not " + type_name(p[0]));
      const std::string& x = s.as_string();
      const std::string& f = p[0].as_string();
      if (name == "removeprefix" && x.compare(0, f.size(), f) == 0)
        return Value(x.substr(f.size()));
      if (name == "removesuffix" && !f.empty() && x.size() >= f.size() &&
          x.compare(x.size() - f.size(), f.size(), f) == 0)
        return Value(x.substr(0, x.size() - f.size()));
      return s;
    });
  return std::nullopt;
}

std::optional<Value> dict_method(const Value& self, const std::string& name) {
  const std::string fn = "dict." + name;
  if (name == "items" || name == "keys" || name == "values")
    return method(self, name, [name, fn](Interpreter&, const Value& d, CallArgs& a) {
      bind(a, fn, {});
      std::vector<Value> out;
      for (const auto& [k, v] : d.as_dict().items) {
        if (name == "items")
          out.push_back(Value::list({k, v}, true));
        else
          out.push_back(name == "keys" ? k : v);
      }
      return Value::list(std::move(out));
    });
  if (name == "get")
    return method(self, name, [fn](Interpreter&, const Value& d, CallArgs& a) {
      auto p = bind(a, fn, {{"key", std::nullopt}, {"default", Value(nullptr)}});
      const Value* v = d.as_dict().find(p[0]);
      return v ? *v : p[1];
    });
  if (name == "copy")
    return method(self, name,
                  [](Interpreter&, const Value& d, CallArgs&) { return Value::dict(d.as_dict()); });
  if (name == "pop" || name == "popitem" || name == "setdefault" || name == "update" ||
      name == "clear")
    return unsafe(self, name);
  return std::nullopt;
}

std::optional<Value> list_method(const Value& self, const std::string& name) {
  const std::string fn = type_name(self) + "." + name;
  if (name == "index" || name == "count")
    return method(self, name, [name, fn](Interpreter&, const Value& l, CallArgs& a) {
      auto p = bind(a, fn, {{"value", std::nullopt}});
      int64_t n = 0;
      const auto& items = l.as_list().items;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!py_eq(items[i], p[0])) continue;
        if (name == "index") return Value(static_cast<int64_t>(i));
        ++n;
      }
      if (name == "index") raise("ValueError", py_repr(p[0]) + " is not in list");
      return Value(n);
    });
  if (self.as_list().is_tuple) return std::nullopt;
  if (name == "copy")
    return method(self, name, [](Interpreter&, const Value& l, CallArgs&) {
      return Value::list(l.as_list().items);
    });
  if (name == "append" || name == "extend" || name == "insert" || name == "pop" ||
      name == "remove" || name == "reverse" || name == "sort" || name == "clear")
    return unsafe(self, name);
  return std::nullopt;
}

}  // namespace

std::optional<Value> builtin_method(const Value& obj, const std::string& name) {
  if (obj.is_string()) return string_method(obj, name);
  if (obj.is_dict()) return dict_method(obj, name);
  if (obj.is_list()) return list_method(obj, name);
  return std::nullopt;
}

// ---- tests
// ------------------------------------------------------------------------------------------

bool builtin_test(Interpreter& interp, const std::string& name, const Value& v, CallArgs& args) {
  if (!is_known_test(name)) raise("TemplateRuntimeError", "No test named '" + name + "' found.");
  const std::string fn = name;
  auto one = [&](const char* arg) { return bind(args, fn, {{arg, std::nullopt}})[0]; };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "sequence") return v.is_string() || v.is_list() || v.is_dict() || v.is_undefined();
  if (name == "iterable")
    return v.is_string() || v.is_list() || v.is_dict() || v.is_undefined() || v.is_loop();
  if (name == "callable") return v.is_callable() || v.is_undefined();
  if (name == "escaped") return false;
  if (name == "lower" || name == "upper") {
    CallArgs none;
    if (!v.is_string()) return false;
    return truthy(interp.call(*string_method(v, name == "lower" ? "islower" : "isupper"), none));
  }
  if (name == "odd" || name == "even") {
    const Value r = binary_op(interp, "%", v, Value(2));
    return name == "odd" ? py_eq(r, Value(1)) : py_eq(r, Value(0));
  }
  if (name == "divisibleby") return py_eq(binary_op(interp, "%", v, one("num")), Value(0));
  if (name == "sameas") {
    const Value o = one("other");
    if (v.is_none() || v.is_bool() || o.is_none() || o.is_bool())
      return v.kind() == o.kind() && py_eq(v, o);
    if (v.identity() || o.identity()) return v.identity() == o.identity();
    return v.kind() == o.kind() && py_eq(v, o);
  }
  if (name == "in") return contains(one("seq"), v);
  if (name == "==" || name == "eq" || name == "equalto") return py_eq(v, one("other"));
  if (name == "!=" || name == "ne") return !py_eq(v, one("other"));
  if (name == ">" || name == "gt" || name == "greaterthan") return py_lt(one("other"), v);
  if (name == ">=" || name == "ge") {
    const Value o = one("other");
    return py_lt(o, v) || py_eq(o, v);
  }
  if (name == "<" || name == "lt" || name == "lessthan") return py_lt(v, one("other"));
  if (name == "<=" || name == "le") {
    const Value o = one("other");
    return py_lt(v, o) || py_eq(v, o);
  }
  if (name == "filter") return v.is_string() && is_known_filter(v.as_string());
  if (name == "test") return v.is_string() && is_known_test(v.as_string());
  raise("TemplateRuntimeError", "test '" + name + "' is not supported");
}

// ---- filters
// -------------------------------------------------------------------------------------------

namespace {

// select/reject/selectattr/rejectattr (jinja's select_or_reject).
Value select_or_reject(Interpreter& interp, const Value& seq, CallArgs& args, bool select,
                       bool by_attr) {
  std::vector<Value> rest = args.positional;
  Value attribute;
  if (by_attr) {
    if (rest.empty()) raise("FilterArgumentError", "Missing parameter for attribute name");
    attribute = rest.front();
    rest.erase(rest.begin());
  }
  std::optional<std::string> test_name;
  if (!rest.empty()) {
    test_name = py_str(rest.front());
    rest.erase(rest.begin());
  }
  std::vector<Value> out;
  for (const auto& item : iterate(seq)) {
    Value subject = by_attr ? get_attribute_path(interp, item, attribute) : item;
    bool ok;
    if (test_name) {
      CallArgs targs;
      targs.positional = rest;
      targs.keyword = args.keyword;
      ok = interp.apply_test(*test_name, subject, targs);
    } else {
      ok = truthy(subject);
    }
    if (ok == select) out.push_back(item);
  }
  return Value::list(std::move(out));
}

Value do_sort(Interpreter& interp, std::vector<Value> items, bool reverse, bool case_sensitive,
              const Value& attribute) {
  std::vector<std::pair<Value, Value>> keyed;
  for (auto& item : items)
    keyed.emplace_back(sort_key(interp, item, attribute, case_sensitive), item);
  std::stable_sort(keyed.begin(), keyed.end(), [reverse](const auto& a, const auto& b) {
    return reverse ? py_lt(b.first, a.first) : py_lt(a.first, b.first);
  });
  std::vector<Value> out;
  for (auto& [k, v] : keyed) out.push_back(std::move(v));
  return Value::list(std::move(out));
}

}  // namespace

Value builtin_filter(Interpreter& interp, const std::string& name, const Value& v, CallArgs& args) {
  const std::string& fn = name;
  if (name == "tojson") {
    auto p = bind(args, fn,
                  {{"ensure_ascii", Value(false)},
                   {"indent", Value(nullptr)},
                   {"separators", Value(nullptr)},
                   {"sort_keys", Value(false)}});
    JsonOptions o;
    o.ensure_ascii = truthy(p[0]);
    if (!p[1].is_none()) {
      o.has_indent = true;
      if (p[1].is_string())
        o.indent = p[1].as_string();
      else
        o.indent =
            std::string(static_cast<size_t>(std::max<int64_t>(0, to_index(p[1], "indent"))), ' ');
      o.item_separator = ",";
    }
    if (!p[2].is_none()) {
      const auto seps = iterate(p[2]);
      if (seps.size() != 2)
        raise("ValueError", "separators must be an (item_separator, key_separator) pair");
      o.item_separator = py_str(seps[0]);
      o.key_separator = py_str(seps[1]);
    }
    o.sort_keys = truthy(p[3]);
    std::string out = json_dumps(v, o);
    interp.check_size(out.size());
    return Value(std::move(out));
  }
  if (name == "default" || name == "d") {
    auto p = bind(args, fn, {{"default_value", Value("")}, {"boolean", Value(false)}});
    if (v.is_undefined() || (truthy(p[1]) && !truthy(v))) return p[0];
    return v;
  }
  if (name == "length" || name == "count") {
    bind(args, fn, {});
    return Value(py_len(v));
  }
  if (name == "string") {
    bind(args, fn, {});
    return Value(py_str(v));
  }
  if (name == "safe") {
    bind(args, fn, {});
    return v.is_string() ? v : Value(py_str(v));
  }
  if (name == "e" || name == "escape" || name == "forceescape") {
    bind(args, fn, {});
    return Value(html_escape(py_str(v)));
  }
  if (name == "trim") {
    auto p = bind(args, fn, {{"chars", Value(nullptr)}});
    return Value(strip_impl(py_str(v), p[0], true, true));
  }
  if (name == "upper" || name == "lower" || name == "capitalize" || name == "title") {
    bind(args, fn, {});
    const std::string s = py_str(v);
    if (name == "upper") return Value(str_upper(s));
    if (name == "lower") return Value(str_lower(s));
    if (name == "capitalize") return Value(py_capitalize(s));
    return Value(jinja_title(s));
  }
  if (name == "replace") {
    auto p =
        bind(args, fn, {{"old", std::nullopt}, {"new", std::nullopt}, {"count", Value(nullptr)}});
    const int64_t count = p[2].is_none() ? -1 : to_index(p[2], "count");
    std::string out = replace_impl(py_str(v), py_str(p[0]), py_str(p[1]), count);
    interp.check_size(out.size());
    return Value(std::move(out));
  }
  if (name == "items") {
    bind(args, fn, {});
    if (v.is_undefined()) return Value::list({});
    if (!v.is_dict()) raise("TypeError", "Can only get item pairs from a mapping.");
    std::vector<Value> out;
    for (const auto& [k, val] : v.as_dict().items) out.push_back(Value::list({k, val}, true));
    return Value::list(std::move(out));
  }
  if (name == "list") {
    bind(args, fn, {});
    return Value::list(iterate(v));
  }
  if (name == "join") {
    auto p = bind(args, fn, {{"d", Value("")}, {"attribute", Value(nullptr)}});
    const std::string sep = py_str(p[0]);
    std::string out;
    size_t i = 0;
    for (const auto& item : iterate(v)) {
      if (i++) out += sep;
      out += py_str(p[1].is_none() ? item : get_attribute_path(interp, item, p[1]));
      interp.check_size(out.size());
    }
    return Value(std::move(out));
  }
  if (name == "first" || name == "last") {
    bind(args, fn, {});
    std::vector<Value> items = iterate(v);
    if (items.empty())
      return Value::undefined(std::string("No ") + (name == "first" ? "first" : "last") +
                              " item, sequence was empty.");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "reverse") {
    bind(args, fn, {});
    if (v.is_string()) {
      std::u32string cps = cps_of(v.as_string());
      std::reverse(cps.begin(), cps.end());
      return Value(utf8_of(cps));
    }
    std::vector<Value> items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "int") {
    auto p = bind(args, fn, {{"default", Value(0)}, {"base", Value(10)}});
    if (v.is_int()) return v;
    if (v.is_bool()) return Value(v.int_value());
    if (v.is_float()) {
      if (!std::isfinite(v.as_float())) return p[0];
      return Value(static_cast<int64_t>(v.as_float()));
    }
    if (v.is_string()) {
      if (auto i = parse_python_int(v.as_string(), to_index(p[1], "base"))) return *i;
      if (auto f = parse_python_float(v.as_string()); f && std::isfinite(*f))
        return Value(static_cast<int64_t>(*f));
    }
    return p[0];
  }
  if (name == "float") {
    auto p = bind(args, fn, {{"default", Value(0.0)}});
    if (v.is_number()) return Value(v.number_value());
    if (v.is_string())
      if (auto f = parse_python_float(v.as_string())) return Value(*f);
    return p[0];
  }
  if (name == "abs") {
    bind(args, fn, {});
    if (v.is_float()) return Value(std::fabs(v.as_float()));
    if (v.is_int() || v.is_bool())
      return v.int_value() == INT64_MIN ? checked_int(true, 0)
                                        : Value(static_cast<int64_t>(std::llabs(v.int_value())));
    if (v.is_undefined()) v.fail_undefined();
    raise("TypeError", "bad operand type for abs(): '" + type_name(v) + "'");
  }
  if (name == "round") {
    auto p = bind(args, fn, {{"precision", Value(0)}, {"method", Value("common")}});
    return do_round(v, to_index(p[0], "precision"), py_str(p[1]));
  }
  if (name == "indent") {
    auto p =
        bind(args, fn, {{"width", Value(4)}, {"first", Value(false)}, {"blank", Value(false)}});
    const std::string indention =
        p[0].is_string() ? p[0].as_string()
                         : std::string(std::max<int64_t>(0, to_index(p[0], "width")), ' ');
    std::string s = py_str(v) + "\n";
    std::vector<std::string> lines = splitlines_impl(s, false);
    std::string rv;
    if (truthy(p[2])) {
      for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + indention : "") + lines[i];
    } else {
      rv = lines.empty() ? "" : lines[0];
      for (size_t i = 1; i < lines.size(); ++i)
        rv += "\n" + (lines[i].empty() ? "" : indention + lines[i]);
    }
    if (truthy(p[1])) rv = indention + rv;
    interp.check_size(rv.size());
    return Value(std::move(rv));
  }
  if (name == "map") {
    std::vector<Value> out;
    const Value* attribute = nullptr;
    Value default_value;
    bool has_default = false;
    for (const auto& [k, val] : args.keyword) {
      if (k == "attribute")
        attribute = &val;
      else if (k == "default")
        default_value = val, has_default = true;
    }
    if (attribute) {
      for (const auto& item : iterate(v)) {
        Value x = get_attribute_path(interp, item, *attribute);
        out.push_back(x.is_undefined() && has_default ? default_value : x);
      }
      return Value::list(std::move(out));
    }
    if (args.positional.empty()) raise("FilterArgumentError", "map requires a filter argument");
    const std::string filter_name = py_str(args.positional[0]);
    if (!is_known_filter(filter_name))
      raise("TemplateRuntimeError", "No filter named '" + filter_name + "'.");
    CallArgs fargs;
    fargs.positional.assign(args.positional.begin() + 1, args.positional.end());
    fargs.keyword = args.keyword;
    for (const auto& item : iterate(v)) {
      CallArgs copy = fargs;
      out.push_back(interp.apply_filter(filter_name, item, copy));
    }
    return Value::list(std::move(out));
  }
  if (name == "select" || name == "reject")
    return select_or_reject(interp, v, args, name == "select", false);
  if (name == "selectattr" || name == "rejectattr")
    return select_or_reject(interp, v, args, name == "selectattr", true);
  if (name == "sort") {
    auto p = bind(args, fn,
                  {{"reverse", Value(false)},
                   {"case_sensitive", Value(false)},
                   {"attribute", Value(nullptr)}});
    return do_sort(interp, iterate(v), truthy(p[0]), truthy(p[1]), p[2]);
  }
  if (name == "dictsort") {
    auto p =
        bind(args, fn,
             {{"case_sensitive", Value(false)}, {"by", Value("key")}, {"reverse", Value(false)}});
    if (!v.is_dict()) raise("TypeError", "dictsort requires a mapping");
    const int pos = py_str(p[1]) == "value" ? 1 : 0;
    std::vector<Value> pairs;
    for (const auto& [k, val] : v.as_dict().items) pairs.push_back(Value::list({k, val}, true));
    return do_sort(interp, pairs, truthy(p[2]), truthy(p[0]), Value(pos));
  }
  if (name == "unique") {
    auto p = bind(args, fn, {{"case_sensitive", Value(false)}, {"attribute", Value(nullptr)}});
    std::vector<Value> seen, out;
    for (const auto& item : iterate(v)) {
      Value key = sort_key(interp, item, p[1], truthy(p[0]));
      bool dup = false;
      for (const auto& s : seen) dup = dup || py_eq(s, key);
      if (!dup) seen.push_back(key), out.push_back(item);
    }
    return Value::list(std::move(out));
  }
  if (name == "min" || name == "max") {
    auto p = bind(args, fn, {{"case_sensitive", Value(false)}, {"attribute", Value(nullptr)}});
    std::vector<Value> items = iterate(v);
    if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
    size_t best = 0;
    Value best_key = sort_key(interp, items[0], p[1], truthy(p[0]));
    for (size_t i = 1; i < items.size(); ++i) {
      Value key = sort_key(interp, items[i], p[1], truthy(p[0]));
      if (name == "min" ? py_lt(key, best_key) : py_lt(best_key, key)) best = i, best_key = key;
    }
    return items[best];
  }
  if (name == "sum") {
    auto p = bind(args, fn, {{"attribute", Value(nullptr)}, {"start", Value(0)}});
    Value total = p[1];
    for (const auto& item : iterate(v))
      total = binary_op(interp, "+", total,
                        p[0].is_none() ? item : get_attribute_path(interp, item, p[0]));
    return total;
  }
  if (name == "batch") {
    auto p = bind(args, fn, {{"linecount", std::nullopt}, {"fill_with", Value(nullptr)}});
    const int64_t n = to_index(p[0], "linecount");
    if (n <= 0) raise("ValueError", "linecount must be positive");
    std::vector<Value> out, tmp;
    for (const auto& item : iterate(v)) {
      if (static_cast<int64_t>(tmp.size()) == n)
        out.push_back(Value::list(std::move(tmp))), tmp.clear();
      tmp.push_back(item);
    }
    if (!tmp.empty()) {
      if (!p[1].is_none())
        while (static_cast<int64_t>(tmp.size()) < n) tmp.push_back(p[1]);
      out.push_back(Value::list(std::move(tmp)));
    }
    return Value::list(std::move(out));
  }
  if (name == "center") {
    auto p = bind(args, fn, {{"width", Value(80)}});
    CallArgs a;
    a.positional.push_back(p[0]);
    return interp.call(*string_method(Value(py_str(v)), "center"), a);
  }
  if (name == "format") {
    if (!args.positional.empty() && !args.keyword.empty())
      raise("FilterArgumentError",
            "can't handle positional and keyword arguments at the same time");
    Value params;
    if (!args.keyword.empty()) {
      DictObject d;
      for (const auto& [k, val] : args.keyword) d.set(Value(k), val);
      params = Value::dict(std::move(d));
    } else {
      params = Value::list(args.positional, true);
    }
    std::string out = percent_format(py_str(v), params);
    interp.check_size(out.size());
    return Value(std::move(out));
  }
  if (name == "attr") {  // attributes only: a dict's keys are items, not attributes
    auto p = bind(args, fn, {{"name", std::nullopt}});
    const std::string attr = py_str(p[0]);
    if (v.is_dict() || v.is_list() || v.is_string()) {
      if (auto m = builtin_method(v, attr)) return *m;
      return Value::undefined(repr_string(object_type_repr(v)) + " has no attribute " +
                              repr_string(attr));
    }
    return interp.getattr(v, attr);
  }
  if (name == "pprint") {
    bind(args, fn, {});
    return Value(py_repr(v));
  }
  if (name == "wordcount") {
    bind(args, fn, {});
    int64_t n = 0;
    bool in_word = false;
    for (char32_t c : cps_of(py_str(v))) {
      const bool w = is_alpha(c) || is_digit(c) || c == '_';
      if (w && !in_word) ++n;
      in_word = w;
    }
    return Value(n);
  }
  if (name == "truncate") {
    auto p = bind(args, fn,
                  {{"length", Value(255)},
                   {"killwords", Value(false)},
                   {"end", Value("...")},
                   {"leeway", Value(5)}});
    const std::u32string s = cps_of(py_str(v));
    const int64_t length = to_index(p[0], "length");
    const std::string end = py_str(p[2]);
    const int64_t end_len = static_cast<int64_t>(utf8_length(end));
    if (length < end_len)
      raise("AssertionError",
            "expected length >= " + std::to_string(end_len) + ", got " + std::to_string(length));
    if (static_cast<int64_t>(s.size()) <= length + to_index(p[3], "leeway"))
      return Value(utf8_of(s));
    std::string head = utf8_of(s.substr(0, length - end_len));
    if (truthy(p[1])) return Value(head + end);
    const size_t space = head.rfind(' ');
    if (space != std::string::npos) head.resize(space);
    return Value(head + end);
  }
  raise("TemplateRuntimeError",
        "filter '" + name + "' is not supported by moetune's template interpreter");
}

// ---- globals
// ---------------------------------------------------------------------------------------------

std::vector<std::pair<std::string, Value>> builtin_globals() {
  std::vector<std::pair<std::string, Value>> g;
  g.emplace_back(
      "range", Value::callable("range", [](Interpreter&, CallArgs& a) {
        if (!a.keyword.empty()) raise("TypeError", "range() takes no keyword arguments");
        int64_t start = 0, stop = 0, step = 1;
        if (a.positional.size() == 1) {
          stop = to_index(a.positional[0], "");
        } else if (a.positional.size() == 2 || a.positional.size() == 3) {
          start = to_index(a.positional[0], "");
          stop = to_index(a.positional[1], "");
          if (a.positional.size() == 3) step = to_index(a.positional[2], "");
        } else {
          raise("TypeError",
                "range expected at most 3 arguments, got " + std::to_string(a.positional.size()));
        }
        if (step == 0) raise("ValueError", "range() arg 3 must not be zero");
        const double count =
            step > 0 ? std::ceil((static_cast<double>(stop) - start) / step)
                     : std::ceil((static_cast<double>(start) - stop) / -static_cast<double>(step));
        if (count > 100000)
          raise("OverflowError",
                "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        std::vector<Value> out;
        if (step > 0)
          for (int64_t i = start; i < stop; i += step) out.emplace_back(i);
        else
          for (int64_t i = start; i > stop; i += step) out.emplace_back(i);
        return Value::list(std::move(out));
      }));
  auto make_dict = [](CallArgs& a, const char* fn) {
    DictObject d;
    if (a.positional.size() > 1)
      raise("TypeError", std::string(fn) + " expected at most 1 argument");
    if (a.positional.size() == 1) {
      const Value& src = a.positional[0];
      if (src.is_dict()) {
        d = src.as_dict();
      } else {
        for (const auto& pair : iterate(src)) {
          const auto kv = iterate(pair);
          if (kv.size() != 2)
            raise("ValueError", "dictionary update sequence element has wrong length");
          d.set(kv[0], kv[1]);
        }
      }
    }
    for (const auto& [k, v] : a.keyword) d.set(Value(k), v);
    return d;
  };
  g.emplace_back("dict", Value::callable("dict", [make_dict](Interpreter&, CallArgs& a) {
                   return Value::dict(make_dict(a, "dict"));
                 }));
  g.emplace_back("namespace",
                 Value::callable("namespace", [make_dict](Interpreter& in, CallArgs& a) {
                   DictObject d = make_dict(a, "namespace");
                   auto ns = std::make_shared<NamespaceObject>();
                   for (auto& [k, v] : d.items) ns->set(py_str(k), v);
                   in.register_namespace(ns);
                   return Value(ns);
                 }));
  g.emplace_back("joiner", Value::callable("joiner", [](Interpreter&, CallArgs& a) {
                   auto p = bind(a, "joiner", {{"sep", Value(", ")}});
                   auto used = std::make_shared<bool>(false);
                   const std::string sep = py_str(p[0]);
                   return Value::callable("joiner", [used, sep](Interpreter&, CallArgs&) {
                     if (!*used) {
                       *used = true;
                       return Value("");
                     }
                     return Value(sep);
                   });
                 }));
  g.emplace_back("raise_exception",
                 Value::callable("raise_exception", [](Interpreter&, CallArgs& a) -> Value {
                   auto p = bind(a, "raise_exception", {{"message", std::nullopt}});
                   raise("TemplateError", py_str(p[0]));
                 }));
  g.emplace_back("strftime_now", Value::callable("strftime_now", [](Interpreter& in, CallArgs& a) {
                   auto p = bind(a, "strftime_now", {{"format", std::nullopt}});
                   if (!p[0].is_string())
                     raise("TypeError",
                           "strftime() argument 1 must be str, not " + type_name(p[0]));
                   const std::string& format = p[0].as_string();
                   if (format.empty()) return Value("");
                   const std::tm now = in.now();
                   std::vector<char> buf(256 + format.size() * 16);
                   // strftime returns 0 both for "too small" and for an empty result; a marker
                   // tells them apart.
                   const std::string marked = format + "\x01";
                   for (int attempt = 0; attempt < 6; ++attempt) {
                     const size_t n = std::strftime(buf.data(), buf.size(), marked.c_str(), &now);
                     if (n > 0) return Value(std::string(buf.data(), n - 1));
                     buf.resize(buf.size() * 4);
                   }
                   raise("ValueError", "strftime format too long");
                 }));
  return g;
}

}  // namespace moetune::jinja
