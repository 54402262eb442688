#!/usr/bin/env bash
# Runs the tiled attention-backward kernels in the CPU emulation (attention_backward_emu.cpp):
# cuts the kernels out of src/ops/cuda/attention_backward.cu as they are now, builds, runs every
# case (or CASE, 0-based) with a TIMEOUT_S watchdog per block (default 20). About a minute on
# 2 cores once the release build's libraries are built; not part of CI. Prints one line per case and "ALL OK" when all match the CPU.
#   bash scripts/kernel-emu/run.sh [TIMEOUT_S [CASE]]
#   bash scripts/kernel-emu/run.sh mma [TIMEOUT_S]
# runs the tensor-core GEMV core (src/ops/cuda/mma_gemv.cuh, included as it is) in
# mma_gemv_emu.cpp instead: mma.sync emulated lane by lane, results against a double reference.
#   bash scripts/kernel-emu/run.sh mla [TIMEOUT_S [SEED]]
# runs the absorbed-MLA decode kernel (src/ops/cuda/attention_mla.cu) in mla_attention_emu.cpp:
# ldmatrix and mma.sync emulated lane by lane, results against cpu::attention.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "mla" ]; then
  shift
  out=${TMPDIR:-/tmp}/fathom-kernel-emu
  mkdir -p "$out"
  bash scripts/build.sh --target fathom_ops fathom_core >/dev/null
  g++ -O2 -std=c++20 -pthread -fno-strict-aliasing -Wno-unknown-pragmas -Isrc -Iinclude scripts/kernel-emu/mla_attention_emu.cpp \
    build/release/libfathom_ops.a build/release/libfathom_core.a -lopenblas -o "$out/mla_emu"
  exec "$out/mla_emu" "$@"
fi
if [ "${1:-}" = "mma" ]; then
  shift
  out=${TMPDIR:-/tmp}/fathom-kernel-emu
  mkdir -p "$out"
  g++ -O2 -std=c++20 -pthread -Isrc -Iinclude scripts/kernel-emu/mma_gemv_emu.cpp build/release/libfathom_core.a \
    -o "$out/mma_emu"
  exec "$out/mma_emu" "$@"
fi
src=src/ops/cuda/attention_backward.cu
out=${TMPDIR:-/tmp}/fathom-kernel-emu
mkdir -p "$out"
bash scripts/kernel-emu/cut-attention-backward.sh "$src" "$out/kernels.inc"
# the CPU reference is src/ops/cpu/backward.cpp itself, from the release build's libraries
# (scripts/build.sh; CUDA or not, the CPU ops are the same)
bash scripts/build.sh --target fathom_ops fathom_core >/dev/null
g++ -O2 -std=c++20 -pthread -Isrc -Iinclude -Itests -I"$out" scripts/kernel-emu/attention_backward_emu.cpp \
  build/release/libfathom_ops.a build/release/libfathom_core.a -lopenblas -o "$out/emu"
"$out/emu" "$@"
