#!/usr/bin/env bash
# Configures and builds fathom (release preset: build/release). Extra args go to cmake --build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release "$@"
