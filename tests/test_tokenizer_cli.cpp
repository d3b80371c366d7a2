// `moetune tokenize`: JSONL text -> ids agrees with the library, --decode inverts it, and a
// malformed line fails with file:line in the message and leaves no output file.
#include <gtest/gtest.h>

#include "test_tokenizer_fixtures.h"

namespace moetune {
namespace {

using nlohmann::json;

TEST(TokenizeCommand, EncodesDecodesAndReportsBadLines) {
  const auto folder = testing::tokenizer_folder("gpt2/kv260-gptq");
  const Tokenizer& tokenizer = testing::shared_tokenizer("gpt2/kv260-gptq");
  testing::TempDir dir;
  const std::vector<std::string> texts = {"Hello world", "", "emoji 👍 and <|endoftext|>\n"};
  {
    std::ofstream in(dir / "in.jsonl");
    for (const auto& text : texts) in << json{{"text", text}}.dump() << "\n";
  }
  const std::string binary = testing::moetune_binary().string();
  auto result = testing::run_command(binary + " tokenize --tokenizer '" + folder.string() +
                                     "' --input '" + (dir / "in.jsonl").string() + "' --output '" +
                                     (dir / "ids.jsonl").string() + "'");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  std::ifstream ids_file(dir / "ids.jsonl");
  std::string line;
  for (const auto& text : texts) {
    ASSERT_TRUE(std::getline(ids_file, line));
    EXPECT_EQ(json::parse(line)["ids"].get<std::vector<int32_t>>(), tokenizer.encode(text, false));
  }

  result = testing::run_command(binary + " tokenize --decode --tokenizer '" + folder.string() +
                                "' --input '" + (dir / "ids.jsonl").string() + "' --output '" +
                                (dir / "text.jsonl").string() + "'");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  std::ifstream text_file(dir / "text.jsonl");
  for (const auto& text : texts) {
    ASSERT_TRUE(std::getline(text_file, line));
    EXPECT_EQ(json::parse(line)["text"].get<std::string>(), text);
  }

  std::ofstream(dir / "bad.jsonl") << "{\"text\": \"ok\"}\n{\"text\": 5}\n";
  result = testing::run_command(binary + " tokenize --tokenizer '" + folder.string() +
                                "' --input '" + (dir / "bad.jsonl").string() + "' --output '" +
                                (dir / "out.jsonl").string() + "'");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.output.find("bad.jsonl:2"), std::string::npos) << result.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "out.jsonl"));
  std::ofstream(dir / "bad2.jsonl") << "{not json\n";
  result = testing::run_command(binary + " tokenize --tokenizer '" + folder.string() +
                                "' --input '" + (dir / "bad2.jsonl").string() + "' --output '" +
                                (dir / "out.jsonl").string() + "'");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.output.find("bad2.jsonl:1"), std::string::npos) << result.output;
}

}  // namespace
}  // namespace moetune
