"""Micro-benchmark of the attention kernels behind the paths of `set_attention_impl`.

Times, per MViTv2-T attention shape and dtype: fused SDPA without rel-pos, with the rel-pos as a
float mask ("bias"), with q/k widened by the folded rel-pos ("folded"), and explicit matmuls
(softmax(q k^T + bias) v, what "reference" and "chunked" do). Uses per-thread CPU time with one
thread (robust on a shared machine); the result decides `_AUTO_TABLE` in ops/attention.py.

    uv run python benchmarks/attention_paths.py [--batch 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (heads, Nq, Nk, head width, folded extra width) of MViTv2-T at 224.
SHAPES = [
    (1, 3136, 196, 96, 28),
    (2, 784, 784, 96, 56),
    (4, 196, 196, 96, 28),
    (2, 784, 196, 96, 28),
]


def bench(repeats: int, fn, *args, **kwargs) -> float:
    """Minimum thread CPU time of ``fn(*args, **kwargs)`` in ms."""
    fn(*args, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn(*args, **kwargs)
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def explicit(q, k, v, bias):
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B = args.batch
    for nH, N, M, C, E in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, nH, n, C, dtype=dt) for n in (N, M, M))
            bias = torch.randn(B, nH, N, M, dtype=dt)
            q2, k2, v2 = (torch.randn(B, nH, n, C + E, dtype=dt) for n in (N, M, M))
            sdpa, n = F.scaled_dot_product_attention, args.repeats
            res = {
                "plain": bench(n, sdpa, q, k, v),
                "bias": bench(n, sdpa, q, k, v, attn_mask=bias),
                "folded": bench(n, sdpa, q2, k2, v2),
                "explicit": bench(n, explicit, q, k, v, bias),
            }
            gflop = 4 * B * nH * N * M * C / 1e9
            cells = " ".join(f"{n}={t:.1f}ms({gflop / t * 1e3:.0f}GF/s)" for n, t in res.items())
            print(f"B={B} nH={nH} Nq={N} Nk={M} C={C} {str(dt)[6:]:>8}: {cells}", flush=True)


if __name__ == "__main__":
    main()
