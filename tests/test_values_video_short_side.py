"""SlowFast's SSv2 recipe draws the random short side inverse-uniformly
(configs/SSv2/MVITv2_S_16x4.yaml:19 and MVITv2_B_32x3.yaml ``DATA.INV_UNIFORM_SAMPLE: True``,
slowfast/datasets/utils.py ``random_short_side_scale_jitter``: ``round(1 / uniform(1/max,
1/min))``); the draws are checked against that distribution's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mvitv2.data.video import InverseUniformShortestSize, VideoTransform
from mvitv2.engine.cli import RECIPES_DIR
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError
from mvitv2.tasks.video import VideoDataConfig

LO, HI = 256, 320
N = 20000


def _sides(resize: v2.Transform, h: int = 40, w: int = 56) -> tuple[list[int], list[tuple]]:
    torch.manual_seed(0)
    clip = [tv_tensors.Video(torch.zeros(1, 3, h, w, dtype=torch.uint8))]
    sizes = [tuple(resize.make_params(clip)["size"]) for _ in range(N)]
    return [min(s) for s in sizes], sizes


def _inverse_uniform_cdf(side: float) -> float:
    """P(round(1/u) <= side) for u uniform in [1/HI, 1/LO]: u > 1/(side + 0.5)."""
    return (1 / LO - 1 / (side + 0.5)) / (1 / LO - 1 / HI)


@pytest.mark.parametrize("name", ["ssv2_small", "ssv2_base"])
def test_ssv2_recipes_draw_the_short_side_inverse_uniformly(name):
    cfg = VideoDataConfig.from_dict(TrainConfig.load(RECIPES_DIR / f"{name}.yaml").data)
    resize = cfg.transform(train=True)._augment.transforms[0]
    assert isinstance(resize, InverseUniformShortestSize) and (resize.lo, resize.hi) == (LO, HI)
    k400 = VideoDataConfig.from_dict({"train_crop": "short_side"}).transform(train=True)
    assert type(k400._augment.transforms[0]) is v2.RandomShortestSize  # the default: uniform


def test_inverse_uniform_short_sides_follow_slowfast_s_distribution():
    """Mean ln(HI/LO) / (1/LO - 1/HI) = 285.6 px (uniform: 288); quartiles by the closed form;
    every side in [LO, HI]; the long side scaled alike (int, as torchvision's)."""
    sides, sizes = _sides(InverseUniformShortestSize(LO, HI))
    assert min(sides) >= LO and max(sides) <= HI
    mean = math.log(HI / LO) / (1 / LO - 1 / HI)
    assert abs(sum(sides) / N - mean) < 0.3 and abs(mean - 288) > 2
    for side in (264, 280, 288, 300, 312):
        share = sum(s <= side for s in sides) / N
        assert abs(share - _inverse_uniform_cdf(side)) < 0.01, side
    assert all(s == (side, int(56 * side / 40)) for s, side in zip(sizes, sides, strict=True))


def test_uniform_short_sides_are_each_integer_alike():
    transform = VideoTransform(True, crop="short_side", short_side_range=(LO, HI))
    sides, _ = _sides(transform._augment.transforms[0])
    share = sum(s <= 288 for s in sides) / N
    assert abs(share - 33 / 65) < 0.01 and abs(share - _inverse_uniform_cdf(288)) > 0.03


def test_an_unknown_short_side_sampling_is_one_config_error():
    with pytest.raises(
        UserValueError, match="short_side_sampling must be uniform or inverse_uniform, got 'log'"
    ):
        VideoDataConfig.from_dict({"short_side_sampling": "log"})
    with pytest.raises(
        ValueError,
        match="^unknown short_side_sampling 'log'; expected 'uniform' or 'inverse_uniform'$",
    ):
        VideoTransform(True, crop="short_side", short_side_sampling="log")
