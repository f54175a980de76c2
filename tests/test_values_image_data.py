"""Image data paths a user meets with their own folders and inputs, against independent
references: torchvision's own RandAugment and antialiased resize, and the error lines written
out by hand for each wrong folder layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mvitv2.data.image import ImageDataConfig, ImageFolder, RandAugment, build_transform
from mvitv2.engine import TrainConfig
from mvitv2.engine.cli import RECIPES_DIR
from mvitv2.errors import UserFileNotFoundError, UserValueError
from test_values_data import _normalise, _photo, _write


# ---------------------------------------------------------------------- transforms
@pytest.mark.parametrize(("num_ops", "magnitude"), [(2, 9), (3, 30)])
def test_randaugment_without_magnitude_noise_is_torchvision_s_randaugment(num_ops, magnitude):
    """``randaug_mstd: 0`` gives torchvision's RandAugment exactly: the same ops, magnitudes
    and signs for a seed (no extra random draw per op)."""
    img = TF.pil_to_tensor(_photo(40, 32))
    ours = RandAugment(num_ops, magnitude, 0.0)
    ref = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    for seed in range(4):
        torch.manual_seed(seed)
        got = ours(img)
        torch.manual_seed(seed)
        assert torch.equal(got, ref(img)), seed


def test_a_tensor_image_is_shrunk_with_antialiasing_by_both_transforms():
    """An image passed as an array or tensor (``predict``) is shrunk with antialiasing, as a
    PIL image is, in evaluation and in training: not the aliased nearest-sample resize."""
    noise = torch.randint(0, 256, (3, 128, 128), generator=torch.Generator().manual_seed(0))
    fine = noise.to(torch.uint8)  # detail finer than the output's pixels
    base = {"img_size": 32, "interpolation": "bilinear"}
    dc = ImageDataConfig.from_dict({**base, "crop_pct": 1.0})
    want = _normalise(TF.resize(fine, [32, 32], antialias=True))
    aliased = _normalise(TF.resize(fine, [32, 32], antialias=False))
    assert not torch.allclose(want, aliased, atol=0.1)  # the case tells the two apart
    assert torch.allclose(build_transform(dc, train=False)(fine), want, atol=1e-5)
    plain = {"hflip": 0, "randaug_n": 0, "reprob": 0, "scale": [1, 1], "ratio": [1, 1]}
    train = build_transform(ImageDataConfig.from_dict({**base, **plain}), train=True)
    assert torch.allclose(train(fine), want, atol=1e-5)  # the crop is the whole square


@pytest.mark.parametrize("name", ["in1k_tiny", "in1k_base", "in1k_huge", "finetune"])
def test_data_options_a_recipe_leaves_out_are_the_paper_s_imagenet_recipe(name):
    """The ImageNet recipes spell out their data options but the crop's aspect range: it and
    any option left out of a recipe are the paper's recipe (``in1k_base.yaml``'s values) with
    the standard Inception crop (torchvision's ``RandomResizedCrop`` defaults)."""
    inception = v2.RandomResizedCrop(224)
    paper = TrainConfig.load(RECIPES_DIR / "in1k_base.yaml").data
    defaults = ImageDataConfig()
    assert (defaults.scale, defaults.ratio) == (inception.scale, inception.ratio)
    assert ImageDataConfig.from_dict(paper) == defaults
    recipe = ImageDataConfig.from_dict(TrainConfig.load(RECIPES_DIR / f"{name}.yaml").data)
    assert recipe.ratio == inception.ratio


# ---------------------------------------------------------------------- wrong folder layouts
def _raises(error: type[Exception], message: str, *args) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        ImageFolder(*args)


def test_a_data_folder_that_is_a_file_or_missing_is_one_line_naming_it(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    _raises(
        UserValueError,
        f"data folder {tmp_path / 'data.zip'} is a file; pass the folder holding train/ and val/",
        tmp_path / "data.zip",
        "train",
    )
    _raises(
        UserFileNotFoundError,
        f"data folder {tmp_path / 'nope'} does not exist",
        tmp_path / "nope",
        "train",
    )


def test_a_missing_or_empty_split_shows_the_expected_layout(tmp_path):
    _write(tmp_path / "train/cat/a.jpg")
    _raises(
        UserFileNotFoundError,
        f"{tmp_path / 'val'} does not exist; expected an ImageNet-style folder: "
        f"{tmp_path}/train/<class>/*.jpg and {tmp_path}/val/<class>/*.jpg",
        tmp_path,
        "val",
    )
    (tmp_path / "val").mkdir()
    (tmp_path / "val/a.jpg").write_bytes(b"images directly in the split, not in class folders")
    _raises(
        UserFileNotFoundError,
        f"{tmp_path / 'val'} has no class sub-folders (<class>/*.jpg)",
        tmp_path,
        "val",
    )


def test_a_class_folder_without_images_names_the_extensions_searched(tmp_path):
    _write(tmp_path / "train/cat/a.jpg")
    (tmp_path / "train/dog/deeper").mkdir(parents=True)
    (tmp_path / "train/dog/deeper/photo.heic").write_bytes(np.zeros(4, np.uint8).tobytes())
    _raises(
        UserValueError,
        f"class folder {tmp_path / 'train' / 'dog'} has no images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, "
        ".tif, .tiff, .webp; searched its sub-folders too)",
        tmp_path,
        "train",
    )
