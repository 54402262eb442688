"""The peer of bench_fp8_gemm: PyTorch's FP8 GEMM with DeepSeek-V3's block scaling (A 1x128,
B 128x128; cuBLAS on Hopper) on the same dense shapes, BF16 output, in the same device run.
Used only on the GPU machine as a reference; never part of fathom.

usage: python3 bench/fp8_gemm_peer.py [--quick] [--shape M,N,K]
Prints one line per case: "torch dense M N K 1 <TFLOP/s>" (or "... n/a <reason>").
"""
import sys

import torch

from peer_timing import seconds_per_call

SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def cases(quick, shape=None):
    if shape:
        return [shape]
    out = [(M, N, K) for M in (128, 4096) for (N, K) in SHAPES_NK] + [(8192, 8192, 8192)]
    return [out[4], out[10], out[12]] if quick else out


def blockwise_call(M, N, K):
    """The product as torch's tests call it: A's 1x128 scales outer-dim major, B's 128x128 scales
    transposed with B."""
    kt, nb = (K + 127) // 128, (N + 127) // 128
    a = (torch.randn(M, K, device="cuda") * 100).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K, device="cuda") * 100).to(torch.float8_e4m3fn)
    sa = (torch.rand(M, kt, device="cuda") + 0.5).t().contiguous().t()
    sb = torch.rand(nb, kt, device="cuda") + 0.5
    return lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)


def main():
    quick = "--quick" in sys.argv
    shape = None
    if "--shape" in sys.argv:
        shape = tuple(int(x) for x in sys.argv[sys.argv.index("--shape") + 1].split(","))
        if len(shape) != 3 or min(shape) <= 0:
            sys.exit(f"fp8_gemm_peer: --shape wants M,N,K (positive), got {sys.argv[sys.argv.index('--shape') + 1]}")
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}", flush=True)
    for M, N, K in cases(quick, shape):
        try:
            s = seconds_per_call(blockwise_call(M, N, K))
            print(f"torch dense {M} {N} {K} 1 {2.0 * M * N * K / s / 1e12:.1f}", flush=True)
        except Exception as e:  # a shape the library refuses is reported, not fatal
            msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            print(f"torch dense {M} {N} {K} 1 n/a {msg}", flush=True)


if __name__ == "__main__":
    main()
