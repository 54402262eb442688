#!/usr/bin/env bash
# Does HuggingFace transformers load a fathom checkpoint (by default the shipped fathom-mini, FP8
# with 128x128 block scales in DeepSeek's published layout), and compute what fathom computes?
#
# Here (fathom built: bash scripts/build.sh):
#   bash scripts/device-hf-check.sh --prepare [MODEL_DIR]
#     fathom's CPU reference for MODEL_DIR into the git-ignored device-hf-data/ (about 2 MB):
#     the first 48 ids of a held-out text, their logits (`fathom logits`), a 24-token greedy
#     continuation of its first 24 ids (`fathom generate --input-ids`), and the text's ids.
#     With device-test-data/deps.tar.xz present (bash scripts/device-test.sh --prepare), it is
#     copied in too (5.9 MB) for the CPU-vs-CUDA check below.
# There (PyTorch + transformers; carry ["device-hf-data"]; do not hide the shards for this call):
#   bash scripts/device-hf-check.sh [MODEL_DIR]
#     scripts/hf-load-check.py: transformers loads the checkpoint as FP8 and dequantized to F32,
#     its logits and greedy tokens against fathom's, its tokenizer's ids against fathom's; then,
#     when the build dependencies came along, fathom itself built there: greedy generation of
#     four prompts on the CPU and on the GPU (F32 activations on both), which must agree. A table
#     last, non-zero exit when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-hf-data
if [ "${1:-}" = "--prepare" ]; then
  model=${2:-models/fathom-mini}
  F=${FATHOM:-build/release/fathom}
  [ -x "$F" ] || { echo "device-hf-check: $F is missing: run 'bash scripts/build.sh' first" >&2; exit 1; }
  rm -rf "$data" && mkdir -p "$data"
  cat > "$data/text.txt" <<'TEXT'
The tar command packs files into an archive and unpacks them again. With the -c option it creates an archive, with -x it extracts one, and with -z the archive is compressed with gzip. The -f option names the archive file.

In Python, a list comprehension builds a new list from an iterable in a single expression, for example the squares of the numbers in a range. A condition at the end keeps only the items for which it is true.
TEXT
  "$F" tokenize --tokenizer "$model" --json < "$data/text.txt" > "$data/text-ids.json"
  python3 - "$data" <<'PY'
import json, struct, sys
d = sys.argv[1]
ids = json.load(open(f"{d}/text-ids.json"))["ids"]
assert len(ids) >= 48, f"the text gave {len(ids)} ids, fewer than 48"
def write_ids(path, row):
    body = struct.pack(f"<{len(row)}q", *row)
    head = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, len(row)], "data_offsets": [0, len(body)]}}).encode()
    head += b" " * (-len(head) % 8)
    open(path, "wb").write(struct.pack("<Q", len(head)) + head + body)
write_ids(f"{d}/input_ids.safetensors", ids[:48])
write_ids(f"{d}/prompt_ids.safetensors", ids[:24])
PY
  "$F" logits --model "$model" --device cpu --input-ids "$data/input_ids.safetensors" --out "$data/logits.safetensors"
  "$F" generate --model "$model" --device cpu --input-ids "$data/prompt_ids.safetensors" --max-new-tokens 24 \
    --temperature 0 --out "$data/gen.json"
  python3 - "$data" <<'PY'
import json, sys
d = sys.argv[1]
ids = json.load(open(f"{d}/text-ids.json"))["ids"]
g = {"text": open(f"{d}/text.txt").read(), "text_ids": ids, "prompt": ids[:24],
     "tokens": json.load(open(f"{d}/gen.json"))["ids"]}
json.dump(g, open(f"{d}/greedy.json", "w"))
PY
  rm -f "$data/text-ids.json" "$data/gen.json" "$data/prompt_ids.safetensors"
  if [ -s device-test-data/deps.tar.xz ]; then cp device-test-data/deps.tar.xz "$data/"; fi
  echo "device-hf-check: $data prepared ($(du -sh "$data" | cut -f1)); carry [\"$data\"]"
  exit 0
fi
model=${1:-models/fathom-mini}
for f in input_ids.safetensors logits.safetensors greedy.json; do
  [ -s "$data/$f" ] || { echo "device-hf-check: $data/$f is missing: run 'bash scripts/device-hf-check.sh --prepare' here and carry $data" >&2; exit 1; }
done
[ -s "$(ls "$model"/model-*.safetensors 2>/dev/null | head -1)" ] ||
  { echo "device-hf-check: $model has no weight shards (hidden by device-room.sh?)" >&2; exit 1; }
rc=0
timeout 300 python3 scripts/hf-load-check.py "$model" "$data" >/tmp/hf-check.log 2>&1 || rc=1
grep -v "UNEXPECTED\|Loading weights" /tmp/hf-check.log | tail -40
if [ -s "$data/deps.tar.xz" ]; then
  deps=/tmp/fathom-deps
  if [ ! -d "$deps/lib" ]; then mkdir -p "$deps" && tar -C "$deps" -xJf "$data/deps.tar.xz"; fi
  export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cmake -S . -B build/device-hf -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=OFF -DFATHOM_BENCH=OFF \
    -DFATHOM_DEPS_DIR="$deps" >/dev/null
  cmake --build build/device-hf --target fathom >/dev/null
  F=build/device-hf/fathom agree=0 n=0
  for p in "The list type in Python" "To create a new branch in Git," "The Linux kernel" "What does str.split do?"; do
    "$F" generate --model "$model" --device cpu --precision fp32 --temperature 0 --prompt "$p" --max-tokens 48 >/tmp/g-cpu.txt 2>/dev/null
    "$F" generate --model "$model" --device cuda --precision fp32 --temperature 0 --prompt "$p" --max-tokens 48 >/tmp/g-cuda.txt 2>/dev/null
    n=$((n + 1))
    cmp -s /tmp/g-cpu.txt /tmp/g-cuda.txt && agree=$((agree + 1))
    printf 'prompt: %s\n  cpu:  %s\n  cuda: %s\n' "$p" "$(cat /tmp/g-cpu.txt)" "$(cat /tmp/g-cuda.txt)"
  done
  [ "$agree" = "$n" ] || rc=1
  sed -n '/^| check/,$p' /tmp/hf-check.log
  echo "| fathom greedy, CPU = CUDA | $agree/$n | 48 tokens of each prompt, F32 activations | $([ "$agree" = "$n" ] && echo yes || echo NO) |"
fi
exit $rc
