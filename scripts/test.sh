#!/usr/bin/env bash
# The test command: installs dependencies, builds moetune (with the CUDA backend when nvcc
# is present, so GPU code is compiled even without a GPU), runs every CPU test, then builds
# again with AddressSanitizer + UBSan and runs the tests there too. GPU tests (label "gpu")
# are skipped here; docs/GPU.md says how to run them on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
jobs="$(nproc)"

echo "== release build and tests"
MOETUNE_BUILD_DIR="$root/build" "$root/scripts/build.sh"
ctest --test-dir "$root/build" -LE gpu --output-on-failure -j "$jobs"

echo "== AddressSanitizer + UBSan build and tests"
MOETUNE_BUILD_DIR="$root/build-asan" "$root/scripts/build.sh" -DMOETUNE_SANITIZE=ON \
  -DMOETUNE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$root/build-asan" -LE "gpu|slow" --output-on-failure -j "$jobs"
echo "== all tests passed"
