// Tests of the recipe validation helpers (core/config_keys) and the data section parser.
#include <gtest/gtest.h>

#include <array>

#include "core/config_keys.h"
#include "core/error.h"
#include "data/data_config.h"
#include "test_dataset_fixture.h"

namespace moetune {
namespace {

using testing::TempDir;
using testing::write_text_file;

std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(ConfigKeys, UnknownKeySuggestsClosest) {
  constexpr std::array<std::string_view, 3> known = {"format", "path", "columns"};
  const YAML::Node node = YAML::Load("{path: a.jsonl, formt: auto}");
  EXPECT_EQ(error_of([&] { check_known_keys(node, known, "data"); }),
            "unknown key data.formt (did you mean data.format?)");
  const YAML::Node far = YAML::Load("{zzzzzz: 1}");
  const std::string message = error_of([&] { check_known_keys(far, known, "data"); });
  EXPECT_NE(message.find("unknown key data.zzzzzz (known keys: format, path, columns)"),
            std::string::npos)
      << message;
  EXPECT_NO_THROW(check_known_keys(YAML::Load("{path: x}"), known, "data"));
  EXPECT_NO_THROW(check_known_keys(YAML::Node(), known, "data"));
  EXPECT_NE(error_of([&] {
              check_known_keys(YAML::Load("[1, 2]"), known, "data");
            }).find("data: expected a map"),
            std::string::npos);
}

TEST(ConfigKeys, EditDistance) {
  EXPECT_EQ(edit_distance("formt", "format"), 1u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
}

TEST(ConfigKeys, TypedGettersNameTheKey) {
  const YAML::Node node = YAML::Load(
      "{packing: yes please, seq_len: 12.5, lr: abc, name: x, flag: true, n: 7, rate: 1e-4, "
      "list: [a, b], nested: {a: 1}}");
  EXPECT_EQ(error_of([&] { get_bool(node, "packing", "data", true); }),
            "data.packing: expected a boolean, got 'yes please'");
  EXPECT_EQ(error_of([&] { get_int(node, "seq_len", "training", 0); }),
            "training.seq_len: expected an integer, got '12.5'");
  EXPECT_EQ(error_of([&] { get_double(node, "lr", "training", 0); }),
            "training.lr: expected a number, got 'abc'");
  EXPECT_EQ(error_of([&] { get_string(node, "nested", "x", ""); }),
            "x.nested: expected a string, got a map");
  EXPECT_TRUE(get_bool(node, "flag", "x", false));
  EXPECT_EQ(get_int(node, "n", "x", 0), 7);
  EXPECT_DOUBLE_EQ(get_double(node, "rate", "x", 0), 1e-4);
  EXPECT_EQ(get_int(node, "absent", "x", 42), 42);
  EXPECT_FALSE(get_optional_string(node, "absent", "x").has_value());
  EXPECT_EQ(get_string_list(node, "list", "x"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(get_string_list(node, "name", "x"), (std::vector<std::string>{"x"}));
  constexpr std::array<std::string_view, 2> choices = {"left", "right"};
  EXPECT_EQ(error_of([&] { get_choice(node, "name", "data", choices, "left"); }),
            "data.name: expected one of left, right, got 'x'");
  EXPECT_NE(error_of([&] { check_range(int64_t{5}, 0, 3, "data.n"); }).find("out of range"),
            std::string::npos);
}

TEST(DataConfig, DefaultsAndRelativePaths) {
  TempDir dir;
  write_text_file(dir / "data" / "chat.jsonl", "{}\n");
  const DataConfig config = parse_data_config(YAML::Load("{train: data/chat.jsonl}"), dir.path());
  ASSERT_EQ(config.train.size(), 1u);
  EXPECT_EQ(config.train[0].path, (dir.path() / "data" / "chat.jsonl").lexically_normal());
  EXPECT_EQ(config.train[0].format, DataFormat::Auto);
  EXPECT_TRUE(config.packing);
  EXPECT_TRUE(config.shuffle);
  EXPECT_EQ(config.train_on, TrainOn::Auto);
  EXPECT_EQ(config.truncation, Truncation::Right);
  EXPECT_EQ(config.max_bad_lines, 0);
  EXPECT_FALSE(config.has_eval());
  EXPECT_FALSE(config.seed.has_value());
}

TEST(DataConfig, FullSchema) {
  TempDir dir;
  write_text_file(dir / "a.json", "[]");
  write_text_file(dir / "b.jsonl", "");
  write_text_file(dir / "t.jinja", "x");
  const DataConfig config = parse_data_config(YAML::Load(R"(
train:
  - path: a.json
    format: sharegpt
    columns: {messages: conversations, tools: tools}
    max_samples: 10
  - b.jsonl
eval_fraction: 0.1
train_on: all
truncation: left
packing: false
shuffle: false
seed: 7
max_bad_lines: 3
chat_template: t.jinja
system_prompt: Be brief.
add_eos: false
)"),
                                              dir.path());
  ASSERT_EQ(config.train.size(), 2u);
  EXPECT_EQ(config.train[0].format, DataFormat::ShareGPT);
  EXPECT_EQ(config.train[0].column("messages"), "conversations");
  EXPECT_EQ(config.train[0].column("system"), "system");
  EXPECT_EQ(config.train[0].max_samples, 10);
  EXPECT_EQ(config.train[0].context, "data.train[0]");
  EXPECT_EQ(config.train[1].format, DataFormat::Auto);
  EXPECT_DOUBLE_EQ(config.eval_fraction, 0.1);
  EXPECT_TRUE(config.has_eval());
  EXPECT_EQ(config.train_on, TrainOn::All);
  EXPECT_EQ(config.truncation, Truncation::Left);
  EXPECT_FALSE(config.packing);
  EXPECT_FALSE(config.shuffle);
  EXPECT_EQ(config.seed, 7u);
  EXPECT_EQ(config.max_bad_lines, 3);
  EXPECT_EQ(config.chat_template, (dir.path() / "t.jinja").lexically_normal());
  EXPECT_EQ(config.system_prompt, "Be brief.");
  EXPECT_FALSE(config.add_eos);
}

TEST(DataConfig, Errors) {
  TempDir dir;
  write_text_file(dir / "a.jsonl", "");
  auto parse_error = [&](const std::string& yaml) {
    return error_of([&] { parse_data_config(YAML::Load(yaml), dir.path()); });
  };
  EXPECT_EQ(parse_error("{train: a.jsonl, packng: true}"),
            "unknown key data.packng (did you mean data.packing?)");
  EXPECT_EQ(parse_error("{train: [{path: a.jsonl, formt: auto}]}"),
            "unknown key data.train[0].formt (did you mean data.train[0].format?)");
  EXPECT_EQ(parse_error("{train: a.jsonl, packing: yes please}"),
            "data.packing: expected a boolean, got 'yes please'");
  EXPECT_NE(parse_error("{train: missing.jsonl}").find("data.train: no such file"),
            std::string::npos);
  EXPECT_NE(parse_error("{train: [{path: a.jsonl, format: csv}]}")
                .find("data.train[0].format: expected one of auto, messages"),
            std::string::npos);
  EXPECT_NE(parse_error("{train: [{path: a.jsonl, columns: {mesages: x}}]}")
                .find("did you mean data.train[0].columns.messages?"),
            std::string::npos);
  EXPECT_NE(parse_error("{train: a.jsonl, eval: a.jsonl, eval_fraction: 0.1}").find("not both"),
            std::string::npos);
  EXPECT_NE(parse_error("{train: a.jsonl, eval_fraction: 1.5}").find("(0, 1)"), std::string::npos);
  EXPECT_NE(parse_error("{eval: a.jsonl}").find("data.train: missing"), std::string::npos);
  EXPECT_NE(parse_error("{train: a.jsonl, seed: -1}").find("data.seed"), std::string::npos);
}

}  // namespace
}  // namespace moetune
