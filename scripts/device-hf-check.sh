#!/usr/bin/env bash
# Does HuggingFace transformers load a fathom checkpoint (by default the shipped fathom-mini, FP8
# with 128x128 block scales in DeepSeek's published layout), and compute what fathom computes?
#
# Here (fathom built: bash scripts/build.sh):
#   bash scripts/device-hf-check.sh --prepare [MODEL_DIR]
#     fathom's CPU reference for MODEL_DIR into the git-ignored device-hf-data/ (about 3 MB):
#     the first 64 ids of a held-out text, their logits (`fathom logits`), a 24-token greedy
#     continuation of its first 24 ids (`fathom generate --input-ids`), and the text's ids.
# There (PyTorch + transformers; carry ["device-hf-data"]; do not hide the shards for this call):
#   bash scripts/device-hf-check.sh [MODEL_DIR]
#     scripts/hf-load-check.py: transformers loads the checkpoint as FP8 and dequantized to F32,
#     its logits and greedy tokens against fathom's, its tokenizer's ids against fathom's; a table
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
assert len(ids) >= 64, f"the text gave {len(ids)} ids, fewer than 64"
def write_ids(path, row):
    body = struct.pack(f"<{len(row)}q", *row)
    head = json.dumps({"input_ids": {"dtype": "I64", "shape": [1, len(row)], "data_offsets": [0, len(body)]}}).encode()
    head += b" " * (-len(head) % 8)
    open(path, "wb").write(struct.pack("<Q", len(head)) + head + body)
write_ids(f"{d}/input_ids.safetensors", ids[:64])
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
  echo "device-hf-check: $data prepared ($(du -sh "$data" | cut -f1)); carry [\"$data\"]"
  exit 0
fi
model=${1:-models/fathom-mini}
for f in input_ids.safetensors logits.safetensors greedy.json; do
  [ -s "$data/$f" ] || { echo "device-hf-check: $data/$f is missing: run 'bash scripts/device-hf-check.sh --prepare' here and carry $data" >&2; exit 1; }
done
[ -s "$(ls "$model"/model-*.safetensors 2>/dev/null | head -1)" ] ||
  { echo "device-hf-check: $model has no weight shards (hidden by device-room.sh?)" >&2; exit 1; }
timeout 500 python3 scripts/hf-load-check.py "$model" "$data"
