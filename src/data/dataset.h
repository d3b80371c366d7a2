// Building the tokenized dataset of one split from the recipe's data section: read every
// source file, detect/convert each record's format, take the held-out eval split, encode
// with loss masks, truncate, and keep the statistics. Malformed records are errors naming
// file:line, or skipped and counted when data.skip_bad_lines / max_bad_lines allows.
//
// The eval split from data.eval_fraction is round(fraction * records) records (at least
// one, leaving at least one for training), chosen by a permutation of the train records
// seeded with the data seed; train and eval are disjoint by construction.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/data_config.h"
#include "data/packing.h"
#include "data/tokenizer.h"

namespace moetune {

enum class Split { Train, Eval };

struct DatasetStats {
  int64_t records = 0;            // records read and converted (this split)
  int64_t examples = 0;           // examples kept
  int64_t skipped_lines = 0;      // malformed records skipped (all files read)
  int64_t tokens = 0;             // tokens of the kept examples, after truncation
  int64_t trained_tokens = 0;     // tokens carrying a label (first of each example excluded)
  int64_t truncated = 0;          // examples cut to seq_len (or dropped, with truncation: drop)
  int64_t dropped_too_long = 0;   // examples dropped by truncation: drop
  int64_t dropped_untrained = 0;  // examples with no trained token (nothing to learn)
  int64_t realigned = 0;          // examples whose mask needed re-alignment at a boundary
  int64_t rows = 0;               // rows of one epoch (set by the loader)
  double packing_efficiency = 0;  // example tokens / (rows * seq_len) (set by the loader)
  std::vector<std::string> bad_line_messages;  // the first few skipped records' errors
};

struct ExampleOrigin {
  int32_t source = 0;  // index into the split's source list
  int64_t line = 0;    // 1-based line the record starts on
};

struct TokenizedDataset {
  TokenizedExamples examples;
  std::vector<ExampleOrigin> origins;        // per example
  std::vector<std::filesystem::path> files;  // per source
  DatasetStats stats;

  std::string origin(int64_t example) const;  // "path:line"
};

// The chat template to use: data.chat_template when set, else the tokenizer folder's
// (chat_template.jinja or tokenizer_config.json's), else none.
std::optional<ChatTemplate> load_chat_template(const DataConfig& config,
                                               const std::filesystem::path& tokenizer_dir);

// Reads, converts, splits, encodes and truncates one split (seq_len: the row length).
TokenizedDataset build_dataset(const DataConfig& config, const Tokenizer& tokenizer,
                               const ChatTemplate* chat_template, int64_t seq_len, uint64_t seed,
                               Split split);

}  // namespace moetune
