"""``mvitv2 benchmark``: speed and memory of ours against the reference implementations.

Each case builds both models in one process with the same weights (timm's MViTv2 for images,
torchvision's ``mvit_v2_s`` for video, our own unfused reference path for the detection
backbone), checks that their outputs agree, then times them in alternating runs (the order
rotates every round) and reports medians. Reported per model:

* time per call (ms, median of ``--repeats`` calls) and items (images or clips) per second;
* GFLOP/s = 2 x MACs (:func:`mvitv2.utils.flops.count_macs`; 3x the forward for a training
  step) / time, and that as a percentage of the matmul peak (a square GEMM in fp32 and in
  bf16) measured just before and just after the case, the better of the two (a slow moment of
  a shared host during either does not inflate the percentage);
* peak memory: the high-water mark of live tensor bytes during one call, from
  ``torch.profiler`` memory events (CPU; parameters and optimizer state allocated before the call
  are not counted, allocator caching is not counted) or ``torch.cuda.max_memory_allocated``;
  the tensors our model keeps across inference calls (weight casts under autocast and other
  derivations of its parameters, :mod:`mvitv2.ops.kept`) are made in that call and counted.

timm and torchvision are needed only here (timm is a dev dependency) and only their model
classes are used, to be compared against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mvitv2
from mvitv2.engine.optim import fused_kernels
from mvitv2.ops import attention_impl, attention_measurements, gemm, implementation_choices, kept
from mvitv2.ops import mlp as mlp_ops
from mvitv2.utils.allocator import allocator_setting
from mvitv2.utils.flops import count_macs
from mvitv2.utils.machine import cpu_info, describe_cpu
from mvitv2.weights import convert_state_dict

#: Every case; ``train_bf16`` (the training step under bf16 autocast, how GPUs train) runs
#: only when asked for.
CASES = ("image_fp32", "image_bf16", "video_bf16", "train", "train_bf16", "detect")
DEFAULT_CASES = ("image_fp32", "image_bf16", "video_bf16", "train", "detect")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mvitv2 benchmark``."""
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(DEFAULT_CASES),
        help=f"cases to run (default: {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny models and inputs, 2 repeats"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per model (5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our model and the reference under torch.compile (inductor; frozen weights"
        " for inference), as extra rows of every case but detect",
    )
    parser.add_argument(
        "--output",
        default="runs/benchmark",
        help="folder of the results JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        default=None,
        help="results file (default: OUTPUT/benchmark.json; '' = do not write)",
    )


def results_path(args: argparse.Namespace) -> Path | None:
    """Where the results JSON goes: ``--json``, else ``--output``/benchmark.json (never the
    current folder unless asked); None with ``--json ''``."""
    if args.json is None:
        return Path(args.output) / "benchmark.json"
    return Path(args.json) if args.json else None


# --------------------------------------------------------------------------- measurement
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turns (order rotated every round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _quiet_fd(fd: int) -> Iterator[None]:
    """Send what is written to the OS-level file descriptor ``fd`` to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_memories(fns: dict[str, Callable[[], object]], device: str) -> dict[str, int]:
    """:func:`peak_memory` of each function, each called with no weight copies kept
    (:func:`mvitv2.ops.kept.clear_kept`): a model that keeps its weights cast across calls
    makes them in that call, so its peak counts them."""
    mem = {}
    for name, fn in fns.items():
        kept.clear_kept()
        mem[name] = peak_memory(fn, device)
    return mem


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """High-water mark of live tensor bytes allocated during ``fn()`` (see module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    # The profiler's C++ library logs its start and stop, and on a machine without CUDA a
    # "gpuGetDeviceCount failed" error, straight to file descriptor 2: silence it there.
    with _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype``: PyTorch's ``a @ b`` and,
    for fp32 on CPU, also oneDNN (:mod:`mvitv2.ops.gemm`), whichever is faster."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    products = [lambda: a @ b]
    if device == "cpu" and dtype == torch.float32 and gemm._onednn_linear_op() is not None:
        products.append(lambda: gemm._nt(a, b.t()))  # oneDNN whatever the backend setting
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            product()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def matmul_peaks(device: str, n: int) -> dict[str, float]:
    """:func:`matmul_peak` in fp32 and bf16: ``{"fp32": GFLOP/s, "bf16": GFLOP/s}``."""
    return {
        "fp32": matmul_peak(torch.float32, device, n),
        "bf16": matmul_peak(torch.bfloat16, device, n),
    }


def set_pct_peak(rows: list[Row], peak_gflops: float) -> None:
    """Set each row's ``pct_peak``: its GFLOP/s as a percentage of ``peak_gflops``."""
    for row in rows:
        row.pct_peak = 100 * row.gflops / peak_gflops


@dataclass
class Row:
    """One model in one case."""

    case: str
    model: str
    ms: float
    items_per_s: float
    gflops: float
    peak_mb: float
    times_ms: list[float] = field(default_factory=list)
    speedup: float = 1.0  # baseline time / this time
    memory_ratio: float = 1.0  # this peak / baseline peak
    max_abs_diff: float | None = None  # output difference to the baseline (same weights)
    # where that difference is largest (training: the parameter whose gradient it is)
    max_abs_diff_at: str | None = None
    # training: the largest difference between two gradient computations of this model on the
    # same weights and batch (0 when its backward is deterministic)
    repeat_diff: float | None = None
    # GFLOP/s as % of the matmul peak measured around the case (set by run: set_pct_peak)
    pct_peak: float = float("nan")


# --------------------------------------------------------------------------- models
def _tiny_image_kw() -> dict:
    return dict(depths=(1, 1, 1, 1), embed_dim=32, img_size=64)


def _timm_image(quick: bool, drop_path: float = 0.0) -> nn.Module:
    try:
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    except ImportError as e:  # timm is a dev dependency
        raise SystemExit("mvitv2 benchmark: the image cases need timm (uv sync --dev)") from e
    if quick:
        cfg, size = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=32, num_heads=1), (64, 64)
    else:
        cfg, size = MultiScaleVitCfg(depths=(1, 2, 5, 2), embed_dim=96, num_heads=1), (224, 224)
    return MultiScaleVit(cfg, img_size=size, drop_path_rate=drop_path)


def _image_pair(quick: bool) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    ref = _timm_image(quick)
    kw = _tiny_image_kw() if quick else {}
    ours = mvitv2.create_model("mvitv2_tiny", drop_path_rate=0.0, **kw)
    ours.load_state_dict(convert_state_dict(ref.state_dict()))
    return ours, ref, (3, 64, 64) if quick else (3, 224, 224)


def _video_pair(quick: bool) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    from torchvision.models.video import mvit as tvm

    if quick:
        ours = mvitv2.create_model(
            "mvitv2_small_16x4", depths=(1, 1, 1, 1), embed_dim=32, img_size=64, num_frames=4
        )
        from mvitv2.models.config import block_specs

        setting = [
            tvm.MSBlockConfig(
                s.num_heads,
                s.dim,
                s.dim_out,
                [3, 3, 3],
                [3, 3, 3],
                list(s.stride_q),
                list(s.stride_kv),
            )
            for s in block_specs(ours.cfg)
        ]
        ref = tvm._mvit(
            setting,
            0.0,
            None,
            False,
            spatial_size=(64, 64),
            temporal_size=4,
            residual_pool=True,
            residual_with_cls_embed=False,
            rel_pos_embed=True,
            proj_after_attn=True,
            num_classes=400,
        )
        shape = (3, 4, 64, 64)
    else:
        ours = mvitv2.create_model("mvitv2_small_16x4")
        ref = tvm.mvit_v2_s()
        shape = (3, 16, 224, 224)
    ours.load_state_dict(convert_state_dict(ref.state_dict()))
    return ours, ref, shape


# --------------------------------------------------------------------------- case setups
@dataclass
class CaseSetup:
    """What one case times, shared by ``mvitv2 benchmark`` and the profiling scripts in
    ``benchmarks/``: ``fns`` are ours (first) and the reference (second), each one call on the
    same input ``x``; ``models`` the modules they run, by the same names (the detection case
    runs one module two ways); ``bf16`` whether they compute under bf16 autocast."""

    fns: dict[str, Callable[[], object]]
    models: dict[str, nn.Module]
    x: torch.Tensor
    bf16: bool


@dataclass
class TrainSetup(CaseSetup):
    """A training case: also each model's optimizer, its loss on ``x`` and the step builder."""

    opts: dict[str, torch.optim.Optimizer]
    loss_of: Callable[[nn.Module], torch.Tensor]
    make_step: Callable[[nn.Module, torch.optim.Optimizer], Callable[[], object]]


def default_batch(case: str, quick: bool) -> int:
    """A case's batch when ``--batch`` is not given: one video clip or detection image, 8 images
    for inference and 16 for a training step (2 of either with ``quick``)."""
    if case in ("video_bf16", "detect"):
        return 1
    if case.startswith("train"):
        return 2 if quick else 16
    return 2 if quick else 8


def inference_call(
    model: nn.Module, x: torch.Tensor, bf16: bool, device: str, grad_mode=torch.inference_mode
) -> Callable[[], object]:
    """One inference call of ``model`` on ``x`` (under bf16 autocast with ``bf16``)."""
    dev = torch.device(device).type

    def f():
        with grad_mode(), torch.autocast(dev, torch.bfloat16, enabled=bf16):
            return model(x)

    return f


def inference_setup(case: str, quick: bool, batch: int, device: str) -> CaseSetup:
    """``image_fp32``/``image_bf16``: MViTv2-T at 224 against timm's; ``video_bf16``: MViTv2-S
    16x4 against torchvision's ``mvit_v2_s`` (same weights)."""
    video = case == "video_bf16"
    ours, ref, shape = _video_pair(quick) if video else _image_pair(quick)
    models = {"ours": ours, "torchvision" if video else "timm": ref}
    models = {n: m.eval().to(device) for n, m in models.items()}
    x = torch.randn(batch, *shape, device=device)
    bf16 = case != "image_fp32"
    return CaseSetup(
        {n: inference_call(m, x, bf16, device) for n, m in models.items()}, models, x, bf16
    )


def train_setup(quick: bool, batch: int, device: str, bf16: bool = False) -> TrainSetup:
    """One training step (forward, cross-entropy, backward, AdamW) of ours against timm's, each
    with its own AdamW (:func:`train_optimizer`), in fp32 or (``bf16``) with the forward under
    bf16 autocast and the backward outside it."""
    ours, ref, shape = _image_pair(quick)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    dev = torch.device(device).type

    def loss_of(model: nn.Module) -> torch.Tensor:
        with torch.autocast(dev, torch.bfloat16, enabled=bf16):
            return F.cross_entropy(model(x), y)

    def make_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], object]:
        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model)
            loss.backward()
            opt.step()
            return loss

        return step

    models = {"ours": ours.train().to(device), "timm": ref.train().to(device)}
    opts = {n: train_optimizer(n, m) for n, m in models.items()}
    fns = {n: make_step(m, opts[n]) for n, m in models.items()}
    return TrainSetup(fns, models, x, bf16, opts, loss_of, make_step)


@contextlib.contextmanager
def _mlp_chunk(elements: int | None):
    """Set the MLP's inference token chunk (hidden elements; None: no chunking) for a block."""
    saved = mlp_ops.MLP_CHUNK_ELEMENTS
    mlp_ops.MLP_CHUNK_ELEMENTS = elements if elements is not None else 1 << 62
    try:
        yield
    finally:
        mlp_ops.MLP_CHUNK_ELEMENTS = saved


def detect_setup(quick: bool, batch: int, device: str) -> CaseSetup:
    """The detection backbone (MViTv2-T, windowed stages as detectron2's) on a 1024-px image:
    ours as it runs against the unfused path detectron2 runs (explicit attention matrices, the
    MLP over all tokens at once, PyTorch's own GEMMs), on the same module."""
    if quick:
        model = mvitv2.create_model(
            "mvitv2_tiny", features_only=True, window_size=(8, 4, 2, 1), **_tiny_image_kw()
        )
        shape = (3, 128, 128)
    else:
        model = mvitv2.create_model("mvitv2_tiny", features_only=True, window_size=(56, 28, 14, 7))
        shape = (3, 1024, 1024)
    model = model.eval().to(device)
    x = torch.randn(batch, *shape, device=device)

    def call(impl, mlp_chunk, backend):
        def f():
            with (
                torch.inference_mode(),
                attention_impl(impl),
                _mlp_chunk(mlp_chunk),
                gemm.gemm_backend(backend),
            ):
                return model(x)

        return f

    fns = {
        "ours": call("auto", mlp_ops.MLP_CHUNK_ELEMENTS, gemm.get_gemm_backend()),
        "unfused": call("reference", None, "aten"),
    }
    return CaseSetup(fns, {"ours": model, "unfused": model}, x, False)


def case_setup(case: str, quick: bool, batch: int | None = None, device: str = "cpu") -> CaseSetup:
    """The setup of one of :data:`CASES` (``batch`` None: :func:`default_batch`)."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose one of {', '.join(CASES)}")
    batch = batch or default_batch(case, quick)
    if case.startswith("train"):
        return train_setup(quick, batch, device, bf16=case == "train_bf16")
    if case == "detect":
        return detect_setup(quick, batch, device)
    return inference_setup(case, quick, batch, device)


# --------------------------------------------------------------------------- cases
def _rows(
    case: str,
    times: dict[str, list[float]],
    mem: dict[str, int],
    macs: float,
    items: int,
    baseline: str,
    diff: float | None,
    diff_at: str | None = None,
    repeat_diff: Mapping[str, float] | None = None,
) -> list[Row]:
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        gf = 2 * macs / med / 1e9
        rows.append(
            Row(
                case=case,
                model=name,
                ms=med * 1e3,
                items_per_s=items / med,
                gflops=gf,
                peak_mb=mem[name] / 2**20,
                times_ms=[t * 1e3 for t in ts],
                speedup=statistics.median(times[baseline]) / med,
                memory_ratio=mem[name] / max(mem[baseline], 1),
                max_abs_diff=None if name == baseline else diff,
                max_abs_diff_at=None if name == baseline else diff_at,
                repeat_diff=(repeat_diff or {}).get(name),  # eager models only
            )
        )
    return rows


def _inference_case(
    case: str, setup: CaseSetup, repeats: int, device: str, compile: bool = False
) -> list[Row]:
    fns, (ours, ref_name) = dict(setup.fns), list(setup.fns)
    if compile:
        # no_grad, not inference_mode: inductor freezes weights only under no_grad.
        compiled = {f"{n}+compile": m for n, m in setup.models.items()}
        fns.update(
            _compiled(
                compiled, lambda _, m: inference_call(m, setup.x, setup.bf16, device, torch.no_grad)
            )
        )
    diff = (fns[ours]().float() - fns[ref_name]().float()).abs().max().item()
    times = alternate(fns, repeats, device)
    mem = peak_memories(fns, device)
    return _rows(case, times, mem, case_macs(setup), setup.x.shape[0], ref_name, diff)


def _compiled(
    models: dict[str, nn.Module],
    call: Callable[[str, nn.Module], Callable[[], object]],
    freeze: bool = True,
) -> dict[str, Callable[[], object]]:
    """``torch.compile`` each model (inductor; with ``freeze``, inference weights frozen as
    constants, which lets it prepack GEMM weights and fuse bias/activations) and run it once to
    compile; prints the compile time. ``call(name, compiled)`` makes the function to time.

    Each case compiles as it would in a fresh process: dynamo's caches are reset first, since
    our models share their ``forward`` code, and a second input rank or shape in one process
    makes dynamo recompile that code with dynamic shapes (the video model after the image one,
    AMD EPYC Zen 4: 445 s to compile and 8.7 s per call, against 49 s and 0.8 s alone)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    fns = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        fn = call(name, torch.compile(model))
        with inductor_config.patch(freezing=freeze):
            fn()
        print(f"[{name}: compiled in {time.perf_counter() - t0:.0f} s]", flush=True)
        fns[name] = fn
    return fns


def case_macs(setup: CaseSetup) -> float:
    """Nominal MACs of one call of ours (the setup's first model) as a case's GFLOP/s counts
    them: the forward on the reference attention path (no folded extra width), 3x for a
    training step (forward + backward ~ 3 forwards)."""
    model = next(iter(setup.models.values()))
    training = isinstance(setup, TrainSetup)
    was_training = model.training
    if training:
        model.eval()  # the training step's forward counted as a plain forward
    try:
        with attention_impl("reference"):
            macs = float(count_macs(model, tuple(setup.x.shape)))
    finally:
        model.train(was_training)
    return 3 * macs if training else macs


def train_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The AdamW of the training case: ours (``name == "ours"``) as ``mvitv2 train`` builds it,
    on PyTorch's fused kernel where it applies; the reference's as timm's
    ``create_optimizer_v2("adamw")`` builds it, on PyTorch's default kernels."""
    fused = fused_kernels(model.parameters()) if name == "ours" else None
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)


def _train_case(
    case: str, setup: TrainSetup, repeats: int, device: str, compile: bool = False
) -> list[Row]:
    """The training step of ours against timm's (:func:`train_setup`); with ``compile`` also both
    models under ``torch.compile`` (same parameters and optimizers)."""
    fns, grads, repeat = dict(setup.fns), {}, {}
    for name, model in setup.models.items():
        # Gradients of one step on identical weights, to show both compute the same thing;
        # twice, so that a difference can be told from a nondeterministic backward.
        runs = []
        for _ in range(2):
            setup.loss_of(model).backward()
            runs.append({k: p.grad for k, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
        grads[name] = runs[0]
        repeat[name] = largest_difference(runs[0], runs[1])[0]
    diff, diff_at = largest_difference(grads["ours"], convert_state_dict(grads["timm"]))
    if compile:  # the compiled module shares its parameters (and so the optimizer)
        compiled = {f"{n}+compile": m for n, m in setup.models.items()}

        def call(name: str, module: nn.Module) -> Callable[[], object]:
            return setup.make_step(module, setup.opts[name.removesuffix("+compile")])

        fns.update(_compiled(compiled, call, freeze=False))
    times = alternate(fns, repeats, device)
    mem = peak_memories(fns, device)
    macs, items = case_macs(setup), setup.x.shape[0]
    return _rows(case, times, mem, macs, items, "timm", diff, diff_at, repeat)


def largest_difference(
    ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]
) -> tuple[float, str]:
    """The largest ``|ours[k] - ref[k]|`` over the keys of ``ours`` (each also in ``ref``) and
    the key where it is."""
    per_key = {k: (t - ref[k]).abs().max().item() for k, t in ours.items()}
    at = max(per_key, key=per_key.__getitem__)
    return per_key[at], at


def _detect_case(setup: CaseSetup, repeats: int, device: str) -> list[Row]:
    a, b = (f() for f in setup.fns.values())
    diff = max((p - q).abs().max().item() for p, q in zip(a, b))
    del a, b
    times = alternate(setup.fns, repeats, device)
    mem = peak_memories(setup.fns, device)
    return _rows("detect", times, mem, case_macs(setup), setup.x.shape[0], "unfused", diff)


# --------------------------------------------------------------------------- driver
def _table(rows: list[Row]) -> str:
    head = (
        f"{'case':<11} {'model':<12} {'ms':>9} {'items/s':>8} {'GFLOP/s':>8} {'%peak':>6} "
        f"{'peak MB':>8} {'speedup':>8} {'mem x':>6} {'max|diff|':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        lines.append(
            f"{r.case:<11} {r.model:<12} {r.ms:>9.1f} {r.items_per_s:>8.2f} {r.gflops:>8.1f} "
            f"{r.pct_peak:>6.1f} {r.peak_mb:>8.1f} {r.speedup:>7.2f}x {r.memory_ratio:>6.2f} "
            f"{diff:>9}"
        )
    for r in rows:
        if r.max_abs_diff_at is not None:
            lines.append(f"{r.case} {r.model}: max|diff| at {r.max_abs_diff_at}")
        if r.repeat_diff is not None:
            lines.append(
                f"{r.case} {r.model}: the same backward twice differs by {r.repeat_diff:.1e}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the selected cases, print the table, write the JSON; returns an exit code."""
    from mvitv2.engine.cli import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    torch.manual_seed(0)
    # A GPU needs a larger product than a CPU to reach its peak.
    n = 256 if quick else (8192 if device.startswith("cuda") else 2048)
    best = before = matmul_peaks(device, n)
    gemms = {  # the fp32 GEMM backend of our linear layers (mvitv2.ops)
        "inference": implementation_choices(device, torch.float32)["gemm"],
        "autograd": implementation_choices(device, torch.float32, training=True)["gemm"],
    }
    print(f"CPU: {describe_cpu()}", flush=True)
    print(
        f"matmul peak ({n}x{n}): fp32 {before['fp32']:.0f} GFLOP/s, "
        f"bf16 {before['bf16']:.0f} GFLOP/s; threads {torch.get_num_threads()}; "
        f"our fp32 GEMMs (backend {gemm.get_gemm_backend()}): "
        f"{gemms['inference']} at inference, {gemms['autograd']} under autograd; "
        f"allocator: {allocator_setting()}",
        flush=True,
    )
    rows: list[Row] = []
    case_peaks: dict[str, dict[str, float]] = {}
    for case in args.cases:
        t0 = time.perf_counter()
        setup = case_setup(case, quick, args.batch, device)
        if isinstance(setup, TrainSetup):
            new = _train_case(case, setup, repeats, device, args.compile)
        elif case == "detect":
            new = _detect_case(setup, repeats, device)
        else:
            new = _inference_case(case, setup, repeats, device, args.compile)
        # The peak again after the case: a slow moment of a shared host during one of the two
        # measurements would otherwise inflate the case's % of peak.
        after = matmul_peaks(device, n)
        case_peaks[case] = {k: max(before[k], after[k]) for k in before}
        set_pct_peak(new, case_peaks[case]["bf16" if setup.bf16 else "fp32"])
        best = {k: max(best[k], after[k]) for k in best}
        before = after
        rows += new
        pk = case_peaks[case]
        print(
            f"{_table(new)}\n[{case}: {time.perf_counter() - t0:.0f} s; matmul peak before/after,"
            f" the better: fp32 {pk['fp32']:.0f}, bf16 {pk['bf16']:.0f} GFLOP/s]\n",
            flush=True,
        )
    table = _table(rows)
    print(table)
    path = results_path(args)
    if path is not None:
        result = {
            "command": "mvitv2 benchmark " + " ".join(_argv(args)),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu": cpu_info(),
                "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "device": device,
                "allocator": allocator_setting(),
                **_accelerator(device),
            },
            # the best of the measurements before and after every case (the % of peak of a
            # case is against the better of its own two: matmul_peak_gflops_per_case)
            "matmul_peak_gflops": best,
            "matmul_peak_gflops_per_case": case_peaks,
            "implementation": {  # the kernels in force and why (mvitv2.ops)
                "fp32": implementation_choices(device, torch.float32),
                "bf16": implementation_choices(device, torch.bfloat16),
                "train_fp32": implementation_choices(device, torch.float32, training=True),
                "train_bf16": implementation_choices(device, torch.bfloat16, training=True),
            },
            # "auto" attention at inference: the path timed fastest per size class on this machine
            "attention_measured": attention_measurements(),
            # "auto" GEMM backend at inference: the faster per GEMM size class on this machine
            "gemm_measured": gemm.gemm_measurements(),
            "rows": [asdict(r) for r in rows],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


def _accelerator(device: str) -> dict:
    """The GPU of a CUDA run (name, CUDA version, TF32 switches), for the results JSON."""
    if not device.startswith("cuda"):
        return {}
    return {
        "gpu": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["--cases", *args.cases]
    for name in ("repeats", "threads", "batch"):
        if getattr(args, name):
            out += [f"--{name}", str(getattr(args, name))]
    if args.quick:
        out.append("--quick")
    if args.compile:
        out.append("--compile")
    if args.device != "cpu":
        out += ["--device", args.device]
    return out
