"""The hardware floor the benchmarks compare against: this machine's dense fp32 matmul rate."""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Sustained fp32 GEMM rate (GFLOP/s) with torch's threads, measured in the same run as the benchmark."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
