#!/usr/bin/env bash
# Sets up, builds and runs every test (the command CI runs). Fixture tests read ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --preset release
