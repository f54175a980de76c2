"""A resumed run computes as the run before the kill did: the precision and the CPU training
kernels that run measured come from its checkpoint's ``implementation`` entry instead of being
measured again (a second measurement can pick the other backend, and a run would change its
precision or its GEMMs' rounding at every resume)."""

from __future__ import annotations

import pytest
import torch

from engine_toy import ToyTask, toy_config
from mvitv2.engine import Trainer
from mvitv2.ops import gemm, keep_training_choices, pooling
from mvitv2.ops.gemm import gemm_backend, group_products_on_onednn, uses_onednn
from mvitv2.utils import precision
from mvitv2.utils.precision import Precision, kept_precision
from test_gemm import needs_onednn

KEPT = "kept from the checkpoint being resumed"
CPU = torch.device("cpu")


def _measured(
    monkeypatch, *, onednn_linear: bool, onednn_products: bool, bf16: bool, fp32_pool: bool
):
    """Make every one-off measurement come out as told (times in ms, or s for the precision)."""
    fast, slow = (1.0, 10.0), (10.0, 1.0)  # (oneDNN, ATen)
    monkeypatch.setattr(gemm, "_measured_ms", lambda: fast if onednn_linear else slow)
    monkeypatch.setattr(gemm, "_measured_group_ms", lambda: fast if onednn_products else slow)
    monkeypatch.setattr(
        precision, "time_gemm", lambda shape: (1e-3, 2e-3) if bf16 else (2e-3, 1e-3)
    )
    monkeypatch.setattr(
        pooling, "pool_conv_ms", lambda dtype: (5.0, 1.0) if fp32_pool else (1.0, 5.0)
    )


@needs_onednn
def test_kept_training_backends_replace_the_measurement_until_a_fresh_run():
    x = torch.randn(4, 8)
    with pytest.MonkeyPatch.context() as mp:
        _measured(mp, onednn_linear=False, onednn_products=True, bf16=False, fp32_pool=False)
        assert (uses_onednn(x), group_products_on_onednn(x)) == (False, True)  # measured
        keep_training_choices({"gemm": "onednn", "attention_gemm": "aten"}, None)
        assert (uses_onednn(x), group_products_on_onednn(x)) == (True, False)  # kept
        choice = gemm.gemm_choice(True, torch.float32)
        assert (choice["gemm"], choice["attention_gemm"]) == ("onednn", "aten")
        assert choice["gemm_why"] == f"{KEPT}; attention products {KEPT}"
        with gemm_backend("aten"):  # a setting wins over what was kept
            assert (uses_onednn(x), group_products_on_onednn(x)) == (False, False)
        keep_training_choices({"gemm": "measured", "attention_gemm": "onednn"}, None)
        assert (uses_onednn(x), group_products_on_onednn(x)) == (False, True)  # unknown: measured
        keep_training_choices({}, None)
        assert (uses_onednn(x), group_products_on_onednn(x)) == (False, True)


def test_a_kept_pooling_precision_applies_to_its_autocast_dtype_only():
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", torch.bfloat16):
        _measured(mp, onednn_linear=False, onednn_products=False, bf16=True, fp32_pool=False)
        assert pooling._pool_in_fp32(x, (2, 2)) is False  # measured: autocast is faster
        keep_training_choices({"pool_conv": "fp32"}, torch.bfloat16)
        assert pooling._pool_in_fp32(x, (2, 2)) is True
        assert pooling._pool_in_fp32(x, (1, 1)) is False  # stride 1 never
        assert pooling.pool_choice(torch.bfloat16, True) == {
            "pool_conv": "fp32",
            "pool_conv_why": KEPT,
        }
        assert pooling.pool_choice(torch.float16, True)["pool_conv"] == "as autocast"  # measured
        keep_training_choices({"pool_conv": "fp32"}, None)  # an fp32 run keeps nothing
        assert pooling._pool_in_fp32(x, (2, 2)) is False


def test_a_resumed_amp_bf16_run_keeps_the_precision_its_checkpoint_measured():
    recorded = {
        "precision": "bf16",
        "precision_setting": "bf16",
        "precision_why": "amp=bf16: 1 < 2",
    }
    kept = kept_precision("bf16", CPU, recorded)
    assert kept == Precision("bf16", torch.bfloat16, f"{KEPT} (amp=bf16: 1 < 2)")
    again = kept_precision("bf16", CPU, {**recorded, "precision_why": kept.why})
    assert again.why == kept.why  # said once, however often the run resumes
    fp32 = kept_precision("bf16", CPU, {**recorded, "precision": "fp32"})
    assert (fp32.dtype, fp32.note) == (
        None,
        "amp=bf16 asked; training in fp32 as the run being resumed did; amp=bf16_force keeps bf16",
    )
    # Nothing was measured, or the run now asks for something else: decided afresh.
    assert kept_precision("bf16_force", CPU, recorded) is None
    assert kept_precision("none", CPU, recorded) is None
    assert kept_precision("bf16", torch.device("cuda"), recorded) is None
    assert kept_precision("bf16", CPU, {**recorded, "precision_setting": "bf16_force"}) is None
    assert kept_precision("bf16", CPU, {**recorded, "precision": "fp16"}) is None
    assert kept_precision("bf16", CPU, {}) is None


def test_trainer_resumes_with_the_measured_choices_of_the_run_it_continues(tmp_path, monkeypatch):
    """amp=bf16: the first run measures bf16 faster and autocast pooling faster; at the resume
    every measurement says the opposite, and the run keeps its precision and kernels; a fresh
    run measures again."""
    cfg = toy_config(str(tmp_path), "k", "epochs=1", "amp=bf16")
    _measured(monkeypatch, onednn_linear=False, onednn_products=False, bf16=True, fp32_pool=False)
    first = Trainer(ToyTask(cfg), cfg)
    first.fit()
    assert (first.precision.dtype, first.implementation["pool_conv"]) == (
        torch.bfloat16,
        "as autocast",
    )
    _measured(monkeypatch, onednn_linear=False, onednn_products=False, bf16=False, fp32_pool=True)
    resumed = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert resumed.precision.dtype == torch.bfloat16 and resumed.precision.why.startswith(KEPT)
    assert (resumed.implementation["pool_conv"], resumed.implementation["pool_conv_why"]) == (
        "as autocast",
        KEPT,
    )
    fresh = Trainer(ToyTask(c := toy_config(str(tmp_path), "fresh", "epochs=1", "amp=bf16")), c)
    assert fresh.precision.dtype is None  # measured again: fp32 is faster now


@needs_onednn
def test_trainer_resumes_fp32_training_on_the_gemm_backends_of_the_run_it_continues(
    tmp_path, monkeypatch
):
    cfg = toy_config(str(tmp_path), "g", "epochs=1", "amp=none")
    _measured(monkeypatch, onednn_linear=True, onednn_products=False, bf16=False, fp32_pool=False)
    Trainer(ToyTask(cfg), cfg).fit()
    _measured(monkeypatch, onednn_linear=False, onednn_products=True, bf16=False, fp32_pool=False)
    resumed = Trainer(ToyTask(cfg), cfg, resume="auto")
    got = resumed.implementation
    assert (got["gemm"], got["attention_gemm"], got["gemm_why"]) == (
        "onednn",
        "aten",
        f"{KEPT}; attention products {KEPT}",
    )
    fresh = Trainer(ToyTask(c := toy_config(str(tmp_path), "fresh", "epochs=1", "amp=none")), c)
    assert (fresh.implementation["gemm"], fresh.implementation["attention_gemm"]) == (
        "aten",
        "onednn",
    )
