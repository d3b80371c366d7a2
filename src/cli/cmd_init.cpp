// `moetune init`: a randomly initialised model folder from a config.json (Transformers'
// init: normal(0, initializer_range) for linear and embedding weights, norms 1, biases 0),
// saved in fp32 or bf16 with the dtype recorded in config.json.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.h"
#include "model/model.h"

namespace moetune::cli {

int run_init(int argc, char** argv) {
  CLI::App app{"Write a randomly initialised model folder from a config.json"};
  app.name("moetune init");
  std::string config_path, out_dir, dtype = "fp32";
  uint64_t seed = 0;
  app.add_option("--config", config_path, "config.json (qwen3_moe, mixtral, qwen3, llama)")
      ->required();
  app.add_option("--out", out_dir, "output folder")->required();
  app.add_option("--seed", seed, "random seed");
  app.add_option("--dtype", dtype, "fp32 or bf16")->check(CLI::IsMember({"fp32", "bf16"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  const ModelConfig config = load_model_config(config_path);
  auto backend = make_cpu_backend();
  auto model = Model::random_init(config, seed, *backend);
  SaveOptions options;
  options.dtype = dtype == "bf16" ? DType::BF16 : DType::F32;
  model->save_hf_folder(out_dir, options);
  std::printf("wrote %s: %s, %lld parameters (%s)\n", out_dir.c_str(), config.model_type.c_str(),
              static_cast<long long>(model->num_parameters(false)), dtype.c_str());
  return 0;
}

}  // namespace moetune::cli
