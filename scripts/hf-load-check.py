#!/usr/bin/env python3
"""Loads a fathom checkpoint with HuggingFace transformers and compares it with fathom's own output.

Run by scripts/device-hf-check.sh on the GPU machine (PyTorch + transformers live there, never in
fathom). The reference folder holds what fathom computed here on the CPU for the same checkpoint:
  input_ids.safetensors   I64 [1, T]        a held-out paragraph, tokenized by fathom
  logits.safetensors      F32 [1, T, V]     `fathom logits` (FP8 weights dequantized, F32 compute)
  greedy.json             {"text", "text_ids": fathom's ids of the whole text, "prompt": ids,
                          "tokens": `fathom generate --input-ids` greedy continuation of prompt}
Three loads of the checkpoint, each reported on its own line (one failing does not hide the rest):
  fp8        from_pretrained as it is: transformers' fine-grained FP8 path (W8A8: FP8 weights with
             their 128x128 scales, activations quantized per 1x128 group at run time); its matmul
             comes from the `kernels` package, so without it only the load is checked
  dequant32  from_pretrained with FineGrainedFP8Config(dequantize=True) in F32: the same arithmetic
             as fathom's CPU path, so the logits must agree closely
  tokenizer  AutoTokenizer on the checkpoint folder: the same ids as fathom's tokenizer
Prints a table last; exits non-zero when a check fails.
"""
import json
import sys
import time
import traceback

import torch
from safetensors.torch import load_file


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def greedy(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    from transformers import GenerationConfig
    # plain greedy: not the checkpoint's generation_config.json (sampling, repetition penalty)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1,
                           repetition_penalty=1.0, pad_token_id=0)
    out = model.generate(ids, generation_config=cfg)
    return out[0, len(prompt):].tolist()


def main():
    model_dir, ref_dir = sys.argv[1], sys.argv[2]
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"hf-check: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    ids = load_file(f"{ref_dir}/input_ids.safetensors")["input_ids"].cuda()
    ref = load_file(f"{ref_dir}/logits.safetensors")["logits"].cuda().float()
    g = json.load(open(f"{ref_dir}/greedy.json"))
    rows = []  # (check, result, detail, passed)

    def attempt(name, fn):
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # report and go on: one failing load must not hide the others
            traceback.print_exc()
            rows.append((name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}", False))
        print(f"hf-check: {name} done in {time.time() - t0:.1f} s", flush=True)

    def compare(name, model, bound):
        with torch.no_grad():
            out = model(ids).logits.float()
        assert out.shape == ref.shape, f"logits shape {tuple(out.shape)} != fathom's {tuple(ref.shape)}"
        assert torch.isfinite(out).all(), "non-finite logits"
        e = rel_err(out, ref)
        top1 = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        rows.append((f"{name} logits", f"rel {e:.2e}", f"top-1 agreement {top1:.1%}, bound rel < {bound:g}",
                     e < bound))
        want = g["tokens"]
        eos = model.config.eos_token_id
        if eos in want:  # fathom's greedy continuation runs past the end of text; generate stops there
            want = want[:want.index(eos) + 1]
        toks = greedy(model, g["prompt"], len(want))[:len(want)]
        same = 0
        while same < len(toks) and toks[same] == want[same]:
            same += 1
        rows.append((f"{name} greedy", f"{same}/{len(want)}", "tokens equal to fathom's, from the first",
                     same == len(want) if name == "dequant32" else same >= 8))

    def fp8():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        kinds = sorted({type(x).__name__ for x in m.modules() if "Linear" in type(x).__name__})
        w = m.model.layers[1].self_attn.o_proj.weight
        print(f"hf-check: fp8 load: linear kinds {kinds}, o_proj weight {w.dtype}", flush=True)
        assert w.dtype == torch.float8_e4m3fn, f"o_proj weight loaded as {w.dtype}, not FP8"
        rows.append(("fp8 load", "ok", f"{', '.join(kinds)}; weights stay float8_e4m3fn", True))
        try:
            compare("fp8", m, 5e-2)
        except ImportError as e:  # its W8A8 matmul comes from the `kernels` package (a hub download)
            if "kernels" not in str(e):
                raise
            rows.append(("fp8 forward", "not run", "transformers' FP8 matmul needs the `kernels` package, "
                         "which this machine lacks (no registry)", None))

    def dequant32():
        from transformers import FineGrainedFP8Config
        m = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32,
            quantization_config=FineGrainedFP8Config(dequantize=True)).cuda().eval()
        rows.append(("dequant32 load", "ok", "FineGrainedFP8Config(dequantize=True), F32", True))
        compare("dequant32", m, 1e-3)

    def tokenizer():
        tok = AutoTokenizer.from_pretrained(model_dir)
        mine = g["text_ids"]
        theirs = tok(g["text"], add_special_tokens=False)["input_ids"]
        rows.append(("tokenizer", "same ids" if theirs == mine else "DIFFERENT",
                     f"{len(mine)} ids of the held-out text", theirs == mine))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    attempt("tokenizer", tokenizer)
    attempt("dequant32", dequant32)
    attempt("fp8", fp8)
    print("\n| check | result | detail | pass |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {'-' if r[3] is None else 'yes' if r[3] else 'NO'} |")
    sys.exit(0 if rows and all(r[3] is not False for r in rows) else 1)


if __name__ == "__main__":
    main()
