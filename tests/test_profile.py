"""benchmarks/op_profile.py: the per-category profile of ours against a reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "op_profile.py"
_spec = importlib.util.spec_from_file_location("op_profile", _PATH)
op_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(op_profile)


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("aten::addmm", "gemm"),
        ("aten::bmm", "gemm"),
        ("aten::baddbmm_", "gemm"),  # in place: the memory-efficient attention's dk, dv
        ("aten::addmm_", "gemm"),
        ("mkldnn::_linear_pointwise", "gemm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention_fused"),
        ("aten::_softmax", "softmax"),
        ("aten::native_layer_norm_backward", "norm"),
        ("aten::mkldnn_convolution", "pooling"),
        ("aten::max_pool2d_with_indices_backward", "pooling"),
        ("aten::copy_", "copies"),
        ("aten::cat", "copies"),
        ("aten::gelu_backward", "elementwise"),
        ("aten::_foreach_mul_", "elementwise"),
        ("aten::view", "other"),
    ],
)
def test_profile_puts_each_op_in_its_category(name, category):
    assert op_profile.categorize(name) == category


def test_profile_counts_gemm_and_fused_attention_flops_by_hand():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    w = torch.randn(5, 16)
    q = k = v = torch.randn(2, 3, 7, 4)  # B, heads, tokens, width

    def fn():
        F.linear(a @ b, w)  # 2*4*8*16 + 2*4*16*5
        F.scaled_dot_product_attention(q, k, v)  # two products of 2*B*H*N*N*C

    gemm, attn = op_profile.gemm_flops(fn)
    assert gemm == 2 * 4 * 8 * 16 + 2 * 4 * 16 * 5
    assert attn == 2 * (2 * 2 * 3 * 7 * 7 * 4)


def test_amdahl_ceiling_is_reference_time_over_our_gemm_flops_at_its_rate():
    ref = {"total_s": 10.0, "gemm_gflops": 100.0}
    ours = {"gemm_flops": 300e9, "attention_fused_flops": 100e9}
    # 400 GFLOP at 100 GFLOP/s = 4 s; 10 s / 4 s
    assert op_profile.amdahl_ceiling(ours, ref) == pytest.approx(2.5)


def test_profile_puts_everything_under_optimizer_step_in_optimizer():
    model = torch.nn.Linear(64, 64)
    model(torch.randn(8, 64)).sum().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cats, _, _, inclusive = op_profile.profile_models({"opt": opt.step}, rounds=1)
    assert cats["opt"]["optimizer"] == pytest.approx(sum(cats["opt"].values()))
    assert cats["opt"]["optimizer"] == pytest.approx(inclusive["opt"])


def test_profile_of_tiny_train_case_sums_categories_to_profiled_total():
    res = op_profile.run_profile("train", quick=True, rounds=1)
    for name in ("ours", "timm"):
        s, cats = res["summary"][name], res["categories_s"][name]
        assert set(cats) == set(op_profile.CATEGORIES)
        # the categories' sum against the profiler's own inclusive time under the model
        assert sum(cats.values()) == pytest.approx(s["profiled_inclusive_s"], rel=1e-6)
        assert cats["gemm"] > 0 and cats["optimizer"] > 0
        assert s["gemm_gflops"] == pytest.approx(s["gemm_flops"] / cats["gemm"] / 1e9)
    text = op_profile.format_result(res)
    assert "Amdahl ceiling" in text and "optimizer" in text
