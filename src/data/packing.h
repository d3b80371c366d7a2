// Tokenized examples in one flat store, truncation to the row length, the deterministic
// shuffle, and packing examples into fixed-length rows.
//
// Packing is online best-fit in the (shuffled) example order: each example goes into the
// open row with the least room that still fits it, else starts a new row; an example never
// crosses a row. Rows are emitted in the order they were opened. Inside a row every
// example is a document: position ids restart at 0, its first label is -100 (nothing is
// predicted across a boundary), and the padding that fills the row is a document of its
// own with labels -100. Without packing each row holds one example plus padding.
// Labels are unshifted (HF style): labels[t] = input_ids[t] where trained, else -100.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "data/data_config.h"
#include "data/dataset_encode.h"

namespace moetune {

constexpr int32_t kIgnoreLabel = -100;

// All examples' tokens and masks, flattened (examples are appended, never changed).
class TokenizedExamples {
 public:
  void add(std::span<const int32_t> input_ids, std::span<const uint8_t> trained);
  int64_t size() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t length(int64_t example) const { return offsets_[example + 1] - offsets_[example]; }
  std::span<const int32_t> input_ids(int64_t example) const;
  std::span<const uint8_t> trained(int64_t example) const;
  int64_t total_tokens() const { return offsets_.back(); }

 private:
  std::vector<int32_t> tokens_;
  std::vector<uint8_t> trained_;
  std::vector<int64_t> offsets_{0};
};

// Cuts `example` to at most max_tokens by the policy. Returns false when it must be
// dropped (policy Drop and too long); `truncated` says whether tokens were removed.
bool truncate_example(EncodedExample& example, int64_t max_tokens, Truncation policy,
                      bool& truncated);

// Tokens of an example that will carry a label (its first token never does).
int64_t trained_targets(std::span<const uint8_t> trained);

// A well-mixed 64-bit value from a seed and a stream number (splitmix64).
uint64_t mix_seed(uint64_t seed, uint64_t stream);
// 0..count-1 in an order fixed by the seed (Fisher-Yates; same on every platform).
std::vector<int64_t> shuffled_indices(int64_t count, uint64_t seed);

struct PackedRow {
  std::vector<int64_t> examples;  // indices into TokenizedExamples, in row order
  int64_t used = 0;               // tokens taken by the examples
};

// Rows for examples visited in `order`; every example must be at most seq_len long.
std::vector<PackedRow> plan_rows(const TokenizedExamples& examples, std::span<const int64_t> order,
                                 int64_t seq_len, bool packing);

// Writes one row of seq_len tokens into the spans (each seq_len long) and appends the end
// offset of each document to doc_offsets (offsets counted from `row_start`, the row's first
// token in the flattened batch).
void fill_row(const PackedRow& row, const TokenizedExamples& examples, int32_t pad_id,
              int64_t row_start, std::span<int32_t> input_ids, std::span<int32_t> labels,
              std::span<int32_t> position_ids, std::vector<int32_t>& doc_offsets);

}  // namespace moetune
