// DataLoader: the trainer's view of the data. It builds one split (data/dataset.h), plans
// the rows of each epoch (shuffle by seed and epoch, then pack; see data/packing.h) and
// hands out micro-batches of fixed-length rows. Deterministic: the same config, tokenizer
// and seed give the same batches; state()/restore() resume exactly where it stopped.
// When an epoch's rows run out it continues with the next epoch, reshuffled and repacked
// (so rows_per_epoch() may differ slightly between epochs when packing).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/chat_template.h"
#include "data/data_config.h"
#include "data/dataset.h"
#include "data/tokenizer.h"

namespace moetune {

struct Batch {
  int64_t batch_size = 0, seq_len = 0;
  std::vector<int32_t> input_ids;     // (batch_size, seq_len)
  std::vector<int32_t> labels;        // (batch_size, seq_len) unshifted, -100 = no loss
  std::vector<int32_t> position_ids;  // (batch_size, seq_len) restart at 0 per document
  // Document boundaries over the flattened batch_size * seq_len tokens, cu_seqlens style:
  // doc_offsets[0] = 0, document d is [doc_offsets[d], doc_offsets[d+1]), the last entry is
  // batch_size * seq_len. Documents never cross a row; a row's padding is one document.
  std::vector<int32_t> doc_offsets;

  // Tokens that are prediction targets: labels != -100 (a document's first label is always
  // -100, so this counts labels[t+1] != -100 within each row).
  int64_t trained_tokens() const;
};

class DataLoader {
 public:
  // chat_template may be null (no chat data then). seed: the training seed, used unless
  // data.seed is set. The eval split is neither shuffled nor reshuffled.
  DataLoader(const DataConfig& config, const Tokenizer& tokenizer,
             const ChatTemplate* chat_template, int64_t seq_len, uint64_t seed, Split split);

  Batch next(int64_t micro_batch);

  nlohmann::json state() const;
  void restore(const nlohmann::json& state);

  int64_t epoch() const { return epoch_; }
  int64_t rows_per_epoch() const { return static_cast<int64_t>(rows_.size()); }
  int64_t seq_len() const { return seq_len_; }
  int32_t pad_id() const { return pad_id_; }
  DatasetStats stats() const;
  const TokenizedDataset& dataset() const { return dataset_; }

 private:
  void plan_epoch(int64_t epoch);

  TokenizedDataset dataset_;
  int64_t seq_len_;
  uint64_t seed_;
  bool shuffle_, packing_;
  int32_t pad_id_;
  int64_t epoch_ = 0;
  int64_t cursor_ = 0;  // next row of rows_
  std::vector<PackedRow> rows_;
};

// The pad id: the tokenizer's pad_token, else its eos_token, else 0.
int32_t pad_token_id(const Tokenizer& tokenizer);

}  // namespace moetune
