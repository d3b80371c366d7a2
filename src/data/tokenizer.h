// Tokenizer: Hugging Face tokenizer.json (+ tokenizer_config.json) in C++, exact against
// the `tokenizers` library: byte-level BPE (GPT-2, Qwen, Llama 3) and SentencePiece-style
// BPE with byte fallback (Llama 2, Mistral), added/special tokens, post-processors, decoders.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moetune {

// The parts of tokenizer_config.json the rest of the engine uses.
struct TokenizerSpecialTokens {
  std::optional<std::string> bos_token, eos_token, pad_token, unk_token;
  nlohmann::json config;  // tokenizer_config.json as read (empty object if absent)
};

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
  static Tokenizer from_folder(const std::filesystem::path& dir);
  // From tokenizer.json text (tokenizer_config may be an empty object).
  static Tokenizer from_json(const nlohmann::json& tokenizer_json,
                             const nlohmann::json& tokenizer_config, const std::string& source);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;
  int64_t vocab_size() const;  // including added tokens: 1 + the largest id
  const TokenizerSpecialTokens& special_tokens() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moetune
