#!/usr/bin/env bash
# Sets up, builds and runs every test (the command CI runs). Fixture tests read ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
# the official openai npm client, for the serving tests (tests/js; package-lock.json pins it)
if command -v npm >/dev/null; then
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error ||
    echo "test: npm ci failed: the openai client tests (OpenAiNpmClient) will be skipped" >&2
else
  echo "test: npm not found: the openai client tests (OpenAiNpmClient) will be skipped" >&2
fi
ctest --preset release
# libFuzzer targets (tokenizer, tokenizer.json loader, chat template) under ASan + UBSan, each
# for a bounded time; skipped with a message where clang's libFuzzer is missing.
bash scripts/fuzz.sh "${FATHOM_FUZZ_SECONDS:-20}"
