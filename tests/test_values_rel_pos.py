"""mvitv2.ops.rel_pos by value: the per-axis coefficients on every query layout, the bias without
a temporal table on a multi-frame key grid, and the folded width, against loops of the formula
``a_h[.., t, y, x, j] = q[.., t, y, x] . R_h[y, j]`` (etc.) and the paper's per-pair term."""

from __future__ import annotations

import math

import pytest
import torch

from mvitv2.ops import rel_pos
from mvitv2.ops.rel_pos import RelPos, rel_coeffs, rel_pos_bias, rel_pos_onehots, rel_pos_terms
from test_model_reference import naive_rel_term

DT = torch.float64


def _loop_coeffs(r, rh, rw, rt):
    """``a_h[b, n, t, y, x, j] = r[b, n, t, y, x] . rh[y, j]``, ``a_w`` with ``rw[x, j]``,
    ``a_t`` with ``rt[t, j]``, one dot product at a time."""
    B, nH, qt, qh, qw, _ = r.shape
    a_h = torch.zeros(B, nH, qt, qh, qw, rh.shape[1], dtype=r.dtype)
    a_w = torch.zeros(B, nH, qt, qh, qw, rw.shape[1], dtype=r.dtype)
    a_t = None if rt is None else torch.zeros(B, nH, qt, qh, qw, rt.shape[1], dtype=r.dtype)
    for b in range(B):
        for n in range(nH):
            for t in range(qt):
                for y in range(qh):
                    for x in range(qw):
                        v = r[b, n, t, y, x]
                        a_h[b, n, t, y, x] = torch.stack([v.dot(row) for row in rh[y]])
                        a_w[b, n, t, y, x] = torch.stack([v.dot(row) for row in rw[x]])
                        if rt is not None:
                            a_t[b, n, t, y, x] = torch.stack([v.dot(row) for row in rt[t]])
    return a_h, a_w, a_t


@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("temporal", [True, False])
def test_rel_coeffs_on_any_query_layout_are_the_per_axis_dot_products(token_major, temporal):
    """Queries as attention gives them (``(B, N, nH, C)`` memory under a ``(B, nH, N, C)``
    view, the token-major batched-GEMM way) and contiguous ones give the same per-axis dot
    products of the formula; on a multi-frame grid (qt = 2) with every size distinct."""
    g = torch.Generator().manual_seed(0)
    B, nH, (qt, qh, qw), (kt, kh, kw), C = 2, 3, (2, 3, 4), (3, 2, 5), 4
    tokens = torch.randn(B, qt * qh * qw, nH, C, generator=g, dtype=DT)
    q = tokens.transpose(1, 2) if token_major else tokens.transpose(1, 2).contiguous()
    r = q.reshape(B, nH, qt, qh, qw, C)
    assert rel_pos._token_major(r) == token_major
    rh = torch.randn(qh, kh, C, generator=g, dtype=DT)
    rw = torch.randn(qw, kw, C, generator=g, dtype=DT)
    rt = torch.randn(qt, kt, C, generator=g, dtype=DT) if temporal else None
    got = rel_coeffs(r, rh, rw, rt)
    want = _loop_coeffs(r, rh, rw, rt)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if temporal:
        torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
    else:
        assert got[2] is None


@pytest.mark.parametrize("token_major", [True, False])
def test_rel_pos_terms_of_token_major_video_queries_fold_to_the_per_pair_term(token_major):
    """``rel_pos_terms(q) @ rel_pos_onehots(k).T`` (the folded form attention uses, with
    token-major queries as it gives them) equals the paper's per-pair term on a video grid
    with every size distinct, stored tables resized first."""
    g = torch.Generator().manual_seed(1)
    B, nH, C, q_thw, k_thw = 2, 2, 3, (2, 3, 2), (3, 2, 4)
    tables = {a: torch.randn(2 * max(q_thw[a], k_thw[a]) + 1, C, generator=g) for a in (0, 1, 2)}
    tables = {a: t.to(DT) for a, t in tables.items()}
    tokens = torch.randn(B, math.prod(q_thw), nH, C, generator=g, dtype=DT)
    q = tokens.transpose(1, 2) if token_major else tokens.transpose(1, 2).contiguous()
    terms = rel_pos_terms(q, q_thw, k_thw, tables[1], tables[2], tables[0], factor=2.0)
    hot = rel_pos_onehots(k_thw, True, dtype=DT)
    want = naive_rel_term(q, q_thw, k_thw, tables)
    torch.testing.assert_close(terms @ hot.t(), 2.0 * want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kt", [1, 2, 3])
def test_rel_pos_bias_without_a_temporal_table_repeats_the_spatial_term_on_every_key_frame(kt):
    """No temporal table: the term of query ``i`` and key ``j`` is the spatial one alone,
    the same on each of the ``kt`` key frames (the per-pair loop with no t axis)."""
    g = torch.Generator().manual_seed(kt)
    C, q_thw, k_thw = 3, (1, 3, 2), (kt, 2, 3)
    tables = {a: torch.randn(2 * max(q_thw[a], k_thw[a]) - 1, C, generator=g) for a in (1, 2)}
    tables = {a: t.to(DT) for a, t in tables.items()}
    q = torch.randn(2, 2, math.prod(q_thw), C, generator=g, dtype=DT)
    got = rel_pos_bias(q, q_thw, k_thw, tables[1], tables[2], None)
    want = naive_rel_term(q, q_thw, k_thw, tables)
    assert got.shape == want.shape == (2, 2, 6, kt * 6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temporal", [True, False])
def test_rel_pos_num_terms_is_the_width_of_the_coefficients_and_of_the_onehots(temporal):
    """``RelPos.num_terms()`` (the extra width of the folded attention) is ``kh + kw (+ kt)``:
    the last size of :func:`rel_pos_terms` and of :func:`rel_pos_onehots`, on a key grid with
    three distinct sizes."""
    q_thw, k_thw, C = (2, 3, 4), (3, 5, 2), 2
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2 * 5 - 1, C, generator=g)
    w = torch.randn(2 * 4 - 1, C, generator=g)
    t = torch.randn(2 * 3 - 1, C, generator=g) if temporal else None
    rel = RelPos(h, w, t, q_thw, k_thw, num_prefix=1)
    q = torch.randn(1, 1, math.prod(q_thw), C, generator=g)
    terms = rel_pos_terms(q, q_thw, k_thw, h, w, t)
    assert rel.num_terms() == (5 + 2 + 3 if temporal else 5 + 2)
    assert rel.num_terms() == terms.shape[-1] == rel_pos_onehots(k_thw, temporal).shape[-1]


def test_rel_coeffs_take_the_token_major_gemms_exactly_for_token_major_queries_in_eager_code(
    monkeypatch,
):
    """``_token_major`` is true of queries that lie ``(B, N, nH, C)`` under their ``(B, nH, N,
    C)`` view (heads innermost) and of no other layout; the batched GEMMs run on exactly those,
    and not while traced (where the plain matmuls are the exported graph)."""
    g = torch.Generator().manual_seed(3)
    B, nH, (qt, qh, qw), C = 2, 3, (2, 2, 3), 4
    tokens = torch.randn(B, qt * qh * qw, nH, C, generator=g, dtype=DT)
    layouts = {
        "token_major": tokens.transpose(1, 2),
        "contiguous": tokens.transpose(1, 2).contiguous(),
        "channels_first": torch.randn(B, C, nH, qt * qh * qw, dtype=DT).permute(0, 2, 3, 1),
    }
    tables = (
        torch.randn(qh, 2, C, dtype=DT),
        torch.randn(qw, 3, C, dtype=DT),
        torch.randn(qt, 2, C, dtype=DT),
    )
    calls = []
    real = rel_pos._token_major_coeffs
    monkeypatch.setattr(rel_pos, "_token_major_coeffs", lambda *a: calls.append(a[0]) or real(*a))
    for name, q in layouts.items():
        r = q.reshape(B, nH, qt, qh, qw, C)
        assert rel_pos._token_major(r) == (name == "token_major"), name
        for traced in (False, True):
            monkeypatch.setattr(rel_pos, "tracing", lambda traced=traced: traced)
            calls.clear()
            got = rel_coeffs(r, *tables)
            assert len(calls) == (name == "token_major" and not traced), (name, traced)
            for a, b in zip(got, _loop_coeffs(r, *tables)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [DT, torch.bfloat16])
def test_folded_keys_are_the_keys_then_prefix_zeros_onehots_and_zero_columns_in_k_s_dtype(dtype):
    """``folded_keys(k)[b, n, j] = [k[b, n, j], onehot(j)]``: key ``j`` of the grid marks its own
    h, w and t columns, the prefix keys and the ``extra`` columns are zero; in ``k``'s dtype
    and on its device (meta here), built by hand."""
    g = torch.Generator().manual_seed(4)
    (kt, kh, kw), p, extra, C = (2, 3, 2), 1, 3, 4
    k = torch.randn(2, 3, p + kt * kh * kw, C, generator=g).to(dtype)
    got = rel_pos.folded_keys(k, (kt, kh, kw), True, p, extra)
    hot = torch.zeros(p + kt * kh * kw, kh + kw + kt + extra)
    for t in range(kt):
        for y in range(kh):
            for x in range(kw):
                row = p + (t * kh + y) * kw + x
                hot[row, y] = hot[row, kh + x] = hot[row, kh + kw + t] = 1
    want = torch.cat((k, hot.to(dtype).expand(2, 3, -1, -1)), dim=-1)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    meta = rel_pos.folded_keys(k.to("meta"), (kt, kh, kw), False, p, extra)
    assert meta.device.type == "meta"
    assert meta.shape == (2, 3, p + kt * kh * kw, C + kh + kw + extra)


def _reference_index(q: int, k: int) -> torch.Tensor:
    """The released codebases' indices (detectron2 / segment-anything ``get_rel_pos``): Python
    float ratios times ``arange``, float32 products."""
    q_coords = torch.arange(q)[:, None] * max(k / q, 1.0)
    k_coords = torch.arange(k)[None, :] * max(q / k, 1.0)
    return (q_coords - k_coords + (k - 1) * max(q / k, 1.0)).long()


def test_rel_pos_indices_from_int_or_traced_tensor_sizes_are_the_reference_s_for_every_pair():
    """The sizes as 0-d tensors (how TorchScript's tracer gives them to the whole-detector
    export) give the same indices as ints and as the reference, for every pair up to 48; in
    float64 about a tenth of the pairs would round to another index."""
    for q in range(1, 49):
        for k in range(1, 49):
            want = _reference_index(q, k)
            assert torch.equal(rel_pos.rel_pos_index(q, k), want), (q, k)
            assert torch.equal(rel_pos.rel_pos_index(torch.tensor(q), torch.tensor(k)), want)


def test_get_rel_pos_under_tracing_follows_the_sizes_it_is_given():
    """A traced ``get_rel_pos`` run at other sizes gives the eager embeddings there (table
    length and indices in the graph, not those of the traced sizes)."""
    table = torch.randn(2 * 16 - 1, 3, generator=torch.Generator().manual_seed(0))

    def f(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return rel_pos.get_rel_pos(q.shape[0], k.shape[0], table)

    traced = torch.jit.trace(f, (torch.zeros(7), torch.zeros(4)), check_trace=False)
    for q, k in [(7, 4), (8, 6), (16, 7), (12, 10), (5, 9), (11, 11)]:  # float64 would miss 3
        got = traced(torch.zeros(q), torch.zeros(k))
        torch.testing.assert_close(got, rel_pos.get_rel_pos(q, k, table), rtol=0, atol=1e-6)
