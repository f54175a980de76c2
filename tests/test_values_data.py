"""Image data and shared data helpers against independent references (torchvision's own
functional ops and crop sampler, naive loops, the normal distribution, hand-built folders)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mvitv2.data.common import (
    BadSample,
    SkipCounter,
    build_cached,
    config_from_dict,
    config_to_dict,
    default_data_dir,
    render_digit,
    split_digit_indices,
)
from mvitv2.data.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataConfig,
    ImageFolder,
    RandAugment,
    build_transform,
    digits_folder,
    find_classes,
    load_image,
)


def _photo(w: int = 90, h: int = 70) -> Image.Image:
    """A deterministic RGB image with structure in every channel and no symmetry."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _normalise(t: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (t.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ---------------------------------------------------------------------- training transform
def test_training_crop_is_an_inception_crop_with_the_configured_scale_ratio_and_interpolation():
    img = _photo()
    dc = ImageDataConfig.from_dict(
        {
            "img_size": 32,
            "scale": [0.3, 0.6],
            "ratio": [0.5, 2.0],
            "interpolation": "bicubic",
            "hflip": 0.0,
            "randaug_n": 0,
            "reprob": 0.0,
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.3, 0.4],
        }
    )
    tf = build_transform(dc, train=True)
    for seed in range(4):
        torch.manual_seed(seed)
        got = tf(img)
        torch.manual_seed(seed)  # torchvision's v1 sampler draws the same numbers in order
        top, left, h, w = T1.RandomResizedCrop.get_params(img, [0.3, 0.6], [0.5, 2.0])
        assert 0.3 * 0.9 <= h * w / (90 * 70) <= 0.6 * 1.1
        # On the PIL image, as the transform does (PIL's filters, not the tensor kernels).
        ref = TF.pil_to_tensor(
            TF.resized_crop(img, top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        )
        assert torch.allclose(got, _normalise(ref, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)), atol=1e-5)


def test_training_flip_mirrors_with_the_configured_probability():
    img = _photo(64, 64)
    base = {"img_size": 64, "scale": [1, 1], "ratio": [1, 1], "randaug_n": 0, "reprob": 0.0}
    plain = _normalise(TF.pil_to_tensor(img))
    always = build_transform(ImageDataConfig.from_dict({**base, "hflip": 1.0}), train=True)
    assert torch.allclose(always(img), plain.flip(-1), atol=1e-5)
    never = build_transform(ImageDataConfig.from_dict({**base, "hflip": 0.0}), train=True)
    assert torch.allclose(never(img), plain, atol=1e-5)
    half = build_transform(ImageDataConfig.from_dict({**base, "hflip": 0.5}), train=True)
    torch.manual_seed(0)
    flips = sum(bool(torch.allclose(half(img), plain.flip(-1), atol=1e-5)) for _ in range(200))
    assert 80 <= flips <= 120  # binomial(200, 0.5): mean 100, sd 7


def test_random_erasing_fills_one_rectangle_with_normal_noise():
    img = _photo(64, 64)
    base = {"img_size": 64, "scale": [1, 1], "ratio": [1, 1], "randaug_n": 0, "hflip": 0.0}
    clean = build_transform(ImageDataConfig.from_dict({**base, "reprob": 0.0}), train=True)(img)
    erase = build_transform(ImageDataConfig.from_dict({**base, "reprob": 1.0}), train=True)
    torch.manual_seed(1)
    got = erase(img)
    changed = (got != clean).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    # The changed pixels are exactly a rectangle (RandomErasing's region), filled with N(0, 1).
    box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert box.all() and int(changed.sum()) == box.numel() >= 64 * 64 * 0.02
    noise = got[:, changed]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    torch.manual_seed(1)
    rare = build_transform(ImageDataConfig.from_dict({**base, "reprob": 0.25}), train=True)
    erased = sum(bool((rare(img) != clean).any()) for _ in range(200))
    assert 30 <= erased <= 70  # binomial(200, 0.25): mean 50, sd 6


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _recorded_bins(aug: RandAugment, calls: int, *inputs) -> tuple[list[int], list]:
    """The magnitude bin of every op ``aug`` applies over ``calls`` forwards (ops are no-ops)."""
    bins: list[int] = []

    def record(image, transform_id, magnitude, interpolation, fill):
        bins.append(aug.magnitude)
        return image

    aug._apply_image_or_video_transform = record  # type: ignore[method-assign]
    outs = [aug(*inputs) for _ in range(calls)]
    return bins, outs


@pytest.mark.parametrize(("mean", "std"), [(9, 0.5), (28, 2.0), (1, 2.0)])
def test_randaugment_draws_each_ops_magnitude_from_a_rounded_clamped_normal(mean, std):
    torch.manual_seed(0)
    aug = RandAugment(3, mean, std)
    bins, outs = _recorded_bins(aug, 1000, torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert len(bins) == 3000 and all(o.shape == (3, 8, 8) for o in outs)  # 3 ops per image
    for b in range(31):
        lo = -math.inf if b == 0 else (b - 0.5 - mean) / std
        hi = math.inf if b == 30 else (b + 0.5 - mean) / std
        want = _normal_cdf(hi) - _normal_cdf(lo)
        assert abs(bins.count(b) / 3000 - want) < 0.03, (b, bins.count(b) / 3000, want)
    assert max(bins) == 30 if mean + 2 * std > 30 else True


def test_randaugment_without_noise_keeps_the_magnitude_and_passes_extra_inputs_through():
    aug = RandAugment(2, 7, interpolation=InterpolationMode.BILINEAR)  # no noise by default
    assert aug.interpolation == InterpolationMode.BILINEAR
    label = torch.tensor(4)
    bins, outs = _recorded_bins(aug, 5, torch.zeros(3, 8, 8, dtype=torch.uint8), label)
    assert bins == [7] * 10
    for image, y in outs:  # (image, label) in, (image, label) out
        assert image.shape == (3, 8, 8) and y is label


def test_training_transform_applies_randaugment_with_the_recipe_values(monkeypatch):
    seen = []
    init = RandAugment.__init__

    def spy(self, num_ops, magnitude, magnitude_std=0.0, **kwargs):
        seen.append((num_ops, magnitude, magnitude_std, kwargs))
        init(self, num_ops, magnitude, magnitude_std, **kwargs)

    monkeypatch.setattr(RandAugment, "__init__", spy)
    dc = ImageDataConfig.from_dict({"img_size": 32, "randaug_n": 4, "randaug_m": 11})
    tf = build_transform(dc, train=True)
    fill = [124, 116, 104]  # ImageNet's mean colour
    kwargs = {"prob": 0.5, "interpolation": InterpolationMode.BICUBIC, "fill": fill}
    assert seen == [(4, 11, 1.5, kwargs)]
    assert [type(t).__name__ for t in tf.transforms] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandAugment",
        "ToImage",
        "ToDtype",
        "Normalize",
        "RandomErasing",
    ]
    assert tf(_photo()).shape == (3, 32, 32)
    off = {"img_size": 32, "hflip": 0.0, "randaug_n": 0, "reprob": 0.0}
    plain = build_transform(ImageDataConfig.from_dict(off), train=True)
    names = [type(t).__name__ for t in plain.transforms]  # each op off at 0
    assert names == ["RandomResizedCrop", "ToImage", "ToDtype", "Normalize"]
    one = build_transform(ImageDataConfig.from_dict({**off, "randaug_n": 1}), train=True)
    assert [type(t).__name__ for t in one.transforms][1] == "RandAugment"


# ---------------------------------------------------------------------- evaluation transform
@pytest.mark.parametrize(
    ("size", "crop_pct", "interp"), [(64, 0.9, "bilinear"), (32, 1.0, "nearest")]
)
def test_eval_transform_resizes_the_short_side_by_crop_pct_then_centre_crops(
    size, crop_pct, interp
):
    img = _photo(150, 100)
    dc = ImageDataConfig.from_dict(
        {"img_size": size, "crop_pct": crop_pct, "interpolation": interp}
    )
    got = build_transform(dc, train=False)(img)
    short = int(size / crop_pct)  # 71 or 32
    # in PIL, as the official eval and timm's validate.py resize
    mode = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}[interp]
    resized = TF.pil_to_tensor(img.resize((short * 150 // 100, short), mode))
    top, left = (short - size + 1) // 2, (short * 150 // 100 - size + 1) // 2
    ref = _normalise(resized[:, top : top + size, left : left + size])
    assert got.shape == (3, size, size) and torch.allclose(got, ref, atol=1e-5)


def test_data_config_validates_and_round_trips_through_a_dict():
    dc = ImageDataConfig.from_dict(
        {"img_size": 64, "scale": [0.5, 1.0], "interpolation": "nearest"}
    )
    assert dc.scale == (0.5, 1.0) and dc.interp == InterpolationMode.NEAREST
    assert dc.to_dict()["scale"] == [0.5, 1.0] and ImageDataConfig.from_dict(dc.to_dict()) == dc
    for bad in ({"img_size": 48}, {"interpolation": "lanczos"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImageDataConfig.from_dict(bad)
    assert ImageDataConfig.from_dict({"img_size": 96}).img_size == 96
    with pytest.raises(KeyError, match=r"unknown data option 'crop' \(did you mean 'crop_pct'\?\)"):
        ImageDataConfig.from_dict({"crop": 0.9})
    assert ImageDataConfig().mean == (0.485, 0.456, 0.406)  # RGB order, timm's constants
    assert ImageDataConfig().std == (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- folders
def _write(path: Path, colour=(10, 20, 30), size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_lists_sorted_classes_and_image_files_with_their_label(tmp_path):
    for rel in ["train/b/2.png", "train/b/1.JPG", "train/a/z.jpeg", "val/b/v.png"]:
        _write(tmp_path / rel)
    (tmp_path / "train/a/notes.txt").write_text("not an image")
    (tmp_path / "train/.cache").mkdir()  # hidden folders are not classes
    (tmp_path / "train/readme.md").write_text("a file, not a class")
    train = ImageFolder(tmp_path, "train")
    assert train.classes == ["a", "b"] and find_classes(tmp_path / "train") == ["a", "b"]
    rel = [(str(Path(p).relative_to(tmp_path)), y) for p, y in train.samples]
    assert rel == [("train/a/z.jpeg", 0), ("train/b/1.JPG", 1), ("train/b/2.png", 1)]
    assert len(train) == 3
    image, label = train[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    val = ImageFolder(tmp_path, "val", transform=TF.pil_to_tensor, classes=train.classes)
    x, y = val[0]
    assert y == 1 and x.shape == (3, 5, 6) and x[:, 0, 0].tolist() == [10, 20, 30]
    assert ImageFolder(tmp_path, "val").classes == ["b"]  # its own folders without ``classes``
    (tmp_path / "train/empty").mkdir()
    with pytest.raises(ValueError, match=r"train/empty has no images \(\.jpg, \.jpeg, \.png, "):
        ImageFolder(tmp_path, "train")
    for i in range(12):
        _write(tmp_path / f"val/c{i:02d}/x.png")
    # the first 10 of the 12 named, sorted, and all counted
    with pytest.raises(
        ValueError, match=r"12 class folder\(s\) not in training: \['c00', .*'c09'\]; the"
    ):
        ImageFolder(tmp_path, "val", classes=["a", "b"])


def test_image_folder_reads_nested_class_folders_as_torchvision_s_image_folder_does(tmp_path):
    """A class's images may sit in sub-folders (and linked folders): the same samples, labels
    and order as torchvision's ``ImageFolder``, which walks each class folder."""
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    for rel in [
        "train/cat/z.jpg",  # a folder's own files come before its sub-folders'
        "train/cat/b/c.PNG",
        "train/cat/b/a/deep.png",
        "train/cat/b-2/x.jpeg",
        "train/dog/1.png",
        "elsewhere/linked.png",
    ]:
        _write(tmp_path / rel)
    (tmp_path / "train/cat/b/notes.txt").write_text("not an image")
    (tmp_path / "train/dog/more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ours = ImageFolder(tmp_path, "train")
    ref = TorchvisionImageFolder(str(tmp_path / "train"))
    assert ours.classes == ref.classes == ["cat", "dog"]
    assert ours.samples == ref.samples
    assert [Path(p).relative_to(tmp_path / "train").as_posix() for p, _ in ours.samples] == [
        "cat/z.jpg",
        "cat/b/c.PNG",
        "cat/b-2/x.jpeg",  # folders in the order of their paths as strings: "-" sorts before "/"
        "cat/b/a/deep.png",
        "dog/1.png",
        "dog/more/linked.png",
    ]


def test_hidden_files_and_folders_are_not_samples(tmp_path):
    """macOS's ``._name.jpg`` resource forks and Jupyter's ``.ipynb_checkpoints`` copies carry
    image extensions but are not images of the class (torchvision's ``ImageFolder`` reads them
    and fails or duplicates); the same rule for ``predict``'s folders."""
    from mvitv2.engine.cli import expand_inputs

    for rel in [
        "train/cat/a.jpg",
        "train/cat/._a.jpg",
        "train/cat/.ipynb_checkpoints/a-checkpoint.jpg",
        "train/cat/sub/.hidden/b.png",
        "train/cat/sub/c.png",
    ]:
        _write(tmp_path / rel)
    expected = [tmp_path / "train/cat/a.jpg", tmp_path / "train/cat/sub/c.png"]
    assert ImageFolder(tmp_path, "train").samples == [(str(p), 0) for p in expected]
    assert expand_inputs([str(tmp_path / "train")], [".jpg", ".png"]) == [str(p) for p in expected]
    (tmp_path / "train/dog/.ipynb_checkpoints").mkdir(parents=True)
    _write(tmp_path / "train/dog/.ipynb_checkpoints/x.png")
    with pytest.raises(ValueError, match=r"train/dog has no images .*searched its sub-folders"):
        ImageFolder(tmp_path, "train")


def test_a_folder_is_listed_anew_at_every_call(tmp_path):
    """Files added to a folder after it was listed are seen (no stale listing of a folder)."""
    from mvitv2.data.common import find_files

    _write(tmp_path / "a.png")
    assert find_files(tmp_path, [".png"]) == [tmp_path / "a.png"]
    _write(tmp_path / "b.png")
    assert find_files(tmp_path, [".png"]) == [tmp_path / "a.png", tmp_path / "b.png"]


def test_the_digit_scans_are_read_once_per_process_and_shared_read_only():
    from mvitv2.data.common import load_digits_arrays

    (images, labels), (images2, labels2) = load_digits_arrays(), load_digits_arrays()
    assert images is images2 and labels is labels2
    assert not images.flags.writeable and not labels.flags.writeable


def test_load_image_converts_to_rgb_and_names_an_unreadable_file(tmp_path):
    Image.new("L", (4, 3), 200).save(tmp_path / "grey.png")
    im = load_image(tmp_path / "grey.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (200, 200, 200)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(BadSample) as e:
        load_image(tmp_path / "bad.jpg")
    assert e.value.path == str(tmp_path / "bad.jpg")
    assert e.value.reason.startswith("cannot read image (UnidentifiedImageError: ")
    with pytest.raises(FileNotFoundError, match="has no class sub-folders"):
        (tmp_path / "empty").mkdir()
        find_classes(tmp_path / "empty")


def test_digits_folder_holds_every_scan_once_split_by_class_and_rendered(tmp_path, monkeypatch):
    import mvitv2.data.image as image_module

    rng = np.random.default_rng(0)  # 60 stand-in scans (scikit-learn's import alone takes ~3 s)
    images, labels = rng.uniform(0, 1, (60, 8, 8)).astype(np.float32), rng.permutation(60) % 10
    monkeypatch.setattr(image_module, "load_digits_arrays", lambda: (images, labels))
    root = digits_folder(tmp_path, size=16)
    assert root == tmp_path / "digits-16"
    files = {s: sorted((root / s).glob("*/*.png")) for s in ("train", "val")}
    ids = {s: {int(p.stem) for p in files[s]} for s in files}
    assert not ids["train"] & ids["val"] and ids["train"] | ids["val"] == set(range(60))
    assert len(ids["val"]) == sum(round(int((labels == c).sum()) * 0.25) for c in range(10))
    # The documented fixed split: stratified, 25% validation, seed 0.
    assert ids["val"] == set(split_digit_indices(labels, 0.25, seed=0)[1].tolist())
    for p in files["val"]:
        assert int(p.parent.name) == labels[int(p.stem)]  # the folder is the scan's digit
        pixels = np.asarray(Image.open(p))
        assert pixels.shape == (16, 16) and pixels.dtype == np.uint8
        want = np.round(_bilinear_reference(images[int(p.stem)], 16) * 255)
        diff = np.abs(pixels.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02  # float32 vs float64 rounding
    stamp = json.loads((root / "_params.json").read_text())
    assert stamp["size"] == 16 and stamp["val_fraction"] == 0.25 and stamp["seed"] == 0
    default = digits_folder(tmp_path)  # 32 px by default
    assert default == tmp_path / "digits-32"
    assert Image.open(next((default / "val").glob("*/*.png"))).size == (32, 32)


# ---------------------------------------------------------------------- common helpers
def _bilinear_reference(image8: np.ndarray, size: int) -> np.ndarray:
    """The 8x8 scan with a blank border (10x10) upscaled to ``size * 10 / 8`` by a naive
    half-pixel bilinear loop, centre-cropped to ``size``."""
    src = np.pad(np.asarray(image8, dtype=np.float64), 1)
    big = round(size * 10 / 8)
    out = np.zeros((big, big))
    for oy in range(big):
        for ox in range(big):
            sy = max((oy + 0.5) * 10 / big - 0.5, 0.0)
            sx = max((ox + 0.5) * 10 / big - 0.5, 0.0)
            y0, x0 = min(int(sy), 9), min(int(sx), 9)
            y1, x1 = min(y0 + 1, 9), min(x0 + 1, 9)
            fy, fx = sy - y0, sx - x0
            out[oy, ox] = (
                src[y0, x0] * (1 - fy) * (1 - fx)
                + src[y0, x1] * (1 - fy) * fx
                + src[y1, x0] * fy * (1 - fx)
                + src[y1, x1] * fy * fx
            )
    off = (big - size) // 2
    return np.clip(out[off : off + size, off : off + size], 0, 1)


def test_render_digit_is_a_bilinear_upscale_of_the_padded_scan():
    rng = np.random.default_rng(0)
    scan = rng.uniform(0, 1, (8, 8))  # float64 in, float32 out
    scan[0, :] = 1.0  # a stroke touching the border fades out into the padding
    for size in (16, 20, 40):
        got = render_digit(scan, size, size)
        assert got.dtype == np.float32 and got.shape == (size, size)
        assert np.allclose(got, _bilinear_reference(scan, size), atol=1e-5), size
    wide = render_digit(scan, 16, 24)
    assert wide.shape == (16, 24)
    # Usable as alpha whatever the scan's range: an over- or under-exposed scan is clipped.
    bright = scan * 3 - 1
    assert bright.min() < -0.5 and bright.max() > 1.5
    assert np.allclose(render_digit(bright, 20, 20), _bilinear_reference(bright, 20), atol=1e-5)


def test_split_is_stratified_disjoint_complete_and_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 7)
    train, val = split_digit_indices(labels, val_fraction=0.3, seed=5)
    assert list(train) == sorted(train) and list(val) == sorted(val)
    assert sorted([*train, *val]) == list(range(len(labels)))
    # Per class: round(n * 0.3) validation scans, at least one.
    assert [int((labels[val] == c).sum()) for c in range(4)] == [3, 1, 1, 2]
    again = split_digit_indices(labels, val_fraction=0.3, seed=5)
    other = split_digit_indices(labels, val_fraction=0.3, seed=6)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)
    _, default_val = split_digit_indices(labels)
    assert [int((labels[default_val] == c).sum()) for c in range(4)] == [2, 1, 1, 2]
    # The default seed is 0: the same scans as the embedded datasets' fixed split (seed=0).
    assert np.array_equal(default_val, split_digit_indices(labels, 0.25, seed=0)[1])
    assert not np.array_equal(default_val, split_digit_indices(labels, 0.25, seed=1)[1])


def test_build_cached_builds_once_per_parameters_and_never_leaves_a_partial_dataset(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "data.txt").write_text(str(len(calls)))

    root = tmp_path / "sub" / "deeper" / "ds"  # parent folders are created
    assert build_cached(root, {"n": (1, 2)}, build) == root
    assert (root / "data.txt").read_text() == "1"
    assert json.loads((root / "_params.json").read_text()) == {"n": [1, 2]}
    assert build_cached(str(root), {"n": [1, 2]}, build) == root and len(calls) == 1  # reused
    build_cached(root, {"n": [3]}, build)  # other parameters: rebuilt in place
    assert len(calls) == 2 and (root / "data.txt").read_text() == "2"
    assert calls[0].parent == root.parent and calls[0].name.startswith(".ds.tmp-")

    def broken(d: Path) -> None:
        (d / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_cached(tmp_path / "other", {"n": 1}, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temp or partial folder
    assert sorted(p.name for p in root.parent.iterdir()) == ["ds"]
    (root / "_params.json").write_text("{not json")  # a damaged stamp: rebuilt
    build_cached(root, {"n": [3]}, build)
    assert len(calls) == 3 and sorted(p.name for p in root.parent.iterdir()) == ["ds"]

    def raced(d: Path) -> None:  # another process finishes the same dataset meanwhile
        build(d)
        other = tmp_path / "race"
        other.mkdir()
        (other / "data.txt").write_text("theirs")
        (other / "_params.json").write_text(json.dumps({"n": 9}))

    assert build_cached(tmp_path / "race", {"n": 9}, raced) == tmp_path / "race"
    assert (tmp_path / "race" / "data.txt").read_text() == "theirs"  # theirs kept, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "sub"]


def test_a_stale_dataset_removed_by_another_builder_meanwhile_is_rebuilt(tmp_path, monkeypatch):
    """Several DDP ranks replace one stale dataset at once: the one that finds it already gone
    goes on (no error)."""
    import shutil

    root = tmp_path / "ds"
    build_cached(root, {"v": 1}, lambda d: (d / "x").write_text("1"))
    real_rmtree = shutil.rmtree

    def other_builder_first(path, *args, **kwargs):
        if Path(path) == root and root.exists():
            real_rmtree(root)  # another rank removed it an instant before us
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", other_builder_first)
    assert build_cached(root, {"v": 2}, lambda d: (d / "x").write_text("2")) == root
    assert (root / "x").read_text() == "2"
    assert json.loads((root / "_params.json").read_text()) == {"v": 2}


def test_a_failed_build_reports_its_own_error_even_if_its_leftovers_cannot_be_removed(
    tmp_path, monkeypatch
):
    import os

    real_unlink = os.unlink

    def locked(path, *args, **kwargs):  # a file that stays open elsewhere (network share)
        if os.fspath(path).endswith("locked.bin"):
            raise PermissionError(13, "file in use", os.fspath(path))
        real_unlink(path, *args, **kwargs)

    def broken(d: Path) -> None:
        (d / "locked.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(os, "unlink", locked)
    with pytest.raises(OSError, match="^disk full$"):
        build_cached(tmp_path / "ds", {"n": 1}, broken)
    assert not (tmp_path / "ds").exists()


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path and default_data_dir("x") == tmp_path / "x"
    monkeypatch.delenv("MVITV2_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir("y") == tmp_path / "home" / ".cache" / "mvitv2" / "data" / "y"


def test_skip_counter_counts_events_and_flags_each_item_once_with_its_first_reason():
    c = SkipCounter(["decode", "short"], num_items=6)
    c.add("decode")
    c.add("short", 3)
    c.add("decode")
    # flag() says whether the item is new (the caller names it then): True once per item.
    assert [c.flag(4, "short"), c.flag(4, "decode"), c.flag(1, "decode"), c.flag(1, "decode")] == [
        True,
        False,  # already flagged: keeps its first reason
        True,
        False,
    ]
    assert (c["decode"], c["short"]) == (2, 3)
    assert c.flagged() == [1, 4] and c.flagged("decode") == [1] and c.flagged("short") == [4]
    assert c.is_flagged(4) and not c.is_flagged(0)
    assert c.as_dict() == {"decode": 2, "short": 3, "bad_decode": 1, "bad_short": 1}
    assert repr(c) == "SkipCounter(decode=2, short=3, bad_decode=1, bad_short=1)"
    empty = SkipCounter(["x"])
    assert empty.as_dict() == {"x": 0} and empty.flagged() == []


class _CountingDataset(torch.utils.data.Dataset):
    """Each item adds 5000 events to a shared counter, as a worker skipping samples does."""

    def __init__(self) -> None:
        self.counter = SkipCounter(["x"])

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        for _ in range(5000):
            self.counter.add("x")
        return i


def test_skip_counter_loses_no_count_when_workers_add_at_once():
    # Two workers adding into one shared cell at once lost ~1-3 % of the counts here.
    ds = _CountingDataset()
    assert list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)) == [0, 1, 2, 3]
    assert ds.counter["x"] == 4 * 5000 and ds.counter.as_dict() == {"x": 20000}


@pytest.mark.parametrize("worker", [0, 253, 254, 255, 1000])
def test_skip_counter_counts_any_worker_id_into_the_totals(monkeypatch, worker):
    import mvitv2.data.common as common

    c = SkipCounter(["a", "b"])
    c.add("b", 2)  # the main process
    info = type("Info", (), {"id": worker})()
    monkeypatch.setattr(common, "get_worker_info", lambda: info)
    c.add("b", 3)
    c.add("a")
    assert (c["a"], c["b"]) == (1, 5) and c.as_dict() == {"a": 1, "b": 5}


def test_the_main_process_and_each_of_255_workers_count_into_rows_of_their_own(monkeypatch):
    """Adds from different processes never share a row (a shared row loses counts when two
    add at once), up to 255 DataLoader workers; all rows are summed."""
    import mvitv2.data.common as common

    c = SkipCounter(["x"])
    rows = []
    for worker in [None, *range(255)]:
        info = None if worker is None else type("Info", (), {"id": worker})()
        monkeypatch.setattr(common, "get_worker_info", lambda info=info: info)
        before = c._events.clone()
        c.add("x", 7)
        changed = (c._events != before).any(1).nonzero().flatten().tolist()
        assert len(changed) == 1, worker
        rows.append(changed[0])
    assert len(set(rows)) == 256 and c["x"] == 7 * 256


def test_config_dicts_turn_lists_into_tuples_and_back_and_name_unknown_keys():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class C:
        size: tuple[int, int] = (1, 2)
        name: str = "a"

    c = config_from_dict(C, {"size": [3, 4]}, "toy data")
    assert c == C((3, 4), "a") and config_to_dict(c) == {"size": [3, 4], "name": "a"}
    with pytest.raises(KeyError, match=r"unknown toy data option 'bogus'; valid: name, size$"):
        config_from_dict(C, {"bogus": 1, "name": "b"}, "toy data")


def test_no_dataset_module_imports_the_engine():
    """data/ never imports engine/ (the engine imports data): one direction only, at any level
    of the module (also imports inside functions)."""
    import ast

    import mvitv2.data.common

    imported = {}
    for path in sorted(Path(mvitv2.data.common.__file__).parent.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imported[path.name] = sorted(n for n in names if n.startswith("mvitv2.engine"))
    assert {"image.py", "detection.py", "video.py", "common.py"} <= set(imported)
    assert imported == dict.fromkeys(imported, [])


def test_bad_sample_and_strict_error_are_the_engines_one_type():
    from mvitv2 import engine
    from mvitv2.data.common import StrictDataError, strict_data_error
    from mvitv2.errors import UserValueError

    e = BadSample("d/x.png", "cannot read image", "unreadable_image")
    assert (str(e), e.path, e.reason, e.kind) == (
        "d/x.png: cannot read image",
        "d/x.png",
        "cannot read image",
        "unreadable_image",
    )
    assert BadSample(Path("a") / "b.png", "r").kind == "unreadable" and BadSample(
        Path("a") / "b.png", "r"
    ).path == str(Path("a") / "b.png")
    assert engine.BadSample is BadSample and engine.data.StrictDataError is StrictDataError
    strict = strict_data_error(BadSample("v/a.mp4", "no such file", "missing"), "video")
    assert isinstance(strict, UserValueError) and isinstance(strict, RuntimeError)
    assert str(strict) == (
        "unreadable video (strict data): v/a.mp4: no such file; without strict_data such videos "
        "are skipped and counted"
    )
    assert str(strict_data_error(e)).startswith("unreadable sample (strict data): d/x.png: cannot")
