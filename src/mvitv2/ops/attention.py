"""``attend(q, k, v, scale, rel)``: softmax attention with the decomposed rel-pos term, on one of
several exact paths (same values, different kernels and memory).

* ``"reference"``: the explicit score matrix ``(q*scale) @ k^T + rel``, softmax, ``@ v`` (what
  every released MViTv2 implementation does);
* ``"bias"``: fused ``scaled_dot_product_attention`` with the rel-pos term as a float mask;
* ``"folded"``: fused SDPA with the rel-pos term folded into the dot product, no bias tensor:
  ``[q, a_h/s, a_w/s, a_t/s] . [k, onehot(h), onehot(w), onehot(t)]`` with
  ``a_h[i] = q_i . R_h[h(i), :]`` (``s`` the softmax scale; ``v`` zero-padded to the same width
  because the fused CPU/GPU kernels need equal head dims; at CPU inference all three padded to
  a multiple of 32 where measured faster, :func:`folded_width`);
* ``"chunked"``: the folded q/k with two explicit GEMMs and a softmax, over query chunks (bounded
  memory); faster than fused SDPA where that kernel is slow (bf16 on CPUs without AMX);
* ``"memeff"``: for training, :func:`~mvitv2.ops.memeff.attention_memeff`.

``"auto"`` (default): at inference on a CPU, each attention size class (exact heads and head
width, batch and token counts by power of two) is timed on ``"bias"``, ``"chunked"`` and
``"folded"`` at its first call and the fastest is kept for that class in this process
(:func:`attention_measurements` lists the decisions); which one wins depends on the CPU (its
fp32 and bf16 GEMM and SDPA kernels) and the shape. Training on a CPU takes ``"memeff"``
(fp32: the least memory) or ``"chunked"`` (bf16: SDPA's CPU backward has no fused kernel); on a
GPU, or while compiling or exporting, ``"bias"``. Tensors are ``(B, nH, N, C)``: batch (or
windows), heads, tokens, head width.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mvitv2.ops.context import autocast_dtype, intercepted, tracing
from mvitv2.ops.memeff import attention_memeff
from mvitv2.ops.rel_pos import (
    RelPos,
    bias_from_coeffs,
    folded_keys,
    rel_pos_bias,
    rel_pos_terms,
)
from mvitv2.utils.choice import Choice
from mvitv2.utils.timing import MeasuredChoices, best_ms

#: Valid names for :func:`set_attention_impl`.
ATTENTION_IMPLS = ("auto", "reference", "bias", "folded", "chunked", "memeff")

_IMPL = Choice("attention implementation", ATTENTION_IMPLS, "auto")

# What "auto" picks for CPU training, per compute dtype (not measured: these follow from the
# kernels). SDPA's CPU backward falls back to the math kernel and keeps the probabilities and
# the bias gradient; "memeff" keeps neither and recomputes them chunk by chunk.
_TRAIN_CPU: dict[torch.dtype, tuple[str, str]] = {
    torch.float32: ("memeff", "training: the least memory (no score-sized tensor kept)"),
    torch.bfloat16: ("chunked", "training under bf16: SDPA's CPU backward has no fused kernel"),
}
_DEFAULT = "bias"

#: The paths ``"auto"`` times on each attention size class at CPU inference.
MEASURED_PATHS = ("bias", "chunked", "folded")
#: What ``"auto"`` resolves to where it times the paths per size class (see :func:`attend`).
MEASURE = "measured"


def set_attention_impl(name: str) -> str:
    """Select the attention path globally; returns the previous setting.

    Args:
        name: ``"auto"`` (default: CPU inference the fastest path measured per size class; see the
            module docstring for training and GPUs),
            ``"reference"`` (explicit score matrix, the exact reference), ``"bias"`` (fused SDPA,
            rel-pos as an additive mask), ``"folded"`` (fused SDPA, rel-pos folded into q/k) or
            ``"chunked"`` (folded q/k with explicit matmuls over query chunks) or ``"memeff"``
            (custom-autograd chunked attention that keeps no score-sized tensor for backward;
            what ``"auto"`` uses for fp32 training on CPU).

    A module's own ``attn_impl`` attribute (None by default) overrides this global setting.
    """
    return _IMPL.set(name)


def get_attention_impl() -> str:
    """The global attention path setting (see :func:`set_attention_impl`)."""
    return _IMPL.value


def attention_impl(name: str) -> contextlib.AbstractContextManager[None]:
    """Context manager: use attention path ``name`` inside the ``with`` block."""
    return _IMPL.using(name)


def resolve_attention_impl(name: str, x: Tensor) -> str:
    """Turn ``"auto"`` into a concrete path for input ``x`` (its device, autocast dtype, and
    whether a gradient will flow through it), or into :data:`MEASURE` (CPU inference:
    :func:`attend` times the paths on each new size class)."""
    if name != "auto":
        return name
    dev = x.device.type
    dtype = autocast_dtype(dev) or x.dtype
    return _auto(dev, dtype, torch.is_grad_enabled() and x.requires_grad)[0]


def _auto(device: str, dtype: torch.dtype, training: bool) -> tuple[str, str]:
    """What ``"auto"`` picks on ``device`` (type) for compute ``dtype``, and why."""
    if device != "cpu":
        return _DEFAULT, "not measured on a GPU: default"
    if training:
        return _TRAIN_CPU.get(dtype, (_DEFAULT, "training: default"))
    if tracing():
        return _DEFAULT, "compiling or exporting: not measured"
    if intercepted():
        return _DEFAULT, "under a dispatch mode (e.g. FLOP counting): not measured"
    return MEASURE, "measured per attention size class at its first call: " + ", ".join(
        MEASURED_PATHS
    )


def _paths() -> dict[str, object]:
    return {
        "reference": attention_reference,
        "bias": attention_bias,
        "folded": attention_folded,
        "chunked": attention_chunked,
        "memeff": attention_memeff,
    }


#: The paths measured per attention size class at CPU inference, for this process ("bias" on a
#: tie, and unmeasured beyond 64 classes; about 60 ms of timing per class).
_MEASURED = MeasuredChoices(default=_DEFAULT)


def _size_class(q: Tensor, k: Tensor, rel: RelPos | None) -> tuple:
    """What a measurement is remembered for: device, dtype, heads, head width and rel-pos kind
    exactly; batch, query and key counts by power of two (detection images of many sizes, and
    so many exact shapes, share a few classes)."""
    B, nH, Nq, C = q.shape
    kind = None if rel is None else (rel.num_prefix, rel.t is not None)
    dtype = autocast_dtype(q.device.type) or q.dtype
    sizes = (B.bit_length(), Nq.bit_length(), k.shape[2].bit_length())
    return (q.device.type, dtype, nH, C, kind, *sizes)


def _measured_path(q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None) -> str:
    """The fastest of :data:`MEASURED_PATHS` for this size class (:func:`_size_class`), timed
    on these inputs at the class's first call and then remembered (see
    :class:`~mvitv2.utils.timing.MeasuredChoices`)."""

    def measure() -> tuple[dict, str]:
        paths = _paths()
        candidates = {
            name: functools.partial(paths[name], q, k, v, scale, rel) for name in MEASURED_PATHS
        }
        dtype = autocast_dtype(q.device.type) or q.dtype
        return candidates, f"q {tuple(q.shape)} k {tuple(k.shape)} {dtype}"

    return _MEASURED.choose(_size_class(q, k, rel), measure)


def attention_measurements() -> dict[str, str]:
    """The paths ``"auto"`` chose so far in this process, per measured size class (named by the
    shapes it was timed on): ``{"q (8, 1, 3136, 96) k (8, 1, 49, 96) torch.float32": "bias (bias
    25.6 ms, chunked 26.5 ms, folded 20.7 ms)"}`` (for a benchmark's JSON or a log)."""
    return _MEASURED.report()


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Explicit attention: ``softmax((q*scale) @ k^T + rel) @ v`` on ``(B, nH, N, C)`` tensors.

    The score matrix is materialised, as in every released MViTv2 implementation; this is the
    exact reference the fused paths are tested against.
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel is not None:
        p = rel.num_prefix
        bias = rel_pos_bias(q[:, :, p:], rel.q_thw, rel.k_thw, rel.h, rel.w, rel.t)
        if p:  # no rel-pos on rows/columns of the cls token
            bias = F.pad(bias, (p, 0, p, 0))
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


#: Score elements per chunk of :func:`attention_chunked` (query rows) and :func:`attention_bias`
#: (batch entries or windows) when no gradient is needed.
CHUNK_ELEMENTS = 1 << 22


def attention_bias(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Fused SDPA with the rel-pos term passed as a float ``attn_mask``.

    Without gradients, a batch (or batch of windows) whose bias would exceed
    :data:`CHUNK_ELEMENTS` goes through in groups, so that the bias stays bounded.
    """
    B, nH, Nq = q.shape[:3]
    if rel is not None and not torch.is_grad_enabled() and not tracing():
        per_item = nH * Nq * k.shape[2]
        if per_item > CHUNK_ELEMENTS and rel.num_prefix == 0:
            return _attention_bias_rows(q, k, v, scale, rel)
        n = max(CHUNK_ELEMENTS // max(per_item, 1), 1)
        if n < B:
            parts = [
                _attention_bias(q[i : i + n], k[i : i + n], v[i : i + n], scale, rel)
                for i in range(0, B, n)
            ]
            return torch.cat(parts)
    return _attention_bias(q, k, v, scale, rel)


def _attention_bias_rows(q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos) -> Tensor:
    """:func:`attention_bias` over query-row chunks (inference, no prefix tokens): each chunk's
    bias is built from the per-query coefficients of :func:`rel_pos_terms` (the same sums as
    :func:`rel_pos_bias`), so the ``(Nq, Nk)`` bias never exists whole."""
    B, nH, Nq = q.shape[:3]
    _, kh, kw = rel.k_thw
    a = rel_pos_terms(q, rel.q_thw, rel.k_thw, rel.h, rel.w, rel.t)
    rows = max(CHUNK_ELEMENTS // (B * nH * k.shape[2]), 1)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    for r0 in range(0, Nq, rows):
        ac = a[:, :, r0 : r0 + rows]
        a_t = ac[..., kh + kw :] if rel.t is not None else None
        bias = bias_from_coeffs(ac[..., :kh], ac[..., kh : kh + kw], a_t, rel.k_thw)
        out[:, :, r0 : r0 + rows] = F.scaled_dot_product_attention(
            q[:, :, r0 : r0 + rows], k, v, attn_mask=bias.to(q.dtype), scale=scale
        )
    return out


def _attention_bias(q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None) -> Tensor:
    bias = None
    if rel is not None:
        p = rel.num_prefix
        bias = rel_pos_bias(q[:, :, p:], rel.q_thw, rel.k_thw, rel.h, rel.w, rel.t)
        if p:
            bias = F.pad(bias, (p, 0, p, 0))
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _fold(q: Tensor, k: Tensor, rel: RelPos, factor: float, extra: int) -> tuple[Tensor, Tensor]:
    """The folded rel-pos term: ``a * factor`` and ``k' = [k, onehots]``, so that
    ``[q, a] . k'`` adds it (no rel term on prefix rows/columns); ``extra`` zero columns end
    both ``a`` and the one-hots (a wider kernel, :func:`folded_width`)."""
    p = rel.num_prefix
    a = rel_pos_terms(q[:, :, p:], rel.q_thw, rel.k_thw, rel.h, rel.w, rel.t, factor).to(q.dtype)
    if p or extra:  # the cls query gets zero coefficients, the cls key zero one-hots
        a = F.pad(a, (0, extra, p, 0))
    return a, folded_keys(k, rel.k_thw, rel.t is not None, p, extra)


def attention_folded(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Fused SDPA with the rel-pos term folded into the dot product (no bias tensor).

    ``q' = [q, a/scale]``, ``k' = [k, onehots]`` (zero coefficients for the cls query, zero
    one-hots for the cls key), ``v`` zero-padded to the same width; the output keeps ``C``.
    At CPU inference the width may be padded further with zero columns (:func:`folded_width`).
    """
    if rel is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    C, terms = q.shape[-1], rel.num_terms()
    width = folded_width(C + terms, q)
    a, k2 = _fold(q, k, rel, 1.0 / scale, width - C - terms)
    q2 = torch.cat((q, a), dim=-1)
    v2 = F.pad(v, (0, width - C))
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :C]


#: At CPU inference the folded path pads its width to a multiple of this where measured faster
#: by :data:`FOLDED_MARGIN` (fp32 is within noise at the probe and slower on wider pads, bf16 on
#: AMX 2-4x faster).
FOLDED_MULTIPLE = 32
FOLDED_MARGIN = 0.1


def folded_width(width: int, q: Tensor) -> int:
    """The width the folded path runs SDPA at for queries ``q``: ``width`` (head width plus
    rel-pos terms), rounded up to a multiple of :data:`FOLDED_MULTIPLE` at CPU inference where
    :func:`folded_padding_ms` found that faster for ``q``'s dtype by more than
    :data:`FOLDED_MARGIN`. PyTorch's CPU flash attention runs its reduced-precision GEMMs on
    AMX tiles 32 bf16 values deep: on the Intel Xeon of docs/benchmarks.md (2 threads)
    MViTv2-S's bf16 folded SDPA took 16.1 ms at width 132 and 12.3 at 160, 20.3 at 118 and
    12.7 at 128; fp32 was as fast or slower padded."""
    if (
        width % FOLDED_MULTIPLE == 0
        or q.device.type != "cpu"
        or torch.is_grad_enabled()
        or tracing()
        or intercepted()
    ):
        return width
    padded = _padding_faster(*folded_padding_ms(q.dtype))
    return -(-width // FOLDED_MULTIPLE) * FOLDED_MULTIPLE if padded else width


def _padding_faster(as_is_ms: float, padded_ms: float) -> bool:
    return padded_ms < (1.0 - FOLDED_MARGIN) * as_is_ms


def time_folded_padding(dtype: torch.dtype) -> tuple[float, float]:
    """Time CPU SDPA in ``dtype`` at a folded width of 118 (96-wide heads plus the terms of an
    8x7x7 key grid) and padded to 128, on ``(1, 2, 1024, width)`` queries and ``(1, 2, 512,
    width)`` keys and values. Returns ``(as is ms, padded ms)``, the best of alternating rounds
    (~50 ms in all)."""
    gen = torch.Generator().manual_seed(0)

    def call(width: int) -> Callable[[], object]:
        q = torch.randn(1, 2, 1024, width, generator=gen).to(dtype)
        kv = torch.randn(1, 2, 512, width, generator=gen).to(dtype)
        return lambda: F.scaled_dot_product_attention(q, kv, kv)

    with torch.autocast("cpu", enabled=False):
        ms = best_ms({"as is": call(118), "padded": call(128)}, budget_ms=40.0, min_rounds=3)
    return ms["as is"], ms["padded"]


#: :func:`time_folded_padding` once per process and dtype.
folded_padding_ms = functools.cache(time_folded_padding)


def folded_choice(dtype: torch.dtype, training: bool) -> dict[str, str]:
    """How wide the folded path runs on a CPU in compute ``dtype`` and why:
    ``{"folded_width": ..., "folded_width_why": ...}``; measures at inference if not yet done."""
    if training:
        return {"folded_width": "as is", "folded_width_why": "with gradients: not padded"}
    as_is, padded = folded_padding_ms(dtype)
    name = str(dtype).removeprefix("torch.")
    chosen = (
        f"padded to a multiple of {FOLDED_MULTIPLE}" if _padding_faster(as_is, padded) else "as is"
    )
    why = f"measured {name} SDPA at width 118: {as_is:.2f} ms, padded to 128: {padded:.2f} ms"
    return {"folded_width": chosen, "folded_width_why": why}


def attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Folded rel-pos with explicit matmuls: ``softmax([q*s, a] @ [k, onehots]^T) @ v``.

    No bias tensor and no padded ``v``; for kernels where the fused SDPA is slower than two
    GEMMs (bf16 on CPUs without AMX, where CPU flash attention computes in fp32). Without
    gradients the queries go in chunks so that the score matrix stays at most
    :data:`CHUNK_ELEMENTS` elements.
    """
    qs, a, k2 = q * scale, None, k
    if rel is not None:
        a, k2 = _fold(qs, k, rel, 1.0 / scale, 0)  # a from the unscaled q

    k2t = k2.transpose(-2, -1)

    def scores(r0: int, r1: int) -> Tensor:
        """Scores of query rows ``r0:r1``, their folded queries cut whole from ``q*s`` and ``a``."""
        qc = qs[:, :, r0:r1]
        return (qc if a is None else torch.cat((qc, a[:, :, r0:r1]), dim=-1)) @ k2t

    B, nH, N = q.shape[:3]
    M = k.shape[-2]
    rows = N
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        rows = max(CHUNK_ELEMENTS // max(B * nH * M, 1), 64)
    if rows >= N:
        return scores(0, N).softmax(dim=-1) @ v
    # Each chunk's folded queries are made whole as they are cut, and v once: the GEMMs
    # would copy a cut of the whole (or v) at every chunk.
    v = v.contiguous()
    return torch.cat([scores(r0, r0 + rows).softmax(dim=-1) @ v for r0 in range(0, N, rows)], 2)


def attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None, impl: str = "auto"
) -> Tensor:
    """``softmax((q * scale) @ k^T + rel) @ v`` on the path ``impl``.

    Args:
        q: queries ``(B, nH, Nq, C)``; k, v: keys and values ``(B, nH, Nk, C)``.
        scale: the softmax scale (``C ** -0.5``).
        rel: the rel-pos tables and grids (None: no rel-pos term).
        impl: a path name of :data:`ATTENTION_IMPLS` (or :data:`MEASURE`); ``"auto"`` is
            resolved for ``q``.

    Returns:
        ``(B, nH, Nq, C)``.
    """
    impl = resolve_attention_impl(impl, q)
    if impl == MEASURE:
        impl = _measured_path(q, k, v, scale, rel)
    return _paths()[impl](q, k, v, scale, rel)


def attention_choice(device: str, dtype: torch.dtype, training: bool) -> dict[str, str]:
    """The attention path in force on ``device`` (type) for compute ``dtype`` (with gradients if
    ``training``) and why: ``{"attention": ..., "attention_setting": ..., "attention_why": ...}``."""
    setting = _IMPL.value
    chosen, why = (setting, "set") if setting != "auto" else _auto(device, dtype, training)
    return {"attention": chosen, "attention_setting": setting, "attention_why": why}
