// Unicode helpers of the tokenizer: UTF-8 decoding/encoding/validation and the four Unicode
// normalization forms (NFC, NFD, NFKC, NFKD). The tables live in tokenizer_unicode_data.cpp
// (generated from Python's unicodedata by scripts/make_tokenizer_unicode_tables.py); Hangul
// syllables are handled algorithmically. Fast path: text whose code points can neither
// decompose nor combine is returned unchanged without building a code-point buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moetune {

namespace unicode_data {
extern const uint32_t kCombiningClassRanges[][3];
extern const size_t kCombiningClassRangesSize;
extern const uint32_t kCanonicalIndex[][2];
extern const size_t kCanonicalIndexSize;
extern const uint32_t kCanonicalPool[];
extern const uint32_t kCompatIndex[][2];
extern const size_t kCompatIndexSize;
extern const uint32_t kCompatPool[];
extern const uint32_t kCompositions[][3];
extern const size_t kCompositionsSize;
}  // namespace unicode_data

// Byte offset of the first invalid UTF-8 sequence in text, or npos when it is valid.
size_t find_invalid_utf8(std::string_view text);

// Decodes the code point at text[pos] (text must be valid UTF-8); sets length to its bytes.
char32_t decode_utf8(std::string_view text, size_t pos, size_t& length);
inline size_t utf8_length(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}
void append_utf8(std::string& out, char32_t code_point);

enum class NormalizationForm { NFC, NFD, NFKC, NFKD };
std::string unicode_normalize(std::string_view text, NormalizationForm form);

}  // namespace moetune
