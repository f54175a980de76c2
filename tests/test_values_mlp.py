"""The training MLP (recomputed GELU, custom backward) against autograd's plain modules, with
any of its inputs and parameters frozen: frozen ones get no gradient, the others autograd's."""

from __future__ import annotations

import pytest
import torch
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
