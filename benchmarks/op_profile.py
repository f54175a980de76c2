"""Where the time goes: per-op-category profile of ours against the reference of a benchmark case.

For one case of ``mvitv2 benchmark`` (same models, weights and inputs as there), both models are
run in alternating rounds under ``torch.profiler`` (CPU), and every op's *self* CPU time is put
into one category (:data:`CATEGORIES`, :func:`categorize`; ops under ``optimizer.step`` go to
``optimizer`` whatever they are). Printed per model: each category's ms per call and share, the
GEMM GFLOP/s (GEMM FLOPs from ``torch.utils.flop_counter`` over the GEMM ops' self time) as a
percentage of the fp32 and bf16 matmul peaks measured in the same process, and the *Amdahl
ceiling*: the best speed-up over the reference ours could reach if all our non-GEMM time were
zero and our GEMMs (fused attention kernels included) ran at the reference's GEMM speed,
``ref_total / (our_gemm_flops / ref_gemm_flops_per_s)``.

    uv run python benchmarks/op_profile.py --case train [--rounds 3] [--threads 1] [--json F]
    uv run python benchmarks/op_profile.py --case detect --quick

Cases: ``train`` (MViTv2-T b16 224 fwd+bwd+AdamW vs timm), ``detect`` (backbone at 1024 with
windows vs the unfused path), ``image_fp32``/``image_bf16`` (b8 224 inference vs timm),
``video_bf16`` (MViTv2-S 16x4, one clip, bf16 autocast, vs torchvision's ``mvit_v2_s``).
The category times are self times, so they sum exactly to the profiled total; ``wall`` is the
median wall time per call measured outside the profiler, in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from mvitv2 import benchmark as bm
from mvitv2.ops import implementation_choices
from mvitv2.utils.allocator import allocator_setting, keep_freed_memory
from mvitv2.utils.machine import describe_cpu

CATEGORIES = (
    "gemm",
    "attention_fused",
    "softmax",
    "norm",
    "pooling",
    "copies",
    "elementwise",
    "optimizer",
    "other",
)

# Op names (without the ``aten::``/``mkldnn::`` namespace) per category; anything else is "other".
_GEMM = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "baddbmm_",
    "addmm_",
    "addbmm_",
    "addbmm",
    "_linear_pointwise",
    "mkldnn_linear",
    "_mkl_linear",
    "mkldnn_matmul",
    "matmul",
    "linear",
    "dot",
    "mv",
    "addmv",
}
_SOFTMAX = {
    "softmax",
    "_softmax",
    "_softmax_backward_data",
    "log_softmax",
    "_log_softmax",
    "_log_softmax_backward_data",
    "logsumexp",
    "amax",
    "exp",
    "exp_",
}
_NORM = {"layer_norm", "native_layer_norm", "native_layer_norm_backward"}
_POOL = {
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "mkldnn_convolution",
    "_mkldnn_convolution",
    "convolution_backward",
    "_slow_conv2d_forward",
    "_slow_conv2d_backward",
    "thnn_conv2d",
    "slow_conv3d",
    "slow_conv3d_forward",
    "_conv_depthwise2d",
    "_conv_depthwise2d_backward",
    "conv_depthwise3d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_pool2d_with_indices_backward",
    "max_pool3d_with_indices_backward",
    "mkldnn_convolution_backward",
    "conv_depthwise3d_backward",
}
_COPY = {
    "copy_",
    "contiguous",
    "clone",
    "cat",
    "_cat",
    "stack",
    "constant_pad_nd",
    "pad",
    "index",
    "index_select",
    "gather",
    "scatter",
    "scatter_add_",
    "scatter_add",
    "to",
    "_to_copy",
    "empty_like",
    "new_zeros",
    "zeros_like",
    "zero_",
    "fill_",
    "zeros",
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "repeat",
    "expand_as",
    "slice_backward",
    "select_backward",
    "index_put_",
    "_index_put_impl_",
    "narrow_copy",
    "unfold_backward",
    "embedding",
    "ones_like",
    "masked_fill",
}
_ELEMENTWISE = {
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "mul",
    "mul_",
    "div",
    "div_",
    "gelu",
    "gelu_backward",
    "addcmul",
    "addcmul_",
    "addcdiv",
    "addcdiv_",
    "sum",
    "mean",
    "sqrt",
    "pow",
    "neg",
    "log",
    "log_",
    "lerp_",
    "maximum",
    "where",
    "nll_loss_forward",
    "nll_loss_backward",
    "nll_loss",
    "nll_loss_nd",
    "cross_entropy_loss",
    "erf",
    "tanh",
    "native_dropout",
    "dropout",
    "threshold_backward",
    "relu",
    "clamp",
    "abs",
    "sigmoid",
    "cumsum",
    "bernoulli_",
    "reciprocal",
}


def categorize(name: str) -> str:
    """The category of one profiler op name (``aten::addmm`` -> ``"gemm"``; fused SDPA kernels
    -> ``"attention_fused"``; anything unknown -> ``"other"``)."""
    op = name.split("::")[-1]
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention_fused"
    if op in _GEMM:
        return "gemm"
    if op in _SOFTMAX:
        return "softmax"
    if op in _NORM:
        return "norm"
    if op in _POOL:
        return "pooling"
    if op in _COPY:
        return "copies"
    if op in _ELEMENTWISE or op.startswith("_foreach_") or op.startswith("_fused_adam"):
        return "elementwise"
    return "other"


def gemm_flops(fn: Callable[[], object]) -> tuple[float, float]:
    """FLOPs of one call of ``fn``: ``(GEMM ops, fused attention kernels)`` (forward and, for a
    training step, backward; from ``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    g = a = 0.0
    for op, n in counter.get_flop_counts()["Global"].items():
        cat = categorize(str(op).split(".")[1])  # "aten.mm" -> "mm"
        if cat == "gemm":
            g += n
        elif cat == "attention_fused":
            a += n
    return g, a


def _self_times(prof) -> Iterator[tuple[str, str, object, bool]]:
    """``(model, op name, self ns, under an optimizer step)`` of every CPU event under a
    ``case::<model>`` annotation, from the profiler's raw events (building torch's
    ``FunctionEvent`` tree is far slower on the ~10^5 events of a training step). For the
    annotation itself the third item is ``(self ns, ns of everything under it)``.

    Nesting is recovered per thread from the event intervals, as the profiler itself does.
    """
    raw = [
        (e.start_thread_id(), e.start_ns(), e.duration_ns(), e.name())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CPU and e.name() != "[memory]"
    ]
    raw.sort(key=lambda r: (r[0], r[1], -r[2]))
    # stack entries: [end ns, name, child ns, model, optimizer]
    stack: list[list] = []
    thread = None

    def close(entry):
        _, ev_name, child, model, opt, _ = entry
        if model is None:
            return None
        dur = entry[0] - entry[5]
        if ev_name.startswith("case::"):
            return model, ev_name, (dur - child, child), opt
        return model, ev_name, dur - child, opt

    for tid, start, dur, ev_name in raw:
        if tid != thread:
            while stack:
                out = close(stack.pop())
                if out:
                    yield out
            thread = tid
        while stack and stack[-1][0] <= start:
            out = close(stack.pop())
            if out:
                yield out
        parent = stack[-1] if stack else None
        if parent is not None:
            parent[2] += dur
        model = parent[3] if parent else None
        opt = bool(parent and parent[4]) or ev_name.startswith("Optimizer.step")
        if ev_name.startswith("case::"):
            model = ev_name[len("case::") :]
        stack.append([start + dur, ev_name, 0, model, opt, start])
    while stack:
        out = close(stack.pop())
        if out:
            yield out


def profile_models(
    fns: dict[str, Callable[[], object]], rounds: int
) -> tuple[
    dict[str, dict[str, float]],
    dict[str, dict[str, float]],
    dict[str, list[float]],
    dict[str, float],
]:
    """Profile the functions in alternating rounds (order rotated every round).

    Returns per model: seconds per call by category (self CPU time, summed over rounds / rounds),
    seconds per call by op name, the wall seconds of each unprofiled call (one per round, in
    the same rotation after the profiled ones), and the profiler's inclusive time per call of
    everything under the model's annotation (the categories' sum, obtained independently).
    """
    names = list(fns)
    for _ in range(3):  # warm-up (with freed memory kept, the C heap settles in a few calls)
        for n in names:
            fns[n]()
    with bm._quiet_fd(2), profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                with record_function(f"case::{n}"):
                    fns[n]()
    walls = bm.alternate(fns, rounds, "cpu", warmup=0)  # same rotation, unprofiled
    cats = {n: dict.fromkeys(CATEGORIES, 0.0) for n in names}
    ops: dict[str, dict[str, float]] = {n: defaultdict(float) for n in names}
    inclusive = dict.fromkeys(names, 0.0)
    for name, ev_name, self_ns, opt in _self_times(prof):
        if ev_name.startswith("case::"):
            # The annotation's own duration less its self time: the profiler's inclusive time
            # of everything under it, which the categories must add up to.
            inclusive[name] += self_ns[1] / 1e9 / rounds
            continue
        t = self_ns / 1e9 / rounds
        cats[name]["optimizer" if opt else categorize(ev_name)] += t
        ops[name][ev_name] += t
    return cats, {n: dict(o) for n, o in ops.items()}, walls, inclusive


def summarize(
    cats: dict[str, float],
    flops: tuple[float, float],
    peaks: dict[str, float],
) -> dict[str, float]:
    """Total, GEMM GFLOP/s and % of the peaks, for one model's categories (seconds per call)."""
    total = sum(cats.values())
    g_time = cats["gemm"]
    gflops = flops[0] / g_time / 1e9 if g_time > 0 else 0.0
    return {
        "total_s": total,
        "gemm_flops": flops[0],
        "attention_fused_flops": flops[1],
        "gemm_fraction": g_time / total if total else 0.0,
        "gemm_gflops": gflops,
        "gemm_pct_fp32_peak": 100 * gflops / peaks["fp32"],
        "gemm_pct_bf16_peak": 100 * gflops / peaks["bf16"],
    }


def amdahl_ceiling(ours: dict[str, float], ref: dict[str, float]) -> float:
    """Best speed-up ``ref_total / our_total`` if our time were only our GEMM FLOPs (fused
    attention included) at the reference's GEMM FLOP/s."""
    rate = ref["gemm_gflops"] * 1e9
    our_flops = ours["gemm_flops"] + ours["attention_fused_flops"]
    return ref["total_s"] / (our_flops / rate) if rate > 0 and our_flops > 0 else float("inf")


# --------------------------------------------------------------------------- cases
def build_case(
    case: str, quick: bool, batch: int | None
) -> tuple[dict[str, Callable[[], object]], bm.CaseSetup]:
    """The two functions of a case, ours first then the reference, and the setup they come from
    (``mvitv2 benchmark``'s :func:`mvitv2.benchmark.case_setup`: same models, weights, inputs
    and optimizers)."""
    setup = bm.case_setup(case, quick, batch)
    fns = dict(setup.fns)
    if setup.bf16 and not isinstance(setup, bm.TrainSetup):  # FlopCounterMode fails on timm's
        ref = list(fns)[1]  # einsum under autocast: count the reference in fp32 (same GEMMs)
        fns[ref].count_flops = bm.inference_call(setup.models[ref], setup.x, False, "cpu")
    return fns, setup


def run_profile(
    case: str, quick: bool = False, rounds: int = 3, batch: int | None = None
) -> dict[str, object]:
    """Profile one case; returns the JSON-able result (see the module docstring)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if case in ("image_bf16", "video_bf16") else torch.float32
    n = 256 if quick else 2048
    peaks = {"fp32": bm.matmul_peak(torch.float32, "cpu", n), "bf16": None}
    peaks["bf16"] = bm.matmul_peak(torch.bfloat16, "cpu", n)
    implementation = implementation_choices("cpu", dtype, training=case == "train")
    fns, _ = build_case(case, quick, batch)  # (after the one-off GEMM backend measurement above)
    flops = {name: gemm_flops(getattr(fn, "count_flops", fn)) for name, fn in fns.items()}
    cats, ops, walls, inclusive = profile_models(fns, rounds)
    summary = {name: summarize(cats[name], flops[name], peaks) for name in fns}
    ours, ref = list(fns)
    for name in fns:
        summary[name]["wall_s"] = statistics.median(walls[name])
        summary[name]["profiled_inclusive_s"] = inclusive[name]
    return {
        "case": case,
        "quick": quick,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "machine": {
            "platform": platform.platform(),
            "processor": describe_cpu(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "matmul_peak_gflops": peaks,
        "implementation": implementation,
        "allocator": allocator_setting(),
        "categories_s": cats,
        "summary": summary,
        "speedup_profiled": summary[ref]["total_s"] / summary[ours]["total_s"],
        "speedup_wall": summary[ref]["wall_s"] / summary[ours]["wall_s"],
        "amdahl_ceiling": amdahl_ceiling(summary[ours], summary[ref]),
        "top_ops_s": {
            name: dict(sorted(o.items(), key=lambda kv: -kv[1])[:25]) for name, o in ops.items()
        },
    }


def format_result(res: dict) -> str:
    """The breakdown table, the GEMM rates and the ceiling, as text."""
    names = list(res["summary"])
    s = res["summary"]
    cats = res["categories_s"]
    lines = [
        f"case {res['case']}: threads {res['threads']}, rounds {res['rounds']}; matmul peak "
        f"fp32 {res['matmul_peak_gflops']['fp32']:.0f} GFLOP/s, "
        f"bf16 {res['matmul_peak_gflops']['bf16']:.0f} GFLOP/s",
        f"{'category':<16}" + "".join(f"{n + ' ms':>14}{'%':>6}" for n in names),
    ]
    for c in CATEGORIES:
        row = f"{c:<16}"
        for n in names:
            row += f"{1e3 * cats[n][c]:>14.1f}{100 * cats[n][c] / s[n]['total_s']:>6.1f}"
        lines.append(row)
    lines.append(
        f"{'total (profiled)':<16}"
        + "".join(f"{1e3 * s[n]['total_s']:>14.1f}{'':>6}" for n in names)
    )
    lines.append(
        f"{'wall (median)':<16}" + "".join(f"{1e3 * s[n]['wall_s']:>14.1f}{'':>6}" for n in names)
    )
    for n in names:
        lines.append(
            f"{n}: GEMM {s[n]['gemm_flops'] / 1e9:.1f} GFLOP (+{s[n]['attention_fused_flops'] / 1e9:.1f}"
            f" in fused attention) at {s[n]['gemm_gflops']:.0f} GFLOP/s = "
            f"{s[n]['gemm_pct_fp32_peak']:.0f}% of fp32 peak, {s[n]['gemm_pct_bf16_peak']:.0f}% of"
            f" bf16 peak; GEMM share {100 * s[n]['gemm_fraction']:.0f}%"
        )
    lines.append(
        f"speed-up {names[0]} vs {names[1]}: profiled {res['speedup_profiled']:.2f}x, wall "
        f"{res['speedup_wall']:.2f}x; Amdahl ceiling {res['amdahl_ceiling']:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--case",
        choices=("train", "detect", "image_fp32", "image_bf16", "video_bf16"),
        required=True,
    )
    p.add_argument("--quick", action="store_true", help="tiny models and inputs")
    p.add_argument("--rounds", type=int, default=3, help="profiled calls per model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--batch", type=int, default=None, help="override the case's batch size")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--text", default=None, help="write the printed table here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `mvitv2 benchmark` runs (MVITV2_MALLOC=default: glibc's default)
    res = run_profile(args.case, args.quick, args.rounds, args.batch)
    res["command"] = "python benchmarks/op_profile.py " + " ".join(argv or sys.argv[1:])
    text = format_result(res)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.text:
        with open(args.text, "w") as f:
            f.write(res["command"] + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
