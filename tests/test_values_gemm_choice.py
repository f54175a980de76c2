"""mvitv2.ops.gemm and mvitv2.ops.context by value: the GEMM backend report for every compute
dtype and mode, what counts as tracing, and converting linears without touching the RNG."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mvitv2.ops import NOT_APPLICABLE, context, gemm
from mvitv2.ops.gemm import gemm_backend, gemm_choice
from test_gemm import needs_onednn

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture
def onednn_present(monkeypatch):
    """A build with oneDNN's linear (faked); the test sets whether the CPU has bf16 kernels."""
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: SimpleNamespace())


def _report(gemm_name: str, setting: str, why: str) -> dict[str, str]:
    return {"gemm": gemm_name, "gemm_setting": setting, "gemm_why": why}


@pytest.mark.parametrize("setting", ["auto", "aten", "onednn"])
def test_fp16_and_bf16_training_report_aten_as_not_applicable_whatever_the_setting(
    monkeypatch, onednn_present, setting
):
    """oneDNN runs fp32, and bf16 autocast only at inference: fp16 (either mode) and bf16
    training are ATen's, for the reason NOT_APPLICABLE, with no attention products named."""
    monkeypatch.setattr(gemm, "_onednn_bf16_supported", lambda: True)
    with gemm_backend(setting):
        for training, dtype in [(False, FP16), (True, FP16), (True, BF16)]:
            assert gemm_choice(training, dtype) == _report("aten", setting, NOT_APPLICABLE)


@pytest.mark.parametrize("setting", ["auto", "aten", "onednn"])
def test_bf16_inference_without_onednn_bf16_kernels_is_aten_and_says_why(
    monkeypatch, onednn_present, setting
):
    """On a CPU without oneDNN's bf16 kernels, bf16 inference reports ATen for that reason;
    fp32 inference there is unaffected (its setting, or measured)."""
    monkeypatch.setattr(gemm, "_onednn_bf16_supported", lambda: False)
    with gemm_backend(setting):
        got = gemm_choice(False, BF16)
        assert got == _report("aten", setting, "this CPU has no oneDNN bf16 kernels")
        fp32 = gemm_choice(False, torch.float32)
    want_fp32 = {"auto": "measured", "aten": "aten", "onednn": "onednn"}[setting]
    assert fp32["gemm"] == want_fp32 and fp32["gemm_setting"] == setting


def test_bf16_inference_with_onednn_bf16_kernels_follows_the_setting(monkeypatch, onednn_present):
    """With bf16 kernels, bf16 inference is reported like fp32 inference: a set backend as set,
    ``"auto"`` as measured per GEMM size class."""
    monkeypatch.setattr(gemm, "_onednn_bf16_supported", lambda: True)
    for setting in ("aten", "onednn"):
        with gemm_backend(setting):
            assert gemm_choice(False, BF16) == _report(setting, setting, "set")
    with gemm_backend("auto"):
        got = gemm_choice(False, BF16)
        assert got["gemm"] == "measured" and got == gemm_choice(False, torch.float32)


def test_tracing_is_any_one_of_jit_tracing_compiling_and_onnx_export(monkeypatch):
    """``tracing()`` is true inside ``torch.jit.trace`` alone, while compiling alone, and during
    an ONNX export alone, and false in plain eager code."""
    seen = []

    def traced(x):
        seen.append(context.tracing())
        return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        torch.jit.trace(traced, torch.zeros(1), check_trace=False)
    assert seen == [True]
    assert context.tracing() is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.jit.is_tracing() is False and context.tracing() is True
    monkeypatch.undo()
    monkeypatch.setattr(context, "_in_onnx_export", lambda: True)
    assert context.tracing() is True


def test_converting_linears_draws_nothing_from_the_global_rng():
    """Swapping a model's ``nn.Linear`` layers for ours makes no new parameters: the random
    stream after the conversion is the one before it (a seeded build stays reproducible)."""
    head = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False))
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    gemm.convert_linears(head)
    assert torch.equal(torch.rand(4), want)
    assert all(isinstance(m, gemm.Linear) for m in head)


def _record_onednn_calls(monkeypatch) -> list[str]:
    """Log the fused attribute (``"none"``, ``"gelu"``) of every oneDNN linear call."""
    real, calls = gemm._onednn_linear_op(), []
    monkeypatch.setattr(
        gemm, "_onednn_linear_op", lambda: lambda *a: calls.append(a[3]) or real(*a)
    )
    return calls


@needs_onednn
@pytest.mark.parametrize("onednn", [False, True])
def test_gradient_products_run_on_the_backend_they_are_told(monkeypatch, onednn):
    """``grad_input(dy, w) = dy @ w`` and ``grad_weight(dy, x) = dy.T @ x`` (output wider and
    narrower than the input) against float64 products: one oneDNN GEMM each when told
    ``onednn`` (as the MLP's backward passes its layers' choice), none otherwise."""
    calls = _record_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    dy, w = torch.randn(40, 12, generator=g), torch.randn(12, 7, generator=g)
    got = gemm.grad_input(dy, w, onednn)
    assert calls == ["none"] * onednn
    torch.testing.assert_close(got, (dy.double() @ w.double()).float())
    for k in (7, 20):
        x = torch.randn(40, k, generator=g)
        calls.clear()
        got = gemm.grad_weight(dy, x, onednn)
        assert calls == ["none"] * onednn and got.shape == (12, k)
        torch.testing.assert_close(got, (dy.double().t() @ x.double()).float())


@needs_onednn
def test_a_training_step_on_onednn_runs_the_forward_and_both_gradients_on_onednn(monkeypatch):
    """With the ``"onednn"`` backend a linear layer's forward, input gradient and weight
    gradient are one oneDNN GEMM each, and the three gradients are float64 autograd's."""
    calls = _record_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 10, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(7)
    dy = torch.randn(3, 10, 7, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with gemm_backend("onednn"):
        got = torch.autograd.grad((gemm.linear(*leaves) * dy).sum(), leaves)
    assert calls == ["none"] * 3
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad((F.linear(*ref) * dy.double()).sum(), ref)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.float())


@pytest.mark.parametrize(("setting", "dtype"), [("aten", torch.float32), ("onednn", torch.float64)])
@pytest.mark.parametrize("gelu", [False, True])
def test_with_gradients_on_aten_the_output_and_gradients_are_f_linears(setting, dtype, gelu):
    """Where a gradient is needed and ATen runs (its setting, or a dtype oneDNN does not take)
    the layer is ``F.linear`` with its bias (then the exact GELU): output and the gradients of
    input, weight and bias against float64 autograd."""
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 6, 9, generator=g), torch.randn(5, 9, generator=g), torch.randn(5)
    dy = torch.randn(2, 6, 5, generator=g)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    with gemm_backend(setting):
        y = gemm.linear(*leaves, gelu=gelu)
    got = [y, *torch.autograd.grad((y * dy.to(dtype)).sum(), leaves)]
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    want = F.gelu(F.linear(*ref)) if gelu else F.linear(*ref)
    want = [want, *torch.autograd.grad((want * dy.double()).sum(), ref)]
    for a, e in zip(got, want):
        torch.testing.assert_close(a.detach(), e.detach().to(dtype))
