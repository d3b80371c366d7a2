// SM partitions through CUDA green contexts (see sm_partition.h). The driver functions come
// from cudaGetDriverEntryPointByVersion, so the binary needs no libcuda at link time and runs
// (without partitions) on drivers older than the toolkit.
#include "ops/cuda/sm_partition.h"

#include <cuda.h>

#include <map>
#include <mutex>

#include "ops/cuda/cuda_common.h"
#include "ops/cuda/driver_entry_point.h"

namespace moetune::cuda {
namespace {

// The green-context entry points of the driver, all null where it lacks them. They are asked
// for at this toolkit's version (CUDA_VERSION of cuda.h): the resource structs' layout changed
// between releases, and only that version's functions match the structs compiled here.
struct GreenContextApi {
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*device_get_resource)(CUdevice, CUdevResource*, CUdevResourceType) = nullptr;
  CUresult (*split_by_count)(CUdevResource*, unsigned int*, const CUdevResource*, CUdevResource*,
                             unsigned int, unsigned int) = nullptr;
  CUresult (*generate_desc)(CUdevResourceDesc*, CUdevResource*, unsigned int) = nullptr;
  CUresult (*create)(CUgreenCtx*, CUdevResourceDesc, CUdevice, unsigned int) = nullptr;
  CUresult (*destroy)(CUgreenCtx) = nullptr;
  CUresult (*stream_create)(CUstream*, CUgreenCtx, unsigned int, int) = nullptr;
  CUresult (*stream_green_context)(CUstream, CUgreenCtx*) = nullptr;
  CUresult (*green_context_resource)(CUgreenCtx, CUdevResource*, CUdevResourceType) = nullptr;
  CUresult (*stream_context)(CUstream, CUcontext*) = nullptr;
  CUresult (*current_context)(CUcontext*) = nullptr;
  CUresult (*push_context)(CUcontext) = nullptr;
  CUresult (*pop_context)(CUcontext*) = nullptr;
  std::string missing;  // the symbols the driver did not give, with why
  bool complete() const { return missing.empty(); }
};

template <typename F>
void load(F& function, const char* symbol, std::string& missing) {
  cudaDriverEntryPointQueryResult found{};
  if (driver_entry_point(symbol, CUDA_VERSION, function, &found)) return;
  missing += std::string(missing.empty() ? "" : ", ") + symbol + " (" +
             (found == cudaDriverEntryPointVersionNotSufficent
                  ? "driver older than CUDA " + std::to_string(CUDA_VERSION)
              : found == cudaDriverEntryPointSymbolNotFound ? "not found"
                                                            : "no function") +
             ")";
}

const GreenContextApi& api() {
  static const GreenContextApi loaded = [] {
    GreenContextApi a;
    load(a.device_get, "cuDeviceGet", a.missing);
    load(a.device_get_resource, "cuDeviceGetDevResource", a.missing);
    load(a.split_by_count, "cuDevSmResourceSplitByCount", a.missing);
    load(a.generate_desc, "cuDevResourceGenerateDesc", a.missing);
    load(a.create, "cuGreenCtxCreate", a.missing);
    load(a.destroy, "cuGreenCtxDestroy", a.missing);
    load(a.stream_create, "cuGreenCtxStreamCreate", a.missing);
    load(a.stream_green_context, "cuStreamGetGreenCtx", a.missing);
    load(a.green_context_resource, "cuGreenCtxGetDevResource", a.missing);
    load(a.stream_context, "cuStreamGetCtx", a.missing);
    load(a.current_context, "cuCtxGetCurrent", a.missing);
    load(a.push_context, "cuCtxPushCurrent", a.missing);
    load(a.pop_context, "cuCtxPopCurrent", a.missing);
    return a;
  }();
  return loaded;
}

std::string driver_error(const char* call, CUresult status) {
  return std::string(call) + " failed (CUresult " + std::to_string(static_cast<int>(status)) + ")";
}

int device_sm_count() {
  int device = 0, sms = 0;
  MOETUNE_CUDA_CHECK(cudaGetDevice(&device));
  MOETUNE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace

bool SmPartition::split(int device, int sms, Split& out, std::string* why) {
  const GreenContextApi& a = api();
  auto refuse = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return false;
  };
  if (!a.complete()) return refuse("the driver lacks green contexts: " + a.missing);
  if (sms < 1) return refuse("an SM partition needs at least one SM");
  MOETUNE_CUDA_CHECK(cudaSetDevice(device));
  MOETUNE_CUDA_CHECK(cudaFree(nullptr));  // the primary context exists before the green ones
  CUdevice handle = 0;
  if (CUresult s = a.device_get(&handle, device); s != CUDA_SUCCESS)
    return refuse(driver_error("cuDeviceGet", s));
  CUdevResource all{};
  if (CUresult s = a.device_get_resource(handle, &all, CU_DEV_RESOURCE_TYPE_SM); s != CUDA_SUCCESS)
    return refuse(driver_error("cuDeviceGetDevResource", s));
  if (static_cast<unsigned>(sms) >= all.sm.smCount)
    return refuse("asked for " + std::to_string(sms) + " SMs of a device with " +
                  std::to_string(all.sm.smCount));
  CUdevResource resources[2]{};  // the part, the rest
  unsigned groups = 1;
  if (CUresult s = a.split_by_count(&resources[0], &groups, &all, &resources[1], 0,
                                    static_cast<unsigned>(sms));
      s != CUDA_SUCCESS || groups != 1)
    return refuse(driver_error("cuDevSmResourceSplitByCount", s));
  if (resources[1].sm.smCount == 0) return refuse("the split left no SMs for the rest");
  std::unique_ptr<SmPartition> made[2];
  for (int i = 0; i < 2; ++i) {
    CUdevResourceDesc desc{};
    CUgreenCtx context = nullptr;
    CUresult status = a.generate_desc(&desc, &resources[i], 1);
    if (status == CUDA_SUCCESS)
      status = a.create(&context, desc, handle, CU_GREEN_CTX_DEFAULT_STREAM);
    if (status != CUDA_SUCCESS) {
      if (i == 0) return refuse(driver_error("cuGreenCtxCreate of the partition", status));
      continue;  // the rest's own context is optional
    }
    made[i].reset(new SmPartition());
    made[i]->green_context_ = context;
    made[i]->sms_ = static_cast<int>(resources[i].sm.smCount);
  }
  out.part = std::move(made[0]);
  out.rest = std::move(made[1]);
  out.rest_sms = static_cast<int>(resources[1].sm.smCount);
  return true;
}

SmPartition::~SmPartition() {
  if (green_context_) api().destroy(static_cast<CUgreenCtx>(green_context_));
}

cudaStream_t SmPartition::make_stream(int priority) const {
  CUstream stream = nullptr;
  const CUresult status = api().stream_create(&stream, static_cast<CUgreenCtx>(green_context_),
                                              CU_STREAM_NON_BLOCKING, priority);
  if (status != CUDA_SUCCESS) fail(driver_error("cuGreenCtxStreamCreate", status));
  return stream;
}

namespace {
// Streams' budgets (set and cleared by their owner). Green-context SM counts are asked of the
// driver each time (two calls): a cache keyed by the handle could outlive the stream, and a
// later stream may get the same handle.
std::mutex budget_mutex;
std::map<cudaStream_t, int> stream_budgets;
}  // namespace

void set_stream_sm_budget(cudaStream_t stream, int sms) {
  std::lock_guard<std::mutex> lock(budget_mutex);
  if (sms > 0)
    stream_budgets[stream] = sms;
  else
    stream_budgets.erase(stream);
}

cudaEvent_t create_event_for(cudaStream_t stream, unsigned flags) {
  const GreenContextApi& a = api();
  CUcontext stream_context = nullptr, current = nullptr;
  const bool other_context =
      stream && a.complete() && a.stream_context(stream, &stream_context) == CUDA_SUCCESS &&
      a.current_context(&current) == CUDA_SUCCESS && stream_context && stream_context != current;
  if (other_context && a.push_context(stream_context) != CUDA_SUCCESS)
    fail("create_event_for: cuCtxPushCurrent of the stream's context failed");
  cudaEvent_t event = nullptr;
  const cudaError_t status = cudaEventCreateWithFlags(&event, flags);
  if (other_context) {
    CUcontext popped = nullptr;
    a.pop_context(&popped);
  }
  MOETUNE_CUDA_CHECK(status);
  return event;
}

int stream_sm_count(cudaStream_t stream) {
  {
    std::lock_guard<std::mutex> lock(budget_mutex);
    if (auto it = stream_budgets.find(stream); it != stream_budgets.end()) return it->second;
  }
  const GreenContextApi& a = api();
  if (!stream || !a.complete()) return device_sm_count();
  CUgreenCtx context = nullptr;
  if (a.stream_green_context(stream, &context) != CUDA_SUCCESS || !context)
    return device_sm_count();
  CUdevResource resource{};
  if (a.green_context_resource(context, &resource, CU_DEV_RESOURCE_TYPE_SM) != CUDA_SUCCESS)
    return device_sm_count();
  return static_cast<int>(resource.sm.smCount);
}

}  // namespace moetune::cuda
