"""Image classification data: ImageNet-style folders, the embedded digits default, transforms.

Folder layout: ``ROOT/train/<class>/*.png|jpg|...`` and ``ROOT/val/<class>/*``; classes are the
sorted sub-folder names of ``train``, and a class's images may sit in sub-folders of its folder
(as torchvision's ``ImageFolder`` reads them, same order; hidden files and folders skipped).
Unreadable images raise :class:`~mvitv2.data.common.BadSample` so the loader skips and counts
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from mvitv2.data.common import (
    BadSample,
    build_cached,
    class_folders,
    config_from_dict,
    config_to_dict,
    default_data_dir,
    find_files,
    load_digits_arrays,
    render_digit,
    split_digit_indices,
)
from mvitv2.errors import UserFileNotFoundError, UserValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageDataConfig:
    """Preprocessing and augmentation (the ``data`` section of a recipe).

    Args:
        img_size: training and evaluation crop side (divisible by 32).
        crop_pct: evaluation resizes the short side to ``img_size / crop_pct`` then centre-crops.
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect range.
        hflip: horizontal flip probability (0 for digits and text).
        randaug_n: RandAugment ops per image (0: off).
        randaug_m: RandAugment magnitude, a bin of torchvision's 0..30 scale: 3x timm's ``m``
            (0..10), so the paper's ``rand-m9-mstd0.5`` is ``randaug_m=27, randaug_mstd=1.5``.
        randaug_mstd: std of the per-op magnitude noise (timm's ``mstd``, in the same bins).
        randaug_prob: probability that each op is applied (timm's RandAugment: 0.5; 1: every
            op, torchvision's).
        reprob: random erasing probability (per-pixel normal noise, like timm's ``pixel`` mode).
        mean, std: normalisation.
    """

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaug_n: int = 6
    randaug_m: int = 27
    randaug_mstd: float = 1.5
    randaug_prob: float = 0.5
    reprob: float = 0.25
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ImageDataConfig:
        """From a recipe's ``data`` mapping; unknown keys raise ``KeyError``."""
        out = config_from_dict(cls, values, "data")
        if out.img_size % 32:
            raise UserValueError(f"data.img_size must be divisible by 32, got {out.img_size}")
        if out.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise UserValueError(f"data.interpolation: unknown {out.interpolation!r}")
        # What torchvision would refuse (or divide by zero on) only at the first image, with
        # its traceback.
        checks = [
            (out.crop_pct > 0, f"crop_pct must be > 0, got {out.crop_pct}"),
            (0 <= out.scale[0] <= out.scale[1], f"scale must be [min, max] with 0 <= min <= max, got {list(out.scale)}"),
            (0 < out.ratio[0] <= out.ratio[1], f"ratio must be [min, max] with 0 < min <= max, got {list(out.ratio)}"),
            (0 <= out.hflip <= 1, f"hflip must be a probability in [0, 1], got {out.hflip}"),
            (0 <= out.reprob <= 1, f"reprob must be a probability in [0, 1], got {out.reprob}"),
            *randaug_checks(out.randaug_n, out.randaug_m, out.randaug_mstd, out.randaug_prob),
            (all(v > 0 for v in out.std), f"std must be > 0, got {list(out.std)}"),
        ]  # fmt: skip
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise UserValueError(f"invalid image data config: {'; '.join(problems)}")
        return out

    @property
    def interp(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def randaug_checks(n: int, m: int, mstd: float, prob: float) -> list[tuple[bool, str]]:
    """``(ok, message)`` for the :class:`RandAugment` options of a data config (image and
    video): ops, magnitude bin, its noise and the per-op probability."""
    return [
        (n >= 0, f"randaug_n must be >= 0 (0: off), got {n}"),
        (0 <= m <= 30, f"randaug_m must be in 0..30, got {m}"),
        (mstd >= 0, f"randaug_mstd must be >= 0, got {mstd}"),
        (0 <= prob <= 1, f"randaug_prob must be in [0, 1], got {prob}"),
    ]


class RandAugment(v2.RandAugment):
    """torchvision's RandAugment with timm's per-op magnitude noise (``mstd``) and per-op
    probability (timm applies each drawn op with probability 0.5).

    Args:
        num_ops: ops per image.
        magnitude: mean magnitude bin.
        magnitude_std: std of the Gaussian noise on the magnitude, resampled for every op.
        prob: probability that each of the ``num_ops`` ops is applied (1: torchvision's).
        **kwargs: passed to ``v2.RandAugment``.
    """

    def __init__(
        self, num_ops: int, magnitude: int, magnitude_std: float = 0.0, prob: float = 1.0, **kwargs
    ) -> None:
        super().__init__(num_ops=1, magnitude=magnitude, **kwargs)
        self.ops, self.mean_magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.prob = prob

    def forward(self, *inputs: Any) -> Any:
        for _ in range(self.ops):
            if self.prob < 1 and float(torch.rand(())) >= self.prob:
                continue
            if self.magnitude_std > 0:
                m = torch.normal(float(self.mean_magnitude), self.magnitude_std, ())
                self.magnitude = int(m.clamp(0, self.num_magnitude_bins - 1).round())
            inputs = super().forward(*inputs)
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        return inputs if len(inputs) > 1 else inputs[0]


def build_transform(dc: ImageDataConfig, train: bool) -> v2.Compose:
    """PIL image -> normalised float tensor (3, img_size, img_size).

    Train: RandomResizedCrop, flip, RandAugment, normalise, random erasing. Eval (the official
    protocol): resize the short side to ``img_size / crop_pct``, centre crop ``img_size``; on a
    PIL image both in PIL, as the official eval and timm's ``validate.py`` do.
    """
    size, interp = dc.img_size, dc.interp
    if train:
        # Geometry and RandAugment on the PIL image: PIL has bicubic for every op, tensors do not.
        ops: list[Any] = [
            v2.RandomResizedCrop(
                size, scale=dc.scale, ratio=dc.ratio, interpolation=interp, antialias=True
            ),
        ]
        if dc.hflip > 0:
            ops.append(v2.RandomHorizontalFlip(dc.hflip))
        if dc.randaug_n > 0:
            # Rotations, shears and shifts uncover the mean colour, as in timm's RandAugment
            # with the official ``img_mean`` (torchvision's default is black).
            fill = [round(255 * m) for m in dc.mean]
            ra = RandAugment(
                dc.randaug_n,
                dc.randaug_m,
                dc.randaug_mstd,
                prob=dc.randaug_prob,
                interpolation=interp,
                fill=fill,
            )
            ops.append(ra)
        ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(dc.mean, dc.std)]
        if dc.reprob > 0:
            ops.append(v2.RandomErasing(p=dc.reprob, value="random"))
        return v2.Compose(ops)
    resize = int(size / dc.crop_pct)
    # Resized and cropped as a PIL image, as the official eval and timm's validate.py do: PIL's
    # bicubic (torchvision's antialiased tensor bicubic differs by a few grey levels). A tensor
    # input takes torchvision's tensor path.
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=interp, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(dc.mean, dc.std),
        ]
    )


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of ``split_dir``; clear errors for a missing or empty folder."""
    return class_folders(split_dir, "an ImageNet-style folder", "*.jpg")


def load_image(path: str | Path, *, upright: bool = False) -> Image.Image:
    """An RGB PIL image; :class:`BadSample` if the file cannot be decoded.

    Args:
        path: the image file.
        upright: turn the pixels by the file's EXIF orientation tag (a phone photo stored
            sideways comes out as it is shown), as detectron2's ``read_image`` does, so that
            COCO annotations made on the shown image fit. Off: the pixels as stored, as timm's
            and torchvision's image folders read them (classification keeps their numbers).
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) if upright else im
            return _to_8_bit(im).convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise BadSample(str(path), f"cannot read image ({type(e).__name__}: {e})") from e


def _to_8_bit(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (PNG, TIFF) as 8-bit greyscale, its top 8 bits; other images
    as they are. PIL's own ``convert("RGB")`` clips 16-bit values at 255, which turns all but the
    darkest 1/256 of the range white."""
    if not im.mode.startswith("I;16"):
        return im
    return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L")


def stored_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file's pixels as stored (before any EXIF orientation);
    reads the header only."""
    with Image.open(path) as im:
        return im.size


class ImageFolder(Dataset):
    """``ROOT/<split>/<class>/<image>`` samples as ``(image_tensor, label)``.

    Args:
        root: dataset root (holding ``train/`` and ``val/``).
        split: ``train`` or ``val``.
        transform: applied to the RGB PIL image.
        classes: class names defining the label ids (default: this split's sorted folders);
            pass the training classes for ``val`` so ids agree.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Any = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        split_dir = self.root / split
        if self.root.is_file():
            raise UserValueError(
                f"data folder {self.root} is a file; pass the folder holding train/ and val/"
            )
        if not self.root.is_dir():
            raise UserFileNotFoundError(f"data folder {self.root} does not exist")
        found = find_classes(split_dir)
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        extra = sorted(set(found) - set(index))
        if extra:
            raise UserValueError(
                f"{split_dir} has {len(extra)} class folder(s) not in training: {extra[:10]}; "
                f"the model knows {len(self.classes)} classes, move the others out of {split_dir}"
            )
        self.samples: list[tuple[str, int]] = []
        for c in found:
            files = find_files(split_dir / c, IMG_EXTENSIONS)
            if not files:
                raise UserValueError(
                    f"class folder {split_dir / c} has no images ({', '.join(IMG_EXTENSIONS)};"
                    " searched its sub-folders too)"
                )
            self.samples += [(str(p), index[c]) for p in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), label


def digits_folder(root: str | Path | None = None, size: int = 32) -> Path:
    """The embedded default: scikit-learn's 1,797 real 8x8 digit scans as an image folder.

    Upscaled to ``size`` px grey PNGs, stratified fixed split (75% train / 25% val, seed 0),
    written once (atomically) and reused.

    Args:
        root: cache folder (default ``$MVITV2_DATA`` or ``~/.cache/mvitv2/data``).
        size: image side in pixels.

    Returns:
        the dataset root with ``train/<digit>/`` and ``val/<digit>/``.
    """
    dest = Path(root or default_data_dir()) / f"digits-{size}"
    params = {
        "kind": "sklearn-digits-folder",
        "size": size,
        "val_fraction": 0.25,
        "seed": 0,
        "v": 1,
    }

    def build(tmp: Path) -> None:
        images, labels = load_digits_arrays()
        train, val = split_digit_indices(labels, val_fraction=0.25, seed=0)
        for split, idx in (("train", train), ("val", val)):
            for i in idx:
                d = tmp / split / str(int(labels[i]))
                d.mkdir(parents=True, exist_ok=True)
                pixels = (render_digit(images[i], size, size) * 255).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(d / f"{i:04d}.png")

    return build_cached(dest, params, build)
