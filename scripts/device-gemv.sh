#!/usr/bin/env bash
# The tensor-core GEMV (src/ops/cuda/mma_gemv.cuh) against the SIMT one (gemv.cuh) on the GPU
# machine, in one command (carry ["device-serve-data"], made here by
# `bash scripts/device-serve.sh --prepare`; hide the training-reference gradients first with
# `bash scripts/device-serve.sh --hide`, `--restore` after): builds fathom_tests,
# bench_cuda_decode and bench_serve_engine, runs the GPU op and model tests, then in the same run
# and on the same machine
#   - bench_cuda_decode (v3-4.9b, bf16 and FP8, batch 1/8/32) with FATHOM_GEMV=simt and with
#     FATHOM_GEMV=mma (tensor cores),
#   - bench_serve_engine at 32 concurrent requests (bf16 and FP8) likewise,
# and prints the table last (also $OUT/device-gemv.txt when OUT is set).
#
#   bash scripts/device-gemv.sh [--no-tests] [--no-bench] [--repeat] [--modes=auto,simt,mma]
#                               [--serve-graphs=on,off] [--fixtures] [--decode-prompt=N]
# With device-bin/ carried (made here by `bash scripts/device-pack.sh`) its programs are used
# instead of a build there.
# --repeat: bench_cuda_decode --repeat (what each kind of op costs in the batch-1 step) and
# bench_serve_engine --repeat (the same at 32 requests).
# --modes: the FATHOM_GEMV values to run (default simt,mma; auto is what runs when it is unset),
# each optionally with more environment settings after colons (auto:FATHOM_NO_PDL=1).
# --serve-graphs: bench_serve_engine with its decode steps as replayed CUDA graphs (on, the
# default) and/or eagerly (off).
# --decode-prompt: bench_cuda_decode's tokens of context before its timed steps (its default,
# 128, when not given; the serving bench's sequences hold 1,024 to 1,088).
# --fixtures: the tests also run the CUDA cases of the reference fixtures (tests/test_fixtures.cpp)
# from device-data/fixtures.tar.xz (made by `bash scripts/device-serve.sh --prepare`; carry
# "device-data" too, and hide fathom-mini's shards first: `bash scripts/device-room.sh hide`; the
# one GPU test that reads them, CudaModel.ServingEngineMatchesTheCpu, is left out then).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=1 bench=1 repeat=() modes="simt mma" graphs="on" fixtures=0 decode_prompt=()
for a in "$@"; do
  case "$a" in
    --modes=*) modes=$(echo "${a#--modes=}" | tr , ' ') ;;
    --serve-graphs=*) graphs=$(echo "${a#--serve-graphs=}" | tr , ' ') ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --repeat) repeat=(--repeat) ;;
    --fixtures) fixtures=1 ;;
    --decode-prompt=*) decode_prompt=(--prompt "${a#--decode-prompt=}") ;;
    *) echo "device-gemv: unknown argument $a" >&2; exit 2 ;;
  esac
done
source scripts/device-serve-env.sh
serve_env device-gemv
t0=$(date +%s)
targets=(bench_cuda_decode bench_serve_engine)
[ "$tests" = 1 ] && targets+=(fathom_tests)
serve_programs device-gemv "${targets[@]}"
t1=$(date +%s)
trc="not run"
if [ "$tests" = 1 ]; then
  set +e
  # a time limit, so that a hung kernel leaves the benchmarks their time and shows where it hung
  filter='CudaOps.*:CudaModel.*:RandomModel.*'
  if [ "$fixtures" = 1 ]; then
    [ -s device-data/fixtures.tar.xz ] || { echo "device-gemv: --fixtures needs device-data/fixtures.tar.xz (scripts/device-serve.sh --prepare; carry device-data)" >&2; exit 1; }
    tar -C /tmp/fathom-serve -xJf device-data/fixtures.tar.xz
    filter="$filter:*Fixture*cuda*"
    skip=":CudaModel.ServingEngineMatchesTheCpu"  # it reads fathom-mini, whose shards stay here then
  fi
  timeout 240 "$bin"/fathom_tests --gtest_filter="$filter:-CudaModel.MemoryBudgetErrors:*realdims*${skip:-}" \
    >/tmp/device-gemv-tests.log 2>&1
  trc=$?
  [ "$trc" != 124 ] || { echo "device-gemv: the GPU tests did not finish in 240 s; they were at:"; grep -E "^\[ RUN" /tmp/device-gemv-tests.log | tail -2; }
  set -e
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|actual" /tmp/device-gemv-tests.log | head -30 || true
  [ "$trc" = 0 ] || { echo "device-gemv: the GPU tests exited $trc; the end of their log:"; tail -n 25 /tmp/device-gemv-tests.log; }
fi
t2=$(date +%s)
tok="$shared/deepseek-v3-tokenizer/tokenizer.json"
[ "$bench" = 1 ] || modes=""
for mode in $modes; do
  # a mode may carry more settings after colons: auto:FATHOM_NO_PDL=1
  IFS=: read -r -a parts <<<"$mode"
  env=(FATHOM_GEMV="${parts[0]}" "${parts[@]:1}")
  mode=$(echo "$mode" | tr ':=' '_-')
  echo "== bench_cuda_decode ($mode)"
  env "${env[@]}" timeout 300 "$bin"/bench_cuda_decode --models v3-4.9b --dtypes bf16,fp8 --batches 1,8,32 \
    "${decode_prompt[@]}" "${repeat[@]}" >"/tmp/gemv-decode-$mode.log" 2>&1 || echo "device-gemv: bench_cuda_decode ($mode) failed"
  cat "/tmp/gemv-decode-$mode.log"
  for dt in bf16 fp8; do
    for gr in $graphs; do
      echo "== bench_serve_engine $dt 32 ($mode, graph $gr)"
      env "${env[@]}" timeout 300 "$bin"/bench_serve_engine --config v3-4.9b --dtype "$dt" --tokenizer "$tok" \
        --concurrency 32 --graph "$gr" "${repeat[@]}" >"/tmp/gemv-serve-$dt-$mode-$gr.log" 2>&1 ||
        echo "device-gemv: bench_serve_engine ($dt, $mode, graph $gr) failed"
      cat "/tmp/gemv-serve-$dt-$mode-$gr.log"
    done
  done
done
{
  echo
  echo "## device-gemv $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo "build $((t1 - t0)) s; GPU tests rc $trc in $((t2 - t1)) s: $(grep -hE '^\[  PASSED|^\[  FAILED' /tmp/device-gemv-tests.log 2>/dev/null | tr '\n' ' ')"
  grep -h "copy bandwidth" /tmp/gemv-decode-*.log 2>/dev/null | head -1 || true
  for mode in $modes; do
    mode=$(echo "$mode" | tr ':=' '_-')
    echo "### GEMV: $mode"
    sed -n '/^model  /,$p' "/tmp/gemv-decode-$mode.log" | grep -v "copy bandwidth" || true
    for dt in bf16 fp8; do
      for gr in $graphs; do
        echo "serve graph $gr: $(sed -n '/^model  /,$p' "/tmp/gemv-serve-$dt-$mode-$gr.log" | tail -n +2)" || true
      done
    done
  done
} | tee "${OUT:-/tmp}/device-gemv.txt"
[ "$trc" = 0 ] || [ "$trc" = "not run" ]
