// `moetune version`: the version and which backends this binary was built with.
#include <cstdio>

#include "cli/commands.h"
#include "ops/backend.h"

namespace moetune::cli {

int run_version(int, char**) {
  std::printf("moetune 0.1.0 (backends: cpu%s)\n", cuda_backend_available() ? ", cuda" : "");
  return 0;
}

}  // namespace moetune::cli
