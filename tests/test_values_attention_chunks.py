"""The attention paths against loops of the formula, and their chunk sizes counted by hand.

Each inference path that works in chunks ("bias" by batch groups or query rows, "chunked" by
query rows) must keep every score (or bias) chunk within ``CHUNK_ELEMENTS`` and make the chunks
as large as that allows (few, large GEMMs), with the reference path's values. The chunk sizes
below are worked out by hand from the budget, not read from the code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mvitv2.ops import attention as attn_mod
from mvitv2.ops.rel_pos import RelPos

SCALE = 0.3  # not the head width's default 8**-0.5: the scale given must be the one used


def _inputs(
    B: int, nH: int, q_hw: tuple[int, int], k_hw: tuple[int, int], seed: int = 0, prefix: int = 0
):
    """q ``(B, nH, p + qh*qw, 8)``, k/v ``(B, nH, p + kh*kw, 8)`` (``p`` prefix tokens) and a 2-D
    rel-pos with large tables."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = prefix + q_hw[0] * q_hw[1], prefix + k_hw[0] * k_hw[1]
    q = torch.randn(B, nH, nq, 8, generator=g)
    k = torch.randn(B, nH, nk, 8, generator=g)
    v = torch.randn(B, nH, nk, 8, generator=g)
    size = 2 * max(q_hw[0], k_hw[0]) - 1
    h = torch.randn(size, 8, generator=g) * 3
    w = torch.randn(size, 8, generator=g) * 3
    rel = RelPos(h=h, w=w, t=None, q_thw=(1, *q_hw), k_thw=(1, *k_hw), num_prefix=prefix)
    return q, k, v, rel


def _record_sdpa(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """Record (q shape, mask shape) of every SDPA call."""
    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return calls


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@torch.no_grad()
def test_bias_path_splits_a_large_item_into_query_rows_of_the_budget(monkeypatch):
    """One item's bias (2 heads x 36 queries x 36 keys = 2,592) over a budget of 1,000: rows
    chunks of 1000 // (1 * 2 * 36) = 13 queries (936 elements): 13, 13, 10."""
    q, k, v, rel = _inputs(1, 2, (6, 6), (6, 6))
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 1000)
    calls = _record_sdpa(monkeypatch)
    out = attn_mod.attention_bias(q, k, v, SCALE, rel)
    assert calls == [((1, 2, n, 8), (1, 2, n, 36)) for n in (13, 13, 10)]
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_row_chunks_count_the_batch_and_the_keys_not_the_head_width(monkeypatch):
    """3 items x 2 heads x 16 keys: 1000 // 96 = 10 query rows a chunk over 36 queries (the
    head width 8 plays no part); each chunk's bias is all three items' (no batch groups)."""
    q, k, v, rel = _inputs(3, 2, (6, 6), (4, 4), seed=1)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 1000)
    calls = _record_sdpa(monkeypatch)
    out = attn_mod._attention_bias_rows(q, k, v, SCALE, rel)
    assert calls == [((3, 2, n, 8), (3, 2, n, 16)) for n in (10, 10, 10, 6)]
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_row_chunks_keep_at_least_one_row(monkeypatch):
    """A budget smaller than one query row's scores still makes progress, one row at a time."""
    q, k, v, rel = _inputs(1, 1, (2, 2), (3, 3), seed=2)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 5)  # < 9 keys
    calls = _record_sdpa(monkeypatch)
    out = attn_mod._attention_bias_rows(q, k, v, SCALE, rel)
    assert calls == [((1, 1, 1, 8), (1, 1, 1, 9))] * 4
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_groups_small_items_up_to_the_budget(monkeypatch):
    """Items of 2 heads x 16 queries x 16 keys (512 elements each) under a budget of 1,200: two
    items a group (1,024), so a batch of 5 goes as 2, 2, 1."""
    q, k, v, rel = _inputs(5, 2, (4, 4), (4, 4), seed=3)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 1200)
    calls = _record_sdpa(monkeypatch)
    out = attn_mod.attention_bias(q, k, v, SCALE, rel)
    assert calls == [((n, 2, 16, 8), (n, 2, 16, 16)) for n in (2, 2, 1)]
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_items_of_exactly_the_budget_go_one_by_one(monkeypatch):
    """An item of exactly the budget (2 x 16 x 16 = 512) is not split into query rows: a batch
    of 2 goes as two whole items."""
    q, k, v, rel = _inputs(2, 2, (4, 4), (4, 4), seed=5)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 512)
    calls = _record_sdpa(monkeypatch)
    out = attn_mod.attention_bias(q, k, v, SCALE, rel)
    assert calls == [((1, 2, 16, 8), (1, 2, 16, 16))] * 2
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_with_a_cls_token_goes_item_by_item_over_the_budget(monkeypatch):
    """With a cls token the query-row split does not apply; an item over the budget (1 head x
    17 x 17 = 289 > 200) still goes alone, never two together."""
    q, k, v, rel = _inputs(3, 1, (4, 4), (4, 4), seed=6, prefix=1)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 200)
    calls = _record_sdpa(monkeypatch)
    out = attn_mod.attention_bias(q, k, v, SCALE, rel)
    assert calls == [((1, 1, 17, 8), (1, 1, 17, 17))] * 3
    assert _close(out, want)


@torch.no_grad()
def test_bias_path_takes_the_batch_whole_within_the_budget(monkeypatch):
    """5 items of 512 elements fit a budget of 2,560 exactly: one SDPA call."""
    q, k, v, rel = _inputs(5, 2, (4, 4), (4, 4), seed=3)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 2560)
    calls = _record_sdpa(monkeypatch)
    attn_mod.attention_bias(q, k, v, SCALE, rel)
    assert calls == [((5, 2, 16, 8), (5, 2, 16, 16))]


def _record_matmul_rows(monkeypatch, keys: int, width: int) -> list[int]:
    """Query rows of each score GEMM ``q' @ k'^T`` of the "chunked" path: the 4-D products
    with ``width`` (head width + rel-pos coefficients) inputs and ``keys`` outputs (not the
    rel-pos coefficients' products, nor ``@ v``)."""
    rows = []
    real = torch.Tensor.__matmul__

    def matmul(a, b):
        out = real(a, b)
        if a.dim() == 4 and a.shape[-1] == width and out.shape[-1] == keys:
            rows.append(a.shape[-2])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    return rows


@torch.no_grad()
def test_chunked_path_splits_queries_by_the_budget_with_at_least_64_rows(monkeypatch):
    """ "chunked" at inference: 2 items x 1 head x 9 keys under a budget of 2,000 give
    2000 // 18 = 111 query rows a chunk over 256 queries (111, 111, 34); under a budget of 100
    (5 rows) the 64-row minimum holds (64 x 4)."""
    q, k, v, rel = _inputs(2, 1, (16, 16), (3, 3), seed=4)
    want = attn_mod.attention_reference(q, k, v, SCALE, rel)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 2000)
    rows = _record_matmul_rows(monkeypatch, keys=9, width=8 + 3 + 3)
    out = attn_mod.attention_chunked(q, k, v, SCALE, rel)
    assert rows == [111, 111, 34]
    assert _close(out, want)
    rows.clear()
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 100)
    out = attn_mod.attention_chunked(q, k, v, SCALE, rel)
    assert rows == [64, 64, 64, 64]
    assert _close(out, want)


@pytest.mark.parametrize("grad", [True, False])
def test_chunked_path_takes_all_queries_at_once_when_they_fit_or_under_autograd(monkeypatch, grad):
    """Within the budget (2 x 1 x 9 x 256 = 4,608 <= 5,000), or with gradients whatever the
    budget, the scores are one GEMM over all 256 queries."""
    q, k, v, rel = _inputs(2, 1, (16, 16), (3, 3), seed=4)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 10 if grad else 5000)
    rows = _record_matmul_rows(monkeypatch, keys=9, width=8 + 3 + 3)
    with torch.set_grad_enabled(grad):
        attn_mod.attention_chunked(q, k, v, SCALE, rel)
    assert rows == [256]


def _naive_attention(q, k, v, scale, h, w, side, prefix):
    """Attention written as loops over items, heads and queries, with the decomposed rel-pos
    term on a ``side x side`` grid (queries and keys): for grid query ``(y, x)`` and grid key
    ``(y', x')``, ``q . h[y - y' + side - 1] + q . w[x - x' + side - 1]``; none on the
    ``prefix`` (cls) rows and columns."""
    B, nH, N, _ = q.shape
    out = torch.zeros(B, nH, N, v.shape[-1], dtype=torch.float64)
    q, k, v, h, w = (t.double() for t in (q, k, v, h, w))
    for b in range(B):
        for n in range(nH):
            for i in range(N):
                s = torch.stack([scale * (q[b, n, i] @ k[b, n, j]) for j in range(N)])
                if i >= prefix:
                    y, x = divmod(i - prefix, side)
                    for j in range(prefix, N):
                        y2, x2 = divmod(j - prefix, side)
                        s[j] += (
                            q[b, n, i] @ h[y - y2 + side - 1] + q[b, n, i] @ w[x - x2 + side - 1]
                        )
                out[b, n, i] = torch.softmax(s, 0) @ v[b, n]
    return out


@pytest.mark.parametrize("path", ["reference", "bias", "folded", "chunked", "memeff"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_every_path_is_the_naive_loop_with_the_scale_given(path, prefix):
    """Each attention path, with a softmax scale other than the head width's default, a cls
    token or none, and with no rel-pos term at all, against the loops of the formula."""
    q, k, v, rel = _inputs(2, 2, (3, 3), (3, 3), seed=7, prefix=prefix)
    fn = attn_mod._paths()[path]
    with torch.no_grad():
        out = fn(q, k, v, SCALE, rel)
        plain = fn(q, k, v, SCALE, None)
    want = _naive_attention(q, k, v, SCALE, rel.h, rel.w, 3, prefix)
    assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    no_rel = _naive_attention(q, k, v, SCALE, rel.h * 0, rel.w * 0, 3, prefix)
    assert torch.allclose(plain.double(), no_rel, rtol=0, atol=1e-5 * no_rel.abs().max().item())


def _naive_attention_3d(q, k, v, scale, rel: RelPos, grid: tuple[int, int, int]):
    """:func:`_naive_attention` on a ``(T, side, side)`` grid of queries and keys (no prefix),
    with the temporal term ``q . t[t - t' + T - 1]`` too."""
    T, side, _ = grid
    B, nH, N, _ = q.shape
    q, k, v = q.double(), k.double(), v.double()
    h, w, t = rel.h.double(), rel.w.double(), rel.t.double()
    out = torch.zeros(B, nH, N, v.shape[-1], dtype=torch.float64)
    pos = [(i // (side * side), (i // side) % side, i % side) for i in range(N)]
    for b in range(B):
        for n in range(nH):
            for i, (ti, yi, xi) in enumerate(pos):
                qi = q[b, n, i]
                s = torch.stack(
                    [
                        scale * (qi @ k[b, n, j])
                        + qi @ h[yi - yj + side - 1]
                        + qi @ w[xi - xj + side - 1]
                        + qi @ t[ti - tj + T - 1]
                        for j, (tj, yj, xj) in enumerate(pos)
                    ]
                )
                out[b, n, i] = torch.softmax(s, 0) @ v[b, n]
    return out


@pytest.mark.parametrize("path", ["reference", "bias", "folded", "chunked", "memeff"])
def test_every_path_is_the_naive_loop_with_a_temporal_rel_pos_term(path, monkeypatch):
    """Video: a (2, 3, 3) grid with height, width and time tables, against the loops; the bias
    path also in query-row chunks (a budget of 100 score elements), where the temporal
    coefficients are taken per chunk."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 18, 8, generator=g) for _ in range(3))
    h, w = torch.randn(5, 8, generator=g) * 3, torch.randn(5, 8, generator=g) * 3
    t = torch.randn(3, 8, generator=g) * 3
    rel = RelPos(h=h, w=w, t=t, q_thw=(2, 3, 3), k_thw=(2, 3, 3), num_prefix=0)
    want = _naive_attention_3d(q, k, v, SCALE, rel, (2, 3, 3))
    fn = attn_mod._paths()[path]
    with torch.no_grad():
        out = fn(q, k, v, SCALE, rel)
        assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
        if path == "bias":
            monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 100)
            rows = _record_sdpa(monkeypatch)
            out = fn(q, k, v, SCALE, rel)
            assert [c[0][2] for c in rows] == [1] * 18  # 100 // (2 * 2 * 18) = 1 row a chunk
            assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@torch.no_grad()
def test_bias_path_without_rel_pos_takes_the_batch_whole_whatever_the_budget(monkeypatch):
    """No rel-pos term, no bias tensor to bound: one SDPA call, items far over the budget."""
    q, k, v, _ = _inputs(3, 2, (4, 4), (4, 4), seed=9)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 10)
    calls = _record_sdpa(monkeypatch)
    attn_mod.attention_bias(q, k, v, SCALE, None)
    assert calls == [((3, 2, 16, 8), None)]
