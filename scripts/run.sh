#!/usr/bin/env bash
# Sets up, builds and runs fathom on its default model, fathom-mini (models/fathom-mini: a small
# DeepSeek-V3-architecture model that fathom trained from scratch; its README is the model card):
# shows the model, then answers a question through the chat template on the CPU.
#
#   bash scripts/run.sh ["QUESTION" [MODEL_DIR]]
#
# For a conversation in the terminal: build/release/fathom chat --model models/fathom-mini
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
question="${1:-What does str.split do?}"
model="${2:-models/fathom-mini}"
[ -f "$model/config.json" ] || { echo "run.sh: $model has no config.json (a model directory is needed)" >&2; exit 1; }
./build/release/fathom info --model "$model"
echo
echo "user: $question"
printf 'assistant: '
# Sampling as `fathom chat` does, with a fixed seed so that the answer is the same on every run;
# a model this small loops when decoded greedily, so the repetition penalty is on.
./build/release/fathom generate --model "$model" --device cpu --chat --prompt "$question" \
  --max-tokens 160 --temperature 0.6 --top-p 0.9 --repetition-penalty 1.15 --seed 0
