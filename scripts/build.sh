#!/usr/bin/env bash
# Configures and builds moetune into build/ (or $MOETUNE_BUILD_DIR), with extra CMake flags
# passed through: scripts/build.sh -DMOETUNE_CUDA=OFF
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build_dir="${MOETUNE_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
