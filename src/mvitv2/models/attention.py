"""Pooling attention with decomposed relative positions, as pure functions plus one module.

Shapes use ``B`` batch, ``nH`` heads, ``C`` head width, ``N`` tokens, and token grids
``thw = (T, H, W)`` (``T = 1`` for images). The rel-pos code is written with plain
``matmul``/``reshape``/``pad``/``cat`` (no einsum, no in-place slice writes) so that it exports to
ONNX and compiles without graph breaks.

Exact ways to compute the attention (see :func:`set_attention_impl`):

* ``"reference"``: the explicit score matrix ``(q*scale) @ k^T + rel``, softmax, ``@ v``, with
  the straightforward pooling layout (what every released implementation does);
* ``"bias"``: fused ``scaled_dot_product_attention`` with the rel-pos term as a float mask;
* ``"folded"``: fused SDPA with the rel-pos term folded into the dot product, no bias tensor:
  ``[q, a_h/s, a_w/s, a_t/s] . [k, onehot(h), onehot(w), onehot(t)]`` with
  ``a_h[i] = q_i . R_h[h(i), :]`` (``s`` the softmax scale; ``v`` zero-padded to the same width
  because the fused CPU/GPU kernels need equal head dims);
* ``"chunked"``: the folded q/k with two explicit GEMMs and a softmax, over query chunks (bounded
  memory); faster than fused SDPA where that kernel is slow (bf16 on CPUs without AMX);
* ``"memeff"``: for training, a custom autograd function in the flash-attention style: scores
  over query chunks with the rel-pos term added from per-query coefficients, only q, k, v, the
  output and the row log-sum-exp saved, the probabilities recomputed chunk by chunk in backward
  (SDPA's CPU backward with a bias keeps the full probabilities and the bias gradient).

All but ``"reference"`` also use a faster pooling layout: Q/K/V stay token-major
(channels-last) from the qkv projection to the attention kernel, all heads (and K with V, or Q, K
and V when their strides agree) go through one depthwise conv call, and no head transpose is copied.

Memory (same values, fewer or smaller live tensors): under autograd the LayerNorm of pooled
Q/K/V (:class:`_GroupLayerNorm`) keeps only its input and row statistics and the max-pool
shortcut (:func:`max_pool`) only its argmax indices; at inference, large inputs are projected and
pooled one of Q/K/V at a time (:data:`SPLIT_ELEMENTS`) and the bias path runs windows or batch
entries in groups (:data:`CHUNK_ELEMENTS`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.models.config import BlockSpec, MViTConfig
from mvitv2.models.gemm import Linear, autocast_dtype, linear, tracing
from mvitv2.utils.choice import Choice

Grid = tuple[int, int, int]

#: Valid names for :func:`set_attention_impl`.
ATTENTION_IMPLS = ("auto", "reference", "bias", "folded", "chunked", "memeff")

_IMPL = Choice("attention implementation", ATTENTION_IMPLS, "auto")

# What "auto" picks, per (device type, compute dtype), from `benchmarks/attention_paths.py` runs
# (docs/benchmarks.md). Anything not listed uses the fallback.
_AUTO_TABLE: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "bias",
    ("cpu", torch.bfloat16): "chunked",
    ("cuda", torch.float32): "bias",
    ("cuda", torch.bfloat16): "bias",
    ("cuda", torch.float16): "bias",
}
_AUTO_FALLBACK = "bias"

# What "auto" picks when a gradient is needed (training), where it differs from the table above:
# SDPA's CPU backward falls back to the math kernel and keeps the probabilities and the bias
# gradient; "memeff" keeps neither and recomputes them chunk by chunk.
_AUTO_TRAIN_TABLE: dict[tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "memeff",
}


def set_attention_impl(name: str) -> str:
    """Select the attention path globally; returns the previous setting.

    Args:
        name: ``"auto"`` (default: per device and dtype, the fastest measured path),
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
    whether a gradient will flow through it)."""
    if name != "auto":
        return name
    dev = x.device.type
    dtype = autocast_dtype(dev) or x.dtype
    if torch.is_grad_enabled() and x.requires_grad and (dev, dtype) in _AUTO_TRAIN_TABLE:
        return _AUTO_TRAIN_TABLE[dev, dtype]
    return _AUTO_TABLE.get((dev, dtype), _AUTO_FALLBACK)


def rel_pos_index(q_size: int, k_size: int, device: torch.device | None = None) -> Tensor:
    """Indices ``(q_size, k_size)`` into a table of length ``2 * max(q_size, k_size) - 1``.

    Distances are measured on the finer of the two grids, as in every released MViTv2 codebase.
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=device)[:, None] * q_ratio
    k_coords = torch.arange(k_size, device=device)[None, :] * k_ratio
    return (q_coords - k_coords + (k_size - 1) * k_ratio).long()


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """Linearly interpolate a ``(L, C)`` rel-pos table to ``(length, C)``."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=length, mode="linear")[0].t()


def get_rel_pos(q_size: int, k_size: int, table: Tensor) -> Tensor:
    """Relative embeddings ``(q_size, k_size, C)`` for one axis, resizing the table if needed."""
    table = resize_rel_pos(table, 2 * max(q_size, k_size) - 1)
    return table[rel_pos_index(q_size, k_size, table.device)]


def rel_pos_bias(
    q: Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    rel_pos_t: Tensor | None = None,
) -> Tensor:
    """Decomposed relative-position term of the attention scores.

    Args:
        q: unscaled queries ``(B, nH, qt*qh*qw, C)``, spatial tokens only.
        q_thw: query grid. k_thw: key grid.
        rel_pos_h, rel_pos_w, rel_pos_t: tables ``(L, C)``; ``rel_pos_t`` may be None when
            ``qt == kt == 1``.

    Returns:
        ``(B, nH, Nq, Nk)`` with ``bias[i, j] = q_i . (R_h[h(i), h(j)] + R_w[w(i), w(j)]
        + R_t[t(i), t(j)])``.
    """
    B, nH, _, C = q.shape
    qt, qh, qw = q_thw
    kt, kh, kw = k_thw
    rh, rw = get_rel_pos(qh, kh, rel_pos_h), get_rel_pos(qw, kw, rel_pos_w)
    rt = None if rel_pos_t is None else get_rel_pos(qt, kt, rel_pos_t)
    bias = _bias_from_coeffs(*_rel_coeffs(q.reshape(B, nH, qt, qh, qw, C), rh, rw, rt), k_thw)
    return bias.reshape(B, nH, qt * qh * qw, kt * kh * kw)


def _rel_coeffs(
    r: Tensor, rh: Tensor, rw: Tensor, rt: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-axis rel-pos coefficients of the query grid ``r`` ``(B, nH, qt, qh, qw, C)`` with
    gathered tables ``rh (qh, kh, C)``, ``rw (qw, kw, C)``, ``rt (qt, kt, C)`` (or None).

    Returns ``(a_h, a_w, a_t)`` (``a_t`` None without ``rt``), each ``(B, nH, qt, qh, qw, k)`` with ``a_h[..., y, x, j] =
    r[..., y, x, :] . rh[y, j]`` etc.: matmuls batched over the axis the table slice depends on.
    """
    B, nH, qt, qh, qw, C = r.shape
    a_h = r @ rh.transpose(1, 2)
    a_w = (r.transpose(3, 4) @ rw.transpose(1, 2)).transpose(3, 4)
    if rt is None:
        return a_h, a_w, None
    a_t = (r.reshape(B, nH, qt, qh * qw, C) @ rt.transpose(1, 2)).view(*a_h.shape[:5], -1)
    return a_h, a_w, a_t


def _bias_from_coeffs(a_h: Tensor, a_w: Tensor, a_t: Tensor | None, k_thw: Grid) -> Tensor:
    """The rel-pos bias ``(..., kt*kh*kw)`` of per-query coefficients ``a_h (..., kh)``,
    ``a_w (..., kw)``, ``a_t (..., kt)`` (None: no temporal term), broadcast over the key grid."""
    kt, kh, kw = k_thw
    bias = (a_h[..., :, None] + a_w[..., None, :])[..., None, :, :]  # (..., 1, kh, kw)
    if a_t is not None:
        bias = bias + a_t[..., None, None]
    elif kt != 1:
        bias = bias.expand(*bias.shape[:-3], kt, kh, kw)
    return bias.flatten(-3)


def rel_pos_terms(
    q: Tensor,
    q_thw: Grid,
    k_thw: Grid,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    rel_pos_t: Tensor | None = None,
    factor: float = 1.0,
) -> Tensor:
    """Per-query rel-pos coefficients ``[a_h, a_w(, a_t)]``, the folded form of the rel-pos term.

    Args:
        q: unscaled queries ``(B, nH, qt*qh*qw, C)``, spatial tokens only.
        q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t: as in :func:`rel_pos_bias`.
        factor: multiplies the result (``1/scale`` folds the softmax scale in for free: it is
            applied to the small gathered tables, not to the coefficients).

    Returns:
        ``(B, nH, Nq, kh + kw (+ kt))`` with ``a_h[i, y] = q_i . R_h[h(i), y]`` etc., so that
        ``rel_pos_bias(...)[i, j] == factor**-1 * (a[i] . rel_pos_onehots(k_thw)[j])``.
    """
    B, nH, _, C = q.shape
    qt, qh, qw = q_thw
    kt, kh, kw = k_thw
    rh = get_rel_pos(qh, kh, rel_pos_h) * factor
    rw = get_rel_pos(qw, kw, rel_pos_w) * factor
    rt = None if rel_pos_t is None else get_rel_pos(qt, kt, rel_pos_t) * factor
    return _rel_terms_from_gathered(q.reshape(B, nH, qt, qh, qw, C), rh, rw, rt)


def _rel_terms_from_gathered(r: Tensor, rh: Tensor, rw: Tensor, rt: Tensor | None) -> Tensor:
    """:func:`rel_pos_terms` of the query grid ``r`` ``(B, nH, qt, qh, qw, C)`` with already
    gathered tables (see :func:`_rel_coeffs`); returns ``(B, nH, qt*qh*qw, kh + kw (+ kt))``."""
    B, nH, qt, qh, qw, _ = r.shape
    parts = [a for a in _rel_coeffs(r, rh, rw, rt) if a is not None]
    return torch.cat(parts, dim=-1).reshape(B, nH, qt * qh * qw, -1)


def rel_pos_onehots(
    k_thw: Grid,
    temporal: bool,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Key-side one-hots ``(kt*kh*kw, kh + kw (+ kt))`` matching :func:`rel_pos_terms`."""
    kt, kh, kw = k_thw
    eye_h = torch.eye(kh, device=device, dtype=dtype)[None, :, None].expand(kt, kh, kw, kh)
    eye_w = torch.eye(kw, device=device, dtype=dtype)[None, None].expand(kt, kh, kw, kw)
    parts = [eye_h, eye_w]
    if temporal:
        parts.append(
            torch.eye(kt, device=device, dtype=dtype)[:, None, None].expand(kt, kh, kw, kt)
        )
    return torch.cat(parts, dim=-1).reshape(kt * kh * kw, -1)


class RelPos:
    """The rel-pos tables of one attention and the grids they are used on (a plain container)."""

    def __init__(
        self, h: Tensor, w: Tensor, t: Tensor | None, q_thw: Grid, k_thw: Grid, num_prefix: int
    ) -> None:
        self.h, self.w, self.t = h, w, t
        self.q_thw, self.k_thw = q_thw, k_thw
        self.num_prefix = num_prefix


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
        bias = _bias_from_coeffs(ac[..., :kh], ac[..., kh : kh + kw], a_t, rel.k_thw)
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


def _fold(q: Tensor, k: Tensor, rel: RelPos, factor: float) -> tuple[Tensor, Tensor]:
    """``q' = [q, a * factor]``, ``k' = [k, onehots]`` with no rel term on prefix rows/columns."""
    p = rel.num_prefix
    B, nH = q.shape[:2]
    a = rel_pos_terms(q[:, :, p:], rel.q_thw, rel.k_thw, rel.h, rel.w, rel.t, factor).to(q.dtype)
    onehot = rel_pos_onehots(rel.k_thw, rel.t is not None, q.device, k.dtype)
    if p:  # the cls query gets zero coefficients, the cls key zero one-hots
        a = F.pad(a, (0, 0, p, 0))
        onehot = F.pad(onehot, (0, 0, p, 0))
    return torch.cat((q, a), dim=-1), torch.cat((k, onehot.expand(B, nH, -1, -1)), dim=-1)


def attention_folded(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Fused SDPA with the rel-pos term folded into the dot product (no bias tensor).

    ``q' = [q, a/scale]``, ``k' = [k, onehots]`` (zero coefficients for the cls query, zero
    one-hots for the cls key), ``v`` zero-padded to the same width; the output keeps ``C``.
    """
    if rel is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    C = q.shape[-1]
    q2, k2 = _fold(q, k, rel, 1.0 / scale)
    v2 = F.pad(v, (0, q2.shape[-1] - C))
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :C]


def attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Folded rel-pos with explicit matmuls: ``softmax([q*s, a] @ [k, onehots]^T) @ v``.

    No bias tensor and no padded ``v``; for kernels where the fused SDPA is slower than two
    GEMMs (bf16 on CPUs without AMX, where CPU flash attention computes in fp32). Without
    gradients the queries go in chunks so that the score matrix stays at most
    :data:`CHUNK_ELEMENTS` elements.
    """
    if rel is None:
        q2, k2 = q * scale, k
    else:
        q2, k2 = _fold(q * scale, k, rel, 1.0 / scale)  # a from the unscaled q
    k2t = k2.transpose(-2, -1)
    B, nH, N = q.shape[:3]
    M = k.shape[-2]
    rows = N
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        rows = max(CHUNK_ELEMENTS // max(B * nH * M, 1), 64)
    if rows >= N:
        return (q2 @ k2t).softmax(dim=-1) @ v
    outs = [(qc @ k2t).softmax(dim=-1) @ v for qc in q2.split(rows, dim=2)]
    return torch.cat(outs, dim=2)


#: Score elements per query chunk of :func:`attention_memeff` (forward and backward).
MEMEFF_CHUNK_ELEMENTS = 1 << 22


def _memeff_rows(bh: int, nq: int, nk: int) -> int:
    """Query rows per chunk so that one chunk of scores has at most MEMEFF_CHUNK_ELEMENTS."""
    return min(max(MEMEFF_CHUNK_ELEMENTS // max(bh * nk, 1), 16), nq)


def _memeff_scores(
    qs: Tensor, kt: Tensor, a: Tensor | None, k_thw: Grid | None, p: int, r0: int
) -> Tensor:
    """Scores ``qs @ k^T + rel`` of one query chunk (3-D: heads folded into the batch).

    ``qs`` holds the scaled query rows ``r0 .. r0+n``; ``a`` the rel-pos coefficients of all
    grid queries (rows offset by the ``p`` prefix tokens, which, like the prefix keys, get no
    rel-pos term).
    """
    s = torch.bmm(qs, kt)
    if a is None:
        return s
    n = qs.shape[1]
    g0 = max(r0, p)  # first grid query row of the chunk
    if g0 >= r0 + n:
        return s
    kt_, kh, kw = k_thw
    ac = a[:, g0 - p : r0 + n - p]
    grid = s[:, g0 - r0 :, p:].unflatten(-1, (kt_, kh, kw))
    grid.add_(ac[..., None, :kh, None])
    grid.add_(ac[..., None, None, kh : kh + kw])
    if ac.shape[-1] > kh + kw:  # temporal term
        grid.add_(ac[..., kh + kw :, None, None])
    return s


def _bh(x: Tensor) -> Tensor:
    """``(B, nH, N, C)`` -> ``(B*nH, N, C)`` (a copy only when the layout needs one)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


class _MemEffAttention(torch.autograd.Function):
    """``softmax((q*scale) @ k^T + rel) @ v`` over query chunks, flash-attention style: the
    forward saves only q, k, v (the caller's views, no copies), the output and the row
    log-sum-exp; the backward recomputes the rel-pos coefficients and each chunk's
    probabilities. No ``(Nq, Nk)`` tensor outlives a chunk.

    q ``(B, nH, Nq, C)``, k/v ``(B, nH, Nk, C)``; ``rh``/``rw``/``rt`` the gathered rel-pos
    tables ``(q_size, k_size, C)`` of each axis (None: no rel-pos; ``rt`` None: no temporal
    term). Per grid query ``i`` the coefficients ``a[i] = [q_i . rh[h(i)], q_i . rw[w(i)],
    q_i . rt[t(i)]]`` are broadcast over the key grid; their gradient is the score gradient
    summed over the broadcast axes, which goes back to q and the gathered tables.
    """

    @staticmethod
    def forward(ctx, q, k, v, rh, rw, rt, scale, q_thw, k_thw, p):  # noqa: D102
        B, nH, Nq, C = q.shape
        Nk = k.shape[2]
        kt, v3 = _bh(k).transpose(1, 2), _bh(v)
        a3 = None
        if rh is not None:
            r = q[:, :, p:].reshape(B, nH, *q_thw, C)
            a3 = _bh(_rel_terms_from_gathered(r, rh, rw, rt))
        rows = _memeff_rows(B * nH, Nq, Nk)
        outs, lses = [], []
        for r0 in range(0, Nq, rows):
            qs = _bh(q[:, :, r0 : r0 + rows] * scale)  # one copy: scaled and contiguous
            s = _memeff_scores(qs, kt, a3, k_thw, p, r0)
            m = s.amax(dim=-1, keepdim=True)
            e = s.sub_(m).exp_()
            total = e.sum(dim=-1, keepdim=True)
            outs.append(torch.bmm(e, v3).div_(total))  # normalise the (n, C) output, not (n, Nk)
            lses.append(total.log_().add_(m))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=1)
        out = out.view(B, nH, Nq, -1)
        ctx.save_for_backward(q, k, v, rh, rw, rt, out, lse)
        ctx.scale, ctx.q_thw, ctx.k_thw, ctx.p = scale, q_thw, k_thw, p
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k, v, rh, rw, rt, out, lse = ctx.saved_tensors
        scale, q_thw, k_thw, p = ctx.scale, ctx.q_thw, ctx.k_thw, ctx.p
        B, nH, Nq, C = q.shape
        Nk = k.shape[2]
        k3, v3, out3, dout3 = _bh(k), _bh(v), _bh(out), _bh(dout)
        a3 = r = None
        if rh is not None:
            r = q[:, :, p:].reshape(B, nH, *q_thw, C)
            a3 = _bh(_rel_terms_from_gathered(r, rh, rw, rt))
        kt, vt = k3.transpose(1, 2), v3.transpose(1, 2)
        dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
        dqs, das = [], []
        rows = _memeff_rows(B * nH, Nq, Nk)
        for r0 in range(0, Nq, rows):
            qs, doc = _bh(q[:, :, r0 : r0 + rows] * scale), dout3[:, r0 : r0 + rows]
            delta = (doc * out3[:, r0 : r0 + rows]).sum(dim=-1, keepdim=True)
            prob = _memeff_scores(qs, kt, a3, k_thw, p, r0)
            prob = prob.sub_(lse[:, r0 : r0 + rows]).exp_()
            dv.baddbmm_(prob.transpose(1, 2), doc)
            ds = torch.bmm(doc, vt).sub_(delta).mul_(prob)  # d(scores)
            del prob
            dqs.append(torch.bmm(ds, k3).mul_(scale))
            dk.baddbmm_(ds.transpose(1, 2), qs)  # scale * ds^T q
            if a3 is not None:
                kt_, kh, kw = k_thw
                g0 = max(r0, p)
                if g0 < r0 + qs.shape[1]:
                    grid = ds[:, g0 - r0 :, p:].unflatten(-1, (kt_, kh, kw))
                    parts = [grid.sum(dim=(2, 4)), grid.sum(dim=(2, 3))]
                    if rt is not None:
                        parts.append(grid.sum(dim=(3, 4)))
                    das.append(torch.cat(parts, dim=-1))
        dq = (dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=1)).view(q.shape)
        drh = drw = drt = None
        if a3 is not None:
            del a3
            qt, qh, qw = q_thw
            kh, kw = k_thw[1:]
            da = das[0] if len(das) == 1 else torch.cat(das, dim=1)
            da = da.view(B, nH, qt, qh, qw, -1)
            da_h, da_w = da[..., :kh], da[..., kh : kh + kw]
            # a_h = r @ rh^T batched over qh (a_w over qw, a_t over qt): the matmul gradients.
            dr = da_h @ rh + (da_w.transpose(3, 4) @ rw).transpose(3, 4)
            drh = (da_h.permute(3, 5, 0, 1, 2, 4).reshape(qh, kh, -1)
                   @ r.permute(3, 0, 1, 2, 4, 5).reshape(qh, -1, C))  # fmt: skip
            drw = (da_w.permute(4, 5, 0, 1, 2, 3).reshape(qw, kw, -1)
                   @ r.permute(4, 0, 1, 2, 3, 5).reshape(qw, -1, C))  # fmt: skip
            if rt is not None:
                da_t = da[..., kh + kw :].reshape(B, nH, qt, qh * qw, -1)
                dr = dr + (da_t @ rt).view(dr.shape)
                drt = (da_t.permute(2, 4, 0, 1, 3).reshape(qt, da_t.shape[-1], -1)
                       @ r.reshape(B, nH, qt, qh * qw, C).permute(2, 0, 1, 3, 4).reshape(qt, -1, C))  # fmt: skip
            dq[:, :, p:] += dr.view(B, nH, -1, C)
        return dq, dk.view(k.shape), dv.view(v.shape), drh, drw, drt, None, None, None, None


def attention_memeff(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Memory-efficient exact attention for training (custom autograd, flash-attention style).

    The rel-pos term is added per query chunk from the per-query coefficients of
    :func:`rel_pos_terms` (broadcast over the key grid); the backward recomputes the
    coefficients and the scores chunk by chunk, so neither the score matrix, the probabilities,
    a bias (or its gradient) nor copies of ``q`` are kept for backward. The gathered rel-pos
    tables get their gradients from the function, the tables themselves by ordinary autograd.
    """
    rh = rw = rt = None
    q_thw = k_thw = None
    p = 0
    if rel is not None:
        p, q_thw, k_thw = rel.num_prefix, rel.q_thw, rel.k_thw
        dt = q.dtype
        rh = get_rel_pos(q_thw[1], k_thw[1], rel.h).to(dt)
        rw = get_rel_pos(q_thw[2], k_thw[2], rel.w).to(dt)
        if rel.t is not None:
            rt = get_rel_pos(q_thw[0], k_thw[0], rel.t).to(dt)
    return _MemEffAttention.apply(q, k, v, rh, rw, rt, scale, q_thw, k_thw, p)


ATTENTION_FUNCTIONS = {
    "reference": attention_reference,
    "bias": attention_bias,
    "folded": attention_folded,
    "chunked": attention_chunked,
    "memeff": attention_memeff,
}


def pool_tokens(
    x: Tensor, thw: Grid, pool: nn.Module, num_prefix: int, spatial_only: bool
) -> tuple[Tensor, Grid]:
    """Apply a conv/pool module to the grid tokens of ``x`` and keep prefix (cls) tokens.

    Args:
        x: ``(..., N, C)`` with ``N = num_prefix + T*H*W`` tokens.
        thw: the token grid.
        pool: a 2-D module when ``spatial_only`` (``T`` must be 1), else a 3-D one.
        num_prefix: leading tokens that skip pooling (the cls token).

    Returns:
        pooled tokens ``(..., num_prefix + T'*H'*W', C)`` and the new grid.
    """
    lead = x.shape[:-2]
    C = x.shape[-1]
    prefix, grid = x[..., :num_prefix, :], x[..., num_prefix:, :]
    grid = grid.reshape(-1, *thw, C)
    if isinstance(pool, (nn.MaxPool2d, nn.MaxPool3d)):
        pool = functools.partial(max_pool, pool=pool)
    if spatial_only:
        grid = pool(grid[:, 0].permute(0, 3, 1, 2)).unsqueeze(2)
    else:
        grid = pool(grid.permute(0, 4, 1, 2, 3))
    new_thw = (grid.shape[2], grid.shape[3], grid.shape[4])
    grid = grid.flatten(2).transpose(1, 2).reshape(*lead, -1, C)
    if num_prefix:
        grid = torch.cat((prefix, grid), dim=-2)
    return grid, new_thw


class _MaxPoolIndices(torch.autograd.Function):
    """Max pooling (2-D or 3-D, NC... layout) that keeps only the argmax indices (int32) for
    backward; autograd's max pooling also keeps the whole input."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):  # noqa: D102
        pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
        y, idx = pool(x, kernel, stride, padding, return_indices=True)
        ctx.save_for_backward(idx.to(torch.int32))
        ctx.in_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        (idx,) = ctx.saved_tensors
        shape = ctx.in_shape
        planes = shape[0] * shape[1]
        dx = dy.new_zeros(planes, math.prod(shape[2:]))
        dx.scatter_add_(1, idx.reshape(planes, -1).long(), dy.reshape(planes, -1))
        return dx.view(shape), None, None, None


def max_pool(x: Tensor, pool: nn.Module) -> Tensor:
    """Apply a ``MaxPool2d``/``MaxPool3d`` module; under autograd through
    :class:`_MaxPoolIndices` (same values and gradients, less memory kept for backward)."""
    if (
        not torch.is_grad_enabled()
        or tracing()
        or pool.dilation not in (1, (1, 1), (1, 1, 1))
        or pool.ceil_mode
    ):
        return pool(x)
    return _MaxPoolIndices.apply(x, pool.kernel_size, pool.stride, pool.padding)


def window_partition(x: Tensor, hw: tuple[int, int], window: int) -> tuple[Tensor, tuple[int, int]]:
    """Split ``(B, nH, H*W, C)`` tokens into zero-padded windows ``(B*nW, nH, window**2, C)``.

    Returns the windows and the padded grid size.
    """
    B, nH, _, C = x.shape
    H, W = hw
    x = x.reshape(B, nH, H, W, C)
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, nH, Hp // window, window, Wp // window, window, C)
    x = x.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, nH, window * window, C)
    return x, (Hp, Wp)


def window_unpartition(
    x: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, nH, window**2, C)`` -> ``(B, nH, H*W, C)``."""
    Hp, Wp = padded_hw
    H, W = hw
    nWh, nWw = Hp // window, Wp // window
    _, nH, _, C = x.shape
    x = x.reshape(-1, nWh, nWw, nH, window, window, C).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(-1, nH, Hp, Wp, C)[:, :, :H, :W]
    return x.reshape(-1, nH, H * W, C)


def _pool_conv(spatial_only: bool, dim: int, kernel: Grid, stride: Grid) -> nn.Module:
    """Depthwise pooling conv shared by all heads (``groups = head width``)."""
    if spatial_only:
        return nn.Conv2d(
            dim, dim, kernel[1:], stride=stride[1:], padding=[k // 2 for k in kernel[1:]],
            groups=dim, bias=False,
        )  # fmt: skip
    return nn.Conv3d(
        dim, dim, kernel, stride=stride, padding=[k // 2 for k in kernel], groups=dim, bias=False
    )


def _depthwise_conv3d_by_2d(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]
) -> Tensor:
    """Depthwise 3-D conv as a sum over the temporal taps of depthwise 2-D convs.

    Args:
        x: ``(B, T, H, W, C)`` token-major input.
        weight: ``(C, 1, kt, kh, kw)``.
        stride, padding: of the 3-D conv.

    Returns:
        ``(B, T', H', W', C)``, equal to the 3-D conv up to float rounding. ATen's depthwise
        Conv3d backward is slow on CPU for small spatial grids with many channels (measured on
        2 cores, fwd+bwd: 14.7 vs 1.8 ms for (32, 2, 4, 4, 384), 19.4 vs 8.2 ms for
        (4, 8, 7, 7, 768)); from 14x14 up the 3-D kernel is as fast or faster.
    """
    B, T, H, W, C = x.shape
    kt, st, pt = weight.shape[2], stride[0], padding[0]
    if pt:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, pt, pt))
    t_out = (T + 2 * pt - kt) // st + 1
    y = None
    for dt in range(kt):
        xs = x[:, dt : dt + st * (t_out - 1) + 1 : st].reshape(B * t_out, H, W, C)
        yd = F.conv2d(xs.permute(0, 3, 1, 2), weight[:, :, dt], None, stride[1:], padding[1:], 1, C)
        y = yd if y is None else y + yd
    return y.permute(0, 2, 3, 1).reshape(B, t_out, y.shape[2], y.shape[3], C)


def _channels_last_pool(
    x: Tensor, thw: Grid, weight: Tensor, conv: nn.Module, num_prefix: int
) -> tuple[Tensor, Grid]:
    """Depthwise conv over the grid tokens of ``x`` ``(B, N, ch)`` without leaving token-major
    layout: the ``(B, T, H, W, ch)`` view is a channels-last conv input, and the conv output
    (channels-last too) views back as tokens. Prefix tokens skip the conv.

    ``weight`` is ``(ch, 1, *kernel)``; stride and padding come from ``conv``.
    """
    B, _, ch = x.shape
    T, H, W = thw
    grid = x[:, num_prefix:] if num_prefix else x
    if weight.dim() == 4:  # 2-D conv on a T = 1 grid
        y = F.conv2d(
            grid.reshape(B, H, W, ch).permute(0, 3, 1, 2), weight, None, conv.stride,
            conv.padding, 1, ch,
        )  # fmt: skip
        new_thw = (1, y.shape[2], y.shape[3])
        y = y.permute(0, 2, 3, 1)
    elif H * W < 196 and torch.is_grad_enabled() and not tracing():
        y = _depthwise_conv3d_by_2d(grid.reshape(B, T, H, W, ch), weight, conv.stride, conv.padding)
        new_thw = (y.shape[1], y.shape[2], y.shape[3])
    else:
        y = F.conv3d(
            grid.reshape(B, T, H, W, ch).permute(0, 4, 1, 2, 3), weight, None, conv.stride,
            conv.padding, 1, ch,
        )  # fmt: skip
        new_thw = (y.shape[2], y.shape[3], y.shape[4])
        y = y.permute(0, 2, 3, 4, 1)
    y = y.reshape(B, -1, ch)
    if num_prefix:
        y = torch.cat((x[:, :num_prefix], y), dim=1)
    return y, new_thw


def _head_norm(x: Tensor, norms: list[nn.LayerNorm], num_heads: int) -> Tensor:
    """LayerNorm over the head width of ``(B, N, G*nH*C)`` tokens, norm ``g`` on group ``g``.

    Returns ``(B, N, G, nH, C)``. With several groups (K and V, or Q, K and V pooled together),
    one affine-free LayerNorm plus one ``addcmul`` replaces G strided LayerNorm calls.
    """
    B, N, _ = x.shape
    G = len(norms)
    # normalized_shape from the module, not x.shape: a traced shape is not a constant for ONNX.
    shape = norms[0].normalized_shape
    x = x.reshape(B, N, G, num_heads, shape[0])
    eps = norms[0].eps
    if G == 1:
        return F.layer_norm(x, shape, norms[0].weight, norms[0].bias, eps)
    weight = torch.stack([n.weight for n in norms])[:, None]  # (G, 1, C)
    bias = torch.stack([n.bias for n in norms])[:, None]
    if autocast_dtype(x.device.type) is None and not tracing():
        if torch.is_grad_enabled():
            return _GroupLayerNorm.apply(x, weight, bias, eps)
        # Inference: affine in place, no second full-size tensor.
        return F.layer_norm(x, shape, None, None, eps).mul_(weight).add_(bias)
    x = F.layer_norm(x, shape, None, None, eps)
    return torch.addcmul(bias.to(x.dtype), x, weight.to(x.dtype))


class _GroupLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim of ``(B, N, G, nH, C)`` with weight/bias ``(G, 1, C)`` per
    group. Saves only the input and the row statistics (affine-free LayerNorm + ``addcmul``
    under autograd would also keep the normalised tensor); the backward recomputes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # noqa: D102
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y.mul_(weight).add_(bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, weight, mean, rstd = ctx.saved_tensors
        dx = dw = db = None
        dims = (0, 1, 3)
        if ctx.needs_input_grad[1]:
            dw = ((x - mean).mul_(rstd).mul_(dy)).sum(dim=dims)[:, None]
        if ctx.needs_input_grad[2]:
            db = dy.sum(dim=dims)[:, None]
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_layer_norm_backward(
                dy * weight, x, x.shape[-1:], mean, rstd, None, None, [True, False, False]
            )[0]
        return dx, dw, db, None


def _windows(x: Tensor, hw: tuple[int, int], window: int) -> tuple[Tensor, tuple[int, int]]:
    """``(B, H*W, *rest)`` tokens -> zero-padded windows ``(B*nW, window**2, *rest)``."""
    B, _ = x.shape[:2]
    rest = x.shape[2:]
    H, W = hw
    x = x.reshape(B, H, W, -1)
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window, window, Wp // window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, *rest), (Hp, Wp)


def _unwindows(x: Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`_windows`: ``(B*nW, window**2, *rest)`` -> ``(B, H*W, *rest)``."""
    Hp, Wp = padded_hw
    H, W = hw
    rest = x.shape[2:]
    x = x.reshape(-1, Hp // window, Wp // window, window, window, rest.numel())
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, rest.numel())[:, :H, :W]
    return x.reshape(x.shape[0], H * W, *rest)


#: At inference, Q, K and V are projected and pooled one at a time when one of them would
#: have more elements than this (bounds the unpooled projections of large inputs).
SPLIT_ELEMENTS = 1 << 23


class MultiScaleAttention(nn.Module):
    """Pooling attention: Q/K/V pooled by depthwise convs, decomposed rel-pos, residual pooling.

    Built from a :class:`BlockSpec` (widths, heads, strides, window) and the model config
    (cls token, rel-pos and residual-pooling switches). ``attn_impl`` (None: the global
    :func:`set_attention_impl` setting) selects the attention path for this module.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
        self.attn_impl: str | None = None
        self.num_heads = spec.num_heads
        self.dim_out = spec.attn_dim
        head_dim = spec.attn_dim // spec.num_heads
        self.scale = head_dim**-0.5
        self.num_prefix = int(cfg.use_cls_token)
        self.spatial_only = not cfg.temporal
        self.residual_pooling = cfg.residual_pooling
        self.residual_pooling_cls = cfg.residual_pooling_cls
        self.window = spec.window
        self.stride_q = spec.stride_q
        self.stride_kv = spec.stride_kv

        self.qkv = Linear(spec.dim, 3 * spec.attn_dim, bias=cfg.qkv_bias)
        self.proj = Linear(spec.attn_dim, spec.attn_dim)
        norm = nn.LayerNorm
        kernel = tuple(cfg.pool_kernel)
        self.pool_q = self.norm_q = None
        if spec.pool_q:
            self.pool_q = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_q)
            self.norm_q = norm(head_dim, eps=cfg.norm_eps)
        self.pool_k = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_k = norm(head_dim, eps=cfg.norm_eps)
        self.pool_v = _pool_conv(self.spatial_only, head_dim, kernel, spec.stride_kv)
        self.norm_v = norm(head_dim, eps=cfg.norm_eps)

        self.rel_pos_h = self.rel_pos_w = self.rel_pos_t = None
        if cfg.use_rel_pos:
            t, h, w = spec.input_grid
            q_size = [max(s // st, 1) for s, st in zip((t, h, w), spec.stride_q)]
            kv_size = [max(s // st, 1) for s, st in zip((t, h, w), spec.stride_kv)]
            lengths = [2 * max(a, b) - 1 for a, b in zip(q_size, kv_size)]
            self.rel_pos_h = nn.Parameter(torch.zeros(lengths[1], head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(lengths[2], head_dim))
            if cfg.temporal:
                self.rel_pos_t = nn.Parameter(torch.zeros(lengths[0], head_dim))

    def _rel(self, q_thw: Grid, k_thw: Grid, num_prefix: int) -> RelPos | None:
        if self.rel_pos_h is None:
            return None
        return RelPos(self.rel_pos_h, self.rel_pos_w, self.rel_pos_t, q_thw, k_thw, num_prefix)

    def forward(self, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        """x: ``(B, N, C_in)`` tokens on grid ``thw``. Returns ``(B, N', C_out)`` and its grid."""
        impl = resolve_attention_impl(self.attn_impl or _IMPL.value, x)
        if impl == "reference":
            return self._forward_reference(x, thw)
        return self._forward_fused(x, thw, ATTENTION_FUNCTIONS[impl])

    # ------------------------------------------------------------------ reference path
    def _pool(self, x: Tensor, thw: Grid, pool: nn.Module | None, norm: nn.Module | None):
        if pool is None:
            return x, thw
        x, thw = pool_tokens(x, thw, pool, self.num_prefix, self.spatial_only)
        return norm(x), thw

    def _forward_reference(self, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        """Head-major layout, one pooling call per tensor, explicit attention matrix."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_thw = self._pool(q, thw, self.pool_q, self.norm_q)
        k, k_thw = self._pool(k, thw, self.pool_k, self.norm_k)
        v, _ = self._pool(v, thw, self.pool_v, self.norm_v)

        if self.window:
            q_win = self.window // self.stride_q[1]
            kv_win = self.window // self.stride_kv[1]
            qw, padded = window_partition(q, q_thw[1:], q_win)
            kw, _ = window_partition(k, k_thw[1:], kv_win)
            vw, _ = window_partition(v, k_thw[1:], kv_win)
            rel = self._rel((1, q_win, q_win), (1, kv_win, kv_win), 0)
            out = attention_reference(qw, kw, vw, self.scale, rel)
            out = window_unpartition(out, q_win, padded, q_thw[1:])
        else:
            out = attention_reference(q, k, v, self.scale, self._rel(q_thw, k_thw, self.num_prefix))

        if self.residual_pooling:
            if self.num_prefix and not self.residual_pooling_cls:
                p = self.num_prefix
                out = torch.cat((out[:, :, :p], out[:, :, p:] + q[:, :, p:]), dim=2)
            else:
                out = out + q
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)
        return self.proj(out), q_thw

    # ------------------------------------------------------------------ fused path
    def _pool_group(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        thw: Grid,
        pools: list[nn.Module],
        norms: list[nn.LayerNorm],
    ) -> tuple[Tensor, Grid]:
        """Project ``x`` with ``(weight, bias)`` to ``(B, N, G*D)`` tokens (G of Q/K/V side by
        side), then pool and norm them in one conv call.

        Returns ``(B, N', G, nH, C)`` and the pooled grid. The per-head conv weight (shared by
        the heads) is repeated over heads so that the conv runs on token-major memory directly.
        The projection is made here so that no caller holds it: at inference it is freed as
        soon as the conv has read it.
        """
        nH = self.num_heads
        y = linear(x, weight, bias)
        w = torch.cat([pl.weight.repeat(nH, *[1] * (pl.weight.dim() - 1)) for pl in pools])
        y, thw = _channels_last_pool(y, thw, w.to(y.dtype), pools[0], self.num_prefix)
        return _head_norm(y, norms, nH), thw

    def _qkv_pooled(self, x: Tensor, thw: Grid) -> tuple[Tensor, Tensor, Grid, Grid]:
        """Q ``(B, Nq, nH, C)`` and K, V stacked ``(B, Nk, 2, nH, C)``, pooled and normed
        (possibly strided views of one buffer)."""
        D = self.dim_out
        w, b = self.qkv.weight, self.qkv.bias
        big = not torch.is_grad_enabled() and not tracing()
        if big and x.shape[0] * x.shape[1] * D > SPLIT_ELEMENTS:
            return self._qkv_pooled_split(x, thw)
        if self.pool_q is not None and self.stride_q == self.stride_kv:
            qkv, q_thw = self._pool_group(
                x, w, b, thw, [self.pool_q, self.pool_k, self.pool_v],
                [self.norm_q, self.norm_k, self.norm_v],
            )  # fmt: skip
            return qkv[:, :, 0], qkv[:, :, 1:], q_thw, q_thw
        # Different strides: two GEMMs on row slices of the qkv weight give dense Q and KV.
        kv, k_thw = self._pool_group(
            x, w[D:], None if b is None else b[D:], thw, [self.pool_k, self.pool_v],
            [self.norm_k, self.norm_v],
        )  # fmt: skip
        bq = None if b is None else b[:D]
        if self.pool_q is not None:
            q, q_thw = self._pool_group(x, w[:D], bq, thw, [self.pool_q], [self.norm_q])
            q = q[:, :, 0]
        else:
            q = linear(x, w[:D], bq)
            q, q_thw = q.reshape(q.shape[0], q.shape[1], self.num_heads, -1), thw
        return q, kv, q_thw, k_thw

    def _qkv_pooled_split(self, x: Tensor, thw: Grid) -> tuple[Tensor, Tensor, Grid, Grid]:
        """:meth:`_qkv_pooled` one tensor at a time (inference on large inputs): only one
        unpooled projection exists at a time, a third of the fused one."""
        D = self.dim_out
        w, b = self.qkv.weight, self.qkv.bias

        def part(i: int, pool: nn.Module, norm: nn.LayerNorm) -> tuple[Tensor, Grid]:
            bi = None if b is None else b[i * D : (i + 1) * D]
            return self._pool_group(x, w[i * D : (i + 1) * D], bi, thw, [pool], [norm])

        k, k_thw = part(1, self.pool_k, self.norm_k)
        v, _ = part(2, self.pool_v, self.norm_v)
        kv = torch.cat((k, v), dim=2)
        del k, v
        if self.pool_q is not None:
            q, q_thw = part(0, self.pool_q, self.norm_q)
            q = q[:, :, 0]
        else:
            q = linear(x, w[:D], None if b is None else b[:D])
            q, q_thw = q.reshape(q.shape[0], q.shape[1], self.num_heads, -1), thw
        return q, kv, q_thw, k_thw

    def _forward_fused(self, x: Tensor, thw: Grid, attend) -> tuple[Tensor, Grid]:
        """Token-major layout end to end; ``attend`` is a fused attention function."""
        B = x.shape[0]
        q, kv, q_thw, k_thw = self._qkv_pooled(x, thw)
        # Under autocast the fused kernels get one dtype (LayerNorm may have left fp32 tensors).
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            q, kv = q.to(dtype), kv.to(dtype)
        if self.window:
            q_win = self.window // self.stride_q[1]
            kv_win = self.window // self.stride_kv[1]
            qw, padded = _windows(q, q_thw[1:], q_win)
            kw, vw = _windows(kv, k_thw[1:], kv_win)[0].unbind(2)
            rel = self._rel((1, q_win, q_win), (1, kv_win, kv_win), 0)
            out = attend(
                qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2), self.scale, rel
            )
            out = _unwindows(out.transpose(1, 2), q_win, padded, q_thw[1:])  # (B, N, nH, C)
        else:
            k, v = kv.unbind(2)
            rel = self._rel(q_thw, k_thw, self.num_prefix)
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, rel)
            out = out.transpose(1, 2)  # (B, N, nH, C)

        if self.residual_pooling:
            if self.num_prefix and not self.residual_pooling_cls:
                p = self.num_prefix
                out = torch.cat((out[:, :p], out[:, p:] + q[:, p:]), dim=1)
            else:
                out = out + q
        return self.proj(out.reshape(B, -1, self.dim_out)), q_thw
