#!/usr/bin/env bash
# Cuts the tiled attention-backward kernels out of SRC (src/ops/cuda/attention_backward.cu) as
# they are now into OUT, the file attention_backward_emu.cpp includes: the shared definitions
# (kMaxD .. visible_keys), then the tiled section up to the path switch, its dynamic shared
# memory turned into the emulator's. Fails when the markers are no longer there.
#   bash scripts/kernel-emu/cut-attention-backward.sh SRC OUT
set -euo pipefail
src=$1 out=$2
awk '/^constexpr int kMaxD = 256/{on=1} on{print} /^__device__ inline int64_t visible_keys/{vk=1} vk && /^}/{exit}' "$src" >"$out.tmp"
awk '/^\/\/ ---- the tiled kernels/{on=1} /^AttentionBackwardPath g_path/{on=0} on' "$src" |
  sed 's|^  extern __shared__ float sm\[\];|  float* sm = emu_sm;|' >>"$out.tmp"
grep -q 'float\* sm = emu_sm;' "$out.tmp" || { echo "kernel-emu: could not cut the kernels out of $src" >&2; rm -f "$out.tmp"; exit 1; }
grep -q '^AttentionBackwardPath g_path' "$src" || { echo "kernel-emu: the end marker of the tiled kernels is gone from $src" >&2; rm -f "$out.tmp"; exit 1; }
mv "$out.tmp" "$out"
