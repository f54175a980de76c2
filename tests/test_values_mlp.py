"""The training MLP (recomputed GELU, custom backward) against autograd's plain modules, with
any of its inputs and parameters frozen: frozen ones get no gradient, the others autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvitv2.ops import mlp as mlp_ops

NAMES = ("x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def _layers(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fc1, act, fc2 = nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4)
    with torch.no_grad():
        for p in (*fc1.parameters(), *fc2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 5, 6, generator=g)
    return x, fc1, act, fc2


@pytest.mark.parametrize("frozen", [(), *((n,) for n in NAMES), ("x", "fc2.bias")])
def test_recompute_gelu_mlp_gradients_are_autograd_s_with_frozen_inputs(frozen):
    x, fc1, act, fc2 = _layers()
    leaves = dict(zip(NAMES, (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)))
    for name, t in leaves.items():
        t.requires_grad_(name not in frozen)
    dy = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    calls = []
    real = mlp_ops._MlpRecomputeGelu.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlp_ops._MlpRecomputeGelu, "apply", lambda *a: calls.append(1) or real(*a))
        out = mlp_ops.mlp(x, fc1, act, fc2)
    assert calls  # the custom function ran
    want = fc2(act(fc1(x)))
    assert torch.allclose(out, want, rtol=0, atol=1e-5)
    trainable = [n for n in NAMES if n not in frozen]
    got = torch.autograd.grad(out, [leaves[n] for n in trainable], dy)
    ref = torch.autograd.grad(want, [leaves[n] for n in trainable], dy)
    for name, a, b in zip(trainable, got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-4 * b.abs().max().item()), name


# =========================================================================== inference chunks
def _chunk_rows(monkeypatch, x, fc1, act, fc2, elements: int) -> tuple[torch.Tensor, list]:
    """Run the inference MLP with ``MLP_CHUNK_ELEMENTS = elements``; the input shapes of its
    chunks."""
    seen = []
    real = mlp_ops._mlp_inference
    monkeypatch.setattr(mlp_ops, "MLP_CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(
        mlp_ops, "_mlp_inference", lambda x, *a: seen.append(tuple(x.shape)) or real(x, *a)
    )
    with torch.no_grad():
        return mlp_ops.mlp(x, fc1, act, fc2), seen


@pytest.mark.parametrize(
    ("elements", "chunks"),
    [
        (10 * 4, [(4, 6), (4, 6), (4, 6), (3, 6)]),  # 4 rows of hidden width 10, 15 tokens
        (10 * 7 + 9, [(7, 6), (7, 6), (1, 6)]),  # the rows are floored: 79 // 10 = 7
        (3, [(1, 6)] * 15),  # less than one row of hidden width: one token at a time
        (10 * 15, [(3, 5, 6)]),  # all 15 tokens fit: one call on the input as given
        (10 * 14, [(14, 6), (1, 6)]),  # one token too many: two chunks
    ],
)
def test_inference_mlp_runs_token_chunks_of_the_hidden_budget(monkeypatch, elements, chunks):
    """At inference the ``(tokens, hidden)`` activation is bounded by MLP_CHUNK_ELEMENTS: the
    tokens are cut into chunks of ``elements // hidden`` rows (at least one), and the result is
    the plain MLP's, in the input's leading shape."""
    x, fc1, act, fc2 = _layers()
    out, seen = _chunk_rows(monkeypatch, x, fc1, act, fc2, elements)
    assert seen == chunks
    with torch.no_grad():
        torch.testing.assert_close(out, fc2(act(fc1(x))), rtol=1e-5, atol=1e-5)
    assert out.shape == (3, 5, 4)


def test_inference_chunk_budget_is_4m_hidden_elements():
    """2**22 hidden activations per chunk (16 MiB in fp32)."""
    assert mlp_ops.MLP_CHUNK_ELEMENTS == 4 * 1024 * 1024


# =========================================================================== other GELUs, autocast
@pytest.mark.parametrize("grad", [False, True])
def test_tanh_gelu_mlp_is_the_plain_tanh_mlp(grad):
    """The recomputing and fused paths are for the exact GELU; a tanh-approximated GELU runs the
    plain modules, with and without gradients (exact GELU would differ by ~1e-3 here)."""
    x, fc1, _, fc2 = _layers()
    act = nn.GELU(approximate="tanh")
    with torch.set_grad_enabled(grad):
        got = mlp_ops.mlp(x, fc1, act, fc2)
        want = fc2(act(fc1(x)))
        exact = fc2(F.gelu(fc1(x)))
    assert (want - exact).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_training_mlp_under_autocast_runs_the_autocast_modules():
    """Under bf16 autocast the training MLP is the plain modules' (bf16 output, autocast's
    rounding), not the fp32 recomputing function."""
    x, fc1, act, fc2 = _layers()
    x.requires_grad_(True)
    calls = []
    real = mlp_ops._MlpRecomputeGelu.apply
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(mlp_ops._MlpRecomputeGelu, "apply", lambda *a: calls.append(1) or real(*a))
        got = mlp_ops.mlp(x, fc1, act, fc2)
        want = fc2(act(fc1(x)))
    assert calls == [] and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_traced_mlp_is_the_plain_graph(monkeypatch):
    """While compiling or exporting, the MLP is ``fc2(act(fc1(x)))`` of the modules themselves
    (no custom autograd function, no fused GEMM), with and without gradients."""
    x, fc1, act, fc2 = _layers()
    monkeypatch.setattr(mlp_ops, "tracing", lambda: True)

    def refuse(*args, **kw):
        raise AssertionError("not the plain graph")

    monkeypatch.setattr(mlp_ops, "linear", refuse)
    monkeypatch.setattr(mlp_ops._MlpRecomputeGelu, "apply", refuse)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(mlp_ops.mlp(x, fc1, act, fc2), fc2(act(fc1(x))))


def test_inference_fuses_the_exact_gelu_into_fc1_s_gemm(monkeypatch):
    """At inference the exact GELU runs inside fc1's GEMM (``linear(..., gelu=True)``), once per
    token chunk, and the GELU module itself is not called; the values are the plain MLP's."""
    x, fc1, act, fc2 = _layers()
    calls = []
    real = mlp_ops.linear
    monkeypatch.setattr(mlp_ops, "linear", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(act, "forward", lambda t: pytest.fail("GELU module called"))
    out, seen = _chunk_rows(monkeypatch, x, fc1, act, fc2, 10 * 8)
    assert seen == [(8, 6), (7, 6)] and calls == [{"gelu": True}] * 2
    with torch.no_grad():
        torch.testing.assert_close(out, fc2(F.gelu(fc1(x))), rtol=1e-5, atol=1e-5)
