"""The training MLP under the ``onednn`` GEMM setting: every product of its custom backward
(the weight and input gradients of both layers) runs on oneDNN, as the setting asks, and the
gradients are autograd's of the plain modules."""

from __future__ import annotations

import torch

from mvitv2.ops import gemm
from mvitv2.ops import mlp as mlp_ops
from test_gemm import needs_onednn
from test_values_mlp import _layers


@needs_onednn
def test_training_mlp_backward_runs_its_four_gemms_on_onednn_when_set(monkeypatch):
    x, fc1, act, fc2 = _layers()
    leaves = (x.requires_grad_(), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    dy = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    products = []
    real = gemm._nt
    monkeypatch.setattr(
        gemm, "_nt", lambda a, b, *r, **k: products.append(1) or real(a, b, *r, **k)
    )
    with gemm.gemm_backend("onednn"):
        out = mlp_ops.mlp(x, fc1, act, fc2)
        products.clear()  # the backward's products only
        got = torch.autograd.grad(out, leaves, dy)
    assert len(products) == 4  # dW2, dH (through W2), dW1, dX (through W1)
    want = torch.autograd.grad(fc2(act(fc1(x))), leaves, dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
