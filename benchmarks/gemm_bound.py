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
essential`` also counts the other kernels that any eager implementation of the same math runs,
each recorded on ours and replayed alone the same way (PyTorch's own kernels):

* normalization, activation and pooling, forward and backward (:data:`ESSENTIAL_OPS`);
* the softmax: our explicit softmax kernels and exponentials (:data:`ESSENTIAL_OPS`), and inside
  a fused attention kernel its time beyond its two GEMMs (the kernel replayed whole, less the
  two GEMMs replayed alone);
* in a training step, the bias gradients (column sums of the output gradient, one per linear
  layer: :func:`is_bias_grad`) and every op of the optimizer step.

Copies, residual and rel-pos adds and autograd's own work are left out, which only raises the
bound: nothing short of faster kernels for these, or fusing them into others, beats the
reference by more than that.

The same two times bound the benchmark's *% of the matmul peak* (the case's nominal FLOPs over
the time, as a percentage of the square-matmul peak measured before and after each measurement):
``pct_peak_gemm_only`` and ``pct_peak_with_essential`` are the most that percentage can reach with
our GEMMs as they run; ``pct_peak_wall`` is ours as measured.

    uv run python benchmarks/gemm_bound.py --case {train,detect,image_fp32,image_bf16,video_bf16}
        [--threads 2] [--repeats 3] [--json F]

The bf16 cases record under CPU autocast, so the GEMMs replayed are the bf16 ones that run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import op_profile  # noqa: E402

from mvitv2.benchmark import alternate, case_macs, matmul_peak  # noqa: E402
from mvitv2.ops import attention as ops_attention  # noqa: E402
from mvitv2.ops import gemm as ops_gemm  # noqa: E402
from mvitv2.utils.allocator import allocator_setting, keep_freed_memory  # noqa: E402
from mvitv2.utils.machine import describe_cpu  # noqa: E402
from mvitv2.utils.timing import best_ms  # noqa: E402

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
if torch.backends.mkldnn.is_available():  # oneDNN's linear (our GEMM backend's other kernel)
    GEMM_OPS.add(torch.ops.mkldnn._linear_pointwise.default)
#: Fused attention kernels: replayed as their two batched GEMMs.
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
}
#: The kernels besides GEMMs that any implementation of the model's math runs over every
#: element at least once (normalization, activation, softmax and its exponentials, pooling;
#: forward and backward), recorded on ours and replayed as they were called.
ESSENTIAL_OPS = {
    aten.exp.default,
    aten.exp_.default,
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


def is_bias_grad(func: object, args: tuple) -> bool:
    """Whether an op call is a linear layer's bias gradient: the column sums ``dy.sum(0)`` of a
    2-D output gradient (as autograd's linear and our custom backwards compute it)."""
    return func is aten.sum.dim_IntList and args[0].dim() == 2 and tuple(args[1]) in ((0,), (-2,))


def _attention_gemms(args: tuple) -> tuple[Call, Call]:
    """The two batched GEMMs of a fused attention call: scores ``q @ k^T`` and ``p @ v``."""
    q, k = args[0], args[1]
    B, nH, Nq, C = q.shape
    Nk, Cv = k.shape[2], args[2].shape[-1]
    bh, dt = B * nH, q.dtype
    qk = ("T", (bh, Nq, C), (Nq * C, C, 1), dt), ("T", (bh, C, Nk), (Nk * C, 1, C), dt)
    pv = ("T", (bh, Nq, Nk), (Nq * Nk, Nk, 1), dt), ("T", (bh, Nk, Cv), (Nk * Cv, Cv, 1), dt)
    return (aten.bmm.default, qk, ()), (aten.bmm.default, pv, ())


#: The kinds of essential calls that :func:`record_essential` tells apart.
ESSENTIAL_KINDS = ("kernels", "attention", "bias_grads", "optimizer")


class OpRecorder(TorchDispatchMode):
    """Counts op calls by layout into :attr:`by_kind`.

    Without ``essential``: every GEMM call and every fused attention call as its two GEMMs
    (kind ``"gemm"``). With ``essential`` (kinds :data:`ESSENTIAL_KINDS`): every op inside an
    optimizer step, every :data:`ESSENTIAL_OPS` call, every bias gradient (:func:`is_bias_grad`),
    and every fused attention call with its two GEMMs counted negatively (so that the replayed
    sum is the kernel's time beyond its GEMMs).
    """

    def __init__(self, essential: bool = False) -> None:
        super().__init__()
        self.essential = essential
        self.in_optimizer = False  # set by the optimizer step hooks of record_essential
        self.by_kind: defaultdict[str, Counter[Call]] = defaultdict(Counter)

    @property
    def calls(self) -> Counter[Call]:
        """All kinds together."""
        total: Counter[Call] = Counter()
        for calls in self.by_kind.values():
            total.update(calls)  # (update keeps negative counts; ``+`` would drop them)
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeImplicitAutograd"
        ):  # under inference_mode composite ops (linear, matmul, SDPA) arrive undecomposed
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        call = (func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))
        kinds = self.by_kind
        if not self.essential:
            if func in GEMM_OPS:
                kinds["gemm"][call] += 1
            elif func in ATTENTION_OPS:
                for gemm in _attention_gemms(args):
                    kinds["gemm"][gemm] += 1
        elif self.in_optimizer:
            kinds["optimizer"][call] += 1
        elif func in ESSENTIAL_OPS:
            kinds["kernels"][call] += 1
        elif is_bias_grad(func, args):
            kinds["bias_grads"][call] += 1
        elif func in ATTENTION_OPS:
            kinds["attention"][call] += 1
            for gemm in _attention_gemms(args):
                kinds["attention"][gemm] -= 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _kernels_as_unrecorded() -> Iterator[None]:
    """Our kernels choose as they do outside a dispatch mode (where they otherwise fall back to
    the plain ops: no timing runs there), so that what is recorded is what runs. Their measured
    choices must already be made (a warm-up call): a new size class would be timed here."""
    with (
        mock.patch.object(ops_gemm, "intercepted", lambda: False),
        mock.patch.object(ops_attention, "intercepted", lambda: False),
    ):
        yield


def record_gemms(fn: Callable[[], object]) -> Counter[Call]:
    """The GEMM calls of one call of ``fn``, by layout, with their counts."""
    with _kernels_as_unrecorded(), OpRecorder() as rec:
        fn()
    return rec.calls


def record_essential(fn: Callable[[], object]) -> dict[str, Counter[Call]]:
    """The essential non-GEMM calls of one call of ``fn`` by kind (:data:`ESSENTIAL_KINDS`; see
    :class:`OpRecorder`), by layout, with their counts (negative for the GEMMs inside fused
    attention)."""
    rec = OpRecorder(essential=True)

    def enter(*_):
        rec.in_optimizer = True

    def leave(*_):
        rec.in_optimizer = False

    hooks = [register_optimizer_step_pre_hook(enter), register_optimizer_step_post_hook(leave)]
    try:
        with _kernels_as_unrecorded(), rec:
            fn()
    finally:
        for h in hooks:
            h.remove()
    return {kind: rec.by_kind[kind] for kind in ESSENTIAL_KINDS}


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
    call = {"call": lambda: func(*args, **kwargs)}
    return best_ms(call, budget_ms=0.0, min_rounds=repeats, max_rounds=repeats)["call"]


def replayed_ms(calls: Counter[Call], repeats: int = 5) -> float:
    """Sum over the recorded calls of their replayed best time times their count."""
    return sum(n * replay_ms(c, repeats) for c, n in calls.items())


def wall_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall ms per call of each function, timed in alternating rounds after a warm-up."""
    times = alternate(fns, rounds, "cpu", warmup=2)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def measure(
    fns: dict[str, Callable[[], object]],
    calls: Counter[Call],
    essential: dict[str, Counter[Call]],
    rounds: int,
    gflop: float,
    peak: Callable[[], float],
) -> dict:
    """One measurement: both walls (alternating), then our GEMMs and essential calls replayed;
    the ceilings from these. ``gflop``: one call of ours as ``mvitv2 benchmark`` counts it;
    ``peak()``: the matmul peak in GFLOP/s, measured before and after (the better counts, as in
    the benchmark). The % of peak bounds are the benchmark's % of peak at those times."""
    ours, ref = list(fns)
    peak_before = peak()
    walls = wall_ms(fns, rounds)
    gemm_ms = replayed_ms(calls)
    by_kind = {kind: replayed_ms(c) for kind, c in essential.items()}
    essential_ms = sum(by_kind.values())
    best_peak = max(peak_before, peak())

    def pct(ms: float) -> float:
        return 100 * gflop / (ms / 1e3) / best_peak

    return {
        "wall_ms": walls,
        "our_gemm_only_ms": gemm_ms,
        "our_overhead_ms": walls[ours] - gemm_ms,
        "essential_ms": essential_ms,
        "essential_ms_by_kind": by_kind,
        "speedup_wall": walls[ref] / walls[ours],
        "ceiling": walls[ref] / gemm_ms,
        "ceiling_with_essential": walls[ref] / (gemm_ms + essential_ms),
        "gflop": gflop,
        "matmul_peak_gflops": best_peak,
        "pct_peak_wall": pct(walls[ours]),
        "pct_peak_gemm_only": pct(gemm_ms),
        "pct_peak_with_essential": pct(gemm_ms + essential_ms),
    }


def median_measurement(runs: list[dict]) -> dict:
    """The run with the median ``ceiling_with_essential`` (the lower middle one of an even
    count): on a noisy machine the walls and the replays move between runs, and one whole run
    keeps its figures consistent with each other."""
    ranked = sorted(runs, key=lambda r: r["ceiling_with_essential"])
    return ranked[(len(ranked) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--case",
        choices=("train", "detect", "image_fp32", "image_bf16", "video_bf16"),
        required=True,
    )
    p.add_argument("--quick", action="store_true", help="tiny models and inputs")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per model and measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements (the median one counts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mvitv2 benchmark` runs
    torch.manual_seed(0)
    fns, setup = op_profile.build_case(args.case, args.quick, None)
    gflop = 2 * case_macs(setup) / 1e9
    dtype = torch.bfloat16 if setup.bf16 else torch.float32
    size = 256 if args.quick else 2048  # the benchmark's peak sizes

    def peak() -> float:
        return matmul_peak(dtype, "cpu", size)

    ours, ref = list(fns)
    fns[ours]()  # measured choices (attention path, GEMM backend) are made before recording
    calls = record_gemms(fns[ours])
    essential = record_essential(fns[ours])
    runs = [measure(fns, calls, essential, args.rounds, gflop, peak) for _ in range(args.repeats)]
    res = {
        "case": args.case,
        "threads": torch.get_num_threads(),
        "processor": describe_cpu(),
        "torch": torch.__version__,
        "allocator": allocator_setting(),
        "our_gemm_calls": sum(calls.values()),
        "essential_calls": sum(n for c in essential.values() for n in c.values() if n > 0),
        **median_measurement(runs),
        "measurements": runs,
        "command": "python benchmarks/gemm_bound.py " + " ".join(argv or sys.argv[1:]),
    }
    for r in runs:
        print(
            f"measurement: {ref} {r['wall_ms'][ref]:.1f} ms, ours {r['wall_ms'][ours]:.1f} ms; "
            f"GEMMs {r['our_gemm_only_ms']:.1f} ms, essential {r['essential_ms']:.1f} ms; "
            f"ceilings {r['ceiling']:.2f}x, {r['ceiling_with_essential']:.2f}x; % of the "
            f"{r['matmul_peak_gflops']:.0f} GFLOP/s peak: ours {r['pct_peak_wall']:.1f}, bound "
            f"{r['pct_peak_gemm_only']:.1f} (GEMMs only), {r['pct_peak_with_essential']:.1f} "
            "(with essential)"
        )
    walls, by_kind = res["wall_ms"], res["essential_ms_by_kind"]
    print(
        f"case {args.case}, {res['threads']} threads ({res['processor']}), median of "
        f"{len(runs)}: {ref} {walls[ref]:.1f} ms, ours {walls[ours]:.1f} ms "
        f"({res['speedup_wall']:.2f}x); our {res['our_gemm_calls']} GEMM calls alone "
        f"{res['our_gemm_only_ms']:.1f} ms, the rest {res['our_overhead_ms']:.1f} ms; "
        f"zero-overhead ceiling {res['ceiling']:.2f}x; our {res['essential_calls']} essential "
        f"other calls alone {res['essential_ms']:.1f} ms ("
        + ", ".join(f"{k} {v:.1f}" for k, v in by_kind.items())
        + f"); ceiling with them {res['ceiling_with_essential']:.2f}x; % of the matmul peak "
        f"({res['matmul_peak_gflops']:.0f} GFLOP/s): ours {res['pct_peak_wall']:.1f}, at most "
        f"{res['pct_peak_gemm_only']:.1f} with no other work, "
        f"{res['pct_peak_with_essential']:.1f} with the essential work"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
