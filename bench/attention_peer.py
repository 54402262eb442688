"""The peers of bench_flash_attention: PyTorch's scaled_dot_product_attention with the cuDNN and
the FlashAttention backends on the same shapes (bf16, (B, H, S, D) layout), causal forward and
forward + backward, in the same device run. Used only on the GPU machine as a reference; never
part of fathom.

usage: python3 bench/attention_peer.py [--full] [--shape B,H,S,Dqk,Dv]
Prints one line per case: "<backend> <fwd|fwdbwd> <causal|full> B H S Dqk Dv <TFLOP/s>"
(or "... n/a <reason>"). FLOPs: 2·S²·(Dqk + Dv) per (batch, head) forward, 3.5× that forward +
backward, halved when causal.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peer_timing import seconds_per_call

SHAPES = [(4, 16, 4096, 128, 128), (1, 16, 16384, 128, 128), (8, 16, 2048, 64, 64), (4, 16, 4096, 192, 128)]
BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]


def main():
    full = "--full" in sys.argv
    shapes = SHAPES
    if "--shape" in sys.argv:
        shapes = [tuple(int(x) for x in sys.argv[sys.argv.index("--shape") + 1].split(","))]
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    for B, H, S, dqk, dv in shapes:
        q = torch.randn(B, H, S, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, H, S, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, H, S, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(B, H, S, dv, device="cuda", dtype=torch.bfloat16)
        for causal in ([True, False] if full else [True]):
            flops = 2.0 * B * H * S * S * (dqk + dv) / (2 if causal else 1)
            tag = "causal" if causal else "full"
            for name, backend in BACKENDS:
                for mode in ("fwd", "fwdbwd"):
                    try:
                        with sdpa_kernel([backend]):
                            if mode == "fwd":
                                def fn():
                                    with torch.no_grad():
                                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            else:
                                def fn():
                                    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                    torch.autograd.grad(o, (q, k, v), do)
                            s = seconds_per_call(fn)
                        total = flops * (3.5 if mode == "fwdbwd" else 1.0)
                        print(f"{name} {mode} {tag} {B} {H} {S} {dqk} {dv} {total / s / 1e12:.1f}", flush=True)
                    except Exception as e:  # a shape the backend refuses is reported, not fatal
                        msg = str(e).splitlines()[0][:140] if str(e) else type(e).__name__
                        print(f"{name} {mode} {tag} {B} {H} {S} {dqk} {dv} n/a {msg}", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
