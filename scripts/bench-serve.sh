#!/usr/bin/env bash
# The serving load test (bench/serve_load.mjs) on this machine, loopback only: starts
# `fathom serve` on fathom-mini (or MODEL_DIR) on a free port, runs 64 concurrent streaming
# clients through the openai npm client, prints a table last, stops the server.
#   bash scripts/bench-serve.sh [MODEL_DIR] [serve_load.mjs options...]   (after scripts/test.sh or build.sh)
# FATHOM_MAX_BATCH (16) sets the server's batch; FATHOM_SPECULATIVE=1 turns on MTP drafting.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/fathom-mini}
shift $(($# > 0 ? 1 : 0))
[ -x build/release/fathom ] || bash scripts/build.sh
[ -f tests/js/node_modules/openai/package.json ] || npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
log=$(mktemp)
spec=()
if [ "${FATHOM_SPECULATIVE:-0}" = 1 ]; then spec=(--speculative); fi
build/release/fathom serve --model "$model" --port 0 --max-batch "${FATHOM_MAX_BATCH:-16}" --max-queue 1024 "${spec[@]}" \
  >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*on http:\/\/127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$log" | head -1)
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "bench-serve: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "bench-serve: $(nproc) CPUs, model $model, max batch ${FATHOM_MAX_BATCH:-16}${spec:+, MTP speculative decoding}" >&2
node bench/serve_load.mjs "http://127.0.0.1:$port/v1" "$@"
