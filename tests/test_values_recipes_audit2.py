"""More of what the recipe fixes of session 34 promise: which parameters ``wd_exempt`` spares,
RandAugment's per-op probability and fill, detectron2's range crop, the new config checks.

References as in test_values_recipes_audit.py: detectron2, timm, SlowFast, written out here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from mvitv2.data.image import ImageDataConfig, RandAugment, build_transform
from mvitv2.engine.optim import param_groups
from mvitv2.errors import UserValueError


def _detectron2_norm_params(model: nn.Module) -> set[str]:
    """detectron2 detectron2/solver/build.py get_default_optimizer_params: for every module
    (``model.named_modules()``) that is a norm layer, its own parameters
    (``module.named_parameters(recurse=False)``), named as ``model.named_parameters()`` does."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    return {
        ".".join(filter(None, (m_name, p_name)))
        for m_name, m in model.named_modules()
        if isinstance(m, norm_types)
        for p_name, _ in m.named_parameters(recurse=False)
    }


def _spared(model: nn.Module, exempt: tuple[str, ...]) -> set[str]:
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.1, exempt)}
    assert groups["decay"] | groups["no_decay"] == set(dict(model.named_parameters()))
    return groups["no_decay"]


def test_a_norm_layer_trained_alone_is_norm_not_bias():
    """A model that is itself a norm layer (its parameters named ``weight`` and ``bias``, with
    no module prefix): ``norm`` spares them, ``bias`` alone does not."""
    for model in (nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4)):
        assert _spared(model, ("norm",)) == {"weight", "bias"} == _detectron2_norm_params(model)
        assert _spared(model, ("bias",)) == set()


def test_wd_exempt_norm_spares_a_norm_layers_own_parameters_not_those_nested_in_it():
    """An adaptive LayerNorm (a LayerNorm subclass holding a Linear, as AdaLN / FiLM layers):
    its own affine parameters are ``norm``, the nested Linear's weight decays as any weight and
    its bias is ``bias``."""

    class AdaLN(nn.LayerNorm):
        def __init__(self) -> None:
            super().__init__(4)
            self.proj = nn.Linear(3, 8)

    model = nn.Sequential(nn.Linear(4, 4), AdaLN())
    norms = _detectron2_norm_params(model)
    assert norms == {"1.weight", "1.bias"}
    assert _spared(model, ("norm",)) == norms
    assert _spared(model, ("bias",)) == {"0.bias", "1.proj.bias"}
    assert _spared(model, ("norm", "bias")) == norms | {"0.bias", "1.proj.bias"}


def test_randaug_prob_and_magnitude_edges_are_accepted():
    """``randaug_prob`` 0 (RandAugment never applies an op) and 1 (every op, torchvision's),
    ``randaug_m`` 0 (the weakest bin) are valid options."""
    for prob in (0.0, 1.0):
        dc = ImageDataConfig.from_dict({"randaug_prob": prob, "randaug_m": 0})
        assert (dc.randaug_prob, dc.randaug_m) == (prob, 0)
    dc = ImageDataConfig.from_dict({"randaug_prob": 0.0, "randaug_m": 30, "randaug_mstd": 0.0})
    ra = next(t for t in build_transform(dc, train=True).transforms if isinstance(t, RandAugment))
    ra._AUGMENTATION_SPACE = {"Brightness": v2.RandAugment._AUGMENTATION_SPACE["Brightness"]}
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    assert all(torch.equal(ra(image), image) for _ in range(20))


@pytest.mark.parametrize("prob", [-0.1, 1.5])
def test_randaug_prob_outside_0_1_is_one_config_error(prob):
    msg = f"invalid image data config: randaug_prob must be in [0, 1], got {prob}"
    with pytest.raises(UserValueError, match=f"^{re.escape(msg)}$"):
        ImageDataConfig.from_dict({"randaug_prob": prob})


def test_every_bad_image_data_option_is_named_in_the_one_error():
    msg = (
        "invalid image data config: hflip must be a probability in [0, 1], got 2.0; "
        "randaug_prob must be in [0, 1], got 3.0"
    )
    with pytest.raises(UserValueError, match=f"^{re.escape(msg)}$"):
        ImageDataConfig.from_dict({"hflip": 2.0, "randaug_prob": 3.0})


def _brightness_chain(k: int) -> set[float]:
    """Grey 100 after ``k`` of torchvision's Brightness ops at bin 30 (factor 1 +- 0.9), each
    clamped to 0..255: the values k applied ops can give."""
    values = {100.0}
    for _ in range(k):
        values = {min(max(v * f, 0.0), 255.0) for v in values for f in (1.9, 0.1)}
    return values


def test_randaugment_applies_each_of_its_ops_independently_with_prob():
    """timm's RandAugment (``AugmentOp.__call__``: ``random.random() > prob`` skips that op
    only): with n = 2 and prob = 0.3 the number of ops applied is Binomial(2, 0.3), which a
    Brightness-only space makes readable from a grey pixel (bounds at 5 standard deviations)."""
    n, p, trials = 2, 0.3, 500
    ra = RandAugment(n, 30, 0.0, prob=p)
    ra._AUGMENTATION_SPACE = {"Brightness": v2.RandAugment._AUGMENTATION_SPACE["Brightness"]}
    grey = tv_tensors.Image(torch.full((3, 2, 2), 100, dtype=torch.uint8))
    levels = {k: _brightness_chain(k) for k in range(n + 1)}
    assert all(abs(a - b) > 2 for i in levels for j in levels if i < j
               for a in levels[i] for b in levels[j])  # fmt: skip
    torch.manual_seed(0)
    counts = [0] * (n + 1)
    for _ in range(trials):
        v = float(ra(grey)[0, 0, 0])
        counts[next(k for k in levels if any(abs(v - w) <= 1 for w in levels[k]))] += 1
    for k, got in enumerate(counts):
        q = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert abs(got - trials * q) <= 5 * math.sqrt(trials * q * (1 - q)), (k, counts)


def _square_scene(side: int) -> tuple[tv_tensors.Image, dict]:
    gen = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, side, side), generator=gen).to(torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        [[0.0, 0, side, side]], format="XYXY", canvas_size=(side, side)
    )
    return image, {"boxes": boxes, "labels": torch.tensor([1])}


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"mode": "lsj", "crop_prob": 0.5}, "data.crop_prob applies to aug: multiscale only, not 'lsj'"),
        ({"mode": "none", "crop_prob": 1.0}, "data.crop_prob applies to aug: multiscale only, not 'none'"),
        ({"crop_prob": 1.5}, "data.crop_prob must be in [0, 1], got 1.5"),
        ({"crop_prob": -0.5}, "data.crop_prob must be in [0, 1], got -0.5"),
    ],
)  # fmt: skip
def test_crop_prob_outside_0_1_or_without_multiscale_is_one_config_error(kwargs, msg):
    from mvitv2.data.detection import detection_train_transforms

    with pytest.raises(UserValueError, match=f"^{re.escape(msg)}$"):
        detection_train_transforms(**kwargs)


def test_crop_prob_one_crops_every_image():
    """detectron2's crop (short side 400/500/600, then each side drawn from 384..600) with
    probability 1: a square image comes out with the crop's random aspect, not square (a
    square crop, h == w, is about 1 draw in 40)."""
    from mvitv2.data.detection import detection_train_transforms

    image, target = _square_scene(640)
    tf = detection_train_transforms(min_sizes=(384,), max_size=10_000, crop_prob=1.0)
    torch.manual_seed(0)
    shapes = [tuple(tf(image, target)[0].shape[-2:]) for _ in range(40)]
    assert all(min(s) == 384 for s in shapes)
    assert sum(h != w for h, w in shapes) >= 36, shapes


def test_crop_prob_zero_is_the_plain_multiscale_pipeline():
    """With crop_prob 0 a seed gives the images of flip + multi-scale resize alone, as before
    the crop existed (no random draw is spent on a crop that never happens)."""
    from mvitv2.data.detection import detection_train_transforms

    image, target = _square_scene(96)
    sizes, cap = (32, 48, 64, 80), 200
    ours = detection_train_transforms(min_sizes=sizes, max_size=cap, crop_prob=0.0)
    reference = v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomShortestSize(min_size=list(sizes), max_size=cap),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    for seed in range(6):
        torch.manual_seed(seed)
        got = ours(image, target)[0]
        torch.manual_seed(seed)
        assert torch.equal(got, reference(image, target)[0])
