// Picks a backend by device name. Kept out of moetune_lib so that the library does not
// depend on the CUDA backend; moetune_engine links the two.
#include <string>

#include "core/error.h"
#include "ops/backend.h"

namespace moetune {

#ifndef MOETUNE_HAS_CUDA
std::unique_ptr<Backend> make_cuda_backend(int) {
  fail("this moetune was built without the CUDA backend (no nvcc at build time); "
       "rebuild with -DMOETUNE_CUDA=ON on a machine with the CUDA toolkit");
}
bool cuda_backend_available() { return false; }
#else
bool cuda_backend_available() { return true; }
#endif

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") return make_cuda_backend(0);
  if (device.rfind("cuda:", 0) == 0) {
    const std::string index = device.substr(5);
    if (index.empty() || index.find_first_not_of("0123456789") != std::string::npos)
      fail("bad device '", device, "': expected cpu, cuda or cuda:N");
    return make_cuda_backend(std::stoi(index));
  }
  fail("unknown device '", device, "': expected cpu, cuda or cuda:N");
}

}  // namespace moetune
