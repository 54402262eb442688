"""Timing of GPU work for the PyTorch peers (fp8_gemm_peer.py, attention_peer.py): the same
doubling loop as bench/cuda_timing.h, with CUDA events. Used only on the GPU machine."""
import torch


def seconds_per_call(fn, min_ms=200.0, max_calls=1 << 20):
    """Seconds per call of fn: calls repeated, doubling, until min_ms of work after a warm-up."""
    fn()
    torch.cuda.synchronize()
    n = 1
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms >= min_ms or n >= max_calls:
            return ms / 1e3 / n
        n *= 2
