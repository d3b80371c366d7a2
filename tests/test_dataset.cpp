// Tests of dataset reading, format conversion, loss masks and build_dataset, with a tiny
// byte-level BPE tokenizer written by the test (real Tokenizer and ChatTemplate classes)
// and the real data files of ../shared/data.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "core/error.h"
#include "data/dataset.h"
#include "data/dataset_encode.h"
#include "data/dataset_formats.h"
#include "data/loader.h"
#include "test_dataset_fixture.h"

namespace moetune {
namespace {

using json = RecordJson;
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

// A tokenizer folder with the given template, loaded.
struct TinyTokenizer {
  explicit TinyTokenizer(const std::string& chat_template = testing::kChatmlGenerationTemplate) {
    testing::write_tiny_tokenizer(dir.path() / "tok", chat_template);
    tokenizer.emplace(Tokenizer::from_folder(dir.path() / "tok"));
    if (!chat_template.empty()) templ.emplace(chat_template, "test template");
  }
  const ChatTemplate* chat_template() const { return templ ? &*templ : nullptr; }
  TempDir dir;
  std::optional<Tokenizer> tokenizer;
  std::optional<ChatTemplate> templ;
};

// The decoded text of each maximal run of trained tokens.
std::vector<std::string> trained_runs(const Tokenizer& tokenizer, std::span<const int32_t> ids,
                                      std::span<const uint8_t> trained) {
  std::vector<std::string> runs;
  size_t t = 0;
  while (t < ids.size()) {
    if (!trained[t]) {
      ++t;
      continue;
    }
    size_t end = t;
    while (end < ids.size() && trained[end]) ++end;
    runs.push_back(tokenizer.decode(ids.subspan(t, end - t)));
    t = end;
  }
  return runs;
}

std::vector<std::pair<int64_t, std::string>> records_of(const std::filesystem::path& path) {
  std::vector<std::pair<int64_t, std::string>> records;
  read_json_records(path, [&](int64_t line, std::string_view text) {
    records.emplace_back(line, std::string(text));
    return true;
  });
  return records;
}

DataSource source_for(const std::filesystem::path& path, DataFormat format = DataFormat::Auto) {
  DataSource source;
  source.path = path;
  source.format = format;
  source.context = "data.train[0]";
  return source;
}

// ---- reading records ----------------------------------------------------------------------

TEST(DatasetRecords, JsonlLinesSkipBlankLines) {
  TempDir dir;
  write_text_file(dir / "a.jsonl", "{\"a\": 1}\n\n  {\"a\": 2}  \r\n{\"a\": 3}");
  const auto records = records_of(dir / "a.jsonl");
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0], (std::pair<int64_t, std::string>{1, "{\"a\": 1}"}));
  EXPECT_EQ(records[1], (std::pair<int64_t, std::string>{3, "{\"a\": 2}"}));
  EXPECT_EQ(records[2].first, 4);
}

TEST(DatasetRecords, JsonArrayElementsWithTheirLines) {
  TempDir dir;
  write_text_file(dir / "a.json",
                  "\xEF\xBB\xBF[\n  {\"a\": \"x]}\\\"\"},\n  {\"b\": [1, {\"c\": 2}]}\n ,{}\n]\n");
  const auto records = records_of(dir / "a.json");
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].first, 2);
  EXPECT_EQ(json::parse(records[0].second)["a"], "x]}\"");
  EXPECT_EQ(records[1].first, 3);
  EXPECT_EQ(json::parse(records[1].second)["b"][1]["c"], 2);
  EXPECT_EQ(records[2].first, 4);
}

TEST(DatasetRecords, JsonObjectAndObjectsPerLine) {
  TempDir dir;
  write_text_file(dir / "one.json", "{\n \"text\": \"hi\"\n}\n");
  EXPECT_EQ(records_of(dir / "one.json").size(), 1u);
  write_text_file(dir / "lines.json", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
  const auto records = records_of(dir / "lines.json");
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].first, 2);
}

TEST(DatasetRecords, BrokenJsonStructureNamesTheLine) {
  TempDir dir;
  write_text_file(dir / "bad.json", "[\n{\"a\": 1},\n{\"a\": \"unterminated}\n]\n");
  const std::string message = error_of([&] { records_of(dir / "bad.json"); });
  EXPECT_NE(message.find("bad.json:3: malformed JSON"), std::string::npos) << message;
  write_text_file(dir / "open.json", "[{\"a\": 1}");
  EXPECT_NE(error_of([&] { records_of(dir / "open.json"); }).find("not closed"), std::string::npos);
}

TEST(DatasetRecords, EveryTruncationOfAFileIsAnErrorOrRecordsNeverACrash) {
  TempDir dir;
  const std::string text =
      "[\n {\"conversations\": [{\"from\": \"human\", \"value\": \"a\\\"]}\"}]},\n"
      " {\"text\": \"\u00e9\", \"n\": [1, 2.5e3, null, true]}\n]\n";
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    for (const char* name : {"cut.json", "cut.jsonl"}) {
      write_text_file(dir / name, text.substr(0, cut));
      try {
        read_json_records(dir / name, [&](int64_t line, std::string_view record) {
          EXPECT_GE(line, 1);
          const json parsed = json::parse(record, nullptr, false);
          if (!parsed.is_discarded() && parsed.is_object()) {
            try {
              convert_record(parsed, detect_format(parsed, source_for(dir / name)),
                             source_for(dir / name), FormatOptions{});
            } catch (const Error&) {
            }
          }
          return true;
        });
      } catch (const Error& error) {
        EXPECT_NE(std::string(error.what()).find(name), std::string::npos) << error.what();
      }
    }
  }
}

// ---- formats ------------------------------------------------------------------------------

TEST(DatasetFormats, DetectFromKeys) {
  const DataSource source = source_for("x.jsonl");
  EXPECT_EQ(
      detect_format(json::parse(R"({"messages": [{"role": "user", "content": "a"}]})"), source),
      DataFormat::Messages);
  EXPECT_EQ(
      detect_format(json::parse(R"({"conversations": [{"from": "human", "value": "a"}]})"), source),
      DataFormat::ShareGPT);
  EXPECT_EQ(
      detect_format(json::parse(R"({"instruction": "a", "input": "", "output": "b"})"), source),
      DataFormat::Alpaca);
  EXPECT_EQ(detect_format(json::parse(R"({"prompt": "a", "completion": "b"})"), source),
            DataFormat::PromptCompletion);
  EXPECT_EQ(detect_format(json::parse(R"({"text": "a"})"), source), DataFormat::Text);
  const std::string message =
      error_of([&] { detect_format(json::parse(R"({"question": "a", "answer": "b"})"), source); });
  EXPECT_NE(message.find("[question, answer]"), std::string::npos) << message;
  EXPECT_NE(message.find("data.train[0].format"), std::string::npos) << message;
  DataSource mapped = source;
  mapped.columns = {{"prompt", "question"}, {"completion", "answer"}};
  EXPECT_EQ(detect_format(json::parse(R"({"question": "a", "answer": "b"})"), mapped),
            DataFormat::PromptCompletion);
}

TEST(DatasetFormats, OpenAIMessagesKeepToolsAndToolCalls) {
  const json record = json::parse(R"({
    "messages": [
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "sunny"},
      {"role": "assistant", "content": "It is sunny."}],
    "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]})");
  FormatOptions options;
  options.system_prompt = "Be brief.";
  const Example example = convert_record(record, DataFormat::Messages, source_for("x"), options);
  ASSERT_EQ(example.kind, ExampleKind::Chat);
  ASSERT_EQ(example.messages.size(), 5u);
  EXPECT_EQ(example.messages[0], json({{"role", "system"}, {"content", "Be brief."}}));
  EXPECT_EQ(example.messages[2]["content"], "");
  EXPECT_EQ(example.messages[2]["tool_calls"][0]["function"]["name"], "get_weather");
  // Bare function schemas get the OpenAI {type, function} wrapper.
  EXPECT_EQ(example.tools[0]["type"], "function");
  EXPECT_EQ(example.tools[0]["function"]["name"], "get_weather");
}

TEST(DatasetFormats, MessageErrors) {
  const DataSource source = source_for("x");
  auto convert_error = [&](const char* text) {
    return error_of(
        [&] { convert_record(json::parse(text), DataFormat::Messages, source, FormatOptions{}); });
  };
  EXPECT_NE(convert_error(R"({"messages": [{"role": "wizard", "content": "a"}]})")
                .find("messages[0]: unknown role 'wizard'"),
            std::string::npos);
  EXPECT_NE(convert_error(R"({"messages": [{"role": "user"}]})").find("missing \"content\""),
            std::string::npos);
  EXPECT_NE(convert_error(R"({"messages": "hello"})").find("expected a list of messages"),
            std::string::npos);
  EXPECT_NE(convert_error(R"({"messages": [{"role": "user", "content": 5}]})")
                .find("expected a string or a list of parts"),
            std::string::npos);
  EXPECT_NE(convert_error(R"({"text": "a"})").find("missing key \"messages\""), std::string::npos);
  EXPECT_NE(convert_error(R"({"messages": []})").find("empty"), std::string::npos);
}

TEST(DatasetFormats, ShareGPTRolesAsLlamaFactory) {
  const json record = json::parse(R"({
    "conversations": [
      {"from": "human", "value": "find a recipe"},
      {"from": "function_call", "value": "{\"name\": \"search\", \"arguments\": {\"q\": \"rice\"}}"},
      {"from": "observation", "value": "{\"found\": 1}"},
      {"from": "gpt", "value": "Found one."}],
    "system": "You cook.",
    "tools": "[{\"name\": \"search\", \"description\": \"d\", \"parameters\": {}}]"})");
  const Example example =
      convert_record(record, DataFormat::ShareGPT, source_for("x"), FormatOptions{});
  ASSERT_EQ(example.messages.size(), 5u);
  EXPECT_EQ(example.messages[0]["role"], "system");
  EXPECT_EQ(example.messages[0]["content"], "You cook.");
  EXPECT_EQ(example.messages[1]["role"], "user");
  EXPECT_EQ(example.messages[2]["role"], "assistant");
  EXPECT_EQ(example.messages[2]["tool_calls"][0]["function"]["name"], "search");
  EXPECT_EQ(example.messages[2]["tool_calls"][0]["function"]["arguments"]["q"], "rice");
  EXPECT_EQ(example.messages[3]["role"], "tool");
  EXPECT_EQ(example.messages[4], json({{"role", "assistant"}, {"content", "Found one."}}));
  EXPECT_EQ(example.tools[0]["function"]["name"], "search");

  const std::string unknown = error_of([&] {
    convert_record(json::parse(R"({"conversations": [{"from": "alien", "value": "x"}]})"),
                   DataFormat::ShareGPT, source_for("x"), FormatOptions{});
  });
  EXPECT_NE(unknown.find("unknown role 'alien'"), std::string::npos) << unknown;
  const std::string bad_call = error_of([&] {
    convert_record(
        json::parse(R"({"conversations": [{"from": "function_call", "value": "nope"}]})"),
        DataFormat::ShareGPT, source_for("x"), FormatOptions{});
  });
  EXPECT_NE(bad_call.find("not valid JSON"), std::string::npos) << bad_call;
}

TEST(DatasetFormats, AlpacaWithAndWithoutTemplate) {
  const json record = json::parse(
      R"({"instruction": "Add", "input": "2+2", "output": "4", "history": [["hi", "hello"]]})");
  FormatOptions chat;
  chat.has_chat_template = true;
  const Example as_chat = convert_record(record, DataFormat::Alpaca, source_for("x"), chat);
  ASSERT_EQ(as_chat.kind, ExampleKind::Chat);
  ASSERT_EQ(as_chat.messages.size(), 4u);
  EXPECT_EQ(as_chat.messages[2], json({{"role", "user"}, {"content", "Add\n2+2"}}));
  EXPECT_EQ(as_chat.messages[3], json({{"role", "assistant"}, {"content", "4"}}));
  const Example raw = convert_record(record, DataFormat::Alpaca, source_for("x"), FormatOptions{});
  ASSERT_EQ(raw.kind, ExampleKind::PromptCompletion);
  EXPECT_EQ(raw.prompt, "hi\n\nhello\n\nAdd\n\n2+2\n\n");
  EXPECT_EQ(raw.completion, "4");
  EXPECT_NE(error_of([&] {
              convert_record(json::parse(R"({"instruction": "a", "output": 3})"),
                             DataFormat::Alpaca, source_for("x"), FormatOptions{});
            }).find("\"output\": expected a string, got number"),
            std::string::npos);
}

TEST(DatasetFormats, PromptCompletionPlainAndConversational) {
  const Example plain =
      convert_record(json::parse(R"({"prompt": "Q: 1+1?", "completion": " 2"})"),
                     DataFormat::PromptCompletion, source_for("x"), FormatOptions{});
  EXPECT_EQ(plain.kind, ExampleKind::PromptCompletion);
  EXPECT_EQ(plain.prompt, "Q: 1+1?");
  const Example conversational = convert_record(
      json::parse(R"({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant",
          "content": "b"}, {"role": "user", "content": "c"}], "completion": "d"})"),
      DataFormat::PromptCompletion, source_for("x"), FormatOptions{});
  EXPECT_EQ(conversational.kind, ExampleKind::Chat);
  EXPECT_EQ(conversational.first_trained_message, 3u);
  EXPECT_EQ(conversational.messages.back(), json({{"role", "assistant"}, {"content", "d"}}));
}

TEST(DatasetFormats, LlamaFactoryValueParts) {
  const json record = json::parse(R"({"messages": [
      {"role": "user", "content": [{"type": "text", "value": "hi"}]},
      {"role": "assistant", "content": [{"type": "reasoning", "value": "think"},
        {"type": "tool_call", "value": "{\"name\": \"f\", \"arguments\": {\"x\": 1}}"}]}]})");
  const Example example =
      convert_record(record, DataFormat::Messages, source_for("x"), FormatOptions{});
  EXPECT_EQ(example.messages[0]["content"], "hi");
  EXPECT_EQ(example.messages[1]["content"], "");
  EXPECT_EQ(example.messages[1]["reasoning_content"], "think");
  EXPECT_EQ(example.messages[1]["tool_calls"][0]["function"]["arguments"]["x"], 1);
}

// ---- masks --------------------------------------------------------------------------------

Example two_turn_chat() {
  Example example;
  example.kind = ExampleKind::Chat;
  example.messages = json::parse(R"([
      {"role": "system", "content": "Be the best."},
      {"role": "user", "content": "hello there"},
      {"role": "assistant", "content": "hello, the world"},
      {"role": "user", "content": "and then?"},
      {"role": "assistant", "content": "then all"}])");
  return example;
}

TEST(DatasetMasks, AssistantOnlyThroughGenerationTags) {
  TinyTokenizer tiny(testing::kChatmlGenerationTemplate);
  ASSERT_TRUE(tiny.templ->has_generation_tags());
  const ExampleEncoder encoder(*tiny.tokenizer, tiny.chat_template(), TrainOn::Auto, true);
  const EncodedExample encoded = encoder.encode(two_turn_chat());
  EXPECT_EQ(encoded.input_ids,
            tiny.tokenizer->encode(encoder.render_chat(two_turn_chat()).text, false));
  EXPECT_FALSE(encoded.realigned);
  EXPECT_EQ(trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{"hello, the world<|im_end|>", "then all<|im_end|>"}));
}

TEST(DatasetMasks, AssistantOnlyThroughPrefixRenders) {
  TinyTokenizer tiny(testing::kChatmlTemplate);
  ASSERT_FALSE(tiny.templ->has_generation_tags());
  const ExampleEncoder encoder(*tiny.tokenizer, tiny.chat_template(), TrainOn::Auto, true);
  const EncodedExample encoded = encoder.encode(two_turn_chat());
  EXPECT_EQ(trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{"hello, the world<|im_end|>\n", "then all<|im_end|>\n"}));
}

TEST(DatasetMasks, PrefixRendersAnchorOnContentWhenTheLastTurnDiffers) {
  TinyTokenizer tiny(testing::kChatmlThinkTemplate);
  const ExampleEncoder encoder(*tiny.tokenizer, tiny.chat_template(), TrainOn::Auto, true);
  const Example chat = two_turn_chat();
  const MaskedText masked = encoder.render_chat(chat);
  ASSERT_NE(masked.text.find("<think>"), std::string::npos);
  const EncodedExample encoded = encoder.encode(chat);
  // Earlier turn: content + end; last turn: the think block is generated too.
  EXPECT_EQ(trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{"hello, the world<|im_end|>\n",
                                      "<think>\n\n</think>\n\nthen all<|im_end|>\n"}));
}

TEST(DatasetMasks, AllTokensAndConversationalCompletion) {
  TinyTokenizer tiny;
  const ExampleEncoder all(*tiny.tokenizer, tiny.chat_template(), TrainOn::All, true);
  const EncodedExample every = all.encode(two_turn_chat());
  for (uint8_t trained : every.trained) EXPECT_EQ(trained, 1);

  Example completion_only = two_turn_chat();
  completion_only.first_trained_message = 4;
  const ExampleEncoder encoder(*tiny.tokenizer, tiny.chat_template(), TrainOn::Auto, true);
  const EncodedExample encoded = encoder.encode(completion_only);
  EXPECT_EQ(trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{"then all<|im_end|>"}));
}

TEST(DatasetMasks, PromptCompletionAndText) {
  TinyTokenizer tiny;
  const ExampleEncoder encoder(*tiny.tokenizer, nullptr, TrainOn::Auto, true);
  Example pc;
  pc.kind = ExampleKind::PromptCompletion;
  pc.prompt = "Q: the sum?";
  pc.completion = " there are four";
  const EncodedExample encoded = encoder.encode(pc);
  EXPECT_EQ(trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{" there are four<|im_end|>"}));
  EXPECT_EQ(tiny.tokenizer->decode(encoded.input_ids), "Q: the sum? there are four<|im_end|>");

  Example text;
  text.kind = ExampleKind::Text;
  text.text = "in the beginning";
  const EncodedExample plain = encoder.encode(text);
  EXPECT_EQ(tiny.tokenizer->decode(plain.input_ids), "in the beginning<|im_end|>");
  for (uint8_t trained : plain.trained) EXPECT_EQ(trained, 1);
  const ExampleEncoder no_eos(*tiny.tokenizer, nullptr, TrainOn::Auto, false);
  EXPECT_EQ(tiny.tokenizer->decode(no_eos.encode(text).input_ids), "in the beginning");
}

TEST(DatasetMasks, BoundaryInsideAMergeIsRealigned) {
  TinyTokenizer tiny;
  const ExampleEncoder encoder(*tiny.tokenizer, nullptr, TrainOn::Auto, true);
  // "the" is one token ("Ġthe" after a space); a span starting inside it splits the merge.
  MaskedText masked;
  masked.text = "say the word";
  masked.trained_spans = {{5, 12}};  // "he word"
  const EncodedExample encoded = encoder.encode_masked_text(masked);
  EXPECT_TRUE(encoded.realigned);
  EXPECT_EQ(tiny.tokenizer->decode(encoded.input_ids), masked.text);
  // The whole-text token " the" overlaps the span, so it is trained.
  const auto runs = trained_runs(*tiny.tokenizer, encoded.input_ids, encoded.trained);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0], " the word");
}

// ---- build_dataset ------------------------------------------------------------------------

DataConfig config_for(const std::filesystem::path& path) {
  DataConfig config;
  config.train.push_back(source_for(path));
  return config;
}

TEST(DatasetBuild, BadLinesErrorOrSkip) {
  TinyTokenizer tiny;
  write_text_file(tiny.dir / "chat.jsonl",
                  "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": "
                  "\"assistant\", \"content\": \"b\"}]}\n"
                  "{not json\n"
                  "{\"messages\": [{\"role\": \"robot\", \"content\": \"a\"}]}\n"
                  "{\"messages\": [{\"role\": \"user\", \"content\": \"c\"}, {\"role\": "
                  "\"assistant\", \"content\": \"d\"}]}\n");
  DataConfig config = config_for(tiny.dir / "chat.jsonl");
  const std::string message = error_of(
      [&] { build_dataset(config, *tiny.tokenizer, tiny.chat_template(), 64, 1, Split::Train); });
  EXPECT_NE(message.find("chat.jsonl:2: malformed JSON"), std::string::npos) << message;

  config.max_bad_lines = -1;
  const TokenizedDataset dataset =
      build_dataset(config, *tiny.tokenizer, tiny.chat_template(), 64, 1, Split::Train);
  EXPECT_EQ(dataset.stats.skipped_lines, 2);
  EXPECT_EQ(dataset.stats.examples, 2);
  ASSERT_EQ(dataset.stats.bad_line_messages.size(), 2u);
  EXPECT_NE(
      dataset.stats.bad_line_messages[1].find("chat.jsonl:3: messages[0]: unknown role 'robot'"),
      std::string::npos)
      << dataset.stats.bad_line_messages[1];
  EXPECT_NE(dataset.origin(1).find("chat.jsonl:4"), std::string::npos);

  config.max_bad_lines = 1;
  EXPECT_NE(error_of([&] {
              build_dataset(config, *tiny.tokenizer, tiny.chat_template(), 64, 1, Split::Train);
            }).find("more than data.max_bad_lines = 1"),
            std::string::npos);
}

TEST(DatasetBuild, EvalSplitIsDisjointAndDeterministic) {
  TinyTokenizer tiny;
  std::string lines;
  for (int i = 0; i < 40; ++i)
    lines += "{\"text\": \"document number " + std::to_string(i) + "\"}\n";
  write_text_file(tiny.dir / "text.jsonl", lines);
  DataConfig config = config_for(tiny.dir / "text.jsonl");
  config.eval_fraction = 0.2;
  auto lines_of = [&](Split split, uint64_t seed) {
    const TokenizedDataset dataset =
        build_dataset(config, *tiny.tokenizer, nullptr, 64, seed, split);
    std::set<int64_t> result;
    for (const ExampleOrigin& origin : dataset.origins) result.insert(origin.line);
    return result;
  };
  const auto train = lines_of(Split::Train, 5), eval = lines_of(Split::Eval, 5);
  EXPECT_EQ(eval.size(), 8u);
  EXPECT_EQ(train.size(), 32u);
  for (int64_t line : eval) EXPECT_FALSE(train.count(line)) << line;
  EXPECT_EQ(lines_of(Split::Eval, 5), eval);
  EXPECT_NE(lines_of(Split::Eval, 6), eval);
  config.eval_fraction = 0;
  EXPECT_NE(error_of([&] {
              build_dataset(config, *tiny.tokenizer, nullptr, 64, 5, Split::Eval);
            }).find("no eval data"),
            std::string::npos);
}

TEST(DatasetBuild, ChatWithoutTemplateIsAnError) {
  TinyTokenizer tiny("");
  write_text_file(tiny.dir / "c.jsonl",
                  "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n");
  EXPECT_NE(error_of([&] {
              build_dataset(config_for(tiny.dir / "c.jsonl"), *tiny.tokenizer, nullptr, 64, 1,
                            Split::Train);
            }).find("c.jsonl:1: the tokenizer has no chat template"),
            std::string::npos);
}

// ---- the real files of ../shared/data -----------------------------------------------------

struct RealFile {
  const char* path;
  DataFormat expected_format;
  std::map<std::string, std::string> columns;
};

TEST(DatasetRealFiles, EveryFormatBuilds) {
  TinyTokenizer tiny(testing::kChatmlTemplate);  // prefix renders: the general path
  const std::filesystem::path data = testing::shared_data_dir();
  const std::vector<RealFile> files = {
      {"alpaca/alpaca_en_demo.json", DataFormat::Alpaca, {}},
      {"glaive-toolcall/glaive_toolcall_en_demo.json", DataFormat::ShareGPT, {}},
      {"sharegpt/conversation.json", DataFormat::ShareGPT, {}},
      {"gsm8k/test.jsonl",
       DataFormat::PromptCompletion,
       {{"prompt", "question"}, {"completion", "answer"}}},
      {"llamafactory-demo/reason_tool_use_demo_50.jsonl", DataFormat::Messages, {}},
      {"llamafactory-demo/identity.json", DataFormat::Alpaca, {}},
  };
  for (const RealFile& file : files) {
    SCOPED_TRACE(file.path);
    DataConfig config = config_for(data / file.path);
    config.train[0].columns = file.columns;
    config.train[0].max_samples = 60;
    // Detection sees the first record.
    std::optional<json> first;
    read_json_records(data / file.path, [&](int64_t, std::string_view text) {
      first = json::parse(text);
      return false;
    });
    ASSERT_TRUE(first);
    EXPECT_EQ(detect_format(*first, config.train[0]), file.expected_format);
    const TokenizedDataset dataset =
        build_dataset(config, *tiny.tokenizer, tiny.chat_template(), 4096, 3, Split::Train);
    EXPECT_EQ(dataset.stats.skipped_lines, 0);
    EXPECT_GT(dataset.stats.examples, 0);
    EXPECT_GT(dataset.stats.trained_tokens, 0);
    EXPECT_LT(dataset.stats.trained_tokens, dataset.stats.tokens);
    // Every trained run of a chat ends a turn (the rendered <|im_end|> + newline), except when
    // truncation cut it.
    if (file.expected_format != DataFormat::PromptCompletion) {
      for (int64_t i = 0; i < std::min<int64_t>(dataset.examples.size(), 10); ++i) {
        if (dataset.examples.length(i) == 4096) continue;
        for (const std::string& run : trained_runs(*tiny.tokenizer, dataset.examples.input_ids(i),
                                                   dataset.examples.trained(i)))
          EXPECT_TRUE(run.ends_with("<|im_end|>\n")) << run;
      }
    }
  }
}

TEST(DatasetRealFiles, GlaiveToolCallsReachTheTemplate) {
  TinyTokenizer tiny(testing::kChatmlTemplate);
  DataConfig config =
      config_for(testing::shared_data_dir() / "glaive-toolcall/glaive_toolcall_en_demo.json");
  int64_t records = 0, tool_turns = 0;
  read_json_records(config.train[0].path, [&](int64_t, std::string_view text) {
    const json record = json::parse(text);
    const Example example = convert_record(record, DataFormat::ShareGPT, config.train[0],
                                           FormatOptions{true, std::nullopt});
    for (const json& message : example.messages) {
      if (message.contains("tool_calls")) {
        ++tool_turns;
        EXPECT_EQ(message["role"], "assistant");
        EXPECT_TRUE(message["tool_calls"][0]["function"].contains("arguments"));
      }
    }
    if (!example.tools.is_null()) {
      EXPECT_EQ(example.tools[0]["type"], "function");
    }
    ++records;
    return true;
  });
  EXPECT_EQ(records, 300);
  EXPECT_EQ(tool_turns, 211);  // every function_call turn of the file
}

// ---- the Qwen3 tokenizer, real chat templates, goldens from Transformers ------------------

// The Qwen3 tokenizer folder (tokenizer.json decompressed), loaded once for the suite.
class DatasetQwen3 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    folder_ = new TempDir();
    const std::filesystem::path data = testing::shared_data_dir() / "qwen3";
    const auto result =
        testing::run_command("xz -dc '" + (data / "tokenizer.json.xz").string() + "' > '" +
                             (folder_->path() / "tokenizer.json").string() + "'");
    ASSERT_EQ(result.exit_code, 0) << result.output;
    std::filesystem::copy_file(data / "tokenizer_config.json",
                               folder_->path() / "tokenizer_config.json");
    tokenizer_ = new Tokenizer(Tokenizer::from_folder(folder_->path()));
    qwen3_template_ = new ChatTemplate(ChatTemplate::from_tokenizer_folder(folder_->path()));
  }
  static void TearDownTestSuite() {
    delete qwen3_template_;
    delete tokenizer_;
    delete folder_;
  }
  static inline TempDir* folder_ = nullptr;
  static inline Tokenizer* tokenizer_ = nullptr;
  static inline ChatTemplate* qwen3_template_ = nullptr;
};

TEST_F(DatasetQwen3, GenerationMasksMatchTransformers) {
  // Goldens: scripts/make_dataset_goldens.py (apply_chat_template with
  // return_assistant_tokens_mask=True, SmolLM3's template, the Qwen3 tokenizer).
  std::ifstream file(testing::source_dir() / "tests/goldens/dataset/smollm3_qwen3_masks.jsonl");
  ASSERT_TRUE(file);
  std::ifstream template_file(testing::shared_data_dir() / "smollm3/chat_template.jinja");
  std::stringstream source;
  source << template_file.rdbuf();
  const ChatTemplate smollm3(source.str(), "smollm3/chat_template.jinja");
  ASSERT_TRUE(smollm3.has_generation_tags());
  const ExampleEncoder encoder(*tokenizer_, &smollm3, TrainOn::Auto, true);
  std::string line;
  int cases = 0;
  while (std::getline(file, line)) {
    const json golden = json::parse(line);
    Example example;
    example.messages = golden["messages"];
    const EncodedExample encoded = encoder.encode(example);
    EXPECT_EQ(encoded.input_ids, golden["input_ids"].get<std::vector<int32_t>>()) << cases;
    EXPECT_EQ(encoded.trained, golden["assistant_masks"].get<std::vector<uint8_t>>()) << cases;
    EXPECT_FALSE(encoded.realigned);
    ++cases;
  }
  EXPECT_EQ(cases, 4);
}

TEST_F(DatasetQwen3, PrefixMasksWithTheQwen3Template) {
  ASSERT_FALSE(qwen3_template_->has_generation_tags());
  const ExampleEncoder encoder(*tokenizer_, qwen3_template_, TrainOn::Auto, true);
  const Example chat = two_turn_chat();
  const EncodedExample encoded = encoder.encode(chat);
  EXPECT_EQ(encoded.input_ids, tokenizer_->encode(encoder.render_chat(chat).text, false));
  // Qwen3 renders an empty think block in the last turn only: it is part of what is learned.
  EXPECT_EQ(trained_runs(*tokenizer_, encoded.input_ids, encoded.trained),
            (std::vector<std::string>{"hello, the world<|im_end|>\n",
                                      "<think>\n\n</think>\n\nthen all<|im_end|>\n"}));
}

TEST_F(DatasetQwen3, RealFilesThroughTheQwen3Template) {
  const std::filesystem::path data = testing::shared_data_dir();
  for (const char* path : {"glaive-toolcall/glaive_toolcall_en_demo.json",
                           "llamafactory-demo/reason_tool_use_demo_50.jsonl",
                           "alpaca/alpaca_en_demo.json", "sharegpt/conversation.json"}) {
    SCOPED_TRACE(path);
    DataConfig config = config_for(data / path);
    config.train[0].max_samples = 40;
    const TokenizedDataset dataset =
        build_dataset(config, *tokenizer_, qwen3_template_, 8192, 1, Split::Train);
    EXPECT_EQ(dataset.stats.skipped_lines, 0);
    EXPECT_GT(dataset.stats.examples, 0);
    for (int64_t i = 0; i < dataset.examples.size(); ++i) {
      const auto runs =
          trained_runs(*tokenizer_, dataset.examples.input_ids(i), dataset.examples.trained(i));
      ASSERT_FALSE(runs.empty());
      for (const std::string& run : runs) EXPECT_TRUE(run.ends_with("<|im_end|>\n")) << run;
    }
  }
  // Tool calls reach the template: glaive's function_call turns render as <tool_call>.
  DataConfig glaive = config_for(data / "glaive-toolcall/glaive_toolcall_en_demo.json");
  glaive.train[0].max_samples = 5;
  const TokenizedDataset dataset =
      build_dataset(glaive, *tokenizer_, qwen3_template_, 8192, 1, Split::Train);
  std::string all_text;
  for (int64_t i = 0; i < dataset.examples.size(); ++i)
    all_text += tokenizer_->decode(dataset.examples.input_ids(i));
  EXPECT_NE(all_text.find("<tool_call>\n{\"name\": \""), std::string::npos);
  EXPECT_NE(all_text.find("<tools>"), std::string::npos);
  // Keys keep the file's order (tojson does not sort them), with the OpenAI wrapper first.
  EXPECT_NE(all_text.find("{\"type\": \"function\", \"function\": {\"name\": \"search_recipes\", "
                          "\"description\": "),
            std::string::npos);
  EXPECT_NE(all_text.find("<tool_response>"), std::string::npos);
}

TEST_F(DatasetQwen3, LoaderOverGsm8kPromptCompletion) {
  DataConfig config = config_for(testing::shared_data_dir() / "gsm8k/test.jsonl");
  config.train[0].columns = {{"prompt", "question"}, {"completion", "answer"}};
  config.train[0].max_samples = 200;
  config.eval_fraction = 0.1;
  DataLoader loader(config, *tokenizer_, qwen3_template_, 512, 3, Split::Train);
  const DatasetStats stats = loader.stats();
  EXPECT_EQ(stats.examples, 180);
  EXPECT_GT(stats.packing_efficiency, 0.9);
  int64_t trained = 0;
  for (int64_t row = 0; row < loader.rows_per_epoch(); ++row)
    trained += loader.next(1).trained_tokens();
  EXPECT_EQ(trained, stats.trained_tokens);
  EXPECT_EQ(loader.pad_id(), *tokenizer_->token_to_id("<|endoftext|>"));
}

}  // namespace
}  // namespace moetune
