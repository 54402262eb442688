#!/usr/bin/env bash
# compute-sanitizer over CUDA op tests on the GPU machine, in one command (carry
# ["device-test-data"], made here by `bash scripts/device-test.sh --prepare`):
#   bash scripts/device-sanitize.sh [TOOL=FILTER ...]
# builds the tests (build/device-test, as device-test.sh does) and runs each tool on the gtest
# filter given for it, each under a time limit (FATHOM_SANITIZE_LIMIT seconds, default 150), then
# prints a table (also in $OUT/device-sanitize.txt). Without arguments: memcheck, racecheck and
# initcheck on the tests of the kernels with shared-memory reductions and cp.async pipelines
# (attention, the experts, the GEMV with an input norm or side ops). racecheck and initcheck
# over every CudaOps test do not fit one 10-minute device call; name them to run them.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-test-data
[ -s "$data/deps.tar.xz" ] && [ -s "$data/shared-data.tar.xz" ] || {
  echo "device-sanitize: $data is missing: run 'bash scripts/device-test.sh --prepare' here and carry $data" >&2; exit 1; }
command -v compute-sanitizer >/dev/null || { echo "device-sanitize: compute-sanitizer is not installed" >&2; exit 1; }
deps=/tmp/fathom-deps
if [ ! -d "$deps/lib" ]; then mkdir -p "$deps" && tar -C "$deps" -xJf "$data/deps.tar.xz"; fi
if [ ! -d /tmp/fathom-shared/data ]; then mkdir -p /tmp/fathom-shared && tar -C /tmp/fathom-shared -xJf "$data/shared-data.tar.xz"; fi
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cmake -S . -B build/device-test -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_BENCH=OFF \
  -DFATHOM_DEPS_DIR="$deps" -DFATHOM_SHARED_DATA_DIR=/tmp/fathom-shared/data >/dev/null
cmake --build build/device-test --target fathom_tests >/dev/null
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  kernels='CudaOps.Attention:CudaOps.MoeExpertsMatchTheCpu:CudaOps.SwigluMatchesTheCpu:CudaOps.MatmulInputNormAndAccumulate'
  runs=("memcheck=$kernels:CudaOps.MatmulBatch:CudaOps.MlaCacheAppendMatchesTheCpu:CudaOps.Sample:CudaOps.MatmulPerHeadWithSideOps"
        "racecheck=CudaOps.Attention:CudaOps.MoeExpertsMatchTheCpu:CudaOps.MatmulInputNormAndAccumulate"
        "initcheck=CudaOps.Attention:CudaOps.MatmulInputNormAndAccumulate")
fi
limit=${FATHOM_SANITIZE_LIMIT:-150}
table="| tool | tests | result | seconds |"$'\n'"|---|---|---|---|"
rc=0
for r in "${runs[@]}"; do
  tool=${r%%=*} filter=${r#*=}
  t0=$(date +%s)
  set +e
  timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 9 build/device-test/fathom_tests \
    --gtest_filter="$filter" >"/tmp/sanitize-$tool.log" 2>&1
  code=$?
  set -e
  case $code in
    0) res="clean ($(grep -c '^\[       OK \]' "/tmp/sanitize-$tool.log") tests passed)" ;;
    124) res="not finished in ${limit} s"; rc=1 ;;
    *) res="FAILED (exit $code)"; rc=1; grep -E "=========|FAILED" "/tmp/sanitize-$tool.log" | head -20 ;;
  esac
  table+=$'\n'"| $tool | ${filter//:/, } | $res | $(($(date +%s) - t0)) |"
done
echo "$table" | tee "${OUT:-/tmp}/device-sanitize.txt"
exit $rc
