"""Value tests (mutation, late changes): a bf16 RGB kernel adapted to another channel count,
the patch kernel of a model that is not RGB on either side, and an export's preprocessing
at another (non-square) size."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.tasks.spec import get_spec
from test_values_models import randomized
from test_values_models2 import OURS_BASE

pytest.importorskip("timm")


@pytest.mark.parametrize("in_chans", [1, 4])
def test_bf16_rgb_weights_adapt_as_timm_rounds_them_to_bf16(in_chans):
    """A bf16 checkpoint: timm's ``adapt_input_conv`` sums/scales in float32 and returns bf16;
    the kernel loaded into the float32 model is that bf16 value, not the float32 one."""
    from timm.models._manipulate import adapt_input_conv

    rgb = randomized(mvitv2.create_model("mvitv2_tiny", **OURS_BASE))
    sd = {k: v.to(torch.bfloat16) for k, v in rgb.state_dict().items()}
    model = mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "in_chans": in_chans})
    mvitv2.load_checkpoint(model, sd)
    ref = adapt_input_conv(in_chans, sd["patch_embed.proj.weight"].clone())
    assert ref.dtype == torch.bfloat16
    assert torch.equal(model.patch_embed.proj.weight, ref.float())
    exact = sd["patch_embed.proj.weight"].float().sum(1, keepdim=True)
    if in_chans == 1:  # the bf16 rounding is visible: not the float32 sum
        assert not torch.equal(model.patch_embed.proj.weight, exact)


def test_a_checkpoint_that_is_not_rgb_is_a_shape_conflict_not_an_adaptation():
    """Only an RGB kernel is adapted: a 2-channel checkpoint into a 4-channel model (its
    channels repeated would fit) is reported as a shape conflict, the kernel left as it was."""
    grey = randomized(mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "in_chans": 2}))
    model = mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "in_chans": 4})
    before = model.patch_embed.proj.weight.detach().clone()
    with pytest.raises(
        mvitv2.weights.CheckpointError,
        match=r"patch_embed.proj.weight: \(8, 2, 7, 7\) vs \(8, 4, 7, 7\)",
    ):
        mvitv2.load_checkpoint(model, grey.state_dict())
    assert torch.equal(model.patch_embed.proj.weight, before)


def test_an_image_export_at_a_non_square_size_crops_that_size_from_its_short_side():
    """Image preprocessing at 96 x 160 (checkpoint 64 x 64, crop_pct 0.8): the crop is 96 x 160
    and the short side the eval transform resizes to is int(96 / 0.8) = 120 (the smaller side,
    not the height nor the width); the other keys are kept, the checkpoint's dict unchanged."""
    pre = {"input_size": [64, 64], "resize_size": 80, "crop_pct": 0.8, "mean": [0.5] * 3}
    got = get_spec("image").preprocessing_at(pre, (96, 160))
    assert got == {"input_size": [96, 160], "resize_size": 120, "crop_pct": 0.8, "mean": [0.5] * 3}
    got = get_spec("image").preprocessing_at(pre, (150, 100))
    assert (got["input_size"], got["resize_size"]) == ([150, 100], 125)
    assert pre["input_size"] == [64, 64] and pre["resize_size"] == 80


def test_a_video_export_at_another_size_scales_the_short_side_by_the_smaller_sides():
    """Video preprocessing (crop 64 x 48 from a short side 73) at 96 x 120: the short side
    scales by 96 / 48 (the smaller sides' ratio) to 146; 120 x 96 gives the same."""
    pre = {"input_size": [64, 48], "resize_size": 73, "num_frames": 4}
    spec = get_spec("video")
    assert spec.preprocessing_at(pre, (96, 120)) == {
        "input_size": [96, 120],
        "resize_size": round(73 * 96 / 48),
        "num_frames": 4,
    }
    assert spec.preprocessing_at(pre, (120, 96))["resize_size"] == 146
    assert spec.preprocessing_at(pre, (24, 30))["resize_size"] == round(73 / 2)


def test_a_detector_export_at_another_size_keeps_its_preprocessing():
    """A detector resizes inside its graph: its preprocessing is the checkpoint's, a copy."""
    pre = {"min_size": 100, "max_size": 160}
    got = get_spec("detect").preprocessing_at(pre, (128, 160))
    assert got == pre and got is not pre


def test_rgb_weights_into_a_grey_model_of_another_patch_kernel_are_a_shape_conflict():
    """The channel adaptation does not make a 7 x 7 kernel fit a 3 x 3 one: a shape conflict."""
    rgb = randomized(mvitv2.create_model("mvitv2_tiny", **OURS_BASE))
    model = mvitv2.create_model(
        "mvitv2_tiny", **{**OURS_BASE, "in_chans": 1, "patch_kernel": [1, 3, 3]}
    )
    with pytest.raises(
        mvitv2.weights.CheckpointError, match=r"patch_embed.proj.weight: \(8, 3, 7, 7\) vs"
    ):
        mvitv2.load_checkpoint(model, rgb.state_dict())


@pytest.mark.parametrize("sampling", ["uniform", "inverse_uniform"])
def test_a_short_side_below_the_crop_is_padded_to_the_crop(sampling):
    """short_side_range under crop_size (20 px sides, 32 px crop): the clip is padded up to
    the crop, not an error; an unknown crop is one error naming the choices."""
    from mvitv2.data.video import VideoTransform

    t = VideoTransform(
        True,
        crop_size=32,
        crop="short_side",
        short_side_range=(20, 20),
        short_side_sampling=sampling,
    )
    out = t(torch.zeros(2, 3, 24, 30, dtype=torch.uint8))
    assert tuple(out.shape) == (3, 2, 32, 32)
    with pytest.raises(ValueError, match="^unknown crop 'x'; expected 'rrc' or 'short_side'$"):
        VideoTransform(True, crop="x")
