// Chat templates against Transformers: every template × conversation rendered by
// scripts/make_chat_goldens.py (apply_chat_template / render_jinja_template of transformers)
// must render to the same text here, or fail where Transformers fails (with the same message
// for raise_exception), and give the same {% generation %} spans.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "data/chat_template.h"
#include "test_util.h"

namespace moetune {
namespace {

using ojson = nlohmann::ordered_json;

std::filesystem::path goldens_dir() { return testing::source_dir() / "tests" / "goldens" / "chat"; }

std::vector<ojson> read_xz_jsonl(const std::filesystem::path& path) {
  const auto result = testing::run_command("xz -dc '" + path.string() + "'");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  std::vector<ojson> rows;
  std::istringstream in(result.output);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) rows.push_back(ojson::parse(line));
  return rows;
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::tm parse_fixed(const std::string& s) {
  std::tm tm{};
  std::sscanf(s.c_str(), "%d-%d-%d %d:%d:%d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
              &tm.tm_min, &tm.tm_sec);
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  tm.tm_isdst = -1;
  std::mktime(&tm);
  return tm;
}

TEST(ChatTemplateGoldens, MatchTransformers) {
  const auto manifest = ojson::parse(read_text(goldens_dir() / "manifest.json"));
  const auto cases = read_xz_jsonl(goldens_dir() / "cases.jsonl.xz");
  const auto expected = read_xz_jsonl(goldens_dir() / "expected.jsonl.xz");
  ASSERT_FALSE(cases.empty());
  const std::tm fixed = parse_fixed(manifest["fixed_date"].get<std::string>());

  std::map<std::string, std::unique_ptr<ChatTemplate>> templates;
  std::map<std::string, ojson> specials;
  for (const auto& t : manifest["templates"]) {
    const std::string name = t["name"];
    const auto root = t["root"] == "shared" ? testing::shared_data_dir() : goldens_dir();
    const auto path = root / t["template"].get<std::string>();
    std::string source = read_text(path);
    if (path.extension() == ".json")
      source = ojson::parse(source)["chat_template"].get<std::string>();
    templates[name] = std::make_unique<ChatTemplate>(source, path.string());
    templates[name]->set_clock([fixed] { return fixed; });
    EXPECT_EQ(templates[name]->has_generation_tags(), t["generation"].get<bool>()) << name;
    specials[name] = t["special_tokens"];
    if (!t["config"].is_null()) {
      const auto config =
          ojson::parse(read_text(testing::shared_data_dir() / t["config"].get<std::string>()));
      EXPECT_EQ(special_token_variables(config), t["special_tokens"]) << name;
    }
  }

  std::map<std::string, int> texts, errors, failures, exact_messages;
  int shown = 0;
  for (const auto& row : expected) {
    const std::string name = row["template"];
    const size_t case_index = row["case"];
    ASSERT_LT(case_index, cases.size());
    ojson variables = specials[name];
    for (auto it = cases[case_index].begin(); it != cases[case_index].end(); ++it)
      variables[it.key()] = it.value();
    std::string failure;
    try {
      const RenderedChat chat = templates[name]->render_ordered(variables);
      if (row.contains("error")) {
        failure = "rendered but Transformers raised " + row["error_type"].get<std::string>() +
                  ": " + row["error"].get<std::string>();
      } else if (chat.text != row["text"].get<std::string>()) {
        const std::string& want = row["text"].get_ref<const std::string&>();
        size_t at = 0;
        while (at < want.size() && at < chat.text.size() && want[at] == chat.text[at]) ++at;
        const size_t from = at > 80 ? at - 80 : 0;
        failure = "text differs at byte " + std::to_string(at) +
                  "\n  want: " + ojson(want.substr(from, 200)).dump() +
                  "\n  got:  " + ojson(chat.text.substr(from, 200)).dump();
      } else if (row.contains("spans")) {
        std::vector<std::pair<size_t, size_t>> want;
        for (const auto& s : row["spans"])
          want.emplace_back(s[0].get<size_t>(), s[1].get<size_t>());
        if (want != chat.generation_spans)
          failure = "generation spans differ: want " + row["spans"].dump();
      }
      if (failure.empty()) ++texts[name];
    } catch (const ChatTemplateError& e) {
      if (!row.contains("error")) {
        failure = std::string("raised but Transformers rendered: ") + e.what();
      } else {
        ++errors[name];
        const std::string& want = row["error"].get_ref<const std::string&>();
        if (e.message() == want) ++exact_messages[name];
        if (row["error_type"] == "TemplateError" &&
            (e.type() != "TemplateError" || e.message() != want))
          failure = "raise_exception message differs: want '" + want + "', got " + e.what();
      }
    }
    if (!failure.empty()) {
      ++failures[name];
      if (shown++ < 15) ADD_FAILURE() << name << " case " << case_index << ": " << failure;
    }
  }
  int total_failures = 0;
  for (const auto& t : manifest["templates"]) {
    const std::string name = t["name"];
    std::printf(
        "  %-20s %3d texts, %3d errors (%3d with Transformers' exact message), %d mismatches\n",
        name.c_str(), texts[name], errors[name], exact_messages[name], failures[name]);
    total_failures += failures[name];
  }
  EXPECT_EQ(total_failures, 0);
}

}  // namespace
}  // namespace moetune
