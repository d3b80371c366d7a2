#!/usr/bin/env bash
# Installs what building and testing moetune needs on Debian 12 / Ubuntu 24.04, idempotently:
# only packages that are missing are installed. Needs root or sudo for apt-get.
#   scripts/setup.sh            build and test dependencies (Debian packages)
#   scripts/setup.sh --python   also the PyPI packages of the golden/fixture scripts and benchmarks
set -euo pipefail

packages=(build-essential cmake git xz-utils nlohmann-json3-dev libyaml-cpp-dev libpcre2-dev
          libopenblas-dev libcli11-dev libgtest-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Header-only cudnn-frontend (cuDNN flash attention) for the CUDA backend, from its pinned
# PyPI wheel into .deps/ (only where nvcc exists; the build falls back without it).
cudnn_frontend_version=1.32.0
root="$(cd "$(dirname "$0")/.." && pwd)"
cudnn_frontend_dir="$root/.deps/cudnn-frontend"
if { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; } &&
   [ "$(cat "$cudnn_frontend_dir/VERSION" 2>/dev/null)" != "$cudnn_frontend_version" ]; then
  wheel_dir="$(mktemp -d)"
  if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       --platform manylinux_2_28_x86_64 -d "$wheel_dir" "nvidia-cudnn-frontend==$cudnn_frontend_version"; then
    rm -rf "$cudnn_frontend_dir" && mkdir -p "$cudnn_frontend_dir"
    python3 - "$wheel_dir"/*.whl "$cudnn_frontend_dir" <<'PY'
import sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    archive.extractall(target, [n for n in archive.namelist() if n.startswith("include/")])
PY
    echo "$cudnn_frontend_version" >"$cudnn_frontend_dir/VERSION"
  else
    echo "setup: warning: could not download nvidia-cudnn-frontend; building without cuDNN attention"
  fi
  rm -rf "$wheel_dir"
fi

# Header-only CUTLASS/CuTe (Hopper grouped GEMM, src/ops/cuda/grouped_gemm_sm90.cu) from the
# pinned nvidia-cutlass PyPI wheel's include/ folder into .deps/cutlass/include (only where
# nvcc exists; without it the grouped GEMMs keep the WMMA kernels).
cutlass_version=4.2.0.0
cutlass_dir="$root/.deps/cutlass"
if { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; } &&
   [ "$(cat "$cutlass_dir/VERSION" 2>/dev/null)" != "$cutlass_version" ]; then
  wheel_dir="$(mktemp -d)"
  if python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheel_dir" "nvidia-cutlass==$cutlass_version"; then
    rm -rf "$cutlass_dir" && mkdir -p "$cutlass_dir"
    python3 - "$wheel_dir"/*.whl "$cutlass_dir/include" <<'PY'
import os, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            path = os.path.join(target, name[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(archive.read(name))
PY
    echo "$cutlass_version" >"$cutlass_dir/VERSION"
  else
    echo "setup: warning: could not download nvidia-cutlass; grouped GEMMs keep the WMMA kernels"
  fi
  rm -rf "$wheel_dir"
fi

if [ "${1:-}" = "--python" ]; then
  python3 -m pip install -q -r "$(dirname "$0")/../requirements-tools.txt"
fi
