"""The peer of bench_cuda_decode: HuggingFace transformers eager `generate` (greedy, batch 1)
on the same random-weight config, bf16 on the same GPU, in the same device run.
Used only to measure the peer; fathom never calls it.

usage: python3 bench/hf_peer_decode.py CONFIG.json [--prompt 128] [--decode 64]
prints: HF_PEER <config name> <decode tokens/s>
"""
import argparse
import json
import os
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    cls_name = cfg["architectures"][0]
    conf_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, cls_name)
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    conf = conf_cls(**fields)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_cls(conf)
    model.eval()
    ids = torch.tensor([[(i * 7919 + 11) % cfg["vocab_size"] for i in range(a.prompt)]], device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[1] == a.prompt + n
        return time.perf_counter() - t0

    run(4)  # warm-up
    t1 = run(1)  # prefill + one token
    tn = run(a.decode)
    tps = (a.decode - 1) / (tn - t1)
    print(f"HF_PEER {os.path.basename(a.config)[:-5]} {tps:.2f}", flush=True)


if __name__ == "__main__":
    main()
