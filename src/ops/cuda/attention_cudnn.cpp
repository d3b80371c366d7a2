// cuDNN SDPA (flash attention) through cudnn-frontend graphs; see attention_cudnn.h.
// Layout: our (B, T, H, D) row-major tensors are cuDNN's (B, H, T, D) dims with strides
// (T*H*D, D, H*D, 1), so nothing is transposed or copied; the softmax statistics (the
// natural-log log-sum-exp) are (B, H, T, 1) fp32, exactly our lse layout.
// Packed rows (document masks): the graph's batch is S sequence slots of up to T tokens;
// Q/K/V/O (and their gradients) carry ragged offsets (element offset of each document's first
// token in the flat (B*T, H, D) tensor), the lengths come as seq_len_q/kv with a padding mask.
// The stats are ragged too, token-major (B*T, H) in a scratch buffer, converted to and from
// our (B, H, T) lse around the call (attention_packed.cu), which keeps the lse of both paths
// the same and lets the reference kernels take over any call cuDNN rejects.
#include "ops/cuda/attention_cudnn.h"

#include <bit>
#include <cstring>
#include <map>
#include <tuple>

#include "core/error.h"
#include "ops/cuda/cuda_common.h"

#if MOETUNE_HAS_CUDNN
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>
#endif

namespace moetune::cuda {

#if MOETUNE_HAS_CUDNN

namespace fe = cudnn_frontend;

namespace {
enum Uid : int64_t {
  kQ = 1,
  kK,
  kV,
  kO,
  kStats,
  kdO,
  kdQ,
  kdK,
  kdV,
  kSeqLenQ,
  kSeqLenKV,
  kRaggedQ,
  kRaggedK,
  kRaggedV,
  kRaggedO,
  kRaggedStats,
  kRaggeddO,
  kRaggeddQ,
  kRaggeddK,
  kRaggeddV
};

// backward, packed slots (0: not packed), b, t, hq, hkv, d, scale bits
using Key = std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t>;

void check(fe::error_t status, const char* what) {
  if (status.is_bad()) fail("cuDNN attention ", what, ": ", status.get_message());
}

// Device scratch of one packed call: the sequence tables and the token-major stats.
struct PackedTables {
  int32_t* seq_len = nullptr;
  int64_t *q_offsets = nullptr, *kv_offsets = nullptr, *stats_offsets = nullptr;
  float* stats = nullptr;  // (B*T, Hq)
};
}  // namespace

struct CudnnAttention::Impl {
  cudnnHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  std::map<Key, std::shared_ptr<fe::graph::Graph>> graphs;
  std::map<Key, bool> unsupported;

  // slots == 0: B rows of T tokens, causal. slots > 0: packed rows, `slots` ragged sequences
  // of at most T tokens each over the B*T tokens.
  std::shared_ptr<fe::graph::Graph> build(bool backward, int64_t slots, int64_t b, int64_t t,
                                          int64_t hq, int64_t hkv, int64_t d, float scale) {
    const bool packed = slots > 0;
    const int64_t batch = packed ? slots : b, tokens = b * t;
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto index = [&](const char* name, int64_t uid, int64_t count, fe::DataType_t type) {
      return graph->tensor(fe::graph::Tensor_attributes()
                               .set_name(name)
                               .set_uid(uid)
                               .set_dim({count, 1, 1, 1})
                               .set_stride({1, 1, 1, 1})
                               .set_data_type(type));
    };
    auto ragged = [&](const char* name, int64_t uid) {
      return packed ? index(name, uid, batch + 1, fe::DataType_t::INT64) : nullptr;
    };
    auto layout = [&](const std::shared_ptr<fe::graph::Tensor_attributes>& tensor, int64_t heads,
                      int64_t ragged_uid, const char* ragged_name) {
      tensor->set_dim({batch, heads, t, d}).set_stride({t * heads * d, d, heads * d, 1});
      if (packed) tensor->set_ragged_offset(ragged(ragged_name, ragged_uid));
    };
    auto input = [&](const char* name, int64_t uid, int64_t heads, int64_t ragged_uid) {
      auto tensor = graph->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid));
      layout(tensor, heads, ragged_uid, name);
      return tensor;
    };
    auto stats_layout = [&](const std::shared_ptr<fe::graph::Tensor_attributes>& stats) {
      stats->set_data_type(fe::DataType_t::FLOAT).set_dim({batch, hq, t, 1});
      if (packed)  // token-major (B*T, Hq), ragged
        stats->set_stride({hq * t, 1, hq, 1})
            .set_ragged_offset(ragged("RaggedStats", kRaggedStats));
      else
        stats->set_stride({hq * t, t, 1, 1});
    };
    std::shared_ptr<fe::graph::Tensor_attributes> seq_q, seq_kv;
    if (packed) {
      seq_q = index("SeqLenQ", kSeqLenQ, batch, fe::DataType_t::INT32);
      seq_kv = index("SeqLenKV", kSeqLenKV, batch, fe::DataType_t::INT32);
    }
    auto q = input("Q", kQ, hq, kRaggedQ);
    auto k = input("K", kK, hkv, kRaggedK);
    auto v = input("V", kV, hkv, kRaggedV);
    if (!backward) {
      auto options = fe::graph::SDPA_attributes()
                         .set_name("sdpa_forward")
                         .set_generate_stats(true)
                         .set_causal_mask(true)
                         .set_attn_scale(scale);
      if (packed) options.set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
      auto [o, stats] = graph->sdpa(q, k, v, options);
      o->set_output(true).set_uid(kO);
      layout(o, hq, kRaggedO, "RaggedO");
      stats->set_output(true).set_uid(kStats);
      stats_layout(stats);
    } else {
      auto o = input("O", kO, hq, kRaggedO);
      auto dout = input("dO", kdO, hq, kRaggeddO);
      auto stats = graph->tensor(fe::graph::Tensor_attributes().set_name("Stats").set_uid(kStats));
      stats_layout(stats);
      auto options = fe::graph::SDPA_backward_attributes()
                         .set_name("sdpa_backward")
                         .set_causal_mask(true)
                         .set_attn_scale(scale);
      if (packed)
        options.set_padding_mask(true)
            .set_seq_len_q(seq_q)
            .set_seq_len_kv(seq_kv)
            .set_max_total_seq_len_q(tokens)
            .set_max_total_seq_len_kv(tokens);
      auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, dout, stats, options);
      dq->set_output(true).set_uid(kdQ);
      layout(dq, hq, kRaggeddQ, "RaggeddQ");
      dk->set_output(true).set_uid(kdK);
      layout(dk, hkv, kRaggeddK, "RaggeddK");
      dv->set_output(true).set_uid(kdV);
      layout(dv, hkv, kRaggeddV, "RaggeddV");
    }
    check(graph->validate(), "validate");
    check(graph->build_operation_graph(handle), "build_operation_graph");
    check(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
    check(graph->check_support(handle), "check_support");
    check(graph->build_plans(handle), "build_plans");
    return graph;
  }

  std::shared_ptr<fe::graph::Graph> get(bool backward, int64_t slots, const Tensor& q,
                                        const Tensor& k, float scale) {
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &scale, sizeof(scale_bits));
    const Key key{backward,  slots,     q.size(0), q.size(1),
                  q.size(2), k.size(2), q.size(3), scale_bits};
    if (unsupported.count(key)) return nullptr;
    auto found = graphs.find(key);
    if (found != graphs.end()) return found->second;
    try {
      auto graph =
          build(backward, slots, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), scale);
      graphs.emplace(key, graph);
      return graph;
    } catch (const Error&) {
      unsupported[key] = true;  // the reference kernels take it
      return nullptr;
    }
  }

  void run(const std::shared_ptr<fe::graph::Graph>& graph,
           std::unordered_map<int64_t, void*>& pointers, CudnnAttention::Workspace workspace,
           void* context) {
    int64_t bytes = 0;
    check(graph->get_workspace_size(bytes), "get_workspace_size");
    void* space = bytes > 0 ? workspace(context, static_cast<size_t>(bytes)) : nullptr;
    check(graph->execute(handle, pointers, space), "execute");
  }

  // The sequence tables of a packed call (and room for the token-major stats), filled on the
  // stream from doc_offsets; their pointers join the variant pack.
  PackedTables packed_tables(const Tensor& q, const Tensor& k, const Tensor& doc_offsets,
                             int64_t slots, CudnnAttention::Workspace workspace, void* context,
                             std::unordered_map<int64_t, void*>& pointers) {
    const int64_t hq = q.size(2), hkv = k.size(2), d = q.size(3), tokens = q.size(0) * q.size(1);
    PackedTables tables;
    tables.seq_len = static_cast<int32_t*>(workspace(context, sizeof(int32_t) * slots));
    tables.q_offsets = static_cast<int64_t*>(workspace(context, sizeof(int64_t) * (slots + 1)));
    tables.kv_offsets = static_cast<int64_t*>(workspace(context, sizeof(int64_t) * (slots + 1)));
    tables.stats_offsets = static_cast<int64_t*>(workspace(context, sizeof(int64_t) * (slots + 1)));
    tables.stats = static_cast<float*>(workspace(context, sizeof(float) * tokens * hq));
    launch_packed_sequences(doc_offsets, slots, hq * d, hkv * d, hq, tables.seq_len,
                            tables.q_offsets, tables.kv_offsets, tables.stats_offsets, stream);
    pointers[kSeqLenQ] = tables.seq_len;
    pointers[kSeqLenKV] = tables.seq_len;
    for (int64_t uid : {kRaggedQ, kRaggedO, kRaggeddO, kRaggeddQ}) pointers[uid] = tables.q_offsets;
    for (int64_t uid : {kRaggedK, kRaggedV, kRaggeddK, kRaggeddV})
      pointers[uid] = tables.kv_offsets;
    pointers[kRaggedStats] = tables.stats_offsets;
    pointers[kStats] = tables.stats;
    return tables;
  }
};

CudnnAttention::CudnnAttention(cudaStream_t stream) : impl_(std::make_unique<Impl>()) {
  impl_->stream = stream;
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

// Sequence slots of a packed call (0: not packed): the documents rounded up to a power of two,
// so that a new packing rarely needs a new graph. Packed rows need cuDNN 9.6 (GQA + ragged).
static int64_t packed_slots(const Tensor& doc_offsets) {
  if (!present(doc_offsets)) return 0;
  if (doc_offsets.dtype != DType::I32 || doc_offsets.rank() != 1 || doc_offsets.numel() < 2 ||
      cudnnGetVersion() < 90600)
    return -1;
  return static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(doc_offsets.numel() - 1)));
}

bool CudnnAttention::forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                             const Tensor& doc_offsets, const Tensor& out, const Tensor& lse,
                             Workspace workspace, void* context) {
  const int64_t slots = packed_slots(doc_offsets);
  if (!impl_->handle || !eligible(q, k) || slots < 0) return false;
  auto graph = impl_->get(false, slots, q, k, scale);
  if (!graph) return false;
  std::unordered_map<int64_t, void*> pointers{
      {kQ, q.data}, {kK, k.data}, {kV, v.data}, {kO, out.data}, {kStats, lse.data}};
  if (slots == 0) {
    impl_->run(graph, pointers, workspace, context);
    return true;
  }
  const PackedTables tables =
      impl_->packed_tables(q, k, doc_offsets, slots, workspace, context, pointers);
  impl_->run(graph, pointers, workspace, context);
  launch_lse_layout(tables.stats, lse.ptr<float>(), q.size(0), q.size(2), q.size(1), false,
                    impl_->stream);
  return true;
}

bool CudnnAttention::backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& out, const Tensor& lse, float scale,
                              const Tensor& doc_offsets, const Tensor& dq, const Tensor& dk,
                              const Tensor& dv, Workspace workspace, void* context) {
  const int64_t slots = packed_slots(doc_offsets);
  if (!impl_->handle || !eligible(q, k) || slots < 0) return false;
  auto graph = impl_->get(true, slots, q, k, scale);
  if (!graph) return false;
  std::unordered_map<int64_t, void*> pointers{{kQ, q.data},   {kK, k.data},     {kV, v.data},
                                              {kO, out.data}, {kdO, dout.data}, {kStats, lse.data},
                                              {kdQ, dq.data}, {kdK, dk.data},   {kdV, dv.data}};
  if (slots > 0) {
    const PackedTables tables =
        impl_->packed_tables(q, k, doc_offsets, slots, workspace, context, pointers);
    launch_lse_layout(lse.ptr<float>(), tables.stats, q.size(0), q.size(2), q.size(1), true,
                      impl_->stream);
  }
  impl_->run(graph, pointers, workspace, context);
  return true;
}

#else  // no cuDNN in this build: the reference kernels take every call

struct CudnnAttention::Impl {};
CudnnAttention::CudnnAttention(cudaStream_t) {}
CudnnAttention::~CudnnAttention() = default;
bool CudnnAttention::forward(const Tensor&, const Tensor&, const Tensor&, float, const Tensor&,
                             const Tensor&, const Tensor&, Workspace, void*) {
  return false;
}
bool CudnnAttention::backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, float, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, Workspace, void*) {
  return false;
}

#endif

}  // namespace moetune::cuda
