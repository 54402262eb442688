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
if [ $# -eq 0 ]; then
  # Text in, text out: the DeepSeek-V3 tokenizer and chat template in front of a random-weight
  # V3-shaped model with the full 129,280-id vocabulary (random weights: expect random words).
  rand=bench-models/v3-chat-random
  if [ ! -f "$rand/model.safetensors" ] || [ ! -f "$rand/tokenizer.json" ]; then
    ./build/release/fathom init-random --config bench/configs/v3-chat-random.json --out "$rand" \
      --tokenizer ../shared/data/deepseek-v3-tokenizer --seed 0
  fi
  echo "chat prompt through the DeepSeek-V3 tokenizer and chat template ($rand, random weights):"
  ./build/release/fathom generate --model "$rand" --chat --prompt "What is multi-head latent attention?" \
    --max-tokens 24 --temperature 0.7 --seed 0
fi
