"""Linear layers on the fastest exact GEMM kernel of the device.

PyTorch runs fp32 CPU GEMMs (``F.linear``, ``mm``, ``bmm``, SDPA's inner products) through MKL.
On AMD CPUs MKL takes a generic AVX2 path, while oneDNN, which PyTorch also ships, runs its
AVX-512 kernels: on the benchmark machine (AMD EPYC, 2 cores) oneDNN reaches ~400 GFLOP/s where
MKL gives ~175 on the MViTv2 linear shapes. Both are plain fp32 GEMMs (no reduced-precision
accumulation); they differ only in summation order.

The backend is chosen by measuring on the machine at hand (:func:`set_gemm_backend`). With
``"auto"`` at inference each GEMM size class is timed both ways on its first call and the faster
kept (in fp32 ATen unless oneDNN is more than 10 % faster): oneDNN adds the bias, and fuses the
MLP's exact GELU, in its GEMM, where ATen first fills the output with the bias and makes a second
pass for the GELU; which wins depends on the CPU and the shape (on an Intel Xeon, 2 threads:
oneDNN 1.5x faster on ``65536x96 @ 96x192`` with bias, a few % slower on most wider GEMMs).
Inference under CPU bf16 autocast is measured the same way, oneDNN getting the operands cast to
bf16 as autocast casts them; there ATen's GEMM is oneDNN's too and only the epilogue differs, so
the faster is kept with no margin (:data:`ONEDNN_MARGIN_BF16`). Under autograd one fp32 GEMM with
bias is timed each way once per process. oneDNN is used only in eager CPU code, for fp32 without
autocast and for inference under bf16 autocast; elsewhere (training under autocast, CUDA,
compiling, exporting, tracing) the standard ``F.linear`` runs.

Training uses the same kernels through :class:`_OneDNNLinear` (custom autograd: the input and
weight gradients are oneDNN GEMMs too, each in the orientation that its kernel runs fastest).
Memory-efficient attention's per-head products go through :func:`group_products`: one oneDNN
grouped 1x1 convolution for all heads and batch entries where measured faster than ``torch.bmm``
(on the AMD EPYC of docs/benchmarks.md ~1.7x on MViTv2-T's shapes), decided by the same setting.

At inference under autocast the linear layers take their weights from :func:`inference_cast`:
the autocast-dtype copy of each weight is kept across calls (autocast makes it again at every
call, or once per ``with`` block for whole parameters) and made again when the weight changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.ops.context import autocast_dtype, intercepted, tracing
from mvitv2.ops.kept import keeping, kept
from mvitv2.utils.choice import Choice
from mvitv2.utils.timing import KEPT_WHY, MeasuredChoices, best_ms

#: Valid names for :func:`set_gemm_backend`.
GEMM_BACKENDS = ("auto", "aten", "onednn")

_BACKEND = Choice("GEMM backend", GEMM_BACKENDS, os.environ.get("MVITV2_GEMM", "auto"))


def set_gemm_backend(name: str) -> str:
    """Select the fp32 CPU GEMM backend of our linear layers; returns the previous setting.

    Args:
        name: ``"auto"`` (default; also the ``MVITV2_GEMM`` environment variable): measure both
            and use the faster, at inference per GEMM size class at its first call, under
            autograd once per process; ``"aten"``: PyTorch's own ``F.linear`` (MKL on CPU), as
            every other MViTv2 implementation; ``"onednn"``: oneDNN whenever it applies.
    """
    return _BACKEND.set(name)


def get_gemm_backend() -> str:
    """The GEMM backend setting (see :func:`set_gemm_backend`)."""
    return _BACKEND.value


def gemm_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Context manager: use GEMM backend ``name`` inside the ``with`` block."""
    return _BACKEND.using(name)


def _onednn_linear_op():
    """oneDNN's linear (``y = x @ w.T + b``, optional fused activation), or None if absent."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


#: How much faster (fraction of ATen's time) oneDNN must measure to be used with ``"auto"`` in
#: fp32: on a near tie ATen, the GEMMs every other MViTv2 implementation runs.
ONEDNN_MARGIN = 0.1
#: The same under bf16 autocast: none. There ATen's CPU GEMM is itself oneDNN's (on CPUs with a
#: native bf16 path) and the two differ only in the bias and GELU epilogue (on the AMD EPYC of
#: docs/benchmarks.md oneDNN was 0-10 % faster on each bf16 linear of MViTv2-T, none beyond the
#: fp32 margin, and taking it wherever faster made the forward 2-5 % faster).
ONEDNN_MARGIN_BF16 = 0.0


@functools.cache
def _measured_ms() -> tuple[float, float] | None:
    """Time one linear-shaped GEMM with bias (``6272 x 384 @ 384 x 1536``, 7.4 GFLOP) each way
    (:func:`~mvitv2.utils.timing.best_ms`: alternating rounds, at least 3, the best of each): the
    backend of our linear layers under autograd with ``"auto"``.

    Returns ``(oneDNN ms, ATen ms)``, or None without oneDNN. Called once per process, on the
    first fp32 CPU linear call under autograd with the ``"auto"`` backend; ~0.3 s.
    """
    op = _onednn_linear_op()
    if op is None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6272, 384, generator=gen)
    w = torch.randn(1536, 384, generator=gen)
    b = torch.randn(1536, generator=gen)
    return _onednn_vs_aten_ms(
        lambda: op(x, w, b, "none", [], ""), lambda: F.linear(x, w, b), budget_ms=200.0
    )


def _onednn_vs_aten_ms(
    onednn: Callable[[], object], aten: Callable[[], object], budget_ms: float
) -> tuple[float, float]:
    """``(oneDNN ms, ATen ms)`` of a one-off backend measurement: the two calls without
    gradients, each the best of alternating rounds (at least 3, about ``budget_ms``)."""
    with torch.no_grad():
        ms = best_ms({"onednn": onednn, "aten": aten}, budget_ms=budget_ms, min_rounds=3)
    return ms["onednn"], ms["aten"]


def _beats_margin(ms: tuple[float, float] | None) -> bool:
    """Whether oneDNN beat ATen by more than :data:`ONEDNN_MARGIN` in a one-off measurement
    ``(oneDNN ms, ATen ms)`` (None: not measured, no oneDNN)."""
    return ms is not None and ms[0] < (1 - ONEDNN_MARGIN) * ms[1]


def _onednn_measured_faster() -> bool:
    """Whether oneDNN beat ATen by more than :data:`ONEDNN_MARGIN` in :func:`_measured_ms`, or
    the backend a resumed run keeps (:func:`keep_training_backends`)."""
    if "gemm" in _KEPT:
        return _KEPT["gemm"]
    return _beats_margin(_measured_ms())


#: The training backends (True: oneDNN) a resumed run keeps from its checkpoint instead of
#: measuring them again, so that it computes as the run before the kill did: ``"gemm"`` (linear
#: layers), ``"attention_gemm"`` (:func:`group_products`). Used with the ``"auto"`` setting only.
_KEPT: dict[str, bool] = {}
#: The backends a training run records and a resumed one can keep.
TRAINING_BACKENDS = ("aten", "onednn")


def keep_training_backends(gemm: str | None, attention_gemm: str | None) -> None:
    """Under autograd with ``"auto"``, use these backends (``"onednn"`` or ``"aten"``; None:
    measure) for the rest of the process instead of the one-off measurements."""
    _KEPT.clear()
    for key, name in (("gemm", gemm), ("attention_gemm", attention_gemm)):
        if name is not None:
            if name not in TRAINING_BACKENDS:
                expected = " or ".join(map(repr, TRAINING_BACKENDS))
                raise ValueError(f"unknown {key} backend {name!r}; expected {expected}")
            _KEPT[key] = name == "onednn"


@functools.cache
def _onednn_bf16_supported() -> bool:
    """Whether this CPU has oneDNN's bf16 kernels (AVX-512 or AMX): elsewhere its bf16 linear
    refuses to run, and ATen's bf16 GEMM is used."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_dtype(x: Tensor, inference: bool = False) -> torch.dtype | None:
    """The dtype oneDNN would run a linear layer on ``x`` in now, or None where it does not
    apply: fp32 for fp32 CPU tensors without autocast; with ``inference``, also bf16 under CPU
    bf16 autocast (fp32 or bf16 ``x``) on a CPU with oneDNN's bf16 kernels. Never while tracing
    or under a dispatch mode such as FLOP counting (no timing run there), nor in a build without
    oneDNN's linear."""
    if x.device.type != "cpu" or tracing() or intercepted():
        return None
    amp = autocast_dtype("cpu")
    if amp is None:
        dtype = torch.float32 if x.dtype == torch.float32 else None
    elif inference and amp == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16):
        dtype = torch.bfloat16 if _onednn_bf16_supported() else None
    else:
        dtype = None
    if dtype is None or _onednn_linear_op() is None:
        return None
    return dtype


def uses_onednn(x: Tensor) -> bool:
    """Whether our linear layers send ``x`` to oneDNN under autograd (training): the setting, or
    with ``"auto"`` the one-off measurement :func:`_measured_ms`. (Inference with ``"auto"``
    decides per GEMM size class, see :func:`linear`.)"""
    backend = _BACKEND.value
    if backend == "aten" or _onednn_dtype(x) is None:  # under autograd: fp32 without autocast
        return False
    return backend == "onednn" or _onednn_measured_faster()


#: The backend of each GEMM size class at CPU inference (fp32, or bf16 under autocast) with
#: ``"auto"``, for this process: ATen unless oneDNN ran faster by the dtype's margin on the
#: class's first call (oneDNN adds the bias in its GEMM, where ATen first fills the output with
#: it: ~1.5x faster on 65536x96 @ 96x192 on the Xeon of docs/benchmarks.md, a few % slower on
#: most wider shapes). Up to 160 classes: a process that runs both dtypes (a benchmark) needs
#: about twice the ~25 of one model.
_MEASURED = MeasuredChoices(default="aten", max_classes=160, margin=ONEDNN_MARGIN)


def _aten_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def _onednn_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool, dtype: torch.dtype
) -> Tensor:
    """:func:`_nt` on the operands cast to ``dtype`` (bf16 under autocast, as autocast's
    ``F.linear`` casts them; no copy for fp32)."""
    x, weight = x.to(dtype), weight.to(dtype)
    return _nt(x, weight, None if bias is None else bias.to(dtype), gelu)


def _onednn_at_inference(
    x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool
) -> torch.dtype | None:
    """The dtype this linear call runs in on oneDNN at inference (see :func:`_onednn_dtype`), or
    None for ATen: the setting, or with ``"auto"`` the faster for its size class (rows by power
    of two; width, output width, bias, GELU, a dense input and the dtype exactly), timed on this
    call's tensors at the class's first call."""
    backend = _BACKEND.value
    dtype = None if backend == "aten" else _onednn_dtype(x, inference=True)
    if dtype is None or backend == "onednn":
        return dtype
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // max(K, 1)

    def measure() -> tuple[dict, str]:
        candidates = {
            "aten": functools.partial(_aten_linear, x, weight, bias, gelu),
            "onednn": functools.partial(_onednn_linear, x, weight, bias, gelu, dtype),
        }
        name = f"{M}x{K} @ {K}x{N}" + " +bias" * (bias is not None) + " +GELU" * gelu
        return candidates, name + " bf16" * (dtype == torch.bfloat16)

    key = (M.bit_length(), K, N, bias is not None, gelu, x.is_contiguous(), dtype)
    margin = ONEDNN_MARGIN if dtype == torch.float32 else ONEDNN_MARGIN_BF16
    return dtype if _MEASURED.choose(key, measure, margin) == "onednn" else None


def gemm_measurements() -> dict[str, str]:
    """The backends ``"auto"`` chose so far in this process at inference, per measured GEMM size
    class (named by the shapes it was timed on): ``{"25088x96 @ 96x576 +bias": "onednn (aten
    19.19 ms, onednn 14.17 ms)"}`` (for a benchmark's JSON or a log)."""
    return _MEASURED.report()


#: Why ATen's GEMMs run where oneDNN never does (another device or dtype, autocast training).
NOT_APPLICABLE = "oneDNN is used on CPU only, for fp32 and for bf16 autocast at inference"


def gemm_choice(training: bool = False, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """The CPU GEMM backend in force for compute ``dtype`` (the autocast dtype under autocast)
    and why: ``{"gemm": ..., "gemm_setting": ..., "gemm_why": ...}``. With ``"auto"``: at
    inference ``"measured"`` (per GEMM size class, see :func:`gemm_measurements`); under
    autograd (``training``) the backend of the one-off measurement, which this runs if not yet
    done. ATen where oneDNN does not apply (see :func:`_onednn_dtype`). Training in fp32 also
    names the backend of memory-efficient attention's products, ``"attention_gemm"`` (see
    :func:`group_products_on_onednn`; with ``"auto"`` its measurement is in ``"gemm_why"``)."""
    choice = _linear_choice(training, dtype)
    if training and dtype == torch.float32:
        choice["attention_gemm"] = "onednn" if _groups_on_onednn() else "aten"
        if "attention_gemm" in _KEPT and choice["gemm_setting"] == "auto":
            choice["gemm_why"] += f"; attention products {KEPT_WHY}"
        elif choice["gemm_setting"] == "auto" and _onednn_linear_op() is not None:
            a, b = _measured_group_ms()
            choice["gemm_why"] += (
                f"; attention products, 32 groups of 167x96 @ 96x784: oneDNN {a:.1f} ms,"
                f" ATen {b:.1f} ms"
            )
    return choice


def _linear_choice(training: bool, dtype: torch.dtype) -> dict[str, str]:
    """:func:`gemm_choice` for the linear layers."""
    setting = _BACKEND.value
    if dtype != torch.float32 and (training or dtype != torch.bfloat16):
        return {"gemm": "aten", "gemm_setting": setting, "gemm_why": NOT_APPLICABLE}
    if dtype == torch.bfloat16 and not _onednn_bf16_supported():
        why = "this CPU has no oneDNN bf16 kernels"
        return {"gemm": "aten", "gemm_setting": setting, "gemm_why": why}
    if setting == "aten":
        return {"gemm": "aten", "gemm_setting": setting, "gemm_why": "set"}
    if _onednn_linear_op() is None:
        return {"gemm": "aten", "gemm_setting": setting, "gemm_why": "no oneDNN in this build"}
    if setting == "onednn":
        return {"gemm": "onednn", "gemm_setting": setting, "gemm_why": "set"}
    if not training:
        why = (
            "measured per GEMM size class at its first call: aten, or onednn if >10 % faster"
            " (fp32) or faster (bf16 autocast)"
        )
        return {"gemm": "measured", "gemm_setting": setting, "gemm_why": why}
    chosen = "onednn" if _onednn_measured_faster() else "aten"
    if "gemm" in _KEPT:
        return {"gemm": chosen, "gemm_setting": setting, "gemm_why": KEPT_WHY}
    a, b = _measured_ms()
    why = f"measured 6272x384x1536 with bias: oneDNN {a:.1f} ms, ATen {b:.1f} ms"
    return {"gemm": chosen, "gemm_setting": setting, "gemm_why": why}


# ------------------------------------------------------------- per-group products (attention)
def group_products(a: Tensor, w: Tensor, onednn: bool, *, transposed: bool = True) -> Tensor:
    """``out[:, g] = a[:, g] @ w[g].T`` for every group ``g`` (batch entry and head), or
    ``a[:, g] @ w[g]`` with ``transposed=False``.

    a: ``(n, G, K)``; w: ``(G, N, K)`` (``(G, K, N)`` with ``transposed=False``); returns
    ``(n, G, N)`` (contiguous on oneDNN, else a strided view). On oneDNN (``onednn``) all groups
    are one grouped 1x1 convolution over the ``n`` rows in channels-last memory (a transposed
    convolution for ``transposed=False``): ``a`` and the result are its input and output as they
    lie, ``w`` its weight, so nothing is copied when both are contiguous. Else ``torch.bmm`` on
    strided views (MKL's batched GEMM on CPU).
    """
    n, G, K = a.shape
    N = w.shape[1] if transposed else w.shape[2]
    if not onednn:
        return torch.bmm(a.transpose(0, 1), w.transpose(1, 2) if transposed else w).transpose(0, 1)
    x = a.contiguous().view(1, n, 1, G * K).permute(0, 3, 1, 2)
    if transposed:
        y = F.conv2d(x, w.contiguous().view(G * N, K, 1, 1), None, 1, 0, 1, G)
    else:
        y = F.conv_transpose2d(x, w.contiguous().view(G * K, N, 1, 1), None, 1, 0, 0, G)
    return y.permute(0, 2, 3, 1).reshape(n, G, N)


@functools.cache
def _measured_group_ms() -> tuple[float, float]:
    """Time one attention-shaped :func:`group_products` each way (alternating rounds, at least
    3, the best of each): one query chunk of memory-efficient attention (32 groups of
    ``167 x 96 @ 96 x 784``, 0.8 GFLOP; the scores of MViTv2-T's second stage at batch 16, 4M
    elements). Returns ``(oneDNN ms, ATen ms)``; called once per process, at the first fp32 CPU
    training step with ``"auto"``; ~80 ms."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(167, 32, 96, generator=gen)
    w = torch.randn(32, 784, 96, generator=gen)
    return _onednn_vs_aten_ms(
        lambda: group_products(a, w, True), lambda: group_products(a, w, False), budget_ms=60.0
    )


def group_products_on_onednn(x: Tensor) -> bool:
    """Whether :func:`group_products` runs on oneDNN for tensors like ``x``: only for fp32 CPU
    tensors in eager code (see :func:`_onednn_dtype`); then the setting, or with ``"auto"`` the
    one-off measurement :func:`_measured_group_ms` (oneDNN if more than :data:`ONEDNN_MARGIN`
    faster)."""
    return _onednn_dtype(x) == torch.float32 and _groups_on_onednn()


def _groups_on_onednn() -> bool:
    """:func:`group_products_on_onednn` for a tensor it applies to."""
    backend = _BACKEND.value
    if backend == "aten" or _onednn_linear_op() is None:
        return False
    if backend == "onednn":
        return True
    if "attention_gemm" in _KEPT:
        return _KEPT["attention_gemm"]
    return _beats_margin(_measured_group_ms())


# ---------------------------------------------------------------------- raw oneDNN products
def _dense(t: Tensor) -> Tensor:
    """``t`` if it is contiguous or (2-D) the transpose of a contiguous tensor, else a
    contiguous copy: oneDNN is fast on those two layouts and can be 100x slower on a matrix
    whose rows are spaced wider than their length (e.g. one head's slice of a token-major
    tensor)."""
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _nt(a: Tensor, b: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """``a @ b.T (+ bias)``, optionally followed by the exact (erf) GELU, on oneDNN.

    a: ``(..., K)``; b: ``(N, K)``, any strides; returns ``(..., N)``.
    """
    a, b = _dense(a), _dense(b)
    if bias is not None:
        bias = bias.contiguous()  # oneDNN reads a strided bias as if it were dense
    if gelu:
        return _onednn_linear_op()(a, b, bias, "gelu", [], "none")
    return _onednn_linear_op()(a, b, bias, "none", [], "")


def grad_input(dy: Tensor, weight: Tensor, onednn: bool) -> Tensor:
    """``dy @ weight``: the input gradient of a linear layer. dy ``(M, N)``, weight ``(N, K)``."""
    return _nt(dy, weight.t()) if onednn else dy @ weight


def grad_weight(dy: Tensor, x: Tensor, onednn: bool) -> Tensor:
    """``dy.T @ x``: the weight gradient of a linear layer. dy ``(M, N)``, x ``(M, K)``.

    oneDNN runs this product fastest with the wider of ``N``, ``K`` as its output columns.
    """
    if not onednn:
        return dy.t() @ x
    if dy.shape[1] >= x.shape[1]:
        return _nt(x.t(), dy.t()).t().contiguous()
    return _nt(dy.t(), x.t())


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with forward and both gradients on oneDNN (same saved tensors as
    autograd's linear: the input and the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _nt(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _rows(dy)
        dx = dw = db = None
        if need[0]:
            dx = grad_input(dy2, weight, True).view(x.shape)
        if need[1]:
            dw = grad_weight(dy2, _rows(x), True)
        if need[2] and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db


# ------------------------------------------------------------ low-precision weights, kept
def inference_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` for an inference call, from a copy kept across calls.

    Autocast casts a linear layer's fp32 weight at every call (its own cache lasts one
    ``with`` block and skips views, such as the row slices of the qkv weight that Q, K and V
    are projected with); at bf16 speed that cast costs a quarter to a third of the layer's time
    (2 threads, Intel Xeon with AMX: ``392x768 @ 768x3072`` 1.73 ms cast per call, 1.09 ms
    kept). The copy of ``t``'s whole tensor (its base, for a view) is kept
    (:func:`mvitv2.ops.kept.kept`, kind ``"cast"``: made again when the tensor changes, freed
    with it). Costs the weights' size in ``dtype`` while the model lives.

    Only fp32 tensors are cast (as autocast does); only where :func:`~mvitv2.ops.kept.kept`
    keeps, and for a contiguous base with a version counter, is the copy kept (elsewhere a
    fresh cast).
    """
    if t.dtype != torch.float32 or dtype == torch.float32:
        return t
    base = t if t._base is None else t._base
    if not keeping() or base.is_inference() or not base.is_contiguous():
        return t.to(dtype)
    copy = kept("cast", dtype, lambda b: b.detach().to(dtype), base)
    if t is base:
        return copy
    return copy.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then the exact GELU if ``gelu``) on the faster backend.

    x: ``(..., K)``; weight: ``(N, K)``; bias: ``(N,)`` or None. Returns ``(..., N)``. Without
    gradients oneDNN runs the GELU inside its GEMM, and under autocast the weight and bias
    come cast from :func:`inference_cast`.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = _OneDNNLinear.apply(x, weight, bias) if uses_onednn(x) else F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        weight = inference_cast(weight, amp)
        bias = None if bias is None else inference_cast(bias, amp)
    dtype = _onednn_at_inference(x, weight, bias, gelu)
    if dtype is not None:
        return _onednn_linear(x, weight, bias, gelu, dtype)
    return _aten_linear(x, weight, bias, gelu)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that runs on :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return linear(x, self.weight, self.bias)


def convert_linears(module: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Linear`` inside ``module`` (e.g. torchvision's detection heads) for
    :class:`Linear`, keeping the same parameter objects (state dict and optimizer unchanged).
    Returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            new = Linear(
                child.in_features, child.out_features, child.bias is not None, device="meta"
            )
            new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            convert_linears(child)
    return module
