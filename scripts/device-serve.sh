#!/usr/bin/env bash
# The serving engine on the GPU machine, in one command: builds fathom_tests and
# bench_serve_engine, runs the GPU tests of the model and the engine (paged caches = contiguous
# caches on CUDA, the CUDA engine = the CPU engine on fathom-mini), then bench_serve_engine:
#   - the 4.89B V3-shaped random model (bench/configs/v3-4.9b.json), bf16 and FP8, at 1, 8, 32
#     and 128 concurrent requests of 1,024-token prompts and 64 greedy tokens, against the
#     batch's decode roofline measured in the same run;
#   - the same with a random MTP module and --speculative (acceptance meaningless: random);
#   - fathom-mini (trained by fathom) with and without --speculative on text prompts: the MTP
#     acceptance of a trained module;
# and prints the tables last (also $OUT/device-serve.txt when OUT is set).
#
# Here first (the GPU machine has no registry and no ../shared):
#   bash scripts/device-serve.sh --prepare
# makes the git-ignored device-serve-data/ (build dependencies, the DeepSeek-V3 tokenizer, the
# v3-tiny config the random test models start from). The working tree travels too, with
# fathom-mini's weights; to stay under 64 MiB hide the training-reference gradients first:
#   bash scripts/device-serve.sh --hide     (and --restore after)
# Then there (carry ["device-serve-data"], and "device-bin" to use programs built here by
# scripts/device-pack.sh instead of building there):
#   bash scripts/device-serve.sh [--quick]
# --quick: bf16 only, 1, 8 and 32 concurrent, no fathom-mini run.
# --repeat: bf16 at 32 concurrent, then again with each kind of op twice: what each costs in a
#           decode step (bench_serve_engine --repeat), without a profiler.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-serve-data
grads=tests/data/train-reference/v3-tiny-mtp-grads.safetensors
case "${1:-}" in
  --prepare)
    [ -s device-test-data/deps.tar.xz ] || bash scripts/device-test.sh --prepare
    rm -rf "$data" && mkdir -p "$data/shared/data/fixtures/v3-tiny"
    cp device-test-data/deps.tar.xz "$data/"
    cp ../shared/data/fixtures/v3-tiny/config.json "$data/shared/data/fixtures/v3-tiny/"
    mkdir -p "$data/shared/data/deepseek-v3-tokenizer"
    cp ../shared/data/deepseek-v3-tokenizer/* "$data/shared/data/deepseek-v3-tokenizer/"
    tar -C "$data" -cf - shared | xz -T0 -9 > "$data/shared.tar.xz"
    rm -rf "$data/shared"
    # the reference fixtures the CUDA fixture cases read (device-gemv.sh --fixtures; ~26 MB: the
    # real-dimension FP8 one stays here), in the git-ignored device-data/
    mkdir -p device-data
    tar -C .. -cf - shared/data/fixtures/v3-tiny shared/data/fixtures/v2-lite-tiny shared/data/fixtures/v3-tiny-fp8 \
      shared/data/fixtures/v3-dense shared/data/fixtures/v3-tiny-mtp | xz -T0 -6 > device-data/fixtures.tar.xz
    echo "device-serve: $data and device-data/fixtures.tar.xz prepared ($(du -sh "$data" | cut -f1), $(du -sh device-data/fixtures.tar.xz | cut -f1))"
    exit 0 ;;
  --hide)
    git diff --quiet HEAD -- "$grads" || { echo "device-serve: $grads has changes; commit first" >&2; exit 1; }
    # skip-worktree: while hidden, `git add -A` / `commit -a` do not record the file as deleted
    # (that happened twice before)
    git update-index --skip-worktree "$grads"
    rm -f "$grads"
    echo "device-serve: $grads hidden ('--restore' brings it back)"
    exit 0 ;;
  --restore)
    git update-index --no-skip-worktree "$grads"
    git checkout -- "$grads"
    echo "device-serve: $grads restored"
    exit 0 ;;
esac
quick=0
[ "${1:-}" = "--quick" ] && quick=1
[ "${1:-}" = "--repeat" ] && quick=2
source scripts/device-serve-env.sh
serve_env device-serve
[ -s models/fathom-mini/model-00001-of-00003.safetensors ] ||
  { echo "device-serve: fathom-mini's weights did not travel (run 'bash scripts/device-room.sh restore' here)" >&2; exit 1; }
t0=$(date +%s)
serve_programs device-serve fathom_tests bench_serve_engine
t1=$(date +%s)
set +e
"$bin"/fathom_tests --gtest_filter='CudaOps.*:CudaModel.*:RandomModel.*:-CudaModel.MemoryBudgetErrors' \
  >/tmp/device-serve-tests.log 2>&1
trc=$?
set -e
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|actual" /tmp/device-serve-tests.log | head -30 || true
if [ "$trc" != 0 ]; then
  echo "device-serve: the GPU tests exited $trc; the end of their log:"
  tail -n 25 /tmp/device-serve-tests.log
fi
t2=$(date +%s)
bench="$bin"/bench_serve_engine
tok="$shared/deepseek-v3-tokenizer/tokenizer.json"
logs=()
run() {  # name, arguments...
  local name=$1
  shift
  echo "== bench_serve_engine $*"
  if timeout 420 "$bench" "$@" >"/tmp/serve-$name.log" 2>&1; then :; else echo "device-serve: $name failed:"; fi
  cat "/tmp/serve-$name.log"
  logs+=("/tmp/serve-$name.log")
}
if [ "$quick" = 1 ]; then
  run v3-bf16 --config v3-4.9b --dtype bf16 --tokenizer "$tok" --concurrency 1,8,32
elif [ "$quick" = 2 ]; then
  run v3-bf16-repeat --config v3-4.9b --dtype bf16 --tokenizer "$tok" --concurrency 32 --repeat
  sed -n '/each kind of op twice/,$p' /tmp/serve-v3-bf16-repeat.log
else
  # 128 requests take longer to prefill than 64 tokens to decode: 256 tokens each there, so that
  # all of them decode together for a while (the decode tok/s window)
  for v in "bf16 v3-bf16" "fp8 v3-fp8" "bf16 v3-bf16-mtp --mtp --speculative"; do
    set -- $v
    dt=$1 name=$2
    shift 2
    run "$name" --config v3-4.9b --dtype "$dt" --tokenizer "$tok" --concurrency 1,8,32 "$@"
    run "$name-128" --config v3-4.9b --dtype "$dt" --tokenizer "$tok" --concurrency 128 --gen 256 "$@"
  done
  run mini --model models/fathom-mini --text docs/serving.md --prompt 512 --gen 64 --concurrency 1,8,32
  run mini-mtp --model models/fathom-mini --text docs/serving.md --prompt 512 --gen 64 --concurrency 1,8,32 --speculative
fi
{
  echo
  echo "## device-serve $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo "build $((t1 - t0)) s; GPU tests (CudaOps.*, CudaModel.*, RandomModel.*) rc $trc in $((t2 - t1)) s: $(grep -E '^\[  PASSED|^\[  FAILED' /tmp/device-serve-tests.log | tr '\n' ' ')"
  grep -h "copy bandwidth" "${logs[@]}" | head -1 || true
  first=1
  for l in "${logs[@]}"; do
    if [ "$first" = 1 ]; then sed -n '/^model  /,$p' "$l"; first=0; else sed -n '/^model  /,$p' "$l" | tail -n +2; fi
  done
} | tee "${OUT:-/tmp}/device-serve.txt"
exit $trc
