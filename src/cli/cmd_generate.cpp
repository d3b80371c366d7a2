// `moetune generate --model DIR --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T]
//  [--top-p P] [--seed S] [--device cpu|cuda[:N]] [--dtype fp32|bf16]`: loads an HF folder and
// continues the prompt with the KV-cache generator (model/generate.h) on the chosen device
// (weights in bf16 on cuda unless --dtype fp32; the CPU computes in fp32). --chat wraps the prompt
// as a user message with the tokenizer's chat template and add_generation_prompt. Stops at the eos
// token(s) of generation_config.json (else config.json, else the tokenizer's eos_token). Prints
// only the generated text (special tokens skipped) on stdout.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "cli/commands.h"
#include "core/error.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "model/generate.h"
#include "model/model.h"
#include "ops/backend.h"

namespace moetune::cli {

namespace fs = std::filesystem;

namespace {

void add_ids(const nlohmann::json& value, std::vector<int32_t>& ids) {
  if (value.is_number_integer()) ids.push_back(value.get<int32_t>());
  if (value.is_array())
    for (const auto& v : value)
      if (v.is_number_integer()) ids.push_back(v.get<int32_t>());
}

std::vector<int32_t> stop_ids(const fs::path& dir, const Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (const char* file : {"generation_config.json", "config.json"}) {
    std::ifstream in(dir / file);
    if (!in) continue;
    const auto json = nlohmann::json::parse(in, nullptr, false);
    if (json.is_object() && json.contains("eos_token_id")) add_ids(json["eos_token_id"], ids);
    if (!ids.empty()) return ids;
  }
  if (const auto& eos = tokenizer.special_tokens().eos_token)
    if (auto id = tokenizer.token_to_id(*eos)) ids.push_back(*id);
  return ids;
}

}  // namespace

int run_generate(int argc, char** argv) {
  CLI::App app{"generate text with a model (KV cache)", "moetune generate"};
  std::string model_dir, prompt, device = "cpu", dtype_name_arg;
  bool chat = false;
  GenerationOptions options;
  app.add_option("--model", model_dir,
                 "HF model folder (config.json, safetensors, tokenizer files)")
      ->required();
  app.add_option("--prompt", prompt, "the prompt text")->required();
  app.add_flag("--chat", chat, "wrap the prompt with the chat template (as a user message)");
  app.add_option("--max-new-tokens", options.max_new_tokens, "tokens to generate at most")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", options.temperature, "0: greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", options.top_p, "nucleus sampling mass")->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", options.seed, "sampling seed");
  app.add_option("--device", device, "cpu, cuda or cuda:N");
  app.add_option("--dtype", dtype_name_arg,
                 "weights and activations: fp32 or bf16 (default: "
                 "bf16 on cuda, fp32 on cpu)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  const fs::path dir = model_dir;
  auto backend = make_backend(device);
  const bool on_cpu = backend->device() == Device::CPU;
  if (dtype_name_arg.empty()) dtype_name_arg = on_cpu ? "fp32" : "bf16";
  if (on_cpu && dtype_name_arg != "fp32") fail("--dtype ", dtype_name_arg, ": the CPU runs fp32");
  ModelOptions model_options;
  model_options.param_dtype = model_options.grad_dtype =
      dtype_name_arg == "bf16" ? DType::BF16 : DType::F32;
  const Tokenizer tokenizer = Tokenizer::from_folder(dir);
  auto model = Model::from_hf_folder(dir, *backend, model_options);

  std::vector<int32_t> ids;
  if (chat) {
    const ChatTemplate chat_template = ChatTemplate::from_tokenizer_folder(dir);
    nlohmann::json variables = special_token_variables(tokenizer.special_tokens().config);
    variables["messages"] = nlohmann::json::array({{{"role", "user"}, {"content", prompt}}});
    variables["add_generation_prompt"] = true;
    ids = tokenizer.encode(chat_template.render(variables).text, false);
  } else {
    ids = tokenizer.encode(prompt, true);
  }
  options.stop_ids = stop_ids(dir, tokenizer);
  const std::vector<int32_t> produced = generate(*model, ids, options);
  std::printf("%s\n", tokenizer.decode(produced, true).c_str());
  return 0;
}

}  // namespace moetune::cli
