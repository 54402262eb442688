#!/usr/bin/env bash
# The FP8 block-scaled GEMM (src/ops/cuda/fp8_gemm.cu) on the GPU machine, in one command: its
# GPU tests (CudaFp8Gemm.*: against the CPU recipe, the contrast without promotion, the grouped
# layouts, bad parameters), then bench_fp8_gemm and its peer, PyTorch's blockwise scaled_mm
# (bench/fp8_gemm_peer.py), on the same shapes in the same run; prints the table last (also
# $OUT/device-fp8.txt when OUT is set).
#
# Here first: `bash scripts/device-serve.sh --prepare` (device-serve-data/: the build
# dependencies), `bash scripts/device-pack.sh fathom_tests bench_fp8_gemm bench_cuda_decode` (device-bin/), and
# hide the training-reference gradients (`bash scripts/device-serve.sh --hide`, `--restore`
# after). Then there (carry ["device-serve-data", "device-bin"]):
#   bash scripts/device-fp8.sh [--quick] [--no-tests] [--no-peer] [--ncu] [--sass] [--variants] [--prefill] [--wgmma]
# --quick: three shapes (M 128 and 4096 of N 4096, K 7168; 8192³).
# --ncu: an ncu profile of the wgmma kernel at 8192³ (SOL and warp-state sections), the peer's
# kernel's alike (unless --no-peer), and both kernels' source counters (stalls per instruction)
# into $OUT/ncu-source-*.txt.
# --variants: the 8192³ and M = 4096 shapes with each tile and cluster shape (FATHOM_FP8_GEMM).
# --prefill: bench_cuda_decode's 2,048-token prefill of the 4.89B V3-shaped model in bf16 and in FP8,
# weight-only and FP8 x FP8 (needs bench_cuda_decode in device-bin).
# --sass: which tensor-core instructions the wgmma kernels' machine code holds (QGMMA expected), and
# their local-memory (spill) loads and stores.
# --wgmma: bench_fp8_gemm --wgmma, the e4m3 wgmma rate of the tile patterns on resident tiles
# (src/ops/cuda/wgmma_bench.cu). FP8_VARIANTS="256,2x1,producer 192,2x1,persistent" and
# FP8_SHAPES="M,N,K ..." choose the forms and shapes --variants runs.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=() tests=1 peer=1 ncu=0 sass=0 variants=0 prefill=0 wgmma=0
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick) ;;
    --no-tests) tests=0 ;;
    --no-peer) peer=0 ;;
    --ncu) ncu=1 ;;
    --sass) sass=1 ;;
    --variants) variants=1 ;;
    --prefill) prefill=1 ;;
    --wgmma) wgmma=1 ;;
    *) echo "device-fp8: unknown argument $a" >&2; exit 2 ;;
  esac
done
source scripts/device-serve-env.sh
serve_env device-fp8
serve_programs device-fp8 fathom_tests bench_fp8_gemm bench_cuda_decode
log=/tmp/device-fp8
mkdir -p "$log"
if [ "$sass" = 1 ]; then
  /usr/local/cuda/bin/cuobjdump -sass "$bin"/bench_fp8_gemm 2>/dev/null >"$log/sass.txt" || true
  awk '/Function :/ {f=$3} /GMMA|UTMALDG|SYNCS|STL|LDL/ {split($2,o,"."); n[f" "o[1]]++} END {for (k in n) print "sass", k, n[k]}' \
    "$log/sass.txt" | grep fp8_gemm || echo "sass: no tensor-core instructions found"
  # the default kernel's machine code, for reading here
  awk '/Function :/ {p = ($3 ~ /fp8_gemm_wgmma_kernelILi1ELi1ELi2E/)} p' "$log/sass.txt" >"${OUT:-/tmp}/fp8-gemm-sass.txt"
fi
trc="not run"
if [ "$tests" = 1 ]; then
  set +e
  timeout 120 "$bin"/fathom_tests --gtest_filter="CudaFp8Gemm.*:Fp8Gemm.*:CudaOps.MatmulFp8*${FP8_TESTS:-}" >"$log/tests.log" 2>&1
  trc=$?
  set -e
  grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|FP8 GEMM|Failure|Expected|Which is|rel_err|wgmma|simt|seed" "$log/tests.log" | grep -v "worst out" | head -60 || true
  echo "tests: exit $trc"
fi
if [ "$wgmma" = 1 ]; then timeout 120 "$bin"/bench_fp8_gemm --wgmma | tee "$log/wgmma.txt"; fi
timeout 240 "$bin"/bench_fp8_gemm "${quick[@]}" | tee "$log/fathom.txt"
if [ "$variants" = 1 ]; then
  for v in ${FP8_VARIANTS:-256,2x1,producer 256,1x1,persistent 256,2x1,persistent 192,2x1,persistent}; do
    for shape in ${FP8_SHAPES:-8192,8192,8192 4096,2112,7168 4096,24576,1536 4096,32768,512 4096,7168,16384 4096,4096,7168 4096,7168,2048}; do
      echo "tiles,clusters $v $(FATHOM_FP8_GEMM=$v "$bin"/bench_fp8_gemm --shape $shape | grep ^fp8_gemm)"
    done
  done
fi
if [ "$prefill" = 1 ]; then  # FP8 prefill of the 4.89B V3-shaped model: weight-only vs FP8 x FP8
  timeout 240 "$bin"/bench_cuda_decode --models v3-4.9b --dtypes bf16,fp8 --batches 1 --decode 8 --prefill 2048 \
    --fp8-prefill weight-only,fp8 | grep -E "copy bandwidth|prefill" | tee "$log/prefill.txt"
fi
if [ "$peer" = 1 ]; then
  timeout 240 python3 bench/fp8_gemm_peer.py "${quick[@]}" | tee "$log/torch.txt" || echo "peer failed" >"$log/torch.txt"
else
  : >"$log/torch.txt"
fi
ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1 || true)
[ "$ncu" = 1 ] && [ -z "$ncu_bin" ] && echo "device-fp8: ncu not found"
if [ "$ncu" = 1 ] && [ -n "$ncu_bin" ]; then
  timeout 200 "$ncu_bin" --kernel-name regex:fp8_gemm_wgmma --launch-count 1 --launch-skip 1 --section SpeedOfLight \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*gmma.*pct_of_peak_sustained_active,regex:l1tex__data_pipe_lsu_wavefronts_mem_shared.*sum\.pct.*,sm__cycles_elapsed.avg.per_second" \
    "$bin"/bench_fp8_gemm --shape 8192,8192,8192 --min-ms 1 >"$log/ncu.txt" 2>&1
  grep -vE "^ *-+ *$|^ *$" "$log/ncu.txt" | grep -vE "^fp8_gemm|^#" | awk '$NF != "0" && $NF != "0.00"' | head -90
  # the peer's kernel (cuBLAS's nvjet) with the same metrics, and where each kernel's warps stall,
  # instruction by instruction (ncu's source counters; the reports come back in $OUT)
  if [ "$peer" = 1 ]; then
    echo "== the peer's kernel at 8192³"
    timeout 200 "$ncu_bin" --kernel-name regex:nvjet --launch-count 1 --launch-skip 3 --section SpeedOfLight \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*gmma.*pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second" \
      python3 bench/fp8_gemm_peer.py --shape 8192,8192,8192 >"$log/ncu-peer.txt" 2>&1
    grep -vE "^ *-+ *$|^ *$" "$log/ncu-peer.txt" | grep -vE "^torch|^#" | awk '$NF != "0" && $NF != "0.00"' | head -60
  fi
  if [ -n "${OUT:-}" ]; then
    timeout 200 "$ncu_bin" --kernel-name regex:fp8_gemm_wgmma --launch-count 1 --launch-skip 1 --section SourceCounters \
      --section WarpStateStats "$bin"/bench_fp8_gemm --shape 8192,8192,8192 --min-ms 1 >"$OUT/ncu-source-fathom.txt" 2>&1 || true
    if [ "$peer" = 1 ]; then
      timeout 200 "$ncu_bin" --kernel-name regex:nvjet --launch-count 1 --launch-skip 3 --section SourceCounters \
        --section WarpStateStats python3 bench/fp8_gemm_peer.py --shape 8192,8192,8192 >"$OUT/ncu-source-peer.txt" 2>&1 || true
    fi
  fi
fi
python3 - "$log/fathom.txt" "$log/torch.txt" "$trc" <<'EOF' | tee "${OUT:-/tmp}/device-fp8.txt"
import sys
fathom, torch = {}, {}
for path, d, tag in ((sys.argv[1], fathom, "fp8_gemm"), (sys.argv[2], torch, "torch")):
    for line in open(path):
        f = line.split()
        if len(f) >= 7 and f[0] == tag:
            d[(f[1], f[2], f[3], f[4], f[5])] = f[6] if f[6] != "n/a" else "n/a " + " ".join(f[7:])[:40]
print(f"\ndevice-fp8: GPU tests rc {sys.argv[3]}")
print("| case | M | N | K | groups | fathom TFLOP/s | PyTorch blockwise TFLOP/s | ratio |")
print("|---|---|---|---|---|---|---|---|")
for k, v in fathom.items():
    t = torch.get(k, "")
    try:
        r = f"{float(v) / float(t):.2f}x"
    except ValueError:
        r = ""
    print(f"| {' | '.join(k)} | {v} | {t} | {r} |")
for line in open(sys.argv[1]):
    if line.startswith("quantize_1x128"):
        print(line.strip())
EOF
