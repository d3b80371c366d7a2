// CPU reference backend: placeholder until the op implementations land (see backend.h).
#include "ops/backend.h"

namespace moetune {
std::unique_ptr<Backend> make_cpu_backend() { fail("CPU backend: not implemented yet"); }
}  // namespace moetune
