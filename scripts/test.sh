#!/usr/bin/env bash
# Sets up, builds and runs every test (the command CI runs). Fixture tests read ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --preset release
# libFuzzer targets (tokenizer, tokenizer.json loader, chat template) under ASan + UBSan, each
# for a bounded time; skipped with a message where clang's libFuzzer is missing.
bash scripts/fuzz.sh "${FATHOM_FUZZ_SECONDS:-20}"
