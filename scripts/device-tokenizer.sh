#!/usr/bin/env bash
# The tokenizer benchmark on the GPU machine, against HuggingFace `tokenizers` (Rust) there.
#
# Here, once (copies the inputs into the git-ignored device-data/, which the run must carry):
#   scripts/device-tokenizer.sh --prepare
# There, from the repository root (device run with carry: ["device-data"]):
#   bash scripts/device-tokenizer.sh [bench_tokenizer options]
# Configures build/device with -DFATHOM_TESTS=OFF, builds bench_tokenizer, runs it on
# device-data/tokenizer-corpus.txt with device-data/deepseek-v3-tokenizer/ and the HF peer
# (bench/tokenizer_peer_hf.py; single thread and encode_batch) at 1, 2, 4, ... and nproc
# threads. The output is also written to $OUT/bench-tokenizer.txt when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-data
corpus="$data/tokenizer-corpus.txt"
tokenizer="$data/deepseek-v3-tokenizer"

if [ "${1:-}" = "--prepare" ]; then
  [ -s bench-models/tokenizer-corpus.txt ] || scripts/make-tokenizer-corpus.sh bench-models/tokenizer-corpus.txt
  mkdir -p "$tokenizer"
  install -m 644 bench-models/tokenizer-corpus.txt bench-models/tokenizer-corpus.txt.sha256 "$data/"
  install -m 644 ../shared/data/deepseek-v3-tokenizer/tokenizer.json ../shared/data/deepseek-v3-tokenizer/tokenizer_config.json "$tokenizer/"
  # The GPU machine has no package registry: carry the two build dependencies the tokenizer
  # needs (nlohmann-json headers, PCRE2 header + static library) from this Debian machine.
  mkdir -p "$data/deps/include" "$data/deps/lib"
  cp -r /usr/include/nlohmann "$data/deps/include/"
  install -m 644 /usr/include/pcre2.h "$data/deps/include/"
  install -m 644 "$(find /usr/lib -name libpcre2-8.a | head -1)" "$data/deps/lib/"
  echo "device-tokenizer: $data/ prepared ($(du -sh "$data" | cut -f1)); run 'bash scripts/device-tokenizer.sh' there with carry [\"$data\"]"
  exit 0
fi

# ---- what the build and the peer need; say clearly what is missing
missing=()
for tool in g++ python3; do
  command -v "$tool" >/dev/null || missing+=("the program '$tool'")
done
[ -f "$data/deps/include/pcre2.h" ] && [ -f "$data/deps/lib/libpcre2-8.a" ] && [ -f "$data/deps/include/nlohmann/json.hpp" ] \
  || missing+=("the carried build dependencies $data/deps (run 'scripts/device-tokenizer.sh --prepare' here)")
if command -v python3 >/dev/null && ! python3 -c 'import tokenizers' 2>/dev/null; then
  missing+=("the Python module 'tokenizers' for python3 ($(command -v python3))")
fi
[ -s "$corpus" ] || missing+=("the corpus $corpus (run 'scripts/device-tokenizer.sh --prepare' here and carry device-data)")
[ -s "$tokenizer/tokenizer.json" ] || missing+=("the tokenizer $tokenizer/tokenizer.json (likewise)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "device-tokenizer: cannot run; missing on this machine:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi

# 1, 2, 4, ... and nproc (the CPUs this process may use, not the host's)
n=$(nproc)
threads=1
for ((t = 2; t < n; t *= 2)); do threads="$threads,$t"; done
[ "$n" -gt 1 ] && threads="$threads,$n"

echo "device-tokenizer: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), python3 $(python3 -c 'import sys, tokenizers; print(sys.version.split()[0], "tokenizers", tokenizers.__version__)')"
# The benchmark needs only core + tokenizer: build it directly (the full CMake build also wants
# CLI11 and OpenBLAS, which that machine lacks), with the flags of the Release build.
mkdir -p build/device/obj
flags=(-std=c++20 -O3 -march=native -DNDEBUG -Isrc -Iinclude -I"$data/deps/include" -DFATHOM_SOURCE_DIR="\"$PWD\"")
objs=()
for src in src/core/error.cpp src/core/files.cpp src/core/thread_pool.cpp src/tokenizer/*.cpp bench/bench_tokenizer.cpp; do
  obj="build/device/obj/$(basename "${src%.cpp}").o"
  objs+=("$obj")
  g++ "${flags[@]}" -c "$src" -o "$obj" &
done
wait
g++ "${objs[@]}" "$data/deps/lib/libpcre2-8.a" -lpthread -o build/device/bench_tokenizer

log=/dev/null
if [ -n "${OUT:-}" ]; then log="$OUT/bench-tokenizer.txt"; fi
build/device/bench_tokenizer --tokenizer "$tokenizer" --corpus "$corpus" --threads "$threads" \
  --peer-js none --peer-hf "python3 bench/tokenizer_peer_hf.py" "$@" 2>&1 | tee "$log"
