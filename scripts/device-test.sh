#!/usr/bin/env bash
# Every test on the GPU machine, in one command.
#
# That machine has no package registry and does not get ../shared, so first, here:
#   bash scripts/device-test.sh --prepare
# packs the build dependencies from this Debian machine (headers; static PCRE2 and GoogleTest;
# OpenBLAS with its Fortran runtime) and the reference data into the git-ignored
# device-test-data/ (under the 64 MiB a run may carry). Then there (carry ["device-test-data"]):
#   bash scripts/device-test.sh [ctest arguments]
# configures build/device-test with -DFATHOM_DEPS_DIR, builds, runs ctest on all cores, then
# scripts/device-sanitize.sh (compute-sanitizer on the CUDA op tests of the trickier kernels), and
# prints a summary table last (also written to $OUT/device-test.txt when OUT is set).
# The working tree and the carried folder must stay under 64 MiB: run `bash scripts/device-room.sh
# hide` here first (the shipped fathom-mini weights do not travel) and `restore` after.
# FATHOM_NO_SANITIZER=1 skips the sanitizer runs.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-test-data

if [ "${1:-}" = "--prepare" ]; then
  rm -rf "$data" && mkdir -p "$data/stage/include" "$data/stage/lib"
  inc="$data/stage/include" lib="$data/stage/lib"
  cp -r /usr/include/nlohmann /usr/include/CLI /usr/include/gtest /usr/include/gmock "$inc/"
  cp /usr/include/pcre2.h "$inc/"
  cp /usr/include/x86_64-linux-gnu/openblas-pthread/*.h "$inc/"
  for a in libpcre2-8.a libgtest.a libgtest_main.a libgmock.a libgmock_main.a; do
    cp "$(find /usr/lib -name "$a" | head -1)" "$lib/"
  done
  cp -L /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 "$lib/"
  ln -s libopenblas.so.0 "$lib/libopenblas.so"
  cp -L /usr/lib/x86_64-linux-gnu/libgfortran.so.5 /usr/lib/x86_64-linux-gnu/libquadmath.so.0 "$lib/"
  tar -C "$data/stage" -cJf "$data/deps.tar.xz" include lib
  rm -rf "$data/stage"
  tar -C ../shared -cf - data | xz -T0 -6 > "$data/shared-data.tar.xz"
  echo "device-test: $data prepared ($(du -sh "$data" | cut -f1)); run 'bash scripts/device-test.sh' there with carry [\"$data\"]"
  exit 0
fi

for f in deps.tar.xz shared-data.tar.xz; do
  [ -s "$data/$f" ] || { echo "device-test: $data/$f is missing: run 'bash scripts/device-test.sh --prepare' here and carry $data" >&2; exit 1; }
done
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || { echo "device-test: the program '$tool' is missing" >&2; exit 1; }
done
deps=/tmp/fathom-deps
rm -rf "$deps" /tmp/fathom-shared && mkdir -p "$deps" /tmp/fathom-shared
tar -C "$deps" -xJf "$data/deps.tar.xz"
tar -C /tmp/fathom-shared -xJf "$data/shared-data.tar.xz"
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "device-test: $(nproc) CPUs, $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU'), $(nvcc --version 2>/dev/null | tail -1)"
t0=$(date +%s)
cmake -S . -B build/device-test -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_BENCH=OFF \
  -DFATHOM_DEPS_DIR="$deps" -DFATHOM_SHARED_DATA_DIR=/tmp/fathom-shared/data >/dev/null
cmake --build build/device-test 2>&1 | grep -E "warning|error|FAILED" || true
cmake --build build/device-test >/dev/null
t1=$(date +%s)
log=/tmp/device-test.log
set +e
ctest --test-dir build/device-test -j "$(nproc)" --output-on-failure "$@" >"$log" 2>&1
rc=$?
set -e
t2=$(date +%s)
# The CUDA op tests of the kernels with shared-memory reductions, last-block merges and cp.async
# pipelines once more under compute-sanitizer (scripts/device-sanitize.sh: memcheck, racecheck,
# initcheck, each under a time limit).
san="not run (no compute-sanitizer)"
if [ -n "${FATHOM_NO_SANITIZER:-}" ]; then
  san="skipped (FATHOM_NO_SANITIZER)"
elif command -v compute-sanitizer >/dev/null && [ -x build/device-test/fathom_tests ]; then
  if bash scripts/device-sanitize.sh >/tmp/device-sanitize.out 2>&1; then san="clean"; else san="FAILED or unfinished"; rc=1; fi
  tail -6 /tmp/device-sanitize.out
fi
grep -E "tests passed|tests failed|\(Failed\)|\(Timeout\)|\(Skipped\)" "$log" | head -40
summary=$(grep -E "tests passed" "$log" || echo "ctest did not finish")
{
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  echo "| build (Release, all targets but benchmarks) | ok | $((t1 - t0)) |"
  echo "| ctest -j$(nproc) | $summary | $((t2 - t1)) |"
  echo "| compute-sanitizer (scripts/device-sanitize.sh) | $san | $(($(date +%s) - t2)) |"
} | tee "${OUT:-/tmp}/device-test.txt"
exit $rc
