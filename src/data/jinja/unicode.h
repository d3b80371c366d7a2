// Unicode helpers for the Jinja interpreter: Python strings are sequences of code points,
// ours are UTF-8, so length, indexing, slicing and the whitespace/case predicates decode on
// demand. Case mapping and "printable" follow Python for ASCII, Latin-1, Latin Extended-A,
// Greek and Cyrillic; other scripts are left unchanged (approximation, documented).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace moetune::jinja {

// Code points of a UTF-8 string (invalid bytes decode as U+FFFD, one byte each).
std::u32string decode_utf8(std::string_view text);
std::string encode_utf8(std::u32string_view text);
void append_utf8(std::string& out, char32_t cp);
// Number of code points.
size_t utf8_length(std::string_view text);

bool is_space(char32_t cp);      // str.isspace()
bool is_printable(char32_t cp);  // str.isprintable() (approximation outside the BMP basics)
bool is_linebreak(char32_t cp);  // the separators of str.splitlines()
bool is_alpha(char32_t cp);
bool is_digit(char32_t cp);
bool is_lower_cp(char32_t cp);
bool is_upper_cp(char32_t cp);
char32_t to_upper(char32_t cp);
char32_t to_lower(char32_t cp);

std::string str_upper(std::string_view text);
std::string str_lower(std::string_view text);

}  // namespace moetune::jinja
