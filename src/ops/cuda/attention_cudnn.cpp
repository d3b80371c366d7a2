// cuDNN SDPA (flash attention) through cudnn-frontend graphs; see attention_cudnn.h.
// Layout: our (B, T, H, D) row-major tensors are cuDNN's (B, H, T, D) dims with strides
// (T*H*D, D, H*D, 1), so nothing is transposed or copied; the softmax statistics (the
// natural-log log-sum-exp) are (B, H, T, 1) fp32, exactly our lse layout.
#include "ops/cuda/attention_cudnn.h"

#include <cstring>
#include <map>
#include <tuple>

#include "core/error.h"

#if MOETUNE_HAS_CUDNN
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>
#endif

namespace moetune::cuda {

#if MOETUNE_HAS_CUDNN

namespace fe = cudnn_frontend;

namespace {
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV };

using Key = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t>;

void check(fe::error_t status, const char* what) {
  if (status.is_bad()) fail("cuDNN attention ", what, ": ", status.get_message());
}
}  // namespace

struct CudnnAttention::Impl {
  cudnnHandle_t handle = nullptr;
  std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;
  std::map<Key, bool> unsupported;

  std::shared_ptr<fe::graph::Graph> build(bool backward, int64_t b, int64_t t, int64_t hq,
                                          int64_t hkv, int64_t d, float scale) {
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto tensor = [&](const char* name, int64_t uid, int64_t heads) {
      return graph->tensor(fe::graph::Tensor_attributes()
                               .set_name(name)
                               .set_uid(uid)
                               .set_dim({b, heads, t, d})
                               .set_stride({t * heads * d, d, heads * d, 1}));
    };
    auto q = tensor("Q", kQ, hq);
    auto k = tensor("K", kK, hkv);
    auto v = tensor("V", kV, hkv);
    if (!backward) {
      auto options = fe::graph::SDPA_attributes()
                         .set_name("sdpa_forward")
                         .set_generate_stats(true)
                         .set_causal_mask(true)
                         .set_attn_scale(scale);
      auto [o, stats] = graph->sdpa(q, k, v, options);
      o->set_output(true).set_uid(kO).set_dim({b, hq, t, d}).set_stride({t * hq * d, d, hq * d, 1});
      stats->set_output(true)
          .set_uid(kStats)
          .set_data_type(fe::DataType_t::FLOAT)
          .set_dim({b, hq, t, 1})
          .set_stride({hq * t, t, 1, 1});
    } else {
      auto o = tensor("O", kO, hq);
      auto dout = tensor("dO", kdO, hq);
      auto stats = graph->tensor(fe::graph::Tensor_attributes()
                                     .set_name("Stats")
                                     .set_uid(kStats)
                                     .set_dim({b, hq, t, 1})
                                     .set_stride({hq * t, t, 1, 1})
                                     .set_data_type(fe::DataType_t::FLOAT));
      auto options = fe::graph::SDPA_backward_attributes()
                         .set_name("sdpa_backward")
                         .set_causal_mask(true)
                         .set_attn_scale(scale);
      auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, dout, stats, options);
      dq->set_output(true)
          .set_uid(kdQ)
          .set_dim({b, hq, t, d})
          .set_stride({t * hq * d, d, hq * d, 1});
      dk->set_output(true)
          .set_uid(kdK)
          .set_dim({b, hkv, t, d})
          .set_stride({t * hkv * d, d, hkv * d, 1});
      dv->set_output(true)
          .set_uid(kdV)
          .set_dim({b, hkv, t, d})
          .set_stride({t * hkv * d, d, hkv * d, 1});
    }
    check(graph->validate(), "validate");
    check(graph->build_operation_graph(handle), "build_operation_graph");
    check(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
    check(graph->check_support(handle), "check_support");
    check(graph->build_plans(handle), "build_plans");
    return graph;
  }

  std::shared_ptr<fe::graph::Graph> get(bool backward, const Tensor& q, const Tensor& k,
                                        float scale) {
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &scale, sizeof(scale_bits));
    const Key key{backward, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), scale_bits};
    if (unsupported.count(key)) return nullptr;
    auto found = graphs.find(key);
    if (found != graphs.end()) return found->second;
    try {
      auto graph = build(backward, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), scale);
      graphs.emplace(key, graph);
      return graph;
    } catch (const Error&) {
      unsupported[key] = true;  // the reference kernels take it
      return nullptr;
    }
  }

  bool run(const std::shared_ptr<fe::graph::Graph>& graph,
           std::unordered_map<int64_t, void*>& pointers, CudnnAttention::Workspace workspace,
           void* context) {
    int64_t bytes = 0;
    check(graph->get_workspace_size(bytes), "get_workspace_size");
    void* space = bytes > 0 ? workspace(context, static_cast<size_t>(bytes)) : nullptr;
    check(graph->execute(handle, pointers, space), "execute");
    return true;
  }
};

CudnnAttention::CudnnAttention(cudaStream_t stream) : impl_(std::make_unique<Impl>()) {
  if (cudnnCreate(&impl_->handle) != CUDNN_STATUS_SUCCESS) {
    impl_->handle = nullptr;
    return;
  }
  cudnnSetStream(impl_->handle, stream);
}

CudnnAttention::~CudnnAttention() {
  impl_->graphs.clear();
  if (impl_->handle) cudnnDestroy(impl_->handle);
}

static bool eligible(const Tensor& q, const Tensor& k) {
  return q.dtype == DType::BF16 && k.dtype == DType::BF16 && q.rank() == 4 && k.rank() == 4 &&
         q.size(3) % 8 == 0 && q.size(3) <= 256 && q.size(1) > 0 && q.size(0) > 0 &&
         k.size(2) > 0 && q.size(2) % k.size(2) == 0;
}

bool CudnnAttention::forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                             const Tensor& out, const Tensor& lse, Workspace workspace,
                             void* context) {
  if (!impl_->handle || !eligible(q, k)) return false;
  auto graph = impl_->get(false, q, k, scale);
  if (!graph) return false;
  std::unordered_map<int64_t, void*> pointers{
      {kQ, q.data}, {kK, k.data}, {kV, v.data}, {kO, out.data}, {kStats, lse.data}};
  return impl_->run(graph, pointers, workspace, context);
}

bool CudnnAttention::backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& out, const Tensor& lse, float scale, const Tensor& dq,
                              const Tensor& dk, const Tensor& dv, Workspace workspace,
                              void* context) {
  if (!impl_->handle || !eligible(q, k)) return false;
  auto graph = impl_->get(true, q, k, scale);
  if (!graph) return false;
  std::unordered_map<int64_t, void*> pointers{{kQ, q.data},   {kK, k.data},     {kV, v.data},
                                              {kO, out.data}, {kdO, dout.data}, {kStats, lse.data},
                                              {kdQ, dq.data}, {kdK, dk.data},   {kdV, dv.data}};
  return impl_->run(graph, pointers, workspace, context);
}

#else  // no cuDNN in this build: the reference kernels take every call

struct CudnnAttention::Impl {};
CudnnAttention::CudnnAttention(cudaStream_t) {}
CudnnAttention::~CudnnAttention() = default;
bool CudnnAttention::forward(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&,
                             const Tensor&, Workspace, void*) {
  return false;
}
bool CudnnAttention::backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, float, const Tensor&, const Tensor&,
                              const Tensor&, Workspace, void*) {
  return false;
}

#endif

}  // namespace moetune::cuda
