#!/usr/bin/env bash
# The pictures of docs/balancing.md: v3-tiny (../shared/data/fixtures) trained 120 steps on a text
# of 23 distinct tokens, once without the auxiliary-loss-free bias update (γ = 0) and once with it
# (γ = 0.03) — the runs of the test Trainer.TheBiasUpdateBalancesTheExperts — and each run's
# expert-load plot copied to docs/images/. Needs a build (bash scripts/build.sh) and gnuplot-nox.
set -euo pipefail
cd "$(dirname "$0")/.."
fathom=${FATHOM:-build/release/fathom}
[ -x "$fathom" ] || { echo "make-balance-plots: build fathom first (bash scripts/build.sh), or set FATHOM" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, os, struct, sys
work = sys.argv[1]
os.makedirs(f"{work}/data")
def shard(path, ids):
    with open(path, "wb") as f:
        f.write(b"FTOKSHRD" + struct.pack("<IIQ", 1, 0, len(ids)) + struct.pack(f"<{len(ids)}I", *ids))
train = [3 + (i * 7) % 23 for i in range(600)]
shard(f"{work}/data/train-00000.bin", train)
shard(f"{work}/data/val-00000.bin", train[:100])
json.dump({"shards": [{"file": "train-00000.bin", "split": "train", "tokens": 600},
                      {"file": "val-00000.bin", "split": "val", "tokens": 100}]}, open(f"{work}/data/manifest.json", "w"))
PY
mkdir -p docs/images
for gamma in 0 0.03; do
  cat > "$work/train-$gamma.json" <<JSON
{"model": "$(pwd)/../shared/data/fixtures/v3-tiny", "data": "data", "out": "run-$gamma", "seq_len": 24, "batch": 1,
 "steps": 120, "lr": {"schedule": "constant", "peak": 1e-3}, "clip": 1.0, "bias_update": $gamma}
JSON
  "$fathom" train --config "$work/train-$gamma.json" --quiet
  "$fathom" train-plot --log "$work/run-$gamma/log.jsonl" --out "$work/run-$gamma"
  cp "$work/run-$gamma/expert-load.png" "docs/images/expert-load-gamma-$gamma.png"
done
echo "make-balance-plots: docs/images/expert-load-gamma-0.png and expert-load-gamma-0.03.png written"
