#!/usr/bin/env bash
# The PyTorch references of the training tests, made on the GPU machine (which has PyTorch and
# transformers; this one has neither) by scripts/train-reference.py. They are kept in the project
# under tests/data/train-reference/ and read by tests/test_train_reference.cpp.
#
# Here, first:
#   bash scripts/device-train-reference.sh --prepare
# copies the v3-tiny and v3-tiny-mtp fixtures into the git-ignored device-train-data/, trains a
# few steps of v3-tiny-mtp with fathom (CPU build) to get a checkpoint, and records fathom's
# logits for it. Then on the GPU machine (carry ["device-train-data"]):
#   bash scripts/device-train-reference.sh
# writes, under $OUT (or out/train-reference):
#   v3-tiny-mtp-grads.safetensors   whole-model gradients of v3-tiny-mtp (float64 autograd, stored F16 × scale)
#   v3-tiny-train-50.safetensors    50 AdamW steps of v3-tiny in float32: the token stream and the
#                                   loss of every step
#   check.json                      fathom's checkpoint loaded by transformers: logits error
# and prints a table last.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-train-data

if [ "${1:-}" = "--prepare" ]; then
  fathom=${FATHOM:-build/release/fathom}
  [ -x "$fathom" ] || { echo "device-train-reference: build fathom first (bash scripts/build.sh), or set FATHOM" >&2; exit 1; }
  rm -rf "$data" && mkdir -p "$data"
  cp -r ../shared/data/fixtures/v3-tiny ../shared/data/fixtures/v3-tiny-mtp "$data/"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 - "$work" <<'EOF'
import json, os, struct, sys
work = sys.argv[1]
os.makedirs(f"{work}/data")
def shard(path, ids):
    with open(path, "wb") as f:
        f.write(b"FTOKSHRD" + struct.pack("<IIQ", 1, 0, len(ids)) + struct.pack(f"<{len(ids)}I", *ids))
train = [3 + (i * 7 + i // 5) % 200 for i in range(3000)]
val = [3 + (i * 7 + i // 5) % 200 for i in range(400)]
shard(f"{work}/data/train-00000.bin", train)
shard(f"{work}/data/val-00000.bin", val)
json.dump({"shards": [{"file": "train-00000.bin", "split": "train", "tokens": len(train)},
                      {"file": "val-00000.bin", "split": "val", "tokens": len(val)}]}, open(f"{work}/data/manifest.json", "w"))
EOF
  cat > "$work/train.json" <<EOF
{"model": "$(pwd)/$data/v3-tiny-mtp", "data": "data", "out": "run", "seq_len": 32, "batch": 2, "steps": 6,
 "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup": 2}, "mtp_lambda": 0.3}
EOF
  "$fathom" train --config "$work/train.json" --quiet
  ckpt=$(ls -d "$work"/run/checkpoints/step-* | tail -1)
  cp -r "$ckpt" "$data/checkpoint"
  rm "$data/checkpoint/optimizer.safetensors"  # transformers reads model.safetensors; the carry limit is 64 MiB
  chmod -R u+w "$data"
  # fathom's logits of the checkpoint on the fixture's input ids (fp32, CPU)
  "$fathom" logits --model "$data/checkpoint" --input-ids ../shared/data/fixtures/v3-tiny-mtp/reference.safetensors \
    --device cpu --precision fp32 --out "$data/checkpoint-logits.safetensors"
  cp ../shared/data/fixtures/v3-tiny-mtp/reference.safetensors "$data/checkpoint-ids.safetensors"
  echo "device-train-reference: $data prepared ($(du -sh "$data" | cut -f1)); run 'bash scripts/device-train-reference.sh' there with carry [\"$data\"]"
  exit 0
fi

[ -d "$data/v3-tiny-mtp" ] || { echo "device-train-reference: $data is missing: run with --prepare here and carry $data" >&2; exit 1; }
out=${OUT:-out/train-reference}
mkdir -p "$out"
ref=scripts/train-reference.py
python3 $ref grads --model "$data/v3-tiny-mtp" --out "$out/v3-tiny-mtp-grads.safetensors" --seq-len 24 --batch 2 \
  --lam 0.3 --alpha 0.01 2>&1 | tee "$out/grads.log"
python3 $ref train --model "$data/v3-tiny" --out "$out/v3-tiny-train-50.safetensors" --seq-len 32 --batch 2 --steps 50 \
  --peak 1e-3 --min-lr 1e-4 --alpha 0.001 --gamma 0.001 2>&1 | tee "$out/train.log"
python3 $ref check --model "$data/checkpoint" --fathom-logits "$data/checkpoint-logits.safetensors" \
  --input-ids "$data/checkpoint-ids.safetensors" --result "$out/check.json" 2>&1 | tee "$out/check.log"
echo
echo "| reference | result |"
echo "|---|---|"
echo "| grads | $(tail -1 "$out/grads.log" | cut -c1-150) |"
echo "| train | $(tail -1 "$out/train.log" | cut -c1-150) |"
echo "| check | $(cat "$out/check.json") |"
