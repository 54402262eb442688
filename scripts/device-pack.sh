#!/usr/bin/env bash
# Builds, here, the programs a GPU-machine script runs, for any x86-64 (no -march=native) and
# sm_90a only, and packs them into the git-ignored device-bin/ (bin.tar.xz, ~6 MB for the three
# below). The device scripts (device-gemv.sh, device-serve.sh) use device-bin/ instead of
# building there when it is carried — carry ["device-serve-data", "device-bin"] — because a full
# build on the GPU machine's file system outran two 10-minute calls (2026-11-30). The reference
# data the tests read is compiled in as /tmp/fathom-serve/shared/data, where those scripts unpack
# device-serve-data. Hide the training-reference gradients first (`bash scripts/device-serve.sh
# --hide`, `--restore` after): the working tree with fathom-mini's weights, device-serve-data and
# the three programs then come to ~64.4 MB, under the 64 MiB a call carries.
# Pack `fathom` too for the tests that run the program (CudaCli.*, the CLI tests): the device
# scripts then point them at it (FATHOM_TEST_BINARY).
#   bash scripts/device-pack.sh [TARGET...]   (default: fathom_tests bench_cuda_decode bench_serve_engine)
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fathom_tests bench_cuda_decode bench_serve_engine)
cmake -S . -B build/devbin -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_BENCH=ON -DFATHOM_TESTS=ON -DFATHOM_NATIVE=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90a -DFATHOM_SHARED_DATA_DIR=/tmp/fathom-serve/shared/data >/dev/null
ninja -C build/devbin "${targets[@]}" >/tmp/device-pack-ninja.log 2>&1 || {
  grep -E "error|FAILED" /tmp/device-pack-ninja.log | head -20 >&2
  echo "device-pack: the build failed (log: /tmp/device-pack-ninja.log); nothing packed" >&2
  exit 1
}
rm -rf device-bin && mkdir -p device-bin
tar -C build/devbin -cf - "${targets[@]}" | xz -T0 -9 >device-bin/bin.tar.xz  # -9: a 64 MiB window sees the three programs' shared CUDA code
echo "device-pack: ${targets[*]} packed ($(du -sh device-bin | cut -f1)) from commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests bench || echo ' + changes'); carry [\"device-serve-data\", \"device-bin\"]"
