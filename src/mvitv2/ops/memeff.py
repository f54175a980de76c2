"""Memory-efficient exact attention for training: a custom autograd function, flash-attention style.

SDPA's CPU backward with a float bias falls back to the math kernel and keeps the full
probabilities and the bias gradient; this keeps neither. The forward goes over query chunks and
saves only q, k and v; the backward recomputes each chunk's probabilities, with the same kernels
on the same operands (so the same values), and takes the softmax gradient from PyTorch's fused
kernel too.

The rel-pos term is folded into the score product, as in the ``"chunked"`` inference path: per
query the coefficients ``a = [a_h, a_w(, a_t)]`` (:func:`~mvitv2.ops.rel_pos.rel_pos_terms`)
extend the scaled query, per key its one-hots (:func:`~mvitv2.ops.rel_pos.key_onehots`) extend
the key, and ``[q*s, a] . [k, onehots]`` is the score with the term added. In the backward the
same product with the score gradient gives the query gradient and the coefficients' gradient in
one GEMM. The wider GEMMs cost less than the broadcast adds over each score chunk and the sums
over the key grid that they replace, which are bandwidth-bound passes (MViTv2-T's training step
at batch 16, Intel Xeon 2 threads: its attention 3 %, the step 2.6-3.2 % faster; see
docs/benchmarks.md, session 25).

Inside, the query-side tensors lie row-major over the groups: ``(N, G, .)`` with ``G = B * nH``
(batch entry and head) in the middle. A chunk of query rows is then one contiguous block, and the
four products that map query rows to query rows (scores, outputs, and their gradients) are each
one :func:`~mvitv2.ops.gemm.group_products` call: a oneDNN grouped convolution where measured
faster than the batched GEMM. The two that sum over the query rows (the key and value gradients)
stay batched GEMMs. Shapes: ``B`` batch, ``nH`` heads, ``C`` head width, ``G = B * nH``, ``R``
rel-pos coefficients per query (``kh + kw (+ kt)``, 0 without rel-pos).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mvitv2.ops.context import tracing
from mvitv2.ops.gemm import group_products, group_products_on_onednn
from mvitv2.ops.rel_pos import Grid, RelPos, folded_keys, get_rel_pos, terms_from_gathered

#: Score elements per query chunk of :func:`attention_memeff` (forward and backward): 64 MB of
#: fp32 scores. Fewer, larger products than 4M (MViTv2-T's training step at batch 16 ~3 % faster
#: on the AMD EPYC of docs/benchmarks.md, none beyond 16M); its peak memory is set elsewhere.
MEMEFF_CHUNK_ELEMENTS = 1 << 24


def _memeff_rows(bh: int, nq: int, nk: int) -> int:
    """Query rows per chunk: as many chunks as needed for one chunk of scores to have at most
    MEMEFF_CHUNK_ELEMENTS (but at least 16 rows), all of about the same size (no small last
    chunk, on which the GEMM kernels run slowly). Traced (torch.compile, export), one chunk: with
    a dynamic batch the chunk sizes are symbolic expressions that the row views cannot match."""
    if tracing():
        return nq
    most = max(MEMEFF_CHUNK_ELEMENTS // max(bh * nk, 1), 16)
    chunks = max(-(-nq // most), 1)
    return max(-(-nq // chunks), 1)


def _by_rows(x: Tensor) -> Tensor:
    """``(B, nH, N, C)`` -> ``(N, B*nH, C)``, contiguous (a copy unless it already lies so)."""
    B, nH, N, C = x.shape
    return x.permute(2, 0, 1, 3).reshape(N, B * nH, C)


def _by_groups(x: Tensor) -> Tensor:
    """``(B, nH, N, C)`` -> ``(B*nH, N, C)`` (a copy only when the layout needs one)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _query_rows(q: Tensor, a: Tensor | None, r0: int, n: int, scale: float, p: int) -> Tensor:
    """Rows ``r0 .. r0+n`` of the folded queries ``[q*scale, a]`` as ``(n, G, C + R)``, made in
    one buffer: ``q`` ``(B, nH, Nq, C)``, ``a`` the rel-pos coefficients of the grid queries by
    rows ``(Nq - p, G, R)`` or None (then just the scaled rows); the ``p`` prefix rows get zero
    coefficients (no rel-pos term)."""
    B, nH, _, C = q.shape
    rows = q[:, :, r0 : r0 + n].permute(2, 0, 1, 3)
    if tracing():  # one chunk, and no strided out= (which dynamo refuses)
        qs = (rows * scale).reshape(n, B * nH, C)
        return qs if a is None else torch.cat((qs, F.pad(a, (0, 0, 0, 0, p, 0))), dim=-1)
    R = 0 if a is None else a.shape[-1]
    out = q.new_empty(n, B, nH, C + R)
    torch.mul(rows, scale, out=out[..., :C])
    out = out.view(n, B * nH, C + R)
    if a is not None:
        in_chunk, in_a = _grid_rows(r0, n, p)
        out[: in_chunk.start, :, C:] = 0
        out[in_chunk, :, C:] = a[in_a]
    return out


def _grid_rows(r0: int, n: int, p: int) -> tuple[slice, slice]:
    """The grid (non-prefix) query rows of the chunk ``r0 .. r0+n`` with ``p`` prefix rows: as
    rows of the chunk, and as rows of the coefficients ``a`` (which start at the first grid
    row). A chunk of prefix rows only has none (both slices empty)."""
    g0 = max(r0, p)  # first grid query row of the chunk
    return slice(g0 - r0, None), slice(g0 - p, max(r0 + n - p, 0))


def _folded_keys(k: Tensor, k_thw: Grid | None, p: int, temporal: bool) -> Tensor:
    """The keys ``(B, nH, Nk, C)`` as ``(G, Nk, C + R)``: each followed by its rel-pos one-hots
    (:func:`~mvitv2.ops.rel_pos.folded_keys`), or as they are without rel-pos (``k_thw``
    None)."""
    if k_thw is None:
        return _by_groups(k)
    return _by_groups(folded_keys(k, k_thw, temporal, p))


def _rel_coeffs(
    q: Tensor, rh: Tensor | None, rw: Tensor, rt: Tensor | None, q_thw: Grid, p: int
) -> tuple[Tensor | None, Tensor | None]:
    """The query grid ``r`` ``(B, nH, qt, qh, qw, C)`` (a view of ``q`` past its ``p`` prefix
    tokens) and its rel-pos coefficients by rows, ``(Nq - p, G, kh + kw (+ kt))``; both None
    without rel-pos tables (``rh`` None). The forward computes them, the backward again."""
    if rh is None:
        return None, None
    B, nH, _, C = q.shape
    r = q[:, :, p:].reshape(B, nH, *q_thw, C)
    return r, _by_rows(terms_from_gathered(r, rh, rw, rt))


def _memeff_scores(qf: Tensor, kf: Tensor, onednn: bool) -> Tensor:
    """Scores of one query chunk ``(n, G, Nk)``, rel-pos term included: the folded query rows
    ``qf`` ``(n, G, C + R)`` times the folded keys ``kf`` ``(G, Nk, C + R)``."""
    return group_products(qf, kf, onednn)


def _row_wise(fn: Callable[..., Tensor], *ts: Tensor) -> Tensor:
    """``fn(*ts)`` for a function of independent rows (softmax and its gradient) on ``(n, G, M)``
    tensors. Where every one is the transposed view of a contiguous ``(G, n, M)`` tensor (how
    ``torch.bmm`` leaves the query-chunk products), ``fn`` runs on those and its result is
    transposed back: PyTorch's softmax kernels would first copy each view to contiguous memory
    (a score-sized copy per chunk, forward and backward). Same values either way."""
    if tracing():
        return fn(*ts)
    flipped = [t.transpose(0, 1) for t in ts]
    if all([f.is_contiguous() for f in flipped]):
        return fn(*flipped).transpose(0, 1)
    return fn(*ts)


def _softmax(s: Tensor) -> Tensor:
    """Softmax over the keys in fp32 (no cast for fp32 scores) in PyTorch's fused kernel, which
    takes each row's maximum, exponentials and sum while the row is in cache."""
    return _row_wise(lambda t: torch.softmax(t, dim=-1, dtype=torch.float32), s)


def _softmax_grad(dprob: Tensor, prob: Tensor) -> Tensor:
    """The scores' gradient from the probabilities' (fp32), PyTorch's fused kernel."""
    return _row_wise(
        lambda d, p: torch.ops.aten._softmax_backward_data(d, p, -1, p.dtype), dprob, prob
    )


def _sum_over_rows(x: Tensor, y: Tensor, acc: Tensor | None) -> Tensor:
    """``acc + x[:, g]^T @ y[:, g]`` per group: x ``(n, G, M)``, y ``(n, G, C)`` -> ``(G, M, C)``
    (the first chunk's product when ``acc`` is None; no zero-filled buffer)."""
    xt, yg = x.permute(1, 2, 0), y.transpose(0, 1)
    return torch.bmm(xt, yg) if acc is None else acc.baddbmm_(xt, yg)


class _MemEffAttention(torch.autograd.Function):
    """``softmax((q*scale) @ k^T + rel) @ v`` over query chunks, flash-attention style: the
    forward saves only q, k and v (the caller's views, no copies); the backward recomputes the
    rel-pos coefficients and each chunk's probabilities. No ``(Nq, Nk)`` tensor outlives a
    chunk.

    q ``(B, nH, Nq, C)``, k/v ``(B, nH, Nk, C)``; ``rh``/``rw``/``rt`` the gathered rel-pos
    tables ``(q_size, k_size, C)`` of each axis (None: no rel-pos; ``rt`` None: no temporal
    term). Per grid query ``i`` the coefficients ``a[i] = [q_i . rh[h(i)], q_i . rw[w(i)],
    q_i . rt[t(i)]]`` meet the key one-hots in the folded product; their gradient, the score
    gradient times the one-hots (summed over the key grid), goes back to q and the gathered
    tables.
    """

    @staticmethod
    def forward(ctx, q, k, v, rh, rw, rt, scale, q_thw, k_thw, p):  # noqa: D102
        B, nH, Nq, _ = q.shape
        Nk = k.shape[2]
        onednn = group_products_on_onednn(q)
        kf, v3 = _folded_keys(k, k_thw, p, rt is not None), _by_groups(v)
        _, a = _rel_coeffs(q, rh, rw, rt, q_thw, p)
        rows = _memeff_rows(B * nH, Nq, Nk)
        outs = []
        for r0 in range(0, Nq, rows):
            n = min(rows, Nq - r0)
            s = _memeff_scores(_query_rows(q, a, r0, n, scale, p), kf, onednn)
            prob = _softmax(s).to(q.dtype)
            outs.append(group_products(prob, v3, onednn, transposed=False))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ctx.save_for_backward(q, k, v, rh, rw, rt)
        ctx.scale, ctx.q_thw, ctx.k_thw, ctx.p = scale, q_thw, k_thw, p
        return out.view(Nq, B, nH, -1).permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k, v, rh, rw, rt = ctx.saved_tensors
        scale, q_thw, k_thw, p = ctx.scale, ctx.q_thw, ctx.k_thw, ctx.p
        B, nH, Nq, C = q.shape
        Nk = k.shape[2]
        dt = q.dtype
        onednn = group_products_on_onednn(q)
        kf, v3, dout_r = _folded_keys(k, k_thw, p, rt is not None), _by_groups(v), _by_rows(dout)
        r, a = _rel_coeffs(q, rh, rw, rt, q_thw, p)
        dk = dv = None  # the first chunk's products, then accumulated (no zero-filled buffers)
        dq = q.new_empty(Nq, B * nH, C)
        da = None if a is None else torch.empty_like(a)
        rows = _memeff_rows(B * nH, Nq, Nk)
        for r0 in range(0, Nq, rows):
            n = min(rows, Nq - r0)
            qf, doc = _query_rows(q, a, r0, n, scale, p), dout_r[r0 : r0 + n]
            # the forward's probabilities again: the same kernels on the same operands
            prob = _softmax(_memeff_scores(qf, kf, onednn))
            dv = _sum_over_rows(prob.to(dt), doc, dv)
            # The softmax backward in fp32, as flash attention's (``.float()`` and ``.to(dt)`` are
            # no-ops in fp32): in bf16, d(probs) - (d(probs) . probs) cancels most of 8 bits.
            dprob = group_products(doc, v3, onednn).float()
            ds = _softmax_grad(dprob, prob).to(dt)
            del prob, dprob
            # [dq/scale, da] = ds @ [k, onehots]: the coefficients' gradient in the same GEMM
            dqf = group_products(ds, kf, onednn, transposed=False)
            torch.mul(dqf[..., :C], scale, out=dq[r0 : r0 + n])
            if da is not None:
                in_chunk, in_a = _grid_rows(r0, n, p)
                da[in_a] = dqf[in_chunk, :, C:]
            dk = _sum_over_rows(ds, qf[..., :C], dk)  # dk = scale * ds^T q: qf's scaled rows
        dq = dq.view(Nq, B, nH, C).permute(1, 2, 0, 3)
        drh = drw = drt = None
        if a is not None:
            del a
            qt, qh, qw = q_thw
            kh, kw = k_thw[1:]
            da = da.view(qt, qh, qw, B, nH, -1).permute(3, 4, 0, 1, 2, 5)
            da_h, da_w = da[..., :kh], da[..., kh : kh + kw]
            # a_h = r @ rh^T batched over qh (a_w over qw, a_t over qt): the matmul gradients.
            dr = da_h @ rh + (da_w.transpose(3, 4) @ rw).transpose(3, 4)
            # A table's gradient: per row of its query axis, da^T r summed over everything else.
            da_h_rows = da_h.permute(3, 5, 0, 1, 2, 4).reshape(qh, kh, -1)
            drh = da_h_rows @ r.permute(3, 0, 1, 2, 4, 5).reshape(qh, -1, C)
            da_w_rows = da_w.permute(4, 5, 0, 1, 2, 3).reshape(qw, kw, -1)
            drw = da_w_rows @ r.permute(4, 0, 1, 2, 3, 5).reshape(qw, -1, C)
            if rt is not None:
                da_t = da[..., kh + kw :].reshape(B, nH, qt, qh * qw, -1)
                dr = dr + (da_t @ rt).view(dr.shape)
                da_t_rows = da_t.permute(2, 4, 0, 1, 3).reshape(qt, da_t.shape[-1], -1)
                r_t_rows = r.reshape(B, nH, qt, qh * qw, C).permute(2, 0, 1, 3, 4)
                drt = da_t_rows @ r_t_rows.reshape(qt, -1, C)
            dq[:, :, p:] += dr.reshape(B, nH, -1, C)
        return dq, dk.view(k.shape), dv.view(v.shape), drh, drw, drt, None, None, None, None


def attention_memeff(
    q: Tensor, k: Tensor, v: Tensor, scale: float, rel: RelPos | None = None
) -> Tensor:
    """Memory-efficient exact attention for training (custom autograd, flash-attention style).

    The rel-pos term is folded into the score product per query chunk (the per-query
    coefficients of :func:`rel_pos_terms` against the key one-hots); the backward recomputes the
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
