// ChatTemplate (see chat_template.h): loads a tokenizer folder's template, parses it once, and
// renders it per conversation with a fresh interpreter. JSON inputs become interpreter values
// with their key order kept (ordered_json), so tojson/str() print keys as Python would.
#include "data/chat_template.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "data/jinja/interpreter.h"
#include "data/jinja/parser.h"

namespace moetune {

ChatTemplateError::ChatTemplateError(std::string type, std::string message,
                                     const std::string& source_name, int line)
    : Error(source_name + ":" + std::to_string(line) + ": " + type + ": " + message),
      type_(std::move(type)),
      message_(std::move(message)),
      line_(line) {}

struct ChatTemplate::Impl {
  std::string source;
  std::string source_name;
  ChatTemplateLimits limits;
  jinja::ParsedTemplate parsed;
  std::function<std::tm()> clock;
};

namespace {

std::function<std::tm()> default_clock() {
  if (const char* fixed = std::getenv("MOETUNE_FIXED_DATE")) {
    std::tm tm{};
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, s = 0;
    const int n = std::sscanf(fixed, "%d-%d-%d %d:%d:%d", &y, &mo, &d, &h, &mi, &s);
    if (n < 3) fail("MOETUNE_FIXED_DATE must be YYYY-MM-DD[ HH:MM:SS], got '", fixed, "'");
    tm.tm_year = y - 1900, tm.tm_mon = mo - 1, tm.tm_mday = d;
    tm.tm_hour = h, tm.tm_min = mi, tm.tm_sec = s;
    tm.tm_isdst = -1;
    std::tm copy = tm;
    std::mktime(&copy);  // fills in weekday and day of the year
    return [copy] { return copy; };
  }
  return [] {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    return tm;
  };
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read ", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <typename Json>
Json special_tokens_impl(const Json& config) {
  Json out = Json::object();
  if (!config.is_object()) return out;
  auto token_string = [](const Json& v, std::string& s) {
    if (v.is_string()) {
      s = v.template get<std::string>();
      return true;
    }
    if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      s = v["content"].template get<std::string>();
      return true;
    }
    return false;
  };
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"}) {
    std::string s;
    if (config.contains(key) && token_string(config[key], s)) out[key] = s;
  }
  if (config.contains("extra_special_tokens") && config["extra_special_tokens"].is_object())
    for (auto it = config["extra_special_tokens"].begin();
         it != config["extra_special_tokens"].end(); ++it) {
      std::string s;
      if (token_string(it.value(), s)) out[it.key()] = s;
    }
  return out;
}

}  // namespace

ChatTemplate::ChatTemplate(const std::string& source, const std::string& source_name,
                           ChatTemplateLimits limits)
    : impl_(std::make_unique<Impl>()) {
  impl_->source = source;
  impl_->source_name = source_name;
  impl_->limits = limits;
  impl_->clock = default_clock();
  try {
    impl_->parsed = jinja::parse_template(source);
  } catch (const jinja::JinjaError& e) {
    throw ChatTemplateError(e.type, e.what(), source_name, e.line);
  }
}

ChatTemplate ChatTemplate::from_tokenizer_folder(const std::filesystem::path& dir) {
  const auto jinja_path = dir / "chat_template.jinja";
  if (std::filesystem::exists(jinja_path))
    return ChatTemplate(read_file(jinja_path), jinja_path.string());
  const auto config_path = dir / "tokenizer_config.json";
  if (!std::filesystem::exists(config_path))
    fail(dir.string(), ": no chat_template.jinja and no tokenizer_config.json");
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(read_file(config_path));
  } catch (const nlohmann::json::exception& e) {
    fail(config_path.string(), ": invalid JSON: ", e.what());
  }
  if (!config.is_object() || !config.contains("chat_template") || config["chat_template"].is_null())
    fail(config_path.string(), ": no chat_template (and no chat_template.jinja beside it)");
  const auto& t = config["chat_template"];
  const std::string name = config_path.string() + " (chat_template)";
  if (t.is_string()) return ChatTemplate(t.get<std::string>(), name);
  if (t.is_array()) {
    for (const auto& entry : t)
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string())
        return ChatTemplate(entry["template"].get<std::string>(),
                            config_path.string() + " (chat_template 'default')");
    fail(config_path.string(), ": chat_template is a list without an entry named 'default'");
  }
  fail(config_path.string(), ": chat_template must be a string or a list of {name, template}");
}

ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

bool ChatTemplate::has_generation_tags() const { return impl_->parsed.has_generation; }
const std::string& ChatTemplate::source() const { return impl_->source; }
void ChatTemplate::set_clock(std::function<std::tm()> now) { impl_->clock = std::move(now); }

RenderedChat ChatTemplate::render(const nlohmann::json& variables) const {
  return render_ordered(nlohmann::ordered_json::parse(variables.dump()));
}

RenderedChat ChatTemplate::render_ordered(const nlohmann::ordered_json& variables) const {
  if (!variables.is_object())
    fail(impl_->source_name, ": template variables must be a JSON object");
  std::vector<std::pair<std::string, jinja::Value>> vars;
  for (const char* key : {"tools", "documents"})
    if (!variables.contains(key)) vars.emplace_back(key, jinja::Value(nullptr));
  if (!variables.contains("add_generation_prompt"))
    vars.emplace_back("add_generation_prompt", jinja::Value(false));
  for (auto it = variables.begin(); it != variables.end(); ++it)
    vars.emplace_back(it.key(), jinja::from_json(it.value()));
  jinja::RenderLimits limits{impl_->limits.max_loop_iterations, impl_->limits.max_recursion_depth,
                             impl_->limits.max_output_bytes};
  jinja::Interpreter interpreter(limits, impl_->clock);
  try {
    jinja::RenderOutput out = interpreter.render(impl_->parsed, vars);
    return RenderedChat{std::move(out.text), std::move(out.generation_spans)};
  } catch (const jinja::JinjaError& e) {
    throw ChatTemplateError(e.type, e.what(), impl_->source_name, e.line);
  }
}

nlohmann::json special_token_variables(const nlohmann::json& tokenizer_config) {
  return special_tokens_impl(tokenizer_config);
}

nlohmann::ordered_json special_token_variables(const nlohmann::ordered_json& tokenizer_config) {
  return special_tokens_impl(tokenizer_config);
}

}  // namespace moetune
