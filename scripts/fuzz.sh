#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ (clang++, ASan + UBSan) into build/fuzz and runs each
# for SECONDS_PER_TARGET seconds (default 30) on a copy of its seed corpus in fuzz/corpus/
# (the repository is not modified). Exits non-zero when a target finds a crash, a leak, UB, a
# timeout or a failed check, printing the log tail and the path of the saved input, which is
# kept under build/fuzz/artifacts/<target>/ (replay it: build/fuzz/<target> <file>).
# Exits 0 with a message when clang++ or libFuzzer is not installed.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#   FATHOM_FUZZ_TARGETS="fuzz_tokenizer" scripts/fuzz.sh 60    # a subset
#   FATHOM_FUZZ_TOKENIZER=/path/to/tokenizer-dir                # for fuzz_tokenizer
set -uo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build/fuzz"
cxx="${FATHOM_FUZZ_CXX:-clang++}"

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "fuzz: SKIP: $cxx is not installed (scripts/setup.sh installs clang and libclang-rt-14-dev)"
  exit 0
fi
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
cat >"$probe/probe.cpp" <<'EOF'
#include <cstddef>
#include <cstdint>
extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }
EOF
if ! "$cxx" -fsanitize=fuzzer,address,undefined "$probe/probe.cpp" -o "$probe/probe" >"$probe/log" 2>&1; then
  echo "fuzz: SKIP: $cxx cannot link -fsanitize=fuzzer,address,undefined (is libclang-rt-14-dev installed?):"
  sed 's/^/  /' "$probe/log" | head -5
  exit 0
fi

# ---- build
start=$(date +%s)
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root/fuzz" -B "$build" "${generator[@]}" -DCMAKE_CXX_COMPILER="$cxx" >"$probe/cmake.log" 2>&1 || {
    cat "$probe/cmake.log"
    echo "fuzz: FAIL: configuring fuzz/ failed" >&2
    exit 1
  }
fi
jobs="$(nproc 2>/dev/null || echo 2)"
if ! cmake --build "$build" -j "$jobs" >"$probe/build.log" 2>&1; then
  tail -n 60 "$probe/build.log"
  echo "fuzz: FAIL: building the fuzz targets failed" >&2
  exit 1
fi
echo "fuzz: built in $(($(date +%s) - start)) s ($build)"

# ---- run: target, corpus dir, max_len
targets=(
  "fuzz_tokenizer tokenizer 4096"
  "fuzz_tokenizer_json tokenizer_json 16384"
  "fuzz_chat_template chat_template 16384"
  "fuzz_http_request http_request 8192"
)
only="${FATHOM_FUZZ_TARGETS:-}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
tokenizer_dir="${FATHOM_FUZZ_TOKENIZER:-$root/../shared/data/deepseek-v3-tokenizer}"
failed=0
for t in "${targets[@]}"; do
  read -r name corpus max_len <<<"$t"
  if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then continue; fi
  if [ "$name" = fuzz_tokenizer ] && [ ! -e "$tokenizer_dir/tokenizer.json" ]; then
    echo "fuzz: SKIP $name: no tokenizer at $tokenizer_dir (set FATHOM_FUZZ_TOKENIZER)"
    continue
  fi
  work="$(mktemp -d)"
  cp -r "$root/fuzz/corpus/$corpus" "$work/corpus"
  artifacts="$build/artifacts/$name"
  mkdir -p "$artifacts"
  t0=$(date +%s)
  FATHOM_FUZZ_TOKENIZER="$tokenizer_dir" "$build/$name" "$work/corpus" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$work/log" 2>&1
  rc=$?
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/log" | grep -o '[0-9]*$')"
  cov="$(grep -o 'cov: [0-9]*' "$work/log" | tail -n 1)"
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "fuzz: FAIL $name (exit $rc after $(($(date +%s) - t0)) s); log tail:"
    tail -n 80 "$work/log" | sed 's/^/  /'
    grep -o "Test unit written to .*" "$work/log" | sed 's/^/fuzz: /'
    cp "$work/log" "$artifacts/log.txt"
    echo "fuzz: replay: $build/$name <input>; full log: $artifacts/log.txt"
  else
    echo "fuzz: ok   $name: ${runs:-?} runs in $(($(date +%s) - t0)) s, ${cov:-cov: ?}, corpus $(ls "$work/corpus" | wc -l) inputs"
  fi
  rm -rf "$work"
done
echo "fuzz: total $(($(date +%s) - start)) s"
exit $failed
