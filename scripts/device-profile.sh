#!/usr/bin/env bash
# Where a decode step's time goes, on the GPU machine, in one command: runs `ncu` on the timed
# decode steps of bench_cuda_decode (the bench marks them with cudaProfilerStart/Stop) for each
# case given and prints, per kernel name, the calls and kernel time per step, its share, and the
# DRAM bandwidth it reached (bytes read + written ÷ its time). Kernels run serialized under ncu
# and L2 is not flushed between them (--cache-control none), so the sum is the step's kernel time
# without launch gaps or overlap.
#
#   bash scripts/device-profile.sh [--detail REGEX] [CASE...]   CASE = MODEL:DTYPE:BATCH:GEMV[:STEPS[:PROMPT]]
#   default: v3-4.9b:bf16:1:simt v3-4.9b:bf16:32:simt v3-4.9b:bf16:32:mma
# --launches REGEX: also each launch of the first timed step whose kernel name matches REGEX
# (grid, time, DRAM rate), in order — which matmul of the step a kernel's time belongs to.
# --detail REGEX: instead, ncu's launch, occupancy, throughput and warp-stall sections for the
# first timed launch of each kernel whose name matches REGEX (for why a kernel is slow).
# --skip N,N2,...: with --detail, the launches of REGEX after skipping N (each N in turn; the
# order --launches prints) instead of the first ones — e.g. the LM head among the matmuls.
# GEMV is simt or mma (FATHOM_GEMV, the tensor-core GEMV). Carry ["device-serve-data",
# "device-bin"] (scripts/device-pack.sh; without device-bin the bench is built there).
set -euo pipefail
cd "$(dirname "$0")/.."
detail=""
launches=""
skips=""
while [ $# -gt 0 ]; do
  case "$1" in
    --detail) detail=$2; shift 2 ;;
    --launches) launches=$2; shift 2 ;;
    --skip) skips=$(echo "$2" | tr , " "); shift 2 ;;
    *) break ;;
  esac
done
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(v3-4.9b:bf16:1:simt v3-4.9b:bf16:32:simt v3-4.9b:bf16:32:mma)
source scripts/device-serve-env.sh
serve_env device-profile
serve_programs device-profile bench_cuda_decode
out=${OUT:-/tmp}
for c in "${cases[@]}"; do
  IFS=: read -r model dtype batch gemv steps prompt <<<"$c"
  steps=${steps:-2}
  prompt=${prompt:-128}  # tokens of context before the timed steps (the serving bench's are 1,024)
  [ -n "$gemv" ] || { echo "device-profile: case $c is not MODEL:DTYPE:BATCH:GEMV[:STEPS]" >&2; exit 2; }
  if [ -n "$detail" ]; then
   for skip in ${skips:-none}; do
    rep=$out/detail-$model-$dtype-b$batch-$gemv-$skip.txt
    which=(--launch-count 4)
    [ "$skip" = none ] || which=(--launch-skip "$skip" --launch-count 1)
    FATHOM_GEMV=$gemv ncu --profile-from-start off --cache-control none --clock-control none \
      --section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats -k "regex:$detail" "${which[@]}" \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_global_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum" \
      "$bin"/bench_cuda_decode --models "$model" --dtypes "$dtype" --batches "$batch" --decode "$steps" \
      --prompt "$prompt" --prefill 64 >"$rep" 2>&1 || { echo "device-profile: ncu failed for $c:"; tail -5 "$rep"; continue; }
    echo
    echo "### $c: $detail (skip $skip)"
    python3 - "$rep" <<'PY'
import re, sys
stalls = []
for line in open(sys.argv[1]):
    m = re.match(r"\s+smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+\S*\s+([\d.,]+)", line)
    if m and float(m.group(2).replace(",", "")) >= 0.05:
        stalls.append((float(m.group(2).replace(",", "")), m.group(1)))
    m = re.match(r"\s+(smsp__inst_executed\S*|l1tex__data_bank\S*)\s+\S*\s+([\d.,]+)", line)
    if m:
        print(" ", m.group(1), m.group(2))
if stalls:
    print("  stalls per issued instruction:", ", ".join(f"{n} {v:.2f}" for v, n in sorted(stalls, reverse=True)))
PY
    grep -E "^  [a-zA-Z_:<>, ]+\(|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit|DRAM Throughput|Memory Throughput|Duration|Dynamic Shared|Waves Per SM|Grid Size|Block Size|Stall|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per|stalled" "$rep" \
      | grep -v "smsp__average_warps_issue_stalled" | sed -E 's/ {2,}/ /g' | head -120  # (summed up above)
   done
   continue
  fi
  csv=$out/profile-$model-$dtype-b$batch-$gemv.csv
  FATHOM_GEMV=$gemv ncu --profile-from-start off --cache-control none --clock-control none \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv \
    "$bin"/bench_cuda_decode --models "$model" --dtypes "$dtype" --batches "$batch" --decode "$steps" \
    --prompt "$prompt" --prefill 64 >"$csv" 2>"$csv.err" || { echo "device-profile: ncu failed for $c:"; tail -5 "$csv.err"; continue; }
  echo
  echo "### $c"
  python3 - "$csv" "$steps" "$launches" <<'PY'
import csv, sys, collections, re
lines = open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
if start is None:
    sys.exit("no ncu CSV header: " + " | ".join(lines[-3:]))
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
us = collections.Counter(); by = collections.Counter(); ids = collections.defaultdict(set)
per = collections.defaultdict(dict)  # launch ID -> name, grid, us, bytes
for r in csv.DictReader(lines[start:]):
    name = r["Kernel Name"].split("(")[0].split("<")[0].replace("fathom::cuda::", "").replace("(anonymous namespace)::", "")
    v = float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
    ids[name].add(r["ID"])
    L = per[int(r["ID"])]
    L["name"] = name; L["grid"] = r.get("Grid Size", "?")
    if r["Metric Name"] == "gpu__time_duration.sum": us[name] += v; L["us"] = v
    else: by[name] += v; L["bytes"] = L.get("bytes", 0) + v
steps = int(sys.argv[2]); tot = sum(us.values()); calls = sum(len(s) for s in ids.values())
print(f"kernels per step {calls / steps:.0f}, kernel time per step {tot / steps:.0f} us, "
      f"DRAM {sum(by.values()) / steps / 1e6:.0f} MB per step")
print(f"| kernel | calls/step | us/step | share | us/call | GB/s |\n|---|---|---|---|---|---|")
for k, v in us.most_common(14):
    n = len(ids[k])
    print(f"| {k[:44]} | {n / steps:.0f} | {v / steps:.1f} | {100 * v / tot:.1f}% | {v / n:.1f} | {by[k] / v / 1e3:.0f} |")
if sys.argv[3]:
    order = sorted(per)
    first = order[: len(order) // steps]
    print(f"\nlaunches of the first step matching {sys.argv[3]!r}: | # | kernel | grid | us | GB/s |")
    for i, lid in enumerate(first):
        L = per[lid]
        if re.search(sys.argv[3], L["name"]):
            print(f"| {i} | {L['name'][:40]} | {L['grid']} | {L.get('us', 0):.1f} | {L.get('bytes', 0) / max(L.get('us', 1e-9), 1e-9) / 1e3:.0f} |")
PY
done
