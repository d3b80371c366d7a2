// Tokenizer parity with Hugging Face `tokenizers` 0.22.1: for every tokenizer of shared/data,
// the ids (with and without special tokens) and the decoded strings of the goldens written
// by scripts/make_tokenizer_goldens.py (dataset samples, edge cases and a seeded random-Unicode
// fuzz set) must match exactly; byte-level tokenizers must round-trip the corpus.
#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <random>

#include "core/error.h"
#include "data/tokenizer_unicode.h"
#include "test_tokenizer_fixtures.h"

namespace moetune {
namespace {

using nlohmann::json;
using testing::read_json;

std::vector<std::string> corpus() {
  std::vector<std::string> texts;
  std::ifstream in(testing::tokenizer_goldens_dir() / "corpus.jsonl");
  for (std::string line; std::getline(in, line);) texts.push_back(json::parse(line)["text"]);
  return texts;
}

std::string show(const std::string& text) { return json(text).dump().substr(0, 200); }

// The tokenizer a golden names: shared/data/<tokenizer>, or for a variant golden that
// tokenizer.json with the header's "patch" keys replaced and "extra_added_tokens" appended
// (ids after the largest one), as scripts/make_tokenizer_goldens.py builds it.
Tokenizer golden_tokenizer(const json& header) {
  const std::string folder = header["tokenizer"];
  const auto dir = testing::tokenizer_folder(folder);
  json tokenizer_json = read_json(dir / "tokenizer.json");
  for (auto it = header["patch"].begin(); it != header["patch"].end(); ++it)
    tokenizer_json[it.key()] = it.value();
  int64_t next_id = 0;
  for (auto it = tokenizer_json["model"]["vocab"].begin();
       it != tokenizer_json["model"]["vocab"].end(); ++it)
    next_id = std::max<int64_t>(next_id, it.value().get<int64_t>() + 1);
  for (const json& token : tokenizer_json["added_tokens"])
    next_id = std::max<int64_t>(next_id, token["id"].get<int64_t>() + 1);
  for (const json& extra : header["extra_added_tokens"]) {
    json token = {{"id", next_id++}, {"single_word", false}, {"lstrip", false},
                  {"rstrip", false}, {"normalized", true},   {"special", false}};
    token.update(extra);
    tokenizer_json["added_tokens"].push_back(token);
  }
  return Tokenizer::from_json(tokenizer_json, json::object(), folder + " (variant)");
}

class TokenizerGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerGolden, MatchesHuggingFace) {
  const auto texts = corpus();
  ASSERT_GT(texts.size(), 50u);
  std::ifstream in(testing::tokenizer_goldens_dir() / (GetParam() + ".jsonl"));
  ASSERT_TRUE(in) << "missing golden for " << GetParam();
  std::string line;
  std::getline(in, line);
  const json header = json::parse(line);
  std::optional<Tokenizer> variant;
  if (header.contains("patch")) variant.emplace(golden_tokenizer(header));
  const Tokenizer& tokenizer = variant ? *variant : testing::shared_tokenizer(header["tokenizer"]);
  int rows = 0, failures = 0;
  while (std::getline(in, line) && failures < 8) {
    const json row = json::parse(line);
    const std::string text =
        row.contains("i") ? texts.at(row["i"].get<size_t>()) : row["text"].get<std::string>();
    ++rows;
    const auto expected = row["ids"].get<std::vector<int32_t>>();
    const auto ids = tokenizer.encode(text, false);
    std::vector<int32_t> expected_special;
    if (row.contains("ids_special")) {
      expected_special = row["ids_special"].get<std::vector<int32_t>>();
    } else {
      expected_special = row["special"][0].get<std::vector<int32_t>>();
      expected_special.insert(expected_special.end(), expected.begin(), expected.end());
      const auto suffix = row["special"][1].get<std::vector<int32_t>>();
      expected_special.insert(expected_special.end(), suffix.begin(), suffix.end());
    }
    const auto ids_special = tokenizer.encode(text, true);
    const std::string decoded = tokenizer.decode(expected, false);
    const std::string expected_decoded = row.value("decoded", text);
    const std::string decoded_skip = tokenizer.decode(expected_special, true);
    const std::string expected_skip = row.value("decoded_skip", expected_decoded);
    const bool ok = ids == expected && ids_special == expected_special &&
                    decoded == expected_decoded && decoded_skip == expected_skip;
    if (!ok) {
      ++failures;
      ADD_FAILURE() << GetParam() << " text " << show(text) << "\n ids match: " << (ids == expected)
                    << " (" << ids.size() << " vs " << expected.size() << ")"
                    << "\n special match: " << (ids_special == expected_special)
                    << "\n decode: " << show(decoded) << " vs " << show(expected_decoded)
                    << "\n decode skip: " << show(decoded_skip) << " vs " << show(expected_skip);
    }
  }
  EXPECT_GT(rows, 150);
}

INSTANTIATE_TEST_SUITE_P(SharedData, TokenizerGolden,
                         ::testing::Values("qwen3", "qwen2.5", "llama3", "mixtral", "llama2",
                                           "phi-3-mini", "gpt2", "mixtral-metaspace-first",
                                           "phi3-metaspace-always-split", "llama3-added-flags-nfkc",
                                           "qwen3-digits-nfkd-roberta",
                                           "gpt2-whitespace-split-bert"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

TEST(Tokenizer, ByteLevelRoundTripsCorpus) {
  const auto texts = corpus();
  // Qwen normalizes to NFC first, so it round-trips the NFC form of the text.
  for (const char* folder : {"qwen3", "llama3", "gpt2/kv260-gptq"}) {
    const Tokenizer& tokenizer = testing::shared_tokenizer(folder);
    const bool nfc = std::string(folder).rfind("qwen", 0) == 0;
    for (const auto& text : texts) {
      const std::string expected = nfc ? unicode_normalize(text, NormalizationForm::NFC) : text;
      EXPECT_EQ(tokenizer.decode(tokenizer.encode(text, false)), expected)
          << folder << " " << show(text);
    }
  }
}

TEST(Tokenizer, LongWordIsFast) {
  std::mt19937 rng(7);
  std::string word;
  for (int i = 0; i < 100000; ++i) word.push_back(static_cast<char>('a' + rng() % 26));
  for (const char* folder : {"qwen3", "mixtral"}) {
    const Tokenizer& tokenizer = testing::shared_tokenizer(folder);
    const auto start = std::chrono::steady_clock::now();
    const auto ids = tokenizer.encode(word, false);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_GT(ids.size(), 10000u);
    EXPECT_EQ(tokenizer.decode(ids).size(),
              folder == std::string("mixtral") ? word.size() : word.size());
    EXPECT_LT(seconds, 1.0) << folder;
  }
}

TEST(Tokenizer, VocabAndSpecialTokens) {
  const Tokenizer& qwen = testing::shared_tokenizer("qwen3");
  EXPECT_EQ(qwen.token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(qwen.id_to_token(151644), "<|im_start|>");
  EXPECT_EQ(qwen.vocab_size(), 151669);
  EXPECT_FALSE(qwen.token_to_id("definitely not a token").has_value());
  EXPECT_THROW(qwen.id_to_token(10000000), Error);
  EXPECT_EQ(qwen.special_tokens().eos_token, "<|im_end|>");
  const Tokenizer& llama2 = testing::shared_tokenizer("llama2");
  EXPECT_EQ(llama2.special_tokens().bos_token, "<s>");
  EXPECT_EQ(llama2.token_to_id("<0x0A>"), 13);
}

TEST(Tokenizer, RejectsInvalidUtf8AndBadFiles) {
  const Tokenizer& qwen = testing::shared_tokenizer("qwen3");
  try {
    qwen.encode("ok\xff", false);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("UTF-8 (byte 2)"), std::string::npos) << error.what();
  }
  EXPECT_THROW(qwen.encode("\xe4\xb8", false), Error);

  const json base = {{"model",
                      {{"type", "BPE"},
                       {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}},
                       {"merges", json::array({"a b"})}}}};
  EXPECT_EQ(Tokenizer::from_json(base, json::object(), "t.json").encode("abab", false),
            (std::vector<int32_t>{2, 2}));
  auto expect_error = [&](json tokenizer_json, const std::string& needle) {
    try {
      Tokenizer::from_json(tokenizer_json, json::object(), "bad/tokenizer.json");
      ADD_FAILURE() << "expected an error containing " << needle;
    } catch (const Error& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(needle), std::string::npos) << message;
      EXPECT_NE(message.find("bad/tokenizer.json"), std::string::npos) << message;
    }
  };
  json bad = base;
  bad["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "x"}};
  expect_error(bad, "unsupported normalizer type 'Precompiled'");
  bad = base;
  bad["pre_tokenizer"] = {{"type", "UnicodeScripts"}};
  expect_error(bad, "unsupported pre_tokenizer type 'UnicodeScripts'");
  bad = base;
  bad["decoder"] = {{"type", "CTC"}};
  expect_error(bad, "unsupported decoder type 'CTC'");
  bad = base;
  bad["post_processor"] = {{"type", "Nope"}};
  expect_error(bad, "unsupported post_processor type 'Nope'");
  bad = base;
  bad["model"]["type"] = "Unigram";
  expect_error(bad, "unsupported model type 'Unigram'");
  bad = base;
  bad["model"]["merges"] = json::array({"a c"});
  expect_error(bad, "'c' is not in the vocab");
  bad = base;
  bad["pre_tokenizer"] = {{"type", "Split"},
                          {"pattern", {{"Regex", "(unclosed"}}},
                          {"behavior", "Isolated"},
                          {"invert", false}};
  expect_error(bad, "cannot compile regex");
  bad = base;
  bad["model"]["vocab"]["c"] = "x";
  expect_error(bad, "vocab entry 'c'");

  testing::TempDir dir;
  std::ofstream(dir / "tokenizer.json") << "{ not json";
  EXPECT_THROW(Tokenizer::from_folder(dir.path()), Error);
  EXPECT_THROW(Tokenizer::from_folder(dir / "missing"), Error);
}

}  // namespace
}  // namespace moetune
