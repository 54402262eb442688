#!/usr/bin/env bash
# Flash attention (src/ops/cuda/flash_attention.cu) on the GPU machine, in one command: its GPU
# tests (CudaFlashAttention.*: the kernels against the CPU reference on ragged, causal, GQA, strided
# batches; FlashAttentionCpu.*), then bench_flash_attention and its peers, PyTorch's
# scaled_dot_product_attention with the cuDNN and FlashAttention backends (bench/attention_peer.py),
# on the same shapes in the same run; prints the table last (also $OUT/device-attention.txt).
#
# Here first: `bash scripts/device-serve.sh --prepare` (device-serve-data/), `bash scripts/device-pack.sh
# fathom_tests bench_flash_attention bench_cuda_decode` (device-bin/), and hide the training-reference gradients
# (`bash scripts/device-serve.sh --hide`, `--restore` after). Then there (carry ["device-serve-data", "device-bin"]):
#   bash scripts/device-attention.sh [--no-tests] [--no-peer] [--full] [--ncu] [--sanitize] [--warpgroups]
#                                    [--schedules] [--kernels] [--profile] [--prefill] [--fixtures]
# --full: non-causal as well. --warpgroups: the forward (and the tests) with blocks of two
# warpgroups too (FATHOM_FLASH_WARPGROUPS=2; the default takes three where it can), and the SIMT
# fallback against the wgmma kernel at (1, 16, 2048, 128). --schedules: the forward (and the
# tests) with each schedule of FATHOM_FLASH_SCHEDULE (ATTN_SCHEDULES="..." to choose), and the
# forward + backward with each form of FATHOM_FLASH_BACKWARD (ATTN_BACKWARDS="...").
# --ncu: an ncu profile of the wgmma kernel at (4, 16, 4096, 128). --kernels: ncu's time of each
# kernel of the forward and the backward there (ATTN_KERNEL_SHAPES="B,H,S,Dqk,Dv ..." for others).
# --prefill: bench_cuda_decode's 2,048-token bf16 prefill of the 4.89B V3-shaped model with the
# naive (per-head) MLA cache, on the flash kernel and off it (FATHOM_FLASH_PREFILL=0), and with
# the absorbed (latent) cache for reference (needs bench_cuda_decode in device-bin).
# --fixtures: the tests also run the CUDA cases of the reference fixtures (tests/test_fixtures.cpp)
# from device-data/fixtures.tar.xz (scripts/device-serve.sh --prepare; carry "device-data" too
# after `bash scripts/device-room.sh hide`; CudaModel.ServingEngineMatchesTheCpu reads the hidden
# fathom-mini and is left out then).
# --sanitize: compute-sanitizer memcheck and racecheck on the GPU tests. --profile: the default wgmma
# kernel's machine code (into $OUT/fa-sass.txt) and ncu's scheduler, warp-state and tensor-pipe
# figures at (4, 16, 4096, 128) (ATTN_PROFILE_WARPGROUPS="2 3" for both block shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=1 peer=1 full=() ncu=0 sanitize=0 warpgroups=0 schedules=0 kernels=0 profile=0 prefill=0 fixtures=0
for a in "$@"; do
  case "$a" in
    --no-tests) tests=0 ;;
    --no-peer) peer=0 ;;
    --full) full=(--full) ;;
    --ncu) ncu=1 ;;
    --sanitize) sanitize=1 ;;
    --warpgroups) warpgroups=1 ;;
    --schedules) schedules=1 ;;
    --kernels) kernels=1 ;;
    --profile) profile=1 ;;
    --prefill) prefill=1 ;;
    --fixtures) fixtures=1 ;;
    *) echo "device-attention: unknown argument $a" >&2; exit 2 ;;
  esac
done
source scripts/device-serve-env.sh
serve_env device-attention
serve_programs device-attention fathom_tests bench_flash_attention bench_cuda_decode
log=/tmp/device-attention
mkdir -p "$log"
trc="not run"
filter="CudaFlashAttention.*:FlashAttentionCpu.*${ATTN_TESTS:-}"
if [ "$fixtures" = 1 ]; then
  [ -s device-data/fixtures.tar.xz ] || { echo "device-attention: --fixtures needs device-data/fixtures.tar.xz (carry device-data)" >&2; exit 1; }
  tar -C /tmp/fathom-serve -xJf device-data/fixtures.tar.xz
  filter="$filter:CudaModel.*:*_cuda_*-CudaModel.ServingEngineMatchesTheCpu"
fi
if [ "$tests" = 1 ]; then
  set +e
  timeout 300 "$bin"/fathom_tests --gtest_filter="$filter" >"$log/tests.log" 2>&1
  trc=$?
  set -e
  grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|worst|Failure|Expected|Which is|vs|wgmma|seed|exception" "$log/tests.log" | head -80 || true
fi
src="not run"
if [ "$sanitize" = 1 ]; then
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1 || true)
  src=""
  for tool in memcheck racecheck; do
    set +e
    timeout 300 "$cs" --tool $tool --error-exitcode 9 "$bin"/fathom_tests \
      --gtest_filter="CudaFlashAttention.RaggedSelf*:CudaFlashAttention.ChunkedPrefill*:CudaFlashAttention.BackwardMatchesTheCpu" >"$log/$tool.log" 2>&1
    rc=$?
    set -e
    src="$src $tool rc $rc"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|rror" "$log/$tool.log" | head -8 || true
  done
fi
timeout 300 "$bin"/bench_flash_attention "${full[@]}" | tee "$log/fathom.txt"
if [ "$warpgroups" = 1 ]; then
  if [ "$tests" = 1 ]; then
    echo "two warpgroups, tests: $(FATHOM_FLASH_WARPGROUPS=2 timeout 120 "$bin"/fathom_tests \
      --gtest_filter='CudaFlashAttention.*' 2>&1 | grep -E '^\[  (PASSED|FAILED) ' | tr '\n' ' ')"
  fi
  FATHOM_FLASH_WARPGROUPS=2 timeout 120 "$bin"/bench_flash_attention --fwd --min-ms 100 | sed "s/^/two warpgroups: /"
  for k in simt wgmma; do  # the SIMT fallback (FlashAttention 1's loop) on a smaller shape
    timeout 120 "$bin"/bench_flash_attention --kernel $k --fwd --shape 1,16,2048,128,128 --min-ms 50 | sed "s/^/$k: /"
  done
fi
if [ "$schedules" = 1 ]; then
  for sch in ${ATTN_SCHEDULES:-serial3 serial2 ws pingpong ws3 pingpong3}; do
    if [ "$tests" = 1 ]; then
      echo "$sch, tests: $(FATHOM_FLASH_SCHEDULE=$sch timeout 120 "$bin"/fathom_tests \
        --gtest_filter='CudaFlashAttention.*' 2>&1 | grep -E '^\[  (PASSED|FAILED) |^\[  FAILED' | tr '\n' ' ')"
    fi
    FATHOM_FLASH_SCHEDULE=$sch timeout 120 "$bin"/bench_flash_attention --fwd --min-ms 100 | sed "s/^/$sch: /"
  done
  for form in ${ATTN_BACKWARDS:-serial ws-serial ws-ss ws}; do
    FATHOM_FLASH_BACKWARD=$form timeout 120 "$bin"/bench_flash_attention --min-ms 100 | grep fwdbwd | sed "s/^/backward $form: /"
  done
fi
if [ "$prefill" = 1 ]; then
  for run in "naive 1" "naive 0" "absorbed 1"; do
    set -- $run
    echo "prefill, mla $1, flash prefill $2: $(FATHOM_FLASH_PREFILL=$2 timeout 200 "$bin"/bench_cuda_decode --models v3-4.9b \
      --dtypes bf16 --batches 1 --decode 8 --prefill 2048 --mla $1 | grep -E 'prefill 2048 tokens' | tr -s ' ')"
  done
fi
if [ "$peer" = 1 ]; then
  timeout 300 python3 bench/attention_peer.py "${full[@]}" | tee "$log/torch.txt" || echo "peer failed" >>"$log/torch.txt"
else
  : >"$log/torch.txt"
fi
ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1 || true)
if [ "$ncu" = 1 ] && [ -n "$ncu_bin" ]; then
  timeout 200 "$ncu_bin" --kernel-name regex:flash_fwd_wgmma --launch-count 1 --launch-skip 1 --section SpeedOfLight \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*gmma.*pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second" \
    "$bin"/bench_flash_attention --shape 4,16,4096,128,128 --min-ms 1 >"$log/ncu.txt" 2>&1
  grep -vE "^ *-+ *$|^ *$" "$log/ncu.txt" | grep -vE "^fathom|^#" | awk '$NF != "0" && $NF != "0.00"' | head -60
fi
if [ "$kernels" = 1 ] && [ -n "$ncu_bin" ]; then  # each kernel's time in forward + backward
  for shape in ${ATTN_KERNEL_SHAPES:-4,16,4096,128,128}; do
    echo "== kernel times (us), $shape"
    timeout 200 "$ncu_bin" --metrics gpu__time_duration.sum --launch-count 40 --print-summary per-kernel \
      "$bin"/bench_flash_attention --shape "$shape" --min-ms 1 >"$log/kernels.txt" 2>&1 || true
    grep -E "flash_|gpu__time_duration" "$log/kernels.txt" | sed -E 's/\(CUtensorMap_st.*//; s/^ +//' | head -24
  done
fi
if [ "$profile" = 1 ] && [ -n "$ncu_bin" ]; then
  /usr/local/cuda/bin/cuobjdump -sass "$bin"/bench_flash_attention 2>/dev/null |
    awk '/Function :/ {p = ($3 ~ /flash_fwd_wgmma_kernelILi128ELi128ELi3E/)} p' >"${OUT:-/tmp}/fa-sass.txt" || true
  for wgs in ${ATTN_PROFILE_WARPGROUPS:-3}; do
    echo "== ncu, $wgs warpgroups"
    FATHOM_FLASH_WARPGROUPS=$wgs timeout 200 "$ncu_bin" --kernel-name regex:flash_fwd_wgmma --launch-count 1 --launch-skip 1 \
      --section WarpStateStats --section SchedulerStats --section SourceCounters \
      --metrics "sm__pipe_tensor_op_hmma_type_hmma_hgmma_qgmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active" \
      "$bin"/bench_flash_attention --shape 4,16,4096,128,128 --fwd --min-ms 1 >"$log/prof$wgs.txt" 2>&1 || true
    grep -vE "^ *-+ *$|^ *$" "$log/prof$wgs.txt" | grep -vE "^fathom|^#|==PROF==|OPT|^          " | head -45
  done
fi
[ -n "${OUT:-}" ] && cp "$log"/*.log "$log"/*.txt "$OUT"/ 2>/dev/null || true  # the logs come back too
python3 - "$log/fathom.txt" "$log/torch.txt" "$trc" "$src" <<'PY' | tee "${OUT:-/tmp}/device-attention.txt"
import sys
fathom, peers = {}, {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 9 and f[0] == "fathom":
        fathom[(f[1], f[2]) + tuple(f[3:8])] = f[8]
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) >= 9 and f[0] in ("cudnn", "flash"):
        peers[(f[0], f[1], f[2]) + tuple(f[3:8])] = f[8] if f[8] != "n/a" else "n/a"
print(f"\ndevice-attention: GPU tests rc {sys.argv[3]}; sanitizers: {sys.argv[4]}")
print("| pass | mask | B | H | S | Dqk | Dv | fathom TFLOP/s | cuDNN | FA (torch) | fathom / cuDNN |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
keys = list(fathom) + [k[1:] for k in peers if k[0] == "cudnn" and k[1:] not in fathom]
for k in keys:
    v, c, fa = fathom.get(k, ""), peers.get(("cudnn",) + k, ""), peers.get(("flash",) + k, "")
    try:
        r = f"{float(v) / float(c):.2f}x"
    except ValueError:
        r = ""
    print(f"| {' | '.join(k)} | {v} | {c} | {fa} | {r} |")
PY
