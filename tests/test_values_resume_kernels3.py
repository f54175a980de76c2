"""What a resumed run does with a checkpoint's ``implementation`` entry that it cannot take: an
unknown recorded kernel is measured again, and a wrong name given to the keepers is refused with
one message naming it."""

from __future__ import annotations

import pytest
import torch

from mvitv2.ops import gemm, keep_training_choices, pooling
from mvitv2.ops.gemm import gemm_backend, group_products_on_onednn, uses_onednn
from test_gemm import needs_onednn
from test_values_resume_kernels import _measured


@needs_onednn
def test_the_aten_setting_wins_over_kept_and_measured_onednn_attention_products():
    """``gemm_backend("aten")`` runs every product on ATen, even where the checkpoint kept
    oneDNN for them and the measurement says oneDNN is faster."""
    x = torch.randn(4, 8)
    with pytest.MonkeyPatch.context() as mp:
        _measured(mp, onednn_linear=True, onednn_products=True, bf16=False, fp32_pool=False)
        for recorded in ({}, {"gemm": "onednn", "attention_gemm": "onednn"}):
            keep_training_choices(recorded, None)
            assert (uses_onednn(x), group_products_on_onednn(x)) == (True, True)
            with gemm_backend("aten"):
                assert (uses_onednn(x), group_products_on_onednn(x)) == (False, False)
                choice = gemm.gemm_choice(True, torch.float32)
                assert (choice["gemm"], choice["attention_gemm"]) == ("aten", "aten")


def test_an_unknown_recorded_pool_conv_is_measured_again_not_refused():
    """A checkpoint whose ``pool_conv`` is no way this version knows (another version's, an
    edited file) resumes as a fresh run would: the measurement decides, as for the GEMMs."""
    with pytest.MonkeyPatch.context() as mp:
        _measured(mp, onednn_linear=False, onednn_products=False, bf16=True, fp32_pool=True)
        keep_training_choices({"pool_conv": "measured"}, torch.bfloat16)
        assert pooling.pool_choice(torch.bfloat16, True)["pool_conv"] == "fp32"  # the measurement
        assert pooling._KEPT_FP32 == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: gemm.keep_training_backends("mkl", None),
            "unknown gemm backend 'mkl'; expected 'aten' or 'onednn'",
        ),
        (
            lambda: gemm.keep_training_backends(None, "cublas"),
            "unknown attention_gemm backend 'cublas'; expected 'aten' or 'onednn'",
        ),
        (
            lambda: pooling.keep_pool_conv("bf16", torch.bfloat16),
            "unknown pool_conv 'bf16'; expected 'fp32' or 'as autocast'",
        ),
    ],
)
def test_a_kernel_name_the_keepers_do_not_know_is_refused_naming_it(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message
