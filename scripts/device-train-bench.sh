#!/usr/bin/env bash
# The training benchmark on the GPU machine, in one command (carry ["device-test-data"], made here
# by `bash scripts/device-test.sh --prepare`): builds bench_train, runs it (tokens/s and MFU of the
# ~0.5B V3-shaped MoE at sequence 2,048 against the bf16 GEMM rate measured in the same run), then,
# when nsys is there, one profiled step's GPU time by kernel; prints the table last (also in
# $OUT/device-train-bench.txt when OUT is set).
#
#   bash scripts/device-train-bench.sh [bench_train arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-test-data
[ -s "$data/deps.tar.xz" ] || { echo "device-train-bench: $data/deps.tar.xz is missing: run 'bash scripts/device-test.sh --prepare' here and carry $data" >&2; exit 1; }
deps=/tmp/fathom-deps
rm -rf "$deps" && mkdir -p "$deps"
tar -C "$deps" -xJf "$data/deps.tar.xz"
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "device-train-bench: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
cmake -S . -B build/device-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=OFF -DFATHOM_BENCH=ON \
  -DFATHOM_DEPS_DIR="$deps" >/dev/null
cmake --build build/device-bench --target bench_train 2>&1 | grep -E "warning|error|FAILED" || true
cmake --build build/device-bench --target bench_train >/dev/null
log=/tmp/device-train-bench.log
build/device-bench/bench_train "$@" | tee "$log"
prof=""
if command -v nsys >/dev/null; then
  nsys profile -o /tmp/train-prof --force-overwrite true -t cuda build/device-bench/bench_train --steps 1 "$@" >/dev/null 2>&1 || true
  prof=$(nsys stats -q -r cuda_gpu_kern_sum -f csv /tmp/train-prof.nsys-rep 2>/dev/null | head -16 || true)
fi
{
  echo
  echo "## bench_train $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  grep -E "bf16 GEMM|model:" "$log"
  sed -n '/^| measure/,$p' "$log"
  if [ -n "$prof" ]; then
    echo
    echo "GPU time by kernel (nsys, warm-up + 1 step):"
    echo "$prof" | cut -d, -f1,2,3,9 | sed 's/^/    /'
  fi
} | tee "${OUT:-/tmp}/device-train-bench.txt"
