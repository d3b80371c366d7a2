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

if [ "${1:-}" = "--python" ]; then
  python3 -m pip install -q -r "$(dirname "$0")/../requirements-tools.txt"
fi
