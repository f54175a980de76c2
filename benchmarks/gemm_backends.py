"""fp32 GEMM throughput of PyTorch's own kernels (MKL on CPU) against oneDNN, on MViTv2 shapes.

For each linear layer shape of MViTv2-T at 224 (batch 8 for inference, 16 for training), times
the three products of a linear layer: forward ``x @ W.T``, input gradient ``dy @ W`` and weight
gradient ``dy.T @ x``, each way: ``aten`` (what ``F.linear`` and autograd run) and ``onednn``
(what :mod:`mvitv2.ops.gemm` runs, in the orientation it uses). This is the measurement behind
``set_gemm_backend("auto")``; the library itself re-measures once per process.

    uv run python benchmarks/gemm_backends.py [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mvitv2.ops import gemm

# (tokens M, in K, out N) of the MViTv2-T linears: qkv, proj, fc1, fc2 in stages 1-4, batch 8.
SHAPES = [
    (8 * 3136, 96, 288),
    (8 * 3136, 96, 384),
    (8 * 3136, 384, 96),
    (8 * 784, 192, 768),
    (8 * 784, 768, 192),
    (8 * 196, 384, 1536),
    (8 * 196, 1536, 384),
    (8 * 49, 768, 3072),
]


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def products(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> dict:
    """The three products of a linear layer, each as (aten, oneDNN) callables."""
    return {
        "forward": (lambda: F.linear(x, w), lambda: gemm._nt(x, w)),
        "grad input": (lambda: dy @ w, lambda: gemm.grad_input(dy, w, True)),
        "grad weight": (lambda: dy.t() @ x, lambda: gemm.grad_weight(dy, x, True)),
    }


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if gemm._onednn_linear_op() is None:
        raise SystemExit("this PyTorch build has no oneDNN linear; nothing to compare")
    print(f"threads {torch.get_num_threads()}; GFLOP/s (median of {args.repeats})")
    print(f"{'M x K -> N':<20} {'product':<12} {'aten':>7} {'onednn':>7} {'ratio':>6}")
    torch.manual_seed(0)
    with torch.no_grad():
        for M, K, N in SHAPES:
            x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
            flops = 2 * M * K * N
            for name, (aten, onednn) in products(x, w, dy).items():
                t_a = median_time(aten, args.repeats)
                t_o = median_time(onednn, args.repeats)
                print(
                    f"{f'{M} x {K} -> {N}':<20} {name:<12} {flops / t_a / 1e9:>7.0f} "
                    f"{flops / t_o / 1e9:>7.0f} {t_a / t_o:>5.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
