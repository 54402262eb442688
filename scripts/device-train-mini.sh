#!/usr/bin/env bash
# Training fathom-mini (configs/fathom-mini/) on the GPU machine, in calls of at most 10 minutes
# on one warm machine (files stay between calls while it is held; $OUT brings back 8 files).
#
# Here, once (carry ["device-mini-data"] in every call after):
#   bash scripts/device-train-mini.sh --prepare
#     builds the corpus (scripts/make-mini-corpus.sh) and the 12,000-token tokenizer, and packs
#     corpus.tar.xz, the tokenizer and the build dependencies into device-mini-data/.
# There:
#   bash scripts/device-train-mini.sh start MINUTES   build, run the GPU training tests, prepare the
#        shards, write the random F32 model (MTP sharing the embedding and head), time 20 steps to
#        size the run so that it ends in MINUTES of training (the cosine schedule then completes),
#        train for what is left of the call's 10 minutes
#     With a checkpoint folder (carried in by an earlier call of the same machine, e.g. an
#     ignored device-mini-ckpt/ holding what `export` brought back), training goes on from its
#     weights with fresh moments and a peak learning rate of 1e-3 instead of starting at random.
#   bash scripts/device-train-mini.sh resume [MINUTES]  train on (--resume) for up to MINUTES (9)
#   bash scripts/device-train-mini.sh export          the last pretraining checkpoint as FP8 shards
#        into $OUT, for a later session's `start MINUTES DIR`
#   bash scripts/device-train-mini.sh bench           build, test, and time the training step of
#        fathom-mini's shape and of the ~0.5B MoE at T = 2,048 (bench_train), in F32 and the
#        0.5B also in mixed precision, each under a time limit
#   bash scripts/device-train-mini.sh profile [LAUNCHES [ARGS...]]   (build and test unless built)
#        the GPU time per kernel of that batched step or of bench_train ARGS (ncu;
#        scripts/ncu-kernel-table.py)
#   bash scripts/device-train-mini.sh sft             the supervised stage (scripts/make-sft-data.py:
#        600 chat examples answered from the docs), 60 steps (about two epochs) from the last
#        checkpoint: the first run's 150 steps at 3e-4 overfitted them (bench/RESULTS.md)
#   bash scripts/device-train-mini.sh finish          validation loss (BF16 and FP8 copies),
#        n-gram baselines, MTP acceptance, greedy text on the CPU and the GPU; the FP8 checkpoint
#        in 16 MiB shards, eval.json and both stages' logs into $OUT (8 files; draw the curves
#        here with `fathom train-plot --log log.jsonl`)
# The working tree and the carried folder must stay under 64 MiB: run `bash scripts/device-room.sh
# hide` here first (the shipped fathom-mini weights do not travel) and `restore` after.
set -euo pipefail
cd "$(dirname "$0")/.."
data=device-mini-data
work=build/mini
if [ "${1:-}" = "--prepare" ]; then
  fathom=${2:-build/fathom}
  rm -rf "$data" && mkdir -p "$data"
  [ -s "$work-corpus/corpus.tar.xz" ] || bash scripts/make-mini-corpus.sh "$work-corpus"
  cp "$work-corpus/corpus.tar.xz" "$work-corpus/manifest.json" "$data/"
  "$fathom" tokenizer train -q "$work-corpus/text" -o "$data/tokenizer" --vocab-size 12000
  [ -s device-test-data/deps.tar.xz ] || bash scripts/device-test.sh --prepare
  cp device-test-data/deps.tar.xz "$data/"
  # the two fixtures the GPU training tests read (the start stage runs them before it trains)
  tar -C ../shared -cJf "$data/train-fixtures.tar.xz" data/fixtures/v3-tiny/config.json \
    data/fixtures/v3-tiny/model.safetensors data/fixtures/v3-tiny-mtp/config.json data/fixtures/v3-tiny-mtp/model.safetensors
  echo "device-train-mini: $data prepared ($(du -sh "$data" | cut -f1)); carry [\"$data\"]"
  exit 0
fi
stage=${1:-}
deps=/tmp/fathom-deps
if [ ! -d "$deps/lib" ]; then mkdir -p "$deps" && tar -C "$deps" -xJf "$data/deps.tar.xz"; fi
export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
F=build/device-mini/fathom
# Builds fathom, its tests and bench_train, then runs the GPU training tests (the matmuls, the
# optimizer on the device, a GPU run against the CPU's, a resumed GPU run): a broken step must not
# cost the session's training time.
build_and_test() {
  rm -rf /tmp/fathom-shared && mkdir -p /tmp/fathom-shared && tar -C /tmp/fathom-shared -xJf "$data/train-fixtures.tar.xz"
  cmake -S . -B build/device-mini -G Ninja -DCMAKE_BUILD_TYPE=Release -DFATHOM_TESTS=ON -DFATHOM_BENCH=ON \
    -DFATHOM_DEPS_DIR="$deps" -DFATHOM_SHARED_DATA_DIR=/tmp/fathom-shared/data >/dev/null
  cmake --build build/device-mini --target fathom fathom_tests bench_train >/dev/null
  echo "device-train-mini: built in $SECONDS s"
  timeout 300 build/device-mini/fathom_tests --gtest_brief=1 \
    --gtest_filter='CudaOps.Matmul*:CudaOps.Attention*:CudaBackward.Attention*:CudaBackward.Bf16Matmuls:CudaBackward.Matmul:CudaBackward.OptimizerPasses:Trainer.TrainsOnTheGpu*:Trainer.AGpuRunResumesWithItsOptimizerState'
}
case "$stage" in
  start)
    minutes=${2:?usage: device-train-mini.sh start MINUTES [CHECKPOINT]}
    from=${3:-}
    [ -z "$from" ] || [ -f "$from/config.json" ] || { echo "device-train-mini: $from has no config.json (carry it in an earlier call)" >&2; exit 1; }
    build_and_test
    echo "device-train-mini: built and tested in $SECONDS s"
    rm -rf "$work" && mkdir -p "$work/corpus"
    tar -C "$work/corpus" -xJf "$data/corpus.tar.xz"
    "$F" data prepare -q "$work/corpus/text" --tokenizer "$data/tokenizer" -o "$work/data" --val-fraction 0.02
    if [ -n "$from" ]; then
      # going on from an earlier session's weights (`export`): fresh AdamW moments, half the peak
      cp -r "$from" "$work/init" && cp "$data"/tokenizer/* "$work/init/"
      peak=1e-3
    else
      "$F" init-random --config configs/fathom-mini/config.json --out "$work/init" --dtype f32 --seed 1 \
        --tokenizer "$data/tokenizer" --mtp-shared-embeddings >/dev/null
      peak=
    fi
    # 20 steps to measure the step time, then the run sized to the minutes asked for
    python3 - "$work" 20 <<'PY'
import json, os, sys
w, steps = sys.argv[1], int(sys.argv[2])
c = json.load(open("configs/fathom-mini/train.json"))
c.update({"model": os.path.abspath(f"{w}/init"), "data": os.path.abspath(f"{w}/data")})  # (relative: to the config's folder)
c.update({"out": os.path.abspath(f"{w}/calibrate"), "steps": steps, "eval_every": 0, "checkpoint_every": 0,
          "lr": {"schedule": "constant", "peak": 1e-4}})
json.dump(c, open(f"{w}/calibrate.json", "w"), indent=1)
PY
    "$F" train -q --config "$work/calibrate.json" >/dev/null
    python3 - "$work" "$minutes" "$peak" <<'PY'
import json, os, sys
w, minutes, peak = sys.argv[1], float(sys.argv[2]), sys.argv[3]
lines = [json.loads(l) for l in open(f"{w}/calibrate/log.jsonl")]
tps = sorted(l["tokens_per_s"] for l in lines[5:])[len(lines[5:]) // 2]  # median, after warm-up
c = json.load(open("configs/fathom-mini/train.json"))
c.update({"model": os.path.abspath(f"{w}/init"), "data": os.path.abspath(f"{w}/data"), "out": os.path.abspath(f"{w}/run")})
per_step = c["batch"] * c["seq_len"]
steps = max(200, int(minutes * 60 * tps / per_step * 0.9))  # evaluation and checkpoints take the rest
c["steps"] = steps
c["lr"]["warmup"] = min(c["lr"]["warmup"], steps // 10)
if peak:
    c["lr"]["peak"] = float(peak)
    c["lr"]["min"] = min(c["lr"]["min"], float(peak) / 10)
json.dump(c, open(f"{w}/train.json", "w"), indent=1)
print(f"device-train-mini: {tps:.0f} tokens/s -> {steps} steps of {per_step} tokens ({steps * per_step / 1e6:.1f}M tokens)")
PY
    # what is left of this call's 10 minutes, less a margin for the last step and its checkpoint
    left=$(python3 -c "print(max(0.5, (560 - $SECONDS) / 60))")
    echo "device-train-mini: training for $left minutes in this call"
    "$F" train -q --config "$work/train.json" --max-minutes "$left" ;;
  bench)
    # the training step of fathom-mini's shape (random weights): one window per pass against the
    # batch of 16 in one pass, as fathom train runs it (bench_train; tokens/s and MFU)
    build_and_test
    # fathom-mini's shape, then the issue's ~0.5B MoE at T = 2,048 (bench_train's default config),
    # in F32, the 0.5B also in mixed precision (tensor cores)
    for args in "--config configs/fathom-mini/config.json --seq 512 --batch 16" "--seq 2048" "--seq 2048 --bf16"; do
      echo "bench_train $args ($SECONDS s):"
      run=$((${run:-0} + 1))
      # shellcheck disable=SC2086
      timeout 150 build/device-mini/bench_train $args --steps 3 --dir "/tmp/bench-mini-$run" | grep -E "^\| (GPU|whole)" ||
        echo "  failed or timed out"
    done ;;
  profile)
    # GPU time per kernel (ncu; the machine has no nsys) of the first LAUNCHES kernels of
    # bench_train ARGS --steps 1 (its warm-up step, then the measured one): by default fathom-mini's
    # batched step, 3,000 launches (about one step); the 0.5B at T = 2,048 needs ~9,000.
    #   device-train-mini.sh profile [LAUNCHES [bench_train args...]]
    launches=${2:-3000}
    shift $(($# < 2 ? $# : 2))
    args=("$@")
    [ ${#args[@]} -gt 0 ] || args=(--config configs/fathom-mini/config.json --seq 512 --batch 16)
    [ -x build/device-mini/bench_train ] || build_and_test
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
    timeout 400 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --launch-count "$launches" \
      build/device-mini/bench_train "${args[@]}" --steps 1 --dir /tmp/bench-profile >/tmp/ncu.csv 2>/tmp/ncu.err ||
      { tail -5 /tmp/ncu.err; exit 1; }
    python3 scripts/ncu-kernel-table.py /tmp/ncu.csv --top 24 ;;
  export)
    # the last pretraining checkpoint as FP8 in 16 MiB shards (41.6 MiB; BF16 would be 65.5 MiB,
    # more than one call brings back or carries in beside the working tree), for `start MINUTES
    # DIR` in a later session: the F32 masters and AdamW's moments (411 MB) cannot leave the
    # machine. FP8 with 128x128 scales changed the first run's validation loss by under 1e-4.
    ckpt=$(ls -d "$work"/run/checkpoints/step-* | sort | tail -1)
    rm -rf "$work/export" && "$F" convert --model "$ckpt" -o "$work/export" --dtype fp8 --shard-mb 16
    if [ -n "${OUT:-}" ]; then cp "$work"/export/*.safetensors "$work"/export/*.json "$OUT/"; fi
    ls -la "$work/export" ;;
  resume)
    "$F" train -q --config "$work/train.json" --resume --max-minutes "${2:-9}" ;;
  sft)
    # the supervised stage: chat examples answered from the docs (scripts/make-sft-data.py),
    # rendered with the chat template, a few epochs from the last pretraining checkpoint
    python3 scripts/make-sft-data.py "$work/corpus/text" "$work/sft.jsonl" --max 600
    rm -rf "$work/sft-data"
    "$F" data prepare -q --chat "$work/sft.jsonl" --tokenizer "$data/tokenizer" -o "$work/sft-data" --val-fraction 0.05
    python3 - "$work" <<'PY'
import glob, json, os, sys
w = sys.argv[1]
c = json.load(open(f"{w}/train.json"))
c.update({"model": os.path.abspath(sorted(glob.glob(f"{w}/run/checkpoints/step-*"))[-1]),
          "data": os.path.abspath(f"{w}/sft-data"), "out": os.path.abspath(f"{w}/sft"),
          "steps": 60, "batch": 8, "seq_len": 256, "eval_every": 20, "eval_batches": 4, "checkpoint_every": 0,
          "lr": {"schedule": "cosine", "peak": 2e-4, "min": 2e-5, "warmup": 6}})
json.dump(c, open(f"{w}/sft.json", "w"), indent=1)
PY
    "$F" train -q --config "$work/sft.json" --max-minutes 8 ;;
  finish)
    run=run
    [ -d "$work/sft/checkpoints" ] && run=sft  # the supervised stage's model when it ran
    ckpt=$(ls -d "$work/$run"/checkpoints/step-* | sort | tail -1)
    rm -rf "$work/fp8" "$work/bf16"
    "$F" convert --model "$ckpt" -o "$work/fp8" --dtype fp8 --shard-mb 16
    "$F" convert --model "$ckpt" -o "$work/bf16" --dtype bf16 --shard-mb 0
    for f in tokenizer.json tokenizer_config.json; do cp "$data/tokenizer/$f" "$work/fp8/"; cp "$data/tokenizer/$f" "$work/bf16/"; done
    "$F" eval --model "$work/bf16" --data "$work/data" --seq-len 512 --baselines --mtp-prompts 32 --json --device cuda \
      --precision fp32 | tee "$work/eval-bf16.json"
    "$F" eval --model "$work/fp8" --data "$work/data" --seq-len 512 --json --device cuda --precision fp32 | tee "$work/eval-fp8.json"
    # greedy generation of the FP8 model on the CPU and on the GPU (F32 activations on both)
    agree=0 n=0
    for p in "The list type in Python" "To create a new branch in Git," "The Linux kernel"; do
      "$F" generate --model "$work/fp8" --device cpu --precision fp32 --temperature 0 --prompt "$p" --max-tokens 48 >"$work/g-cpu.txt" 2>/dev/null
      "$F" generate --model "$work/fp8" --device cuda --precision fp32 --temperature 0 --prompt "$p" --max-tokens 48 >"$work/g-cuda.txt" 2>/dev/null
      n=$((n + 1))
      cmp -s "$work/g-cpu.txt" "$work/g-cuda.txt" && agree=$((agree + 1))
      printf 'prompt: %s\n  cpu:  %s\n  cuda: %s\n' "$p" "$(cat "$work/g-cpu.txt")" "$(cat "$work/g-cuda.txt")"
    done
    echo "$agree/$n" >"$work/greedy-agree.txt"
    if [ -n "${OUT:-}" ]; then
      cp "$work"/fp8/model-*.safetensors "$work/fp8/model.safetensors.index.json" "$work/fp8/config.json" "$OUT/"
      cp "$work/run/log.jsonl" "$OUT/"
      # the GPU machine has no gnuplot: `fathom train-plot --log log.jsonl` draws the curves here
      if [ -f "$work/sft/log.jsonl" ]; then cp "$work/sft/log.jsonl" "$OUT/sft-log.jsonl"; fi
      python3 - "$work" "$OUT" <<'PY'
import json, os, sys
w, out = sys.argv[1], sys.argv[2]
e = {"bf16": json.load(open(f"{w}/eval-bf16.json")), "fp8": json.load(open(f"{w}/eval-fp8.json"))}
json.dump(e, open(f"{out}/eval.json", "w"), indent=1)
PY
    fi
    python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
b, f = json.load(open(f"{w}/eval-bf16.json")), json.load(open(f"{w}/eval-fp8.json"))
print("| measure | value |\n|---|---|")
print(f"| validation loss, BF16 weights | {b['loss']:.4f} (perplexity {b['perplexity']:.1f}) |")
print(f"| validation loss, FP8 weights | {f['loss']:.4f} ({100 * (f['loss'] / b['loss'] - 1):+.2f}%) |")
print(f"| unigram / bigram baseline | {b['unigram_loss']:.4f} / {b['bigram_loss']:.4f} |")
print(f"| MTP greedy acceptance | {100 * b['mtp_acceptance']:.1f}% of {b['mtp_drafts']} drafts |")
print(f"| greedy generation, CPU = CUDA (48 tokens, FP8 weights) | {open(f'{w}/greedy-agree.txt').read().strip()} prompts |")
for stage in ("run", "sft"):
    try:
        log = [json.loads(l) for l in open(f"{w}/{stage}/log.jsonl")]
    except OSError:
        continue
    vals = [l["val_loss"] for l in log if "val_loss" in l]
    print(f"| {stage}: steps, first / last train loss, last val loss | {log[-1]['step']}, {log[0]['loss']:.4f} / "
          f"{log[-1]['loss']:.4f}, {vals[-1] if vals else float('nan'):.4f} |")
PY
    ;;
  *)
    echo "usage: $0 --prepare | start MINUTES [CHECKPOINT] | resume [MINUTES] | export | sft | finish | bench | profile" >&2
    exit 2 ;;
esac
