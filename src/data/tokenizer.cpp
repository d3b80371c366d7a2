// Tokenizer: loads tokenizer.json (+ tokenizer_config.json) and runs HF's encode pipeline
// (added-token split + normalizer -> pre-tokenizer -> BPE -> post-processor) and decode
// (ids -> token strings -> decoder chain). The pieces live in tokenizer_*.cpp. As in
// Transformers, tokenizer.json's "truncation" and "padding" settings are not applied.
#include "data/tokenizer.h"

#include <fstream>
#include <sstream>
#include <unordered_set>

#include "core/error.h"
#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune {

using namespace tokenizer_detail;

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  std::unique_ptr<AddedVocabulary> added;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;
  Vocab added_by_content;                                // added token content -> id
  std::unordered_map<int32_t, std::string> added_by_id;  // id -> content
  std::unordered_set<std::string> special_contents;      // for skip_special_tokens
  int64_t vocab_size = 0;
  TokenizerSpecialTokens special_tokens;
};

namespace {

json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path.string(), ": cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::exception& error) {
    fail(path.string(), ": invalid JSON: ", error.what());
  }
}

// bos_token etc. are strings or AddedToken objects {"content": ...}.
std::optional<std::string> config_token(const json& config, const char* key) {
  if (!config.is_object() || !config.contains(key)) return std::nullopt;
  const json& value = config.at(key);
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value.at("content").is_string())
    return value.at("content").get<std::string>();
  return std::nullopt;
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_folder(const std::filesystem::path& dir) {
  const auto tokenizer_path = dir / "tokenizer.json";
  if (!std::filesystem::exists(tokenizer_path))
    fail(tokenizer_path.string(),
         ": not found (a Hugging Face tokenizer folder needs tokenizer.json)");
  const json tokenizer_json = read_json_file(tokenizer_path);
  const auto config_path = dir / "tokenizer_config.json";
  const json config =
      std::filesystem::exists(config_path) ? read_json_file(config_path) : json::object();
  return from_json(tokenizer_json, config, tokenizer_path.string());
}

Tokenizer Tokenizer::from_json(const json& tokenizer_json, const json& tokenizer_config,
                               const std::string& source) {
  if (!tokenizer_json.is_object()) fail(source, ": tokenizer.json must be a JSON object");
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  auto get = [&](const char* key) -> const json& {
    static const json null_value;
    return tokenizer_json.contains(key) ? tokenizer_json.at(key) : null_value;
  };
  impl->normalizer = make_normalizer(get("normalizer"), source);
  impl->pre_tokenizer = make_pre_tokenizer(get("pre_tokenizer"), source);
  impl->model = std::make_unique<BpeModel>(member(tokenizer_json, "model", source), source);
  impl->added = std::make_unique<AddedVocabulary>(get("added_tokens"), impl->model->vocab(),
                                                  impl->normalizer.get(), source);
  impl->post_processor = make_post_processor(get("post_processor"), impl->model->vocab(), source);
  impl->decoder = make_decoder(get("decoder"), source);

  impl->vocab_size = static_cast<int64_t>(impl->model->id_to_token().size());
  for (const AddedToken& token : impl->added->tokens()) {
    impl->added_by_content[token.content] = token.id;
    impl->added_by_id[token.id] = token.content;
    if (token.special) impl->special_contents.insert(token.content);
    impl->vocab_size = std::max<int64_t>(impl->vocab_size, int64_t{token.id} + 1);
  }

  TokenizerSpecialTokens& special = impl->special_tokens;
  special.config = tokenizer_config.is_object() ? tokenizer_config : json::object();
  special.bos_token = config_token(special.config, "bos_token");
  special.eos_token = config_token(special.config, "eos_token");
  special.pad_token = config_token(special.config, "pad_token");
  special.unk_token = config_token(special.config, "unk_token");
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos)
    fail(impl_->source, ": cannot encode text that is not valid UTF-8 (byte ", bad, ")");
  std::vector<Piece> pieces = impl_->added->extract_and_normalize(text, impl_->normalizer.get());
  if (impl_->pre_tokenizer) impl_->pre_tokenizer->pre_tokenize(pieces);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const Piece& piece : pieces) {
    if (piece.added_id >= 0)
      ids.push_back(piece.added_id);
    else
      impl_->model->tokenize(piece.text, ids);
  }
  if (impl_->post_processor) impl_->post_processor->process(ids, add_special_tokens);
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  const auto& model_tokens = impl_->model->id_to_token();
  for (int32_t id : ids) {
    if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
      if (skip_special_tokens && impl_->special_contents.count(it->second)) continue;
      tokens.push_back(it->second);
    } else if (id >= 0 && static_cast<size_t>(id) < model_tokens.size() &&
               !model_tokens[id].empty()) {
      if (skip_special_tokens && impl_->special_contents.count(model_tokens[id])) continue;
      tokens.push_back(model_tokens[id]);
    }  // unknown ids are skipped, as in HF
  }
  if (!impl_->decoder) {
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) joined += (i ? " " : "") + tokens[i];
    return joined;
  }
  impl_->decoder->decode_chain(tokens);
  std::string out;
  for (const std::string& token : tokens) out += token;
  return out;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end())
    return it->second;
  if (auto it = impl_->model->vocab().find(token); it != impl_->model->vocab().end())
    return it->second;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) return it->second;
  const auto& model_tokens = impl_->model->id_to_token();
  if (id >= 0 && static_cast<size_t>(id) < model_tokens.size() && !model_tokens[id].empty())
    return model_tokens[id];
  fail(impl_->source, ": token id ", id, " is not in the vocabulary");
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

const TokenizerSpecialTokens& Tokenizer::special_tokens() const { return impl_->special_tokens; }

}  // namespace moetune
