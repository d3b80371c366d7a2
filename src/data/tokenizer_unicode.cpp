// UTF-8 helpers and Unicode normalization (UAX #15): full decomposition from the generated
// tables (+ Hangul arithmetic), canonical reordering by combining class (stable insertion
// sort of each run of non-starters), then canonical composition with the "blocked" rule.
// A per-text quick check skips everything when no code point can change or combine.
#include "data/tokenizer_unicode.h"

#include <algorithm>
#include <vector>

namespace moetune {

namespace {

constexpr char32_t kHangulSBase = 0xAC00, kHangulLBase = 0x1100, kHangulVBase = 0x1161,
                   kHangulTBase = 0x11A7;
constexpr int kHangulLCount = 19, kHangulVCount = 21, kHangulTCount = 28;
constexpr int kHangulNCount = kHangulVCount * kHangulTCount;
constexpr int kHangulSCount = kHangulLCount * kHangulNCount;

int combining_class(char32_t cp) {
  using unicode_data::kCombiningClassRanges;
  if (cp < 0x300) return 0;
  size_t lo = 0, hi = unicode_data::kCombiningClassRangesSize;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kCombiningClassRanges[mid][1] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < unicode_data::kCombiningClassRangesSize && kCombiningClassRanges[lo][0] <= cp)
    return static_cast<int>(kCombiningClassRanges[lo][2]);
  return 0;
}

// Finds cp in an index table; returns [begin, end) into the pool, or an empty range.
std::pair<uint32_t, uint32_t> find_decomposition(const uint32_t (*index)[2], size_t size,
                                                 char32_t cp) {
  size_t lo = 0, hi = size - 1;  // the last entry is the sentinel
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (index[mid][0] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < size - 1 && index[lo][0] == cp) return {index[lo][1], index[lo + 1][1]};
  return {0, 0};
}

void decompose(char32_t cp, bool compat, std::vector<char32_t>& out) {
  if (cp >= kHangulSBase && cp < kHangulSBase + kHangulSCount) {
    const int s = static_cast<int>(cp - kHangulSBase);
    out.push_back(kHangulLBase + s / kHangulNCount);
    out.push_back(kHangulVBase + (s % kHangulNCount) / kHangulTCount);
    if (s % kHangulTCount) out.push_back(kHangulTBase + s % kHangulTCount);
    return;
  }
  if (cp < 0xA0) {
    out.push_back(cp);
    return;
  }
  if (compat) {
    auto [b, e] =
        find_decomposition(unicode_data::kCompatIndex, unicode_data::kCompatIndexSize, cp);
    if (b != e) {
      out.insert(out.end(), unicode_data::kCompatPool + b, unicode_data::kCompatPool + e);
      return;
    }
  }
  auto [b, e] =
      find_decomposition(unicode_data::kCanonicalIndex, unicode_data::kCanonicalIndexSize, cp);
  if (b != e)
    out.insert(out.end(), unicode_data::kCanonicalPool + b, unicode_data::kCanonicalPool + e);
  else
    out.push_back(cp);
}

char32_t compose_pair(char32_t first, char32_t second) {
  if (first >= kHangulLBase && first < kHangulLBase + kHangulLCount && second >= kHangulVBase &&
      second < kHangulVBase + kHangulVCount)
    return kHangulSBase +
           ((first - kHangulLBase) * kHangulVCount + (second - kHangulVBase)) * kHangulTCount;
  if (first >= kHangulSBase && first < kHangulSBase + kHangulSCount &&
      (first - kHangulSBase) % kHangulTCount == 0 && second > kHangulTBase &&
      second < kHangulTBase + kHangulTCount)
    return first + (second - kHangulTBase);
  using unicode_data::kCompositions;
  size_t lo = 0, hi = unicode_data::kCompositionsSize;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kCompositions[mid][0] < first ||
        (kCompositions[mid][0] == first && kCompositions[mid][1] < second))
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < unicode_data::kCompositionsSize && kCompositions[lo][0] == first &&
      kCompositions[lo][1] == second)
    return kCompositions[lo][2];
  return 0;
}

// Bitmap of the code points that may change under the form or combine with a neighbour
// (decomposable, non-starter, second half of a composition, Hangul); built once, read-only.
class ChangeMap {
 public:
  explicit ChangeMap(bool compat) : bits_(0x110000 / 64, 0) {
    using namespace unicode_data;
    for (size_t i = 0; i + 1 < kCanonicalIndexSize; ++i) set(kCanonicalIndex[i][0]);
    if (compat)
      for (size_t i = 0; i + 1 < kCompatIndexSize; ++i) set(kCompatIndex[i][0]);
    for (size_t i = 0; i < kCombiningClassRangesSize; ++i)
      for (uint32_t cp = kCombiningClassRanges[i][0]; cp <= kCombiningClassRanges[i][1]; ++cp)
        set(cp);
    for (size_t i = 0; i < kCompositionsSize; ++i) set(kCompositions[i][1]);
    for (uint32_t cp = kHangulLBase; cp < 0x1200; ++cp) set(cp);
    for (uint32_t cp = kHangulSBase; cp < kHangulSBase + kHangulSCount; ++cp) set(cp);
  }
  bool test(char32_t cp) const { return cp < 0x110000 && ((bits_[cp >> 6] >> (cp & 63)) & 1); }

 private:
  void set(uint32_t cp) { bits_[cp >> 6] |= uint64_t{1} << (cp & 63); }
  std::vector<uint64_t> bits_;
};

bool may_change(char32_t cp, bool compat) {
  static const ChangeMap canonical_map(false), compat_map(true);
  return compat ? compat_map.test(cp) : canonical_map.test(cp);
}

}  // namespace

size_t find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    char32_t cp;
    if (c >= 0xC2 && c <= 0xDF)
      len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF)
      len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4)
      len = 4, cp = c & 0x07;
    else
      return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
      return i;
    i += len;
  }
  return std::string_view::npos;
}

char32_t decode_utf8(std::string_view text, size_t pos, size_t& length) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  const unsigned char c = s[0];
  if (c < 0x80) return length = 1, c;
  if (c < 0xE0) return length = 2, ((c & 0x1F) << 6) | (s[1] & 0x3F);
  if (c < 0xF0) return length = 3, ((c & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
  length = 4;
  return ((c & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string unicode_normalize(std::string_view text, NormalizationForm form) {
  const bool compat = form == NormalizationForm::NFKC || form == NormalizationForm::NFKD;
  const bool compose = form == NormalizationForm::NFC || form == NormalizationForm::NFKC;
  // Quick check: nothing to do when no code point may change or combine.
  bool any = false;
  for (size_t i = 0, len = 0; i < text.size() && !any; i += len) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      len = 1;
      continue;
    }
    any = may_change(decode_utf8(text, i, len), compat);
  }
  if (!any) return std::string(text);

  std::vector<char32_t> cps;
  cps.reserve(text.size());
  for (size_t i = 0, len = 0; i < text.size(); i += len)
    decompose(decode_utf8(text, i, len), compat, cps);
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < cps.size();) {
    if (combining_class(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && combining_class(cps[j]) != 0) ++j;
    std::stable_sort(
        cps.begin() + static_cast<long>(i), cps.begin() + static_cast<long>(j),
        [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  if (compose && !cps.empty()) {
    // The composition loop of UAX #15's sample code: a character combines with the last
    // starter unless a character of the same or higher class sits between them.
    size_t starter = 0;
    int last_class = combining_class(cps[0]) == 0 ? 0 : 256;
    size_t out = 1;
    for (size_t i = 1; i < cps.size(); ++i) {
      const char32_t cp = cps[i];
      const int cls = combining_class(cp);
      if (last_class < cls || last_class == 0) {
        if (char32_t composite = compose_pair(cps[starter], cp)) {
          cps[starter] = composite;
          continue;
        }
      }
      if (cls == 0) starter = out;
      last_class = cls;
      cps[out++] = cp;
    }
    cps.resize(out);
  }
  std::string result;
  result.reserve(text.size() + 8);
  for (char32_t cp : cps) append_utf8(result, cp);
  return result;
}

}  // namespace moetune
