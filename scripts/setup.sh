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

if [ "${1:-}" = "--python" ]; then
  python3 -m pip install -q -r "$(dirname "$0")/../requirements-tools.txt"
fi
