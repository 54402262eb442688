#!/usr/bin/env bash
# The CUDA benchmarks on the GPU machine, in one command (carry ["device-test-data"], made here
# by `bash scripts/device-test.sh --prepare`): builds bench_cuda_decode, runs it (decode at
# batch 1/8/32 and a 2,048-token prefill of the V3-4.9B and V2-Lite-16B shapes in bf16 and FP8
# against the copy-bandwidth roofline; with --repeat also what each kind of op costs inside the
# batch-1 step), bench_cuda_attention and bench_cuda_sync (a kernel-per-stage GEMV chain against
# persistent kernels; not with --quick), then the HF transformers eager peer on the same configs,
# and prints the table last (also in $OUT/device-bench.txt when OUT is set).
#
#   bash scripts/device-bench.sh [--quick] [--no-peer] [bench_cuda_decode arguments]
# --quick: only the V3-4.9B shape at batch 1 (a smoke run); --no-peer: skip transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-test-data
quick=0 peer=1 args=()
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    --no-peer) peer=0 ;;
    *) args+=("$a") ;;
  esac
done
[ -s "$data/deps.tar.xz" ] || { echo "device-bench: $data/deps.tar.xz is missing: run 'bash scripts/device-test.sh --prepare' here and carry $data" >&2; exit 1; }
deps=/tmp/fathom-deps
rm -rf "$deps" && mkdir -p "$deps"
tar -C "$deps" -xJf "$data/deps.tar.xz"
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "device-bench: $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null || echo 'no GPU')"
cmake -S . -B build/device-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=OFF -DFATHOM_BENCH=ON \
  -DFATHOM_DEPS_DIR="$deps" >/dev/null
cmake --build build/device-bench --target bench_cuda_decode bench_cuda_attention bench_cuda_sync 2>&1 | grep -E "warning|error|FAILED" || true
cmake --build build/device-bench --target bench_cuda_decode bench_cuda_attention bench_cuda_sync >/dev/null
sync_log=/tmp/device-bench-sync.log
[ "$quick" = 1 ] || build/device-bench/bench_cuda_sync | tee "$sync_log"
attn_log=/tmp/device-bench-attention.log
if [ "$quick" = 1 ]; then
  build/device-bench/bench_cuda_attention --keys 196,4096 | tee "$attn_log"
else
  build/device-bench/bench_cuda_attention | tee "$attn_log"
fi
if [ "$quick" = 1 ]; then args=(--models v3-4.9b --batches 1 "${args[@]}"); fi
log=/tmp/device-bench.log
build/device-bench/bench_cuda_decode "${args[@]}" | tee "$log"
peers=""
if [ "$peer" = 1 ] && python3 -c "import torch, transformers" 2>/dev/null; then
  models=v3-4.9b
  [ "$quick" = 1 ] || models="v3-4.9b v2-lite-16b"
  for m in $models; do
    line=$(timeout 300 python3 bench/hf_peer_decode.py "bench/configs/$m.json" 2>/tmp/hf-peer-$m.log | grep HF_PEER || true)
    [ -n "$line" ] || { echo "device-bench: the HF peer failed on $m:"; tail -5 "/tmp/hf-peer-$m.log"; }
    peers+="$line"$'\n'
  done
fi
{
  echo
  echo "## bench_cuda_decode $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  sed -n '/^model  /,$p' "$log"
  grep "copy bandwidth" "$log"
  echo
  cat "$attn_log"
  [ "$quick" = 1 ] || { echo; cat "$sync_log"; }
  if [ -n "$peers" ]; then
    echo
    echo "HF transformers eager generate (bf16, batch 1, greedy) on the same configs, tokens/s:"
    printf '%s' "$peers"
    for m in v3-4.9b v2-lite-16b; do
      hf=$(printf '%s' "$peers" | awk -v m="$m" '$2 == m {print $3}')
      ours=$(awk -v m="$m" '$1 == m && $2 == "bf16" && $3 == "decode" && $5 == "1" {print $6}' "$log")
      [ -n "$hf" ] && [ -n "$ours" ] && awk -v a="$ours" -v b="$hf" -v m="$m" 'BEGIN {printf "fathom / HF on %s (bf16, batch 1): %.1fx\n", m, a / b}'
    done
  fi
} | tee "${OUT:-/tmp}/device-bench.txt"
