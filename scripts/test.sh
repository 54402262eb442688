#!/usr/bin/env bash
# Sets up, builds and runs every test (the command CI runs). Fixture tests read ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/build.sh
# the official openai npm client and playwright-core, for the serving tests (tests/js;
# package-lock.json pins them)
if command -v npm >/dev/null; then
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error ||
    echo "test: npm ci failed: the openai client tests (ServeNodeClients) will be skipped" >&2
else
  echo "test: npm not found: the openai client tests (ServeNodeClients) will be skipped" >&2
fi
ctest --preset release
# libFuzzer targets (tokenizer, tokenizer.json loader, chat template) under ASan + UBSan, each
# for a bounded time; skipped with a message where clang's libFuzzer is missing.
bash scripts/fuzz.sh "${FATHOM_FUZZ_SECONDS:-20}"
