#!/usr/bin/env bash
# fathom serve checked with the official `openai` npm client (openai_client.test.mjs) and its web
# chat page in headless Chromium through playwright-core (chat_page.test.mjs; skipped without a
# Chromium binary): starts `fathom serve` on fathom-mini on a free port with an API key, runs the
# tests against it with node's test runner, and stops the server. A ctest test (CMakeLists.txt); scripts/test.sh
# installs the client (npm ci here) first.
#   bash tests/js/run.sh PATH_TO_FATHOM
# Exit 77 (ctest: skipped) with a message when node or the installed client is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
fathom="${1:?usage: run.sh PATH_TO_FATHOM}"
if ! command -v node >/dev/null; then echo "openai client tests: node is not installed; skipped" >&2; exit 77; fi
if [ ! -f "$here/node_modules/openai/package.json" ]; then
  echo "openai client tests: the openai npm package is not installed (npm ci --prefix tests/js); skipped" >&2
  exit 77
fi
log=$(mktemp)
key="test-key-$$"
"$fathom" serve --model "$here/../../models/fathom-mini" --port 0 --api-key "$key" --max-batch 4 --max-queue 16 >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 300); do  # up to 30 s for the model to load
  port=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -1)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "openai client tests: fathom serve exited:" >&2; cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "openai client tests: fathom serve did not start in 30 s:" >&2; cat "$log" >&2; exit 1; }
FATHOM_URL="http://127.0.0.1:$port/v1" FATHOM_KEY="$key" node --test --test-reporter=spec --test-concurrency=1 \
  "$here/openai_client.test.mjs" "$here/chat_page.test.mjs"
# the server survived everything the tests sent
kill -0 "$pid" 2>/dev/null || { echo "openai client tests: fathom serve died:" >&2; cat "$log" >&2; exit 1; }
