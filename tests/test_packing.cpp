// Tests of truncation, shuffling, packing and the DataLoader (batches, determinism,
// epochs, state/restore), plus `moetune data preview` end to end.
#include <gtest/gtest.h>

#include <numeric>
#include <set>

#include "core/error.h"
#include "data/loader.h"
#include "data/packing.h"
#include "test_dataset_fixture.h"

namespace moetune {
namespace {

using testing::TempDir;
using testing::write_text_file;

TokenizedExamples examples_of_lengths(const std::vector<int64_t>& lengths) {
  TokenizedExamples examples;
  int32_t next = 1;
  for (int64_t length : lengths) {
    std::vector<int32_t> ids(length);
    std::vector<uint8_t> trained(length);
    for (int64_t t = 0; t < length; ++t) {
      ids[t] = next++;
      trained[t] = t % 2;  // every other token trained
    }
    examples.add(ids, trained);
  }
  return examples;
}

TEST(Packing, TruncationPolicies) {
  EncodedExample example{{1, 2, 3, 4, 5}, {0, 0, 1, 1, 1}, false};
  bool truncated = false;
  EncodedExample right = example;
  EXPECT_TRUE(truncate_example(right, 3, Truncation::Right, truncated));
  EXPECT_TRUE(truncated);
  EXPECT_EQ(right.input_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(right.trained, (std::vector<uint8_t>{0, 0, 1}));
  EncodedExample left = example;
  EXPECT_TRUE(truncate_example(left, 3, Truncation::Left, truncated));
  EXPECT_EQ(left.input_ids, (std::vector<int32_t>{3, 4, 5}));
  EXPECT_EQ(left.trained, (std::vector<uint8_t>{1, 1, 1}));
  EncodedExample drop = example;
  EXPECT_FALSE(truncate_example(drop, 3, Truncation::Drop, truncated));
  EncodedExample fits = example;
  EXPECT_TRUE(truncate_example(fits, 5, Truncation::Drop, truncated));
  EXPECT_FALSE(truncated);
  EXPECT_EQ(fits.input_ids.size(), 5u);
}

TEST(Packing, ShuffleIsAPermutationFixedBySeed) {
  const auto a = shuffled_indices(100, 7), b = shuffled_indices(100, 7),
             c = shuffled_indices(100, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int64_t> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(100);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(a, identity);
}

TEST(Packing, BestFitNeverSplitsExamples) {
  const TokenizedExamples examples = examples_of_lengths({6, 5, 4, 3, 2, 2, 7, 1});
  std::vector<int64_t> order(examples.size());
  std::iota(order.begin(), order.end(), 0);
  const auto rows = plan_rows(examples, order, 8, true);
  std::multiset<int64_t> seen;
  int64_t used = 0;
  for (const PackedRow& row : rows) {
    int64_t sum = 0;
    for (int64_t example : row.examples) {
      seen.insert(example);
      sum += examples.length(example);
    }
    EXPECT_EQ(sum, row.used);
    EXPECT_LE(row.used, 8);
    used += row.used;
  }
  EXPECT_EQ(seen, std::multiset<int64_t>(order.begin(), order.end()));
  EXPECT_EQ(used, examples.total_tokens());
  EXPECT_EQ(rows.size(), 4u);  // best fit: 6+2, 5+3, 4+2, 7+1
  EXPECT_EQ(plan_rows(examples, order, 8, false).size(), 8u);
}

TEST(Packing, FillRowDocumentsPositionsAndLabels) {
  const TokenizedExamples examples = examples_of_lengths({3, 4});
  PackedRow row{{0, 1}, 7};
  std::vector<int32_t> ids(10), labels(10), positions(10), offsets{0};
  // Row starting at flattened offset 10 (the second row of a batch).
  std::vector<int32_t> full_offsets{0, 10};
  fill_row(row, examples, /*pad_id=*/99, 10, ids, labels, positions, full_offsets);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 99, 99, 99}));
  EXPECT_EQ(positions, (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 3, 0, 1, 2}));
  // Trained tokens are the odd positions of each example; the first of each is -100 anyway.
  EXPECT_EQ(labels, (std::vector<int32_t>{-100, 2, -100, -100, 5, -100, 7, -100, -100, -100}));
  EXPECT_EQ(full_offsets, (std::vector<int32_t>{0, 10, 13, 17, 20}));
}

// ---- the loader ---------------------------------------------------------------------------

struct LoaderFixture {
  LoaderFixture() {
    testing::write_tiny_tokenizer(dir.path() / "tok", testing::kChatmlGenerationTemplate);
    tokenizer.emplace(Tokenizer::from_folder(dir.path() / "tok"));
    templ.emplace(testing::kChatmlGenerationTemplate, "test template");
    std::string lines;
    for (int i = 0; i < 50; ++i) {
      const std::string answer(static_cast<size_t>(5 + (i * 7) % 23), 'a' + i % 26);
      lines += "{\"messages\": [{\"role\": \"user\", \"content\": \"question " + std::to_string(i) +
               "\"}, {\"role\": \"assistant\", \"content\": \"" + answer + "\"}]}\n";
    }
    write_text_file(dir / "chat.jsonl", lines);
    DataSource source;
    source.path = dir / "chat.jsonl";
    source.context = "data.train[0]";
    config.train.push_back(source);
  }
  DataLoader loader(int64_t seq_len = 96, uint64_t seed = 1, Split split = Split::Train) const {
    return DataLoader(config, *tokenizer, &*templ, seq_len, seed, split);
  }
  TempDir dir;
  std::optional<Tokenizer> tokenizer;
  std::optional<ChatTemplate> templ;
  DataConfig config;
};

void expect_valid_batch(const Batch& batch, int32_t pad_id) {
  const int64_t total = batch.batch_size * batch.seq_len;
  ASSERT_EQ(static_cast<int64_t>(batch.input_ids.size()), total);
  ASSERT_EQ(batch.labels.size(), batch.input_ids.size());
  ASSERT_EQ(batch.position_ids.size(), batch.input_ids.size());
  ASSERT_GE(batch.doc_offsets.size(), 2u);
  EXPECT_EQ(batch.doc_offsets.front(), 0);
  EXPECT_EQ(batch.doc_offsets.back(), total);
  for (size_t d = 0; d + 1 < batch.doc_offsets.size(); ++d) {
    const int32_t begin = batch.doc_offsets[d], end = batch.doc_offsets[d + 1];
    ASSERT_LT(begin, end);
    EXPECT_EQ(begin / batch.seq_len, (end - 1) / batch.seq_len) << "document crosses a row";
    EXPECT_EQ(batch.labels[begin], kIgnoreLabel) << "first label of a document";
    for (int32_t t = begin; t < end; ++t) {
      EXPECT_EQ(batch.position_ids[t], t - begin);
      if (batch.labels[t] != kIgnoreLabel) {
        EXPECT_EQ(batch.labels[t], batch.input_ids[t]);
      }
    }
  }
  for (int64_t t = 0; t < total; ++t) {
    if (batch.input_ids[t] == pad_id) {
      EXPECT_EQ(batch.labels[t], kIgnoreLabel);
    }
  }
}

TEST(DataLoader, BatchesAreWellFormedAndCoverAnEpoch) {
  const LoaderFixture fixture;
  DataLoader loader = fixture.loader();
  const DatasetStats stats = loader.stats();
  EXPECT_EQ(stats.examples, 50);
  EXPECT_GT(stats.packing_efficiency, 0.5);
  EXPECT_LE(stats.packing_efficiency, 1.0);
  EXPECT_LT(stats.rows, 50);  // packing puts several chats per row
  EXPECT_EQ(loader.pad_id(), *fixture.tokenizer->token_to_id("<|endoftext|>"));
  int64_t trained = 0, documents = 0;
  for (int64_t row = 0; row < loader.rows_per_epoch(); ++row) {
    const Batch batch = loader.next(1);
    expect_valid_batch(batch, loader.pad_id());
    trained += batch.trained_tokens();
    documents += static_cast<int64_t>(batch.doc_offsets.size()) - 1;
  }
  EXPECT_EQ(trained, stats.trained_tokens);  // every trained token exactly once per epoch
  EXPECT_GE(documents, 50);
  EXPECT_EQ(loader.epoch(), 0);
  loader.next(1);
  EXPECT_EQ(loader.epoch(), 1);
}

TEST(DataLoader, WithoutPackingOneExamplePerRow) {
  LoaderFixture fixture;
  fixture.config.packing = false;
  DataLoader loader = fixture.loader();
  EXPECT_EQ(loader.rows_per_epoch(), 50);
  const Batch batch = loader.next(4);
  expect_valid_batch(batch, loader.pad_id());
  EXPECT_EQ(batch.doc_offsets.size(), 9u);  // (example, padding) per row
}

TEST(DataLoader, DeterministicShuffleAndReshuffledEpochs) {
  const LoaderFixture fixture;
  DataLoader a = fixture.loader(96, 1), b = fixture.loader(96, 1), c = fixture.loader(96, 2);
  const Batch first_a = a.next(3), first_b = b.next(3), first_c = c.next(3);
  EXPECT_EQ(first_a.input_ids, first_b.input_ids);
  EXPECT_EQ(first_a.doc_offsets, first_b.doc_offsets);
  EXPECT_NE(first_a.input_ids, first_c.input_ids);
  // Epoch 1 is a different order than epoch 0.
  DataLoader d = fixture.loader(96, 1);
  std::vector<int32_t> epoch0, epoch1;
  const int64_t rows = d.rows_per_epoch();
  for (int64_t i = 0; i < rows; ++i) {
    const Batch batch = d.next(1);
    epoch0.insert(epoch0.end(), batch.input_ids.begin(), batch.input_ids.end());
  }
  const Batch next_epoch = d.next(1);
  EXPECT_EQ(d.epoch(), 1);
  EXPECT_NE(std::vector<int32_t>(epoch0.begin(), epoch0.begin() + 96), next_epoch.input_ids);
}

TEST(DataLoader, StateRestoreContinuesIdentically) {
  const LoaderFixture fixture;
  DataLoader original = fixture.loader();
  const int64_t rows = original.rows_per_epoch();
  for (int64_t i = 0; i < rows - 1; ++i) original.next(1);  // stop just before the epoch ends
  const nlohmann::json state = original.state();
  std::vector<Batch> expected;
  for (int i = 0; i < 5; ++i) expected.push_back(original.next(2));  // crosses into epoch 1

  DataLoader resumed = fixture.loader();
  resumed.restore(nlohmann::json::parse(state.dump()));
  for (int i = 0; i < 5; ++i) {
    const Batch batch = resumed.next(2);
    EXPECT_EQ(batch.input_ids, expected[i].input_ids) << i;
    EXPECT_EQ(batch.labels, expected[i].labels) << i;
    EXPECT_EQ(batch.position_ids, expected[i].position_ids) << i;
    EXPECT_EQ(batch.doc_offsets, expected[i].doc_offsets) << i;
  }
  EXPECT_EQ(resumed.epoch(), original.epoch());

  DataLoader other_seq = fixture.loader(128);
  EXPECT_THROW(other_seq.restore(state), Error);
  EXPECT_THROW(resumed.restore(nlohmann::json::parse(R"({"epoch": "x"})")), Error);
}

TEST(DataLoader, TruncationStatsAndEvalIsNotShuffled) {
  LoaderFixture fixture;
  fixture.config.truncation = Truncation::Drop;
  const DataLoader dropping = fixture.loader(44);
  EXPECT_GT(dropping.stats().dropped_too_long, 0);
  EXPECT_EQ(dropping.stats().dropped_too_long, dropping.stats().truncated);
  EXPECT_EQ(dropping.stats().examples + dropping.stats().dropped_too_long, 50);
  fixture.config.truncation = Truncation::Right;
  const DataLoader cutting = fixture.loader(44);
  EXPECT_EQ(cutting.stats().examples + cutting.stats().dropped_untrained, 50);
  EXPECT_GT(cutting.stats().truncated, 0);

  fixture.config.eval_fraction = 0.2;
  DataLoader eval1 = fixture.loader(96, 1, Split::Eval), eval2 = fixture.loader(96, 1, Split::Eval);
  EXPECT_EQ(eval1.dataset().examples.size(), 10);
  const auto origins = eval1.dataset().origins;
  for (size_t i = 1; i < origins.size(); ++i) EXPECT_LT(origins[i - 1].line, origins[i].line);
  EXPECT_EQ(eval1.next(2).input_ids, eval2.next(2).input_ids);
}

// ---- moetune data preview -----------------------------------------------------------------

TEST(DataPreview, PrintsMarkedSamplesAndStats) {
  TempDir dir;
  testing::write_tiny_tokenizer(dir / "model", testing::kChatmlGenerationTemplate);
  write_text_file(dir / "chat.jsonl",
                  "{\"messages\": [{\"role\": \"user\", \"content\": \"ping\"}, {\"role\": "
                  "\"assistant\", \"content\": \"pong\"}]}\n"
                  "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": "
                  "\"assistant\", \"content\": \"hello\"}]}\n");
  write_text_file(dir / "recipe.yaml",
                  "model: {path: model}\ndata: {train: chat.jsonl}\ntraining: {seq_len: 64}\n");
  const auto result = testing::run_command(testing::moetune_binary().string() + " data preview " +
                                           (dir / "recipe.yaml").string() + " --samples 1");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("<|im_start|>assistant\n\xC2\xABpong<|im_end|>"), std::string::npos)
      << result.output;
  EXPECT_EQ(result.output.find("hello"), std::string::npos) << "only one sample was asked for";
  EXPECT_NE(result.output.find("examples     2 kept"), std::string::npos) << result.output;

  write_text_file(dir / "split.yaml",
                  "model: {tokenizer: model}\ndata: {train: chat.jsonl, eval_fraction: 0.5}\n");
  const auto eval = testing::run_command(testing::moetune_binary().string() + " data preview " +
                                         (dir / "split.yaml").string() + " --split eval");
  ASSERT_EQ(eval.exit_code, 0) << eval.output;
  EXPECT_NE(eval.output.find("=== eval split, seq_len 2048"), std::string::npos) << eval.output;
  EXPECT_NE(eval.output.find("examples     1 kept"), std::string::npos) << eval.output;

  write_text_file(dir / "bad.yaml",
                  "model: {path: model}\ndata: {train: chat.jsonl, shufle: no}\n");
  const auto bad = testing::run_command(testing::moetune_binary().string() + " data preview " +
                                        (dir / "bad.yaml").string());
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("unknown key data.shufle (did you mean data.shuffle?)"),
            std::string::npos)
      << bad.output;
}

}  // namespace
}  // namespace moetune
