#!/usr/bin/env bash
# The demo: installs dependencies, builds moetune and runs the CPU demo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh"
MOETUNE_BUILD_DIR="$root/build" "$root/scripts/build.sh"
"$root/build/moetune" version
