// Expert parallelism against one rank with gradient accumulation (see
// expert_parallel_check.h). Sums over ranks go through the communicator on device tensors,
// so the same code runs with the CPU store communicator and with NCCL.
#include "model/expert_parallel_check.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "dist/communicator.h"

namespace moetune {

double ExpertParallelCheck::max_error() const {
  return std::max({loss_error, aux_error, expert_grad_error, other_grad_error});
}

namespace {

struct MicroBatch {
  std::vector<int32_t> input_ids, labels;
  BatchView view(int64_t batch, int64_t seq) const {
    return BatchView{batch, seq, input_ids, labels, {}, {}};
  }
};

MicroBatch make_micro_batch(int64_t tokens, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  MicroBatch micro;
  for (int64_t i = 0; i < tokens; ++i) {
    micro.input_ids.push_back(token(rng));
    micro.labels.push_back(i % 5 == 4 ? -100 : micro.input_ids.back());
  }
  return micro;
}

double relative(const float* actual, const float* expected, size_t count) {
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < count; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(actual[i]) - expected[i]));
    scale = std::max(scale, std::abs(static_cast<double>(expected[i])));
  }
  return diff / scale;
}

bool is_expert_tensor(const std::string& hf_name) {
  return hf_name.find(".experts.") != std::string::npos;
}

}  // namespace

ExpertParallelCheck check_expert_parallel(
    Backend& backend, dist::Communicator& expert_comm,
    const std::function<std::unique_ptr<Model>(const ModelOptions&)>& make_model, int64_t batch,
    int64_t seq, uint64_t data_seed, ModelOptions options) {
  const int ep = expert_comm.size(), rank = expert_comm.rank();
  const float loss_scale = 1.0f / static_cast<float>(ep * batch * seq);

  // The reference: every micro-batch on this rank, gradients accumulated.
  options.expert_comm = nullptr;
  std::unique_ptr<Model> reference = make_model(options);
  const int64_t vocab = reference->config().vocab_size;
  std::vector<MicroBatch> micro;
  for (int r = 0; r < ep; ++r) micro.push_back(make_micro_batch(batch * seq, vocab, data_seed + r));
  reference->zero_grads();
  double reference_loss = 0, reference_aux = 0;
  for (int r = 0; r < ep; ++r) {
    const StepResult step = reference->forward_backward(micro[r].view(batch, seq), loss_scale);
    reference_loss += step.loss_sum;
    if (r == rank) reference_aux = step.aux_loss;
  }
  std::map<std::string, std::vector<float>> expected;
  for (auto& tensor : reference->hf_tensors_to_host(true))
    expected[tensor.name] = std::move(tensor.values);
  reference.reset();

  // Expert parallel: this rank's micro-batch only.
  options.expert_comm = &expert_comm;
  std::unique_ptr<Model> model = make_model(options);
  model->zero_grads();
  const StepResult step = model->forward_backward(micro[rank].view(batch, seq), loss_scale);
  std::vector<Model::NamedHostTensor> grads = model->hf_tensors_to_host(true);

  // Sum the loss and the non-expert gradients over the ranks (one collective).
  std::vector<float> summed = {static_cast<float>(step.loss_sum)};
  for (const auto& tensor : grads)
    if (!is_expert_tensor(tensor.name))
      summed.insert(summed.end(), tensor.values.begin(), tensor.values.end());
  const int64_t count = static_cast<int64_t>(summed.size());
  Buffer device(DType::F32, {count}, backend.device());
  backend.copy(device, Tensor(summed.data(), DType::F32, {count}));
  expert_comm.all_reduce_sum(device, device, backend.stream());
  backend.copy(Tensor(summed.data(), DType::F32, {count}), device);
  backend.synchronize();

  ExpertParallelCheck check;
  const float reference_loss_f = static_cast<float>(reference_loss);
  check.loss_error = relative(&summed[0], &reference_loss_f, 1);
  const float reference_aux_f = static_cast<float>(reference_aux);
  const float aux_f = static_cast<float>(step.aux_loss);
  check.aux_error = relative(&aux_f, &reference_aux_f, 1);
  double worst = 0;
  size_t position = 1;
  for (const auto& tensor : grads) {
    const auto found = expected.find(tensor.name);
    if (found == expected.end() || found->second.size() != tensor.values.size())
      fail("expert parallel check: tensor ", tensor.name, " differs from the reference's");
    const bool expert = is_expert_tensor(tensor.name);
    const float* actual = expert ? tensor.values.data() : &summed[position];
    const double error = relative(actual, found->second.data(), tensor.values.size());
    if (expert) {
      check.expert_grad_error = std::max(check.expert_grad_error, error);
      for (float value : tensor.values) check.local_expert_grad_sum += std::abs(value);
    } else {
      check.other_grad_error = std::max(check.other_grad_error, error);
      position += tensor.values.size();
    }
    if (error >= worst) worst = error, check.worst_tensor = tensor.name;
  }
  return check;
}

}  // namespace moetune
