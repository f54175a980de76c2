"""mvitv2.ops.memeff by value: the training attention over query chunks that start past the cls
row, with the 2-D or the temporal rel-pos term, equals the loops of the formula (forward) and the
explicit reference (gradients); and attention over a single key is worked out by hand."""

from __future__ import annotations

import torch

from mvitv2.ops import attention as attn_mod
from mvitv2.ops import memeff
from test_speed_paths import _assert_memeff_matches_reference, _assert_same_as_reference
from test_values_attention_chunks import SCALE, _inputs, _naive_attention


def test_memeff_in_query_chunks_past_the_cls_row_is_the_naive_loop_and_the_reference(
    monkeypatch,
):
    """37 queries (a cls token and a 6x6 grid) over a budget of 16 rows: 3 chunks of 13, 13 and
    11 rows (the fewest under 16, evenly split), so two chunks start inside the grid. The output
    is the loops' and the q, k, v and table gradients are the explicit reference's."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 1)  # 16 rows a chunk at most
    sizes = []
    real = memeff._memeff_scores
    monkeypatch.setattr(
        memeff, "_memeff_scores", lambda *a: sizes.append((s := real(*a)).shape[0]) or s
    )
    q, k, v, rel = _inputs(1, 2, (6, 6), (6, 6), seed=11, prefix=1)
    out = attn_mod.attention_memeff(q, k, v, SCALE, rel)
    want = _naive_attention(q, k, v, SCALE, rel.h, rel.w, 6, 1)
    assert sizes == [13, 13, 11]
    assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    tables = [t.clone().requires_grad_() for t in (rel.h, rel.w)]
    rel = attn_mod.RelPos(*tables, None, rel.q_thw, rel.k_thw, num_prefix=1)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    _assert_same_as_reference(attn_mod.attention_memeff, q, k, v, rel, weight, tables)


def test_memeff_in_query_chunks_with_a_temporal_term_gives_the_reference_gradients(monkeypatch):
    """Video: a cls token and a 2x4x4 query grid (33 queries: 3 chunks of 11 rows) against a
    2x2x2 key grid, the temporal table too; output and gradients are the explicit reference's."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 1)
    assert memeff._memeff_rows(2, 33, 9) == 11
    _assert_memeff_matches_reference(attn_mod.attention_memeff, 1, (2, 4, 4), (2, 2, 2), 13)


def test_memeff_over_a_single_key_returns_its_value_with_the_gradient_all_on_v():
    """One key (a fully pooled grid): every query's weight on it is 1, so each output row is
    that key's value; q and k get no gradient and v's is the sum of the output's weights over
    the queries."""
    g = torch.Generator().manual_seed(14)
    q = torch.randn(2, 2, 20, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 1, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 1, 8, generator=g, requires_grad=True)
    weight = torch.randn(2, 2, 20, 8, generator=g)
    out = attn_mod.attention_memeff(q, k, v, 8**-0.5)
    assert torch.allclose(out, v.detach().expand(2, 2, 20, 8), rtol=0, atol=1e-6)
    dq, dk, dv = torch.autograd.grad((out * weight).sum(), (q, k, v))
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dk, torch.zeros_like(k))
    assert torch.allclose(dv, weight.sum(2, keepdim=True), rtol=0, atol=1e-5)
