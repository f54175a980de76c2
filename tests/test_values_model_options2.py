"""Model options at the edge of their range: what ``MViTConfig`` accepts builds the model asked
for, and each combination it refuses is one ``UserValueError`` with its own message."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.errors import UserValueError
from mvitv2.models.config import MViTConfig

TINY = dict(depths=(1, 1, 1, 1), embed_dim=8, img_size=32)


def test_a_one_stage_model_keeps_the_patch_grid_and_the_first_width():
    """A single stage is a valid architecture: no stage change, so a 32 px input with stride 4
    gives its (32 / 4) ** 2 patch tokens at ``embed_dim`` channels."""
    model = mvitv2.create_model("mvitv2_tiny", **{**TINY, "depths": (1,)}).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    assert model.num_features == 8
    assert tokens.shape == (1, (32 // 4) ** 2, 8)


def test_an_mlp_ratio_below_one_narrows_each_mlp_by_that_ratio():
    """``mlp_ratio`` must be > 0, not >= 1: a bottleneck MLP (0.5) is a valid choice."""
    model = mvitv2.create_model("mvitv2_tiny", **{**TINY, "mlp_ratio": 0.5})
    fc1s = [m for name, m in model.named_modules() if name.endswith("mlp.fc1")]
    assert len(fc1s) == 4
    assert all(fc.out_features * 2 == fc.in_features for fc in fc1s)


WINDOWED = dict(depths=(1, 1, 1, 1), window_size=(2, 2, 2, 2))
NO_WINDOWS = "window attention supports image models without a cls token"
IMAGE_ONLY = "image models have num_frames=1 and no temporal stride"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # each reason on its own: a cls token, or a video model
        ({**WINDOWED, "use_cls_token": True}, NO_WINDOWS),
        ({**WINDOWED, "temporal": True, "num_frames": 4}, NO_WINDOWS),
        # an image model with any one temporal setting other than 1
        ({"num_frames": 2}, IMAGE_ONLY),
        ({"patch_stride": (2, 4, 4)}, IMAGE_ONLY),
        ({"kv_stride": (2, 4, 4)}, IMAGE_ONLY),
    ],
)
def test_each_unsupported_combination_is_refused_on_its_own_with_its_message(options, message):
    with pytest.raises(UserValueError) as err:
        MViTConfig(**options)
    assert str(err.value) == message
