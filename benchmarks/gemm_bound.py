"""The zero-overhead bound in wall time: how fast ours could be if only its GEMMs cost anything.

:mod:`op_profile`'s Amdahl ceiling comes from profiler self times (which inflate many small ops
and, at more than one thread, page faults of the profiler's own buffers). This measures the bound
directly, at the thread count of ``mvitv2 benchmark``: every GEMM call of one call of ours (a
forward, or a whole training step with its backward) is recorded with its shapes and strides by
a dispatch mode, then each distinct call is replayed alone on fresh tensors of the same layout and
timed (best of a few), and the times are summed with their counts. A fused attention kernel is
replayed as the two batched GEMMs it contains (scores and output), so its softmax counts as
overhead. The reference is timed as a whole, alternating with ours.

``ceiling = reference wall / our GEMM-only time``: no change to ours that keeps its GEMM FLOPs
(the model's math) can beat the reference by more than that on this machine. ``ceiling with
essential`` also counts our normalization, activation and pooling kernels
(:data:`ESSENTIAL_OPS`, forward and backward; PyTorch's own kernels), replayed alone the same
way: nothing short of faster kernels for these, or fusing them into others, beats the reference
by more than that.

    uv run python benchmarks/gemm_bound.py --case train [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import op_profile  # noqa: E402

from mvitv2.benchmark import alternate  # noqa: E402
from mvitv2.utils.allocator import allocator_setting, keep_freed_memory  # noqa: E402
from mvitv2.utils.timing import best_seconds  # noqa: E402

aten = torch.ops.aten
#: GEMM ops replayed as they were called (out-of-place and in-place forms).
GEMM_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.addmm_.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.baddbmm_.default,
}
#: Fused attention kernels: replayed as their two batched GEMMs.
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
}
#: The kernels besides GEMMs that any implementation of the model's math runs over every
#: element at least once (normalization, activation, softmax, pooling; forward and backward),
#: recorded on ours and replayed as they were called. Not the optimizer, copies, adds or the
#: softmax inside fused or chunked attention: leaving them out only raises the bound.
ESSENTIAL_OPS = {
    aten.native_layer_norm.default,
    aten.native_layer_norm_backward.default,
    aten.gelu.default,
    aten.gelu_backward.default,
    aten._softmax.default,
    aten._softmax_backward_data.default,
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default,
    aten.max_pool3d_with_indices.default,
    aten.max_pool3d_with_indices_backward.default,
}

# One recorded call: (op, arguments with each tensor as ("T", size, stride, dtype) and each
# list as a tuple, keyword arguments as sorted pairs).
Call = tuple


def _spec(a: object) -> object:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_spec(x) for x in a)
    return a


class OpRecorder(TorchDispatchMode):
    """Counts every call of ``ops`` by layout; with ``gemms``, every GEMM call, and every fused
    attention call as its two GEMMs."""

    def __init__(self, ops: set = frozenset(), gemms: bool = True) -> None:
        super().__init__()
        self.ops = (GEMM_OPS if gemms else set()) | set(ops)
        self.gemms = gemms
        self.calls: Counter[Call] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeImplicitAutograd"
        ):  # under inference_mode composite ops (linear, matmul, SDPA) arrive undecomposed
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in self.ops:
            scalars = tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))
            self.calls[(func, _spec(args), scalars)] += 1
        elif self.gemms and func in ATTENTION_OPS:
            q, k = args[0], args[1]
            B, nH, Nq, C = q.shape
            Nk, Cv = k.shape[2], args[2].shape[-1]
            bh, dt = B * nH, q.dtype
            qk = ("T", (bh, Nq, C), (Nq * C, C, 1), dt), ("T", (bh, C, Nk), (Nk * C, 1, C), dt)
            pv = (
                ("T", (bh, Nq, Nk), (Nq * Nk, Nk, 1), dt),
                ("T", (bh, Nk, Cv), (Nk * Cv, Cv, 1), dt),
            )
            self.calls[(aten.bmm.default, qk, ())] += 1
            self.calls[(aten.bmm.default, pv, ())] += 1
        return func(*args, **kwargs)


def record_gemms(fn: Callable[[], object]) -> Counter[Call]:
    """The GEMM calls of one call of ``fn``, by layout, with their counts."""
    with OpRecorder() as rec:
        fn()
    return rec.calls


def record_essential(fn: Callable[[], object]) -> Counter[Call]:
    """The :data:`ESSENTIAL_OPS` calls of one call of ``fn``, by layout, with their counts."""
    with OpRecorder(ESSENTIAL_OPS, gemms=False) as rec:
        fn()
    return rec.calls


def _value(spec: object) -> object:
    """An argument for a replay: a fresh tensor of the recorded layout (normal values; zeros
    for integer tensors, which are valid indices), lists rebuilt."""
    if isinstance(spec, tuple) and len(spec) == 4 and spec[0] == "T":
        _, size, stride, dtype = spec
        t = torch.empty_strided(size, stride, dtype=dtype)
        if not t.numel():
            return t
        return t.normal_() if dtype.is_floating_point else t.zero_()
    if isinstance(spec, tuple):
        return [_value(x) for x in spec]
    return spec


def replay_ms(call: Call, repeats: int = 5) -> float:
    """Best time in ms of one recorded call, replayed on fresh tensors of its layout."""
    func, specs, scalars = call
    args = [_value(s) for s in specs]
    kwargs = {k: _value(v) for k, v in scalars}
    # (the in-place forms accumulate into their first argument run after run: same work)
    return best_seconds(lambda: func(*args, **kwargs), repeats) * 1e3


def replayed_ms(calls: Counter[Call], repeats: int = 5) -> float:
    """Sum over the recorded calls of their replayed best time times their count."""
    return sum(n * replay_ms(c, repeats) for c, n in calls.items())


def wall_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall ms per call of each function, timed in alternating rounds after a warm-up."""
    times = alternate(fns, rounds, "cpu", warmup=2)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("train", "detect", "image_fp32"), required=True)
    p.add_argument("--quick", action="store_true", help="tiny models and inputs")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mvitv2 benchmark` runs
    torch.manual_seed(0)
    fns = op_profile.build_case(args.case, args.quick, None)
    ours, ref = list(fns)
    fns[ours]()  # measured choices (attention path, GEMM backend) are made before recording
    calls = record_gemms(fns[ours])
    essential = record_essential(fns[ours])
    walls = wall_ms(fns, args.rounds)
    gemm_ms = replayed_ms(calls)
    essential_ms = replayed_ms(essential)
    res = {
        "case": args.case,
        "threads": torch.get_num_threads(),
        "processor": op_profile._cpu_name(),
        "torch": torch.__version__,
        "allocator": allocator_setting(),
        "wall_ms": walls,
        "our_gemm_calls": sum(calls.values()),
        "our_gemm_only_ms": gemm_ms,
        "our_overhead_ms": walls[ours] - gemm_ms,
        "essential_calls": sum(essential.values()),
        "essential_ms": essential_ms,
        "speedup_wall": walls[ref] / walls[ours],
        "ceiling": walls[ref] / gemm_ms,
        "ceiling_with_essential": walls[ref] / (gemm_ms + essential_ms),
        "command": "python benchmarks/gemm_bound.py " + " ".join(argv or sys.argv[1:]),
    }
    print(
        f"case {args.case}, {res['threads']} threads ({res['processor']}): {ref} "
        f"{walls[ref]:.1f} ms, ours {walls[ours]:.1f} ms ({res['speedup_wall']:.2f}x); our "
        f"{res['our_gemm_calls']} GEMM calls alone {gemm_ms:.1f} ms, the rest "
        f"{res['our_overhead_ms']:.1f} ms; zero-overhead ceiling {res['ceiling']:.2f}x; "
        f"our {res['essential_calls']} norm/activation/softmax/pooling calls alone "
        f"{essential_ms:.1f} ms; ceiling with them {res['ceiling_with_essential']:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
