"""mvitv2.ops.implementation_choices by value: its defaults, and what a CPU training run under bf16
autocast reports for the pooling convs and the folded path (with the measurement patched)."""

from __future__ import annotations

import torch

from mvitv2.ops import NOT_APPLICABLE, gemm_backend, implementation_choices, pooling
from mvitv2.ops import attention as attention_ops

BF16 = torch.bfloat16


def test_implementation_choices_default_to_cpu_fp32_inference(monkeypatch):
    """Called without arguments: the CPU report (with the pooling conv and folded width
    entries) of an fp32 run without gradients."""
    monkeypatch.setattr(attention_ops, "folded_padding_ms", lambda dtype: (1.0, 2.0))
    choices = implementation_choices()
    assert choices == implementation_choices(torch.device("cpu"), torch.float32, training=False)
    assert choices["pool_conv"] == "as autocast"
    assert choices["pool_conv_why"] == "fp32, or no gradients"
    assert choices["folded_width"] == "as is"
    assert choices["folded_width_why"] == (
        "measured float32 SDPA at width 118: 1.00 ms, padded to 128: 2.00 ms"
    )


def test_cpu_bf16_training_reports_the_measured_pool_conv_and_the_unpadded_folded_path(
    monkeypatch,
):
    """Training under bf16 on a CPU: the pooling convs' way is the one measured for bf16 (here
    fp32, 7.0 ms against 2.5 ms), and the folded path runs unpadded without a measurement."""
    monkeypatch.setattr(pooling, "pool_conv_ms", lambda dtype: {BF16: (7.0, 2.5)}[dtype])
    monkeypatch.setattr(attention_ops, "folded_padding_ms", None)  # would fail if called
    choices = implementation_choices("cpu", BF16, training=True)
    assert choices["pool_conv"] == "fp32"
    assert choices["pool_conv_why"] == (
        "measured a stride-2 depthwise conv's forward and backward: bfloat16 7.0 ms, fp32 2.5 ms"
    )
    assert choices["folded_width"] == "as is"
    assert choices["folded_width_why"] == "with gradients: not padded"


def test_on_a_gpu_the_gemm_is_aten_and_the_setting_in_force_is_reported():
    """Off the CPU the linear layers run F.linear whatever the GEMM backend setting, and the
    report names that setting as it stands."""
    for setting in ("aten", "onednn", "auto"):
        with gemm_backend(setting):
            choices = implementation_choices("cuda:0", torch.float32, training=True)
        assert choices["gemm"] == "aten"
        assert choices["gemm_setting"] == setting
        assert choices["gemm_why"] == NOT_APPLICABLE
