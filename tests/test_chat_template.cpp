// Chat template interpreter: small templates against Jinja (tests/goldens/chat/snippets.jsonl,
// rendered by Transformers' environment: text, error message and line), the sandbox limits
// (each failing with an error that names the template line), syntax errors, {% generation %}
// spans, tokenizer folders and the `moetune render-chat` command.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "data/chat_template.h"
#include "test_util.h"

namespace moetune {
namespace {

using ojson = nlohmann::ordered_json;

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::filesystem::path goldens_dir() { return testing::source_dir() / "tests" / "goldens" / "chat"; }

std::tm fixed_time() {
  std::tm tm{};
  tm.tm_year = 2025 - 1900, tm.tm_mon = 2, tm.tm_mday = 7, tm.tm_hour = 9, tm.tm_min = 5,
  tm.tm_sec = 3;
  tm.tm_isdst = -1;
  std::mktime(&tm);
  return tm;
}

TEST(ChatTemplate, SnippetsMatchJinja) {
  const auto manifest = ojson::parse(read_text(goldens_dir() / "manifest.json"));
  ASSERT_EQ(manifest["fixed_date"], "2025-03-07 09:05:03");
  ojson variables = manifest["snippet_variables"];
  variables["bos_token"] = "<s>";
  variables["eos_token"] = "</s>";
  std::istringstream in(read_text(goldens_dir() / "snippets.jsonl"));
  std::string line;
  int count = 0, errors = 0, exact = 0, lines_match = 0, failures = 0;
  while (std::getline(in, line)) {
    const auto row = ojson::parse(line);
    const std::string source = row["template"];
    ++count;
    std::string failure;
    try {
      ChatTemplate tmpl(source, "snippet");
      tmpl.set_clock(fixed_time);
      const RenderedChat chat = tmpl.render_ordered(variables);
      if (row.contains("error")) {
        failure =
            "rendered '" + chat.text + "' but Jinja raised " + row["error"].get<std::string>();
      } else if (chat.text != row["text"].get<std::string>()) {
        failure = "text differs:\n  want: " + ojson(row["text"]).dump() +
                  "\n  got:  " + ojson(chat.text).dump();
      } else if (row.contains("spans")) {
        std::vector<std::pair<size_t, size_t>> want;
        for (const auto& s : row["spans"])
          want.emplace_back(s[0].get<size_t>(), s[1].get<size_t>());
        if (want != chat.generation_spans)
          failure = "generation spans differ, want " + row["spans"].dump();
      }
    } catch (const ChatTemplateError& e) {
      if (!row.contains("error")) {
        failure =
            std::string("raised ") + e.what() + " but Jinja rendered " + ojson(row["text"]).dump();
      } else {
        ++errors;
        const std::string& want = row["error"].get_ref<const std::string&>();
        if (e.message() == want && e.type() == row["error_type"])
          ++exact;
        else
          std::printf("  message differs for %s\n    jinja: %s: %s\n    ours:  %s: %s\n",
                      ojson(source).dump().c_str(), row["error_type"].get<std::string>().c_str(),
                      want.c_str(), e.type().c_str(), e.message().c_str());
        if (!row["line"].is_null() &&
            row["error_type"] != "SyntaxError") {  // Python's own: generated code
          if (e.line() == row["line"].get<int>())
            ++lines_match;
          else
            failure = "error line " + std::to_string(e.line()) + ", Jinja says " +
                      row["line"].dump() + ": " + e.what();
        }
        if (row["error_type"] == "TemplateError" && e.message() != want)
          failure = "raise_exception message differs: " + std::string(e.what());
      }
    }
    if (!failure.empty()) {
      ++failures;
      ADD_FAILURE() << ojson(source).dump() << ": " << failure;
    }
  }
  std::printf(
      "  %d snippets, %d errors (%d with Jinja's exact type and message, %d lines checked equal)\n",
      count, errors, exact, lines_match);
  EXPECT_GT(count, 100);
  EXPECT_EQ(failures, 0);
}

// Renders `source` and returns the error it raises (fails the test if it renders).
ChatTemplateError render_error(const std::string& source, const ChatTemplateLimits& limits = {}) {
  try {
    ChatTemplate tmpl(source, "limits.jinja", limits);
    tmpl.render(nlohmann::json{{"messages", nlohmann::json::array()}});
  } catch (const ChatTemplateError& e) {
    return e;
  }
  ADD_FAILURE() << "expected an error from: " << source;
  return ChatTemplateError("none", "none", "none", 0);
}

TEST(ChatTemplate, LoopLimitNamesLine) {
  ChatTemplateLimits limits;
  limits.max_loop_iterations = 50'000;
  const auto e = render_error(
      "ok\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
      limits);
  EXPECT_EQ(e.type(), "LimitError");
  EXPECT_NE(e.message().find("max_loop_iterations 50000"), std::string::npos) << e.what();
  EXPECT_EQ(e.line(), 2);
  EXPECT_NE(std::string(e.what()).find("limits.jinja:2:"), std::string::npos) << e.what();
}

TEST(ChatTemplate, RecursionLimitNamesLine) {
  const auto e = render_error("{% macro f(n) %}\n{{ f(n + 1) }}{% endmacro %}\n{{ f(0) }}");
  EXPECT_EQ(e.type(), "LimitError");
  EXPECT_NE(e.message().find("recursion"), std::string::npos) << e.what();
  EXPECT_EQ(e.line(), 2);
  ChatTemplateLimits deep;
  deep.max_recursion_depth = 50;
  const auto e2 = render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", deep);
  EXPECT_NE(e2.message().find("max_recursion_depth 50"), std::string::npos) << e2.what();
  // Mutual recursion through caller() blocks is bounded too.
  const auto e3 =
      render_error("{% macro g() %}{% call g() %}x{% endcall %}{% endmacro %}\n\n{{ g() }}");
  EXPECT_EQ(e3.type(), "LimitError");
  EXPECT_EQ(e3.line(), 1);
}

TEST(ChatTemplate, OutputLimitNamesLine) {
  ChatTemplateLimits small;
  small.max_output_bytes = 1 << 20;
  const auto e =
      render_error("a\nb\n{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", small);
  EXPECT_EQ(e.type(), "LimitError");
  EXPECT_NE(e.message().find("output too large"), std::string::npos) << e.what();
  EXPECT_EQ(e.line(), 3);
  // Doubling a string in a namespace fails before it exhausts memory.
  const auto e2 = render_error(
      "{% set ns = namespace(s='x') %}\n{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% "
      "endfor %}",
      small);
  EXPECT_EQ(e2.line(), 2);
  const auto e3 = render_error("\n\n\n{{ 'x' * 100000000000 }}", small);
  EXPECT_EQ(e3.line(), 4);
  EXPECT_EQ(e3.type(), "LimitError");
}

TEST(ChatTemplate, SyntaxErrorsNameLine) {
  struct Case {
    std::string source;
    int line;
  } cases[] = {{"a\nb\n{% if %}", 3},
               {"{% for x in y %}\n\nno end", 3},
               {"{{ 1 +\n }}", 2},
               {"x\n{{ 'open }}", 2},
               {"\n\n{% endif %}", 3},
               {"{{ x | nosuchfilter }}", 1},
               {"{{ " + std::string(1000, '('), 1},
               {"{% for x in y %}\n{% macro m() %}{% break %}{% endmacro %}{% endfor %}", 2}};
  for (const auto& c : cases) {
    try {
      ChatTemplate tmpl(c.source, "bad.jinja");
      ADD_FAILURE() << "parsed: " << c.source;
    } catch (const ChatTemplateError& e) {
      EXPECT_EQ(e.line(), c.line) << c.source << " -> " << e.what();
      EXPECT_NE(std::string(e.what()).find("bad.jinja:"), std::string::npos);
    }
  }
}

TEST(ChatTemplate, RaiseExceptionCarriesMessageAndLine) {
  ChatTemplate tmpl(
      "{% for m in messages %}\n{% if m.role == 'tool' %}\n{{ raise_exception('no tools: ' ~ "
      "m.content) }}"
      "{% endif %}{% endfor %}",
      "t.jinja");
  try {
    tmpl.render({{"messages", {{{"role", "tool"}, {"content", "x"}}}}});
    FAIL() << "rendered";
  } catch (const ChatTemplateError& e) {
    EXPECT_EQ(e.type(), "TemplateError");
    EXPECT_EQ(e.message(), "no tools: x");
    EXPECT_EQ(e.line(), 3);
    EXPECT_EQ(std::string(e.what()), "t.jinja:3: TemplateError: no tools: x");
  }
}

TEST(ChatTemplate, GenerationSpansAreByteRanges) {
  ChatTemplate tmpl(
      "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% "
      "endgeneration %}"
      "{% else %}[{{ m.content }}]{% endif %}{% endfor %}",
      "gen.jinja");
  EXPECT_TRUE(tmpl.has_generation_tags());
  const auto chat = tmpl.render({{"messages",
                                  {{{"role", "user"}, {"content", "é"}},
                                   {{"role", "assistant"}, {"content", "ü1"}},
                                   {{"role", "user"}, {"content", "q"}},
                                   {{"role", "assistant"}, {"content", "a2"}}}}});
  EXPECT_EQ(chat.text, "[é]ü1[q]a2");
  ASSERT_EQ(chat.generation_spans.size(), 2u);
  EXPECT_EQ(chat.text.substr(chat.generation_spans[0].first,
                             chat.generation_spans[0].second - chat.generation_spans[0].first),
            "ü1");
  EXPECT_EQ(chat.text.substr(chat.generation_spans[1].first), "a2");
  EXPECT_FALSE(ChatTemplate("{{ x }}", "plain").has_generation_tags());
}

TEST(ChatTemplate, FixedDateFromEnvironment) {
  setenv("MOETUNE_FIXED_DATE", "2024-12-25 23:59:58", 1);
  ChatTemplate tmpl("{{ strftime_now('%d %B %Y %H:%M:%S %A') }}", "date.jinja");
  unsetenv("MOETUNE_FIXED_DATE");
  EXPECT_EQ(tmpl.render(nlohmann::json::object()).text, "25 December 2024 23:59:58 Wednesday");
}

TEST(ChatTemplate, KeyOrderIsKeptForTojson) {
  ChatTemplate tmpl("{{ tools[0] | tojson }}|{{ tools[0] }}", "order.jinja");
  const auto vars =
      ojson::parse(R"({"tools": [{"zeta": 1, "alpha": [1.5, null, true]}], "messages": []})");
  EXPECT_EQ(tmpl.render_ordered(vars).text,
            R"({"zeta": 1, "alpha": [1.5, null, true]}|{'zeta': 1, 'alpha': [1.5, None, True]})");
}

TEST(ChatTemplate, TokenizerFolders) {
  testing::TempDir dir;
  {
    std::ofstream(dir / "tokenizer_config.json")
        << R"({"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "pad_token": null,
              "extra_special_tokens": {"image_token": "<img>"},
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]})";
  }
  const auto config = nlohmann::json::parse(read_text(dir / "tokenizer_config.json"));
  EXPECT_EQ(
      special_token_variables(config),
      (nlohmann::json{{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"image_token", "<img>"}}));
  EXPECT_EQ(
      ChatTemplate::from_tokenizer_folder(dir.path()).render(special_token_variables(config)).text,
      "D<s>");
  std::ofstream(dir / "chat_template.jinja") << "J{{ eos_token }}";
  EXPECT_EQ(ChatTemplate::from_tokenizer_folder(dir.path()).render({{"eos_token", "E"}}).text,
            "JE");
  testing::TempDir empty;
  EXPECT_THROW(ChatTemplate::from_tokenizer_folder(empty.path()), Error);
  const auto qwen3 = ChatTemplate::from_tokenizer_folder(testing::shared_data_dir() / "qwen3");
  EXPECT_NE(qwen3.source().find("<|im_start|>"), std::string::npos);
}

TEST(ChatTemplate, RenderChatCommand) {
  testing::TempDir dir;
  {
    std::ofstream in(dir / "in.jsonl");
    in << R"({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": true})"
       << "\n";
    in << R"({"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]})"
       << "\n";
    in << "not json\n";
  }
  const auto result = testing::run_command(
      testing::moetune_binary().string() + " render-chat --tokenizer '" +
      (testing::shared_data_dir() / "llama3").string() + "' --input '" +
      (dir / "in.jsonl").string() + "' --output '" + (dir / "out.jsonl").string() + "'");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  std::istringstream out(read_text(dir / "out.jsonl"));
  std::string line;
  std::vector<ojson> rows;
  while (std::getline(out, line)) rows.push_back(ojson::parse(line));
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0]["text"],
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_TRUE(rows[1].contains("text"));
  EXPECT_TRUE(rows[2].contains("error"));

  // A template error becomes an {"error": ...} line with Jinja's message.
  {
    std::ofstream t(dir / "t.jinja");
    t << "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok";
  }
  const auto r2 = testing::run_command(
      testing::moetune_binary().string() + " render-chat --tokenizer '" +
      (testing::shared_data_dir() / "llama3").string() + "' --template '" +
      (dir / "t.jinja").string() + "' --input '" + (dir / "in.jsonl").string() + "' --output '" +
      (dir / "out2.jsonl").string() + "'");
  ASSERT_EQ(r2.exit_code, 0) << r2.output;
  std::istringstream out2(read_text(dir / "out2.jsonl"));
  std::getline(out2, line);
  EXPECT_EQ(ojson::parse(line)["text"], "ok");
  std::getline(out2, line);
  EXPECT_EQ(ojson::parse(line)["error"], "one message only");
}

}  // namespace
}  // namespace moetune
