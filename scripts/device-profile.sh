#!/usr/bin/env bash
# Where a decode step's time goes, on the GPU machine (carry ["device-test-data"]): builds
# bench_cuda_decode, runs `ncu` on the timed decode steps of one model/dtype/batch (the bench
# marks them with cudaProfilerStart/Stop) and prints the kernel time per kernel name, summed,
# with its share of the step. L2 is not flushed between kernels (--cache-control none).
#
#   bash scripts/device-profile.sh [MODEL] [DTYPE] [BATCH] [STEPS]   (default v3-4.9b bf16 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-v3-4.9b} dtype=${2:-bf16} batch=${3:-1} steps=${4:-2}
data=device-test-data
deps=/tmp/fathom-deps
if [ ! -d "$deps/lib" ]; then
  mkdir -p "$deps" && tar -C "$deps" -xJf "$data/deps.tar.xz"
fi
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cmake -S . -B build/device-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=OFF -DFATHOM_BENCH=ON \
  -DFATHOM_DEPS_DIR="$deps" >/dev/null
cmake --build build/device-bench --target bench_cuda_decode >/dev/null
csv=${OUT:-/tmp}/profile-$model-$dtype-b$batch.csv
ncu --profile-from-start off --cache-control none --clock-control none --metrics gpu__time_duration.sum --csv \
  build/device-bench/bench_cuda_decode --models "$model" --dtypes "$dtype" --batches "$batch" --decode "$steps" \
  --prefill 64 >"$csv" 2>/dev/null || true
python3 - "$csv" "$steps" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[1:]:
    v = float(r[vi].replace(",", ""))
    v *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[r[ui]]  # -> microseconds
    name = r[ki].split("(")[0].split("<")[0].replace("fathom::cuda::", "").replace("(anonymous namespace)::", "")
    tot[name] += v; cnt[name] += 1
steps = int(sys.argv[2]); all_us = sum(tot.values())
print(f"kernels per step {sum(cnt.values()) / steps:.0f}, kernel time per step {all_us / steps:.0f} us")
print(f"{'kernel':48s} {'calls/step':>10s} {'us/step':>9s} {'share':>6s}")
for k, v in tot.most_common():
    print(f"{k[:48]:48s} {cnt[k] / steps:10.0f} {v / steps:9.1f} {100 * v / all_us:5.1f}%")
PY
