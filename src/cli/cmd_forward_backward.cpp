// `moetune forward-backward`: one forward + backward of a model folder on a batch file,
// writing what the parity tests compare with Transformers: loss, logits, aux loss, the
// gradient of every checkpoint tensor under its on-disk HF name, and with --adamw the loss
// after one AdamW step over every parameter (weight decay on all of them, as
// torch.optim.AdamW(model.parameters()) does).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <sstream>

#include "cli/commands.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "train/adamw.h"

namespace moetune::cli {

namespace {
// "lr=1e-3,beta1=0.9,..." -> AdamWConfig (unnamed keys keep their defaults).
AdamWConfig parse_adamw(const std::string& text) {
  AdamWConfig config;
  config.weight_decay = 0.01;  // torch.optim.AdamW's default
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    const size_t equals = item.find('=');
    if (equals == std::string::npos) fail("--adamw: expected key=value, got '", item, "'");
    const std::string key = item.substr(0, equals), value_text = item.substr(equals + 1);
    double value = 0;
    try {
      size_t used = 0;
      value = std::stod(value_text, &used);
      if (used != value_text.size()) throw std::invalid_argument(value_text);
    } catch (const std::exception&) {
      fail("--adamw: '", value_text, "' is not a number (key ", key, ")");
    }
    if (key == "lr")
      config.lr = value;
    else if (key == "beta1")
      config.beta1 = value;
    else if (key == "beta2")
      config.beta2 = value;
    else if (key == "eps")
      config.eps = value;
    else if (key == "weight_decay")
      config.weight_decay = value;
    else
      fail("--adamw: unknown key '", key, "' (lr, beta1, beta2, eps, weight_decay)");
  }
  return config;
}

// input_ids / labels: integer [B, T] -> int32 values.
std::vector<int32_t> read_ids(const SafetensorsFile& file, const std::string& name, Shape& shape) {
  if (!file.contains(name)) fail(file.path().string(), ": no tensor '", name, "'");
  const TensorInfo& info = file.info(name);
  if (info.shape.rank != 2)
    fail(file.path().string(), ": ", name, " must be [batch, seq], got ", info.shape.str());
  shape = info.shape;
  std::vector<int32_t> ids(static_cast<size_t>(info.shape.numel()));
  const auto bytes = file.bytes(name);
  for (size_t i = 0; i < ids.size(); ++i) {
    int64_t value = 0;
    if (info.dtype == DType::I64) {
      std::memcpy(&value, bytes.data() + 8 * i, 8);
    } else if (info.dtype == DType::I32) {
      int32_t narrow;
      std::memcpy(&narrow, bytes.data() + 4 * i, 4);
      value = narrow;
    } else {
      fail(file.path().string(), ": ", name, " must be I64 or I32, got ", dtype_name(info.dtype));
    }
    if (value < INT32_MIN || value > INT32_MAX)
      fail(file.path().string(), ": ", name, "[", i, "] = ", value, " is out of range");
    ids[i] = static_cast<int32_t>(value);
  }
  return ids;
}

double total_loss(const StepResult& result, const ModelConfig& config) {
  double loss = result.loss_sum / static_cast<double>(result.trained_tokens);
  if (result.has_aux_loss) loss += config.router_aux_loss_coef * result.aux_loss;
  return loss;
}
}  // namespace

int run_forward_backward(int argc, char** argv) {
  CLI::App app{"One forward + backward (and optionally one AdamW step) on a batch file"};
  app.name("moetune forward-backward");
  std::string model_dir, batch_path, out_path, device = "cpu", adamw_text, dtype = "fp32";
  app.add_option("--model", model_dir, "HF model folder")->required();
  app.add_option("--batch", batch_path, "safetensors with input_ids and labels [B, T]")->required();
  app.add_option("--out", out_path, "output safetensors")->required();
  app.add_option("--device", device, "cpu, cuda or cuda:N");
  app.add_option("--dtype", dtype, "weights and gradients: fp32 or bf16 (bf16 needs cuda)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--adamw", adamw_text, "lr=F,beta1=F,beta2=F,eps=F,weight_decay=F");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }

  const SafetensorsFile batch_file(batch_path);
  Shape ids_shape, labels_shape;
  const std::vector<int32_t> input_ids = read_ids(batch_file, "input_ids", ids_shape);
  const std::vector<int32_t> labels = read_ids(batch_file, "labels", labels_shape);
  if (ids_shape != labels_shape)
    fail(batch_path, ": labels ", labels_shape.str(), " and input_ids ", ids_shape.str(),
         " differ in shape");

  auto backend = make_backend(device);
  ModelOptions options;
  if (dtype == "bf16") options.param_dtype = options.grad_dtype = DType::BF16;
  auto model = Model::from_hf_folder(model_dir, *backend, options);
  const ModelConfig& config = model->config();
  BatchView batch;
  batch.batch = ids_shape[0];
  batch.seq = ids_shape[1];
  batch.input_ids = input_ids;
  batch.labels = labels;

  const int64_t tokens = batch.batch * batch.seq;
  Buffer logits(DType::F32, {tokens, config.vocab_size}, backend->device());
  int64_t trained = 0;
  for (int64_t b = 0; b < batch.batch; ++b)
    for (int64_t t = 0; t + 1 < batch.seq; ++t) trained += labels[b * batch.seq + t + 1] != -100;
  if (trained == 0) fail(batch_path, ": no label is trained (all -100 after the shift)");

  model->zero_grads();
  const StepResult result =
      model->forward_backward(batch, 1.0f / static_cast<float>(trained), 1.0f, logits);

  std::vector<Buffer> host;  // owns every output tensor's bytes
  std::vector<NamedTensor> outputs;
  auto add_scalar = [&](const std::string& name, double value) {
    host.emplace_back(DType::F32, Shape{1});
    host.back().ptr<float>()[0] = static_cast<float>(value);
    outputs.push_back({name, host.back().tensor()});
  };
  add_scalar("loss", total_loss(result, config));
  host.emplace_back(DType::F32, Shape{batch.batch, batch.seq, config.vocab_size});
  backend->copy(host.back().tensor(), logits);
  backend->synchronize();
  outputs.push_back({"logits", host.back().tensor()});
  if (result.has_aux_loss) add_scalar("aux_loss", result.aux_loss);
  for (auto& gradient : model->hf_tensors_to_host(true)) {
    host.emplace_back(DType::F32, gradient.shape);
    std::memcpy(host.back().data(), gradient.values.data(), gradient.values.size() * 4);
    outputs.push_back({"grad." + gradient.name, host.back().tensor()});
  }

  if (!adamw_text.empty()) {
    for (Parameter& parameter : model->parameters()) parameter.decay = true;
    AdamW optimizer(model->parameters(), *backend, parse_adamw(adamw_text));
    optimizer.step();
    add_scalar("loss_after_step", total_loss(model->evaluate(batch), config));
  }
  write_safetensors(out_path, outputs);
  std::printf(
      "loss %.6f%s\n", total_loss(result, config),
      result.has_aux_loss ? (" (aux " + std::to_string(result.aux_loss) + ")").c_str() : "");
  return 0;
}

}  // namespace moetune::cli
