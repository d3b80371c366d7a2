// DataLoader (see loader.h): epoch plans and micro-batch assembly. The state is just
// (epoch, cursor) plus a fingerprint of the data, because every epoch's plan is a pure
// function of the dataset, the seed and the epoch number.
#include "data/loader.h"

#include "core/error.h"

namespace moetune {

int64_t Batch::trained_tokens() const {
  int64_t count = 0;
  for (const int32_t label : labels) count += label != kIgnoreLabel ? 1 : 0;
  return count;
}

int32_t pad_token_id(const Tokenizer& tokenizer) {
  const auto& special = tokenizer.special_tokens();
  for (const auto* token : {&special.pad_token, &special.eos_token})
    if (*token)
      if (const auto id = tokenizer.token_to_id(**token)) return *id;
  return 0;
}

DataLoader::DataLoader(const DataConfig& config, const Tokenizer& tokenizer,
                       const ChatTemplate* chat_template, int64_t seq_len, uint64_t seed,
                       Split split)
    : dataset_(build_dataset(config, tokenizer, chat_template, seq_len, seed, split)),
      seq_len_(seq_len),
      seed_(config.seed.value_or(seed)),
      shuffle_(config.shuffle && split == Split::Train),
      packing_(config.packing),
      pad_id_(pad_token_id(tokenizer)) {
  plan_epoch(0);
}

void DataLoader::plan_epoch(int64_t epoch) {
  const int64_t count = dataset_.examples.size();
  std::vector<int64_t> order;
  if (shuffle_) {
    order = shuffled_indices(count, mix_seed(seed_, static_cast<uint64_t>(epoch)));
  } else {
    order.resize(count);
    for (int64_t i = 0; i < count; ++i) order[i] = i;
  }
  rows_ = plan_rows(dataset_.examples, order, seq_len_, packing_);
  epoch_ = epoch;
  cursor_ = 0;
}

Batch DataLoader::next(int64_t micro_batch) {
  if (micro_batch < 1) fail("micro batch size must be at least 1, got ", micro_batch);
  Batch batch;
  batch.batch_size = micro_batch;
  batch.seq_len = seq_len_;
  const size_t total = static_cast<size_t>(micro_batch * seq_len_);
  batch.input_ids.resize(total);
  batch.labels.resize(total);
  batch.position_ids.resize(total);
  batch.doc_offsets.push_back(0);
  for (int64_t b = 0; b < micro_batch; ++b) {
    if (cursor_ >= rows_per_epoch()) plan_epoch(epoch_ + 1);
    const int64_t row_start = b * seq_len_;
    auto row_span = [&](std::vector<int32_t>& values) {
      return std::span<int32_t>(values).subspan(row_start, seq_len_);
    };
    fill_row(rows_[cursor_], dataset_.examples, pad_id_, row_start, row_span(batch.input_ids),
             row_span(batch.labels), row_span(batch.position_ids), batch.doc_offsets);
    ++cursor_;
  }
  return batch;
}

nlohmann::json DataLoader::state() const {
  return {{"epoch", epoch_},
          {"cursor", cursor_},
          {"seed", seed_},
          {"examples", dataset_.examples.size()},
          {"tokens", dataset_.examples.total_tokens()},
          {"seq_len", seq_len_},
          {"packing", packing_}};
}

void DataLoader::restore(const nlohmann::json& state) {
  auto read = [&](const char* key) -> const nlohmann::json& {
    if (!state.is_object() || !state.contains(key))
      fail("data loader state: missing \"", key, "\"");
    return state[key];
  };
  try {
    const auto examples = read("examples").get<int64_t>();
    const auto tokens = read("tokens").get<int64_t>();
    const auto seq_len = read("seq_len").get<int64_t>();
    const auto seed = read("seed").get<uint64_t>();
    const auto packing = read("packing").get<bool>();
    if (examples != dataset_.examples.size() || tokens != dataset_.examples.total_tokens() ||
        seq_len != seq_len_ || seed != seed_ || packing != packing_)
      fail("data loader state: the data, seq_len, seed or packing differ from the checkpoint's (",
           examples, " examples, ", tokens, " tokens, seq_len ", seq_len, ") vs now (",
           dataset_.examples.size(), " examples, ", dataset_.examples.total_tokens(),
           " tokens, seq_len ", seq_len_, ")");
    const auto epoch = read("epoch").get<int64_t>();
    const auto cursor = read("cursor").get<int64_t>();
    if (epoch < 0) fail("data loader state: bad epoch ", epoch);
    plan_epoch(epoch);
    if (cursor < 0 || cursor > rows_per_epoch())
      fail("data loader state: cursor ", cursor, " is outside the epoch's ", rows_per_epoch(),
           " rows");
    cursor_ = cursor;
  } catch (const nlohmann::json::exception& error) {
    fail("data loader state: ", error.what());
  }
}

DatasetStats DataLoader::stats() const {
  DatasetStats stats = dataset_.stats;
  stats.rows = rows_per_epoch();
  if (stats.rows > 0)
    stats.packing_efficiency = static_cast<double>(dataset_.examples.total_tokens()) /
                               static_cast<double>(stats.rows * seq_len_);
  return stats;
}

}  // namespace moetune
