#!/usr/bin/env bash
# Sets up, builds and runs fathom on the default model: a checkpoint given as the first
# argument, or the DeepSeek-V3-shaped reference fixture ../shared/data/fixtures/v3-tiny-mtp.
# Shows the model, then a greedy continuation with the KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
model="${1:-../shared/data/fixtures/v3-tiny-mtp}"
ids="${2:-$model/reference.safetensors}"
./build/release/fathom info --model "$model"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
./build/release/fathom generate --model "$model" --input-ids "$ids" --max-new-tokens 16 --temperature 0 --out "$out/gen.json"
echo "greedy continuation of row 0 of $ids: $(cat "$out/gen.json")"
./build/release/fathom logits --model "$model" --input-ids "$ids" --out "$out/logits.safetensors" --mtp
echo "logits (and MTP logits) written for every row of $ids"
