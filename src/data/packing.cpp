// Truncation, shuffling and best-fit packing (see packing.h). Best-fit keeps open rows in
// a multimap keyed by their free room, so placing an example is O(log rows).
#include "data/packing.h"

#include <map>
#include <numeric>

#include "core/error.h"

namespace moetune {

void TokenizedExamples::add(std::span<const int32_t> input_ids, std::span<const uint8_t> trained) {
  MOETUNE_CHECK(input_ids.size() == trained.size());
  tokens_.insert(tokens_.end(), input_ids.begin(), input_ids.end());
  trained_.insert(trained_.end(), trained.begin(), trained.end());
  offsets_.push_back(static_cast<int64_t>(tokens_.size()));
}

std::span<const int32_t> TokenizedExamples::input_ids(int64_t example) const {
  return std::span<const int32_t>(tokens_).subspan(offsets_[example], length(example));
}

std::span<const uint8_t> TokenizedExamples::trained(int64_t example) const {
  return std::span<const uint8_t>(trained_).subspan(offsets_[example], length(example));
}

bool truncate_example(EncodedExample& example, int64_t max_tokens, Truncation policy,
                      bool& truncated) {
  const int64_t length = static_cast<int64_t>(example.input_ids.size());
  truncated = length > max_tokens;
  if (!truncated) return true;
  if (policy == Truncation::Drop) return false;
  if (policy == Truncation::Right) {
    example.input_ids.resize(max_tokens);
    example.trained.resize(max_tokens);
  } else {
    const int64_t cut = length - max_tokens;
    example.input_ids.erase(example.input_ids.begin(), example.input_ids.begin() + cut);
    example.trained.erase(example.trained.begin(), example.trained.begin() + cut);
  }
  return true;
}

int64_t trained_targets(std::span<const uint8_t> trained) {
  int64_t count = 0;
  for (size_t t = 1; t < trained.size(); ++t) count += trained[t] ? 1 : 0;
  return count;
}

uint64_t mix_seed(uint64_t seed, uint64_t stream) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<int64_t> shuffled_indices(int64_t count, uint64_t seed) {
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  uint64_t state = seed;
  for (int64_t i = count - 1; i > 0; --i) {
    state = mix_seed(state, static_cast<uint64_t>(i));
    // Multiply-shift maps the 64-bit value onto [0, i] without modulo bias worth noting.
    const auto j = static_cast<int64_t>(
        (static_cast<unsigned __int128>(state) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(order[i], order[j]);
  }
  return order;
}

std::vector<PackedRow> plan_rows(const TokenizedExamples& examples, std::span<const int64_t> order,
                                 int64_t seq_len, bool packing) {
  std::vector<PackedRow> rows;
  std::multimap<int64_t, size_t> open_rows;  // free room -> row index
  for (const int64_t example : order) {
    const int64_t length = examples.length(example);
    MOETUNE_CHECK(length > 0 && length <= seq_len, "example ", example, " has ", length, " tokens");
    if (!packing) {
      rows.push_back(PackedRow{{example}, length});
      continue;
    }
    auto best = open_rows.lower_bound(length);  // the smallest room that fits
    size_t row_index;
    if (best == open_rows.end()) {
      row_index = rows.size();
      rows.emplace_back();
    } else {
      row_index = best->second;
      open_rows.erase(best);
    }
    PackedRow& row = rows[row_index];
    row.examples.push_back(example);
    row.used += length;
    if (row.used < seq_len) open_rows.emplace(seq_len - row.used, row_index);
  }
  return rows;
}

void fill_row(const PackedRow& row, const TokenizedExamples& examples, int32_t pad_id,
              int64_t row_start, std::span<int32_t> input_ids, std::span<int32_t> labels,
              std::span<int32_t> position_ids, std::vector<int32_t>& doc_offsets) {
  const int64_t seq_len = static_cast<int64_t>(input_ids.size());
  int64_t position = 0;
  for (const int64_t example : row.examples) {
    const auto ids = examples.input_ids(example);
    const auto trained = examples.trained(example);
    for (size_t t = 0; t < ids.size(); ++t) {
      input_ids[position + t] = ids[t];
      labels[position + t] = (t > 0 && trained[t]) ? ids[t] : kIgnoreLabel;
      position_ids[position + t] = static_cast<int32_t>(t);
    }
    position += static_cast<int64_t>(ids.size());
    doc_offsets.push_back(static_cast<int32_t>(row_start + position));
  }
  MOETUNE_CHECK(position <= seq_len);
  if (position == seq_len) return;
  for (int64_t t = position; t < seq_len; ++t) {  // padding: a document of its own
    input_ids[t] = pad_id;
    labels[t] = kIgnoreLabel;
    position_ids[t] = static_cast<int32_t>(t - position);
  }
  doc_offsets.push_back(static_cast<int32_t>(row_start + seq_len));
}

}  // namespace moetune
