"""Detection data: embedded digit scenes as COCO, the COCO reader and its repairs, transforms that
move boxes and masks with the image, and COCO evaluation helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from sklearn.datasets import load_digits
from torchvision import tv_tensors
from torchvision.transforms import v2

from mvitv2.data.common import BadSample, load_digits_arrays, split_digit_indices
from mvitv2.data.detection import (
    BoxesFromMasks,
    CocoDetection,
    coco_evaluate,
    detection_collate,
    detection_eval_transforms,
    detection_train_transforms,
    load_coco_json,
    predictions_to_coco,
    rescale_prediction,
)
from mvitv2.data.digit_scenes import make_digit_scenes, mask_to_polygon
from mvitv2.engine.data import build_loader
from mvitv2.errors import UserValueError

SMALL = {"num_train": 10, "num_val": 6, "image_size": 96, "digit_size": (16, 36), "seed": 3}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_digit_scenes(tmp_path_factory.mktemp("scenes") / "ds", **SMALL)


def _gt_prediction(target):
    """A perfect prediction for ``target`` (what an ideal model would output)."""
    n = len(target["labels"])
    return {
        "boxes": target["boxes"].as_subclass(torch.Tensor).clone(),
        "labels": target["labels"].clone(),
        "scores": torch.linspace(1.0, 0.5, n),
        "masks": target["masks"].as_subclass(torch.Tensor).float()[:, None],
    }


# ------------------------------------------------------------------ embedded digit scenes


def test_mask_to_polygon_decodes_back_exactly():
    rng = np.random.default_rng(0)
    for _ in range(30):
        # Random masks: holes, several components, pixels touching only at corners.
        m = rng.random((rng.integers(3, 20), rng.integers(3, 20))) < rng.uniform(0.2, 0.7)
        if not m.any():
            continue
        poly = mask_to_polygon(m)
        rle = mask_util.merge(mask_util.frPyObjects(poly, *m.shape))
        np.testing.assert_array_equal(mask_util.decode(rle), m.astype(np.uint8))
    assert mask_to_polygon(np.zeros((4, 4), bool)) == []


def test_digit_scenes_are_a_valid_coco_dataset(scenes):
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        img_dir, ann_file = scenes.split(split)
        data = load_coco_json(ann_file)
        assert len(data["images"]) == n
        assert [(c["id"], c["name"]) for c in data["categories"]] == [
            (i + 1, str(i)) for i in range(10)
        ]
        kinds = set()
        for ann in data["annotations"]:
            img = data["images"][ann["image_id"] - 1]
            h, w = img["height"], img["width"]
            assert (h, w) == (96, 96)
            seg = ann["segmentation"]
            kinds.add("polygon" if isinstance(seg, list) else "rle")
            if isinstance(seg, list):
                m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(seg, h, w)))
            else:
                m = mask_util.decode(seg)
            ys, xs = np.nonzero(m)
            # bbox is the mask's tight box and area its pixel count
            assert ann["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() + 1 - xs.min(),
                ys.max() + 1 - ys.min(),
            ]
            assert ann["area"] == m.sum() > 0
            assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0
        assert kinds == {"polygon", "rle"}  # both pycocotools decoding paths are exercised
        for img in data["images"]:
            with Image.open(img_dir / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_digit_scenes_strokes_are_visible_and_disjoint(scenes):
    ds = CocoDetection(*scenes.split("train"))
    for i in range(len(ds)):
        image, target = ds[i]
        masks = target["masks"].bool()
        assert masks.sum(0).max() <= 1  # instances do not overlap
        grey = image.float().mean(0)
        inside, outside = grey[masks.any(0)], grey[~masks.any(0)]
        assert inside.mean() > outside.mean() + 60  # the masks cover the drawn strokes


def test_digit_scenes_deterministic_and_cached(scenes, tmp_path):
    again = make_digit_scenes(tmp_path / "again", **SMALL)
    assert again.train_json.read_text() == scenes.train_json.read_text()
    name = "000003.png"
    assert (again.train_images / name).read_bytes() == (scenes.train_images / name).read_bytes()
    other = make_digit_scenes(tmp_path / "other", **{**SMALL, "seed": 4})
    assert other.train_json.read_text() != scenes.train_json.read_text()
    # Same arguments again: nothing is regenerated.
    stamp = os.stat(again.train_json).st_mtime_ns
    make_digit_scenes(tmp_path / "again", **SMALL)
    assert os.stat(again.train_json).st_mtime_ns == stamp
    # Other arguments in the same place: rebuilt.
    make_digit_scenes(tmp_path / "again", **{**SMALL, "num_val": 2})
    assert len(load_coco_json(again.val_json)["images"]) == 2


def test_val_scenes_use_held_out_digit_scans():
    images, labels = load_digits_arrays()
    reference = load_digits()  # scikit-learn's scans, 0..16 grey levels
    np.testing.assert_array_equal(images, (reference.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(labels, reference.target)
    train, val = split_digit_indices(labels, 0.25, seed=0)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels)
    assert set(labels[val]) == set(range(10))  # every digit has held-out scans


# ------------------------------------------------------------------ reader


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _blank(tmp_path, name, w=40, h=30):
    Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / name)


def _square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def test_reader_targets_and_noncontiguous_categories(tmp_path):
    _blank(tmp_path, "a.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "categories": [{"id": 12, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 12,
                "bbox": [2, 3, 10, 5],
                "segmentation": _square(2, 3, 5),
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [20, 10, 4, 4],
                "segmentation": _square(20, 10, 4),
                "iscrowd": 0,
            },
        ],
    }
    ds = CocoDetection(tmp_path, _write(tmp_path, data))
    assert ds.class_names == ["dog", "cat"]  # sorted by category id -> labels 1, 2
    assert ds.label_to_cat_id == {1: 3, 2: 12}
    image, t = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 30, 40)
    assert image.dtype == torch.uint8
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes)
    assert t["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert t["boxes"].canvas_size == (30, 40)
    torch.testing.assert_close(
        t["boxes"].as_subclass(torch.Tensor), torch.tensor([[2.0, 3, 12, 8], [20, 10, 24, 14]])
    )
    assert t["labels"].tolist() == [2, 1] and t["labels"].dtype == torch.int64
    assert isinstance(t["masks"], tv_tensors.Mask) and t["masks"].shape == (2, 30, 40)
    assert t["masks"].dtype == torch.uint8 and t["masks"][0].sum() == 25
    assert t["image_id"] == 7 and t["orig_size"].tolist() == [30, 40]


def test_reader_repairs_and_counts_bad_annotations(tmp_path):
    for name in ("a.png", "neg.png"):
        _blank(tmp_path, name)
    seg = _square(1, 1, 3)
    ann = {"image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": seg, "area": 9}
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "missing.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "neg.png", "width": 40, "height": 30},
        ],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {**ann, "id": 1, "bbox": [1, 1, 3, 3]},  # fine
            {**ann, "id": 2, "bbox": [5, 5, 0, 4]},  # zero width
            {**ann, "id": 3, "bbox": [5, 5, 4, -2]},  # negative height
            {**ann, "id": 4, "bbox": [35, 25, 10, 10]},  # partly outside -> clipped
            {**ann, "id": 5, "bbox": [-5, 2, 8, 3]},  # partly outside -> clipped
            {**ann, "id": 6, "bbox": [50, 40, 5, 5]},  # fully outside -> dropped
            {**ann, "id": 7, "bbox": [1, 1, 3, 3], "iscrowd": 1},  # crowd
            {**ann, "id": 8, "bbox": [1, 1, 3, 3], "category_id": 99},  # unknown category
            {**ann, "id": 9, "bbox": [1, 1, 3, 3], "segmentation": []},  # no mask
            {**ann, "id": 10, "bbox": [1, 1, 3, 3], "image_id": 2},  # image file missing
            {**ann, "id": 11, "bbox": [1, 1, 3, 3], "image_id": 404},  # no such image
        ],
    }
    path = _write(tmp_path, data)
    ds = CocoDetection(tmp_path, path)
    s = ds.stats
    assert (s.images, s.images_used, s.missing_images, s.negative_images) == (3, 2, 1, 1)
    assert (s.annotations, s.instances) == (11, 3)
    assert (s.degenerate_boxes, s.clipped_boxes, s.outside_boxes) == (2, 2, 1)
    assert (s.crowd, s.unknown_category, s.bad_segmentation, s.orphan_annotations) == (1, 1, 1, 1)
    assert s.summary() == (
        "images=3, images_used=2, missing_images=1, negative_images=1, annotations=11, "
        "instances=3, orphan_annotations=1, unknown_category=1, bad_segmentation=1, crowd=1, "
        "degenerate_boxes=2, outside_boxes=1, clipped_boxes=2"
    )
    assert [str(p) for p in ds.problems if p.reason == "missing_images"] == [
        f"{path}: image id 2: missing_images: {tmp_path / 'missing.png'} not found; skipped"
    ]
    _, t = ds[0]
    torch.testing.assert_close(
        t["boxes"].as_subclass(torch.Tensor),
        torch.tensor([[1.0, 1, 4, 4], [35, 25, 40, 30], [0, 2, 3, 5]]),
    )
    _, neg = ds[1]  # negative image kept, with empty but well-formed targets
    assert (
        neg["image_id"] == 3 and neg["boxes"].shape == (0, 4) and neg["masks"].shape == (0, 30, 40)
    )
    assert len(CocoDetection(tmp_path, path, remove_images_without_annotations=True)) == 1
    # Without masks, segmentations are not required.
    assert CocoDetection(tmp_path, path, masks=False).stats.instances == 4


def test_reader_flags_unreadable_images_and_never_substitutes(tmp_path):
    _blank(tmp_path, "good.png")
    _blank(tmp_path, "small.png", w=20)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    data = {
        "images": [
            {"id": 1, "file_name": "bad.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "good.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "small.png", "width": 40, "height": 30},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    ds = CocoDetection(tmp_path, _write(tmp_path, data))
    with pytest.raises(BadSample, match=r"bad\.png: unreadable_image \(image id 1\): cannot read"):
        ds[0]
    assert ds[1][1]["image_id"] == 2
    with pytest.raises(BadSample, match=r"small\.png: size_mismatch: the image is 20x30 but") as e:
        ds[2]
    assert (e.value.path, e.value.kind) == (str(tmp_path / "small.png"), "size_mismatch")
    assert ds.skipped_images() == {1: "unreadable_image", 3: "size_mismatch"}
    assert ds.skipped.flagged("unreadable_image") == [0]
    # Training substitutes the next sample (equal batches on every process), and counts it.
    loader = build_loader(ds, batch_size=3, train=True, collate_fn=detection_collate)
    _, targets = next(iter(loader))
    assert sorted(t["image_id"] for t in targets) == [2, 2, 2]
    assert loader.dataset.bad_samples == 2
    named = dict(loader.dataset.take_new_bad())  # what the trainer logs, once per sample
    assert {Path(p).name: r.split(" ")[0] for p, r in named.items()} == {
        "bad.png": "unreadable_image",
        "small.png": "size_mismatch:",
    }


def test_malformed_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"broken\.json.*malformed JSON at line 1"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    wrong = _write(tmp_path, {"images": {}, "categories": []}, "wrong.json")
    with pytest.raises(ValueError, match=r"wrong\.json.*'images' must be a list"):
        CocoDetection(tmp_path, wrong)
    noid = _write(tmp_path, {"images": [{"file_name": "a.png"}], "categories": []}, "noid.json")
    with pytest.raises(ValueError, match=r"noid\.json: images\[0\]"):
        CocoDetection(tmp_path, noid)


# ------------------------------------------------------------------ transforms


def _check_alignment(image, target):
    """Boxes enclose their masks tightly and the masks sit on the bright strokes."""
    boxes, masks = target["boxes"].as_subclass(torch.Tensor), target["masks"].bool()
    assert len(boxes) == len(masks) == len(target["labels"])
    assert boxes.shape[0] == 0 or (boxes[:, 2:] > boxes[:, :2]).all()
    for b, m in zip(boxes, masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert len(ys) > 0
        tight = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert (tight - b).abs().max() <= 3.0, (tight, b)
    if len(masks):
        grey = image.mean(0)
        assert grey[masks.any(0)].mean() > grey[~masks.any(0)].mean() + 0.15


def test_multiscale_and_flip_move_boxes_and_masks(scenes):
    ds = CocoDetection(*scenes.split("train"))
    tf = detection_train_transforms(min_sizes=(128, 160, 192), max_size=250)
    torch.manual_seed(0)
    for i in range(len(ds)):
        image, target = ds[i]
        image2, t2 = tf(image, target)
        assert image2.dtype == torch.float32 and image2.min() >= 0 and image2.max() <= 1
        assert min(image2.shape[-2:]) in (128, 160, 192) and max(image2.shape[-2:]) <= 250
        assert t2["boxes"].canvas_size == tuple(image2.shape[-2:])
        assert t2["masks"].shape[-2:] == image2.shape[-2:]
        _check_alignment(image2, t2)
    # A forced flip mirrors image, boxes and masks together.
    image, target = ds[0]
    flip = detection_train_transforms(mode="none", hflip_prob=1.0)
    image2, t2 = flip(image, target)
    torch.testing.assert_close(image2, image.flip(-1).float() / 255)
    w = image.shape[-1]
    b = target["boxes"].as_subclass(torch.Tensor)
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
    torch.testing.assert_close(t2["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(t2["masks"], target["masks"].flip(-1))


def test_lsj_boxes_are_the_tight_boxes_of_the_transformed_masks(scenes):
    """After flip + scale jitter + crop, each box is its mask's tight box (computed here with
    numpy from torchvision's own transform of the masks), and instances whose mask was cropped
    away leave together with their box and label."""
    ds = CocoDetection(*scenes.split("train"))
    ours = detection_train_transforms(mode="lsj", lsj_size=64, lsj_scale=(0.3, 2.0))
    reference = v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.ScaleJitter(target_size=(64, 64), scale_range=(0.3, 2.0), antialias=True),
            # detectron2's FixedSizeCrop pads the image with 128, masks with 0
            v2.RandomCrop((64, 64), pad_if_needed=True, fill={tv_tensors.Image: 128, "others": 0}),
        ]
    )
    dropped = loose = 0
    for i in range(5):
        image, target = ds[i]
        n = len(target["labels"])
        target["labels"] = torch.arange(1, n + 1)  # instance numbers, to follow each one
        for seed in range(2):
            torch.manual_seed(seed)
            image2, out = ours(image, target)
            torch.manual_seed(seed)
            ref_image, ref = reference(image, target)
            assert torch.equal(image2, v2.functional.to_dtype(ref_image, torch.float32, scale=True))
            ref_masks = ref["masks"].numpy().astype(bool)
            keep = [k for k in range(n) if ref_masks[k].any()]
            assert out["labels"].tolist() == [k + 1 for k in keep]
            np.testing.assert_array_equal(out["masks"].numpy(), ref["masks"].numpy()[keep])
            tight = []
            for k in keep:
                ys, xs = np.nonzero(ref_masks[k])
                tight.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert out["boxes"].reshape(-1, 4).tolist() == tight
            assert out["boxes"].canvas_size == (64, 64)
            dropped += n - len(keep)
            clipped = ref["boxes"].as_subclass(torch.Tensor)[keep].tolist()
            loose += sum(c != t for c, t in zip(clipped, tight))
    assert dropped > 0 and loose > 0  # both cases happen in these scenes


def test_lsj_size_is_height_by_width():
    """A 50x100 image (H x W) jittered at scale 1 to lsj_size (40, 80) is resized by
    min(40/50, 80/100) = 0.8 to exactly 40x80: nothing to crop or pad."""
    image = tv_tensors.Image(torch.randint(0, 256, (3, 50, 100), dtype=torch.uint8))
    mask = torch.zeros(1, 50, 100, dtype=torch.uint8)
    mask[0, 10:20, 10:30] = 1
    loose = tv_tensors.BoundingBoxes([[5.0, 5, 35, 25]], format="XYXY", canvas_size=(50, 100))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            [[10.0, 10, 30, 20]], format="XYXY", canvas_size=(50, 100)
        ),
        "labels": torch.tensor([1]),
        "masks": tv_tensors.Mask(mask),
    }
    for recompute in (True, False):
        tf = detection_train_transforms(
            mode="lsj",
            lsj_size=(40, 80),
            lsj_scale=(1.0, 1.0),
            hflip_prob=0.0,
            recompute_boxes=recompute,
        )
        image2, t2 = tf(image, {**target, "boxes": loose})
        expected = v2.functional.resize(image, [40, 80], antialias=True)
        assert torch.equal(image2, v2.functional.to_dtype(expected, torch.float32, scale=True))
        # Nearest-neighbour mask: output column j samples floor(1.25 j): columns 8..23, rows 8..15.
        assert t2["masks"][0].nonzero().amin(0).tolist() == [8, 8]
        assert t2["masks"][0].nonzero().amax(0).tolist() == [15, 23]
        # The box: the mask's tight box, or the loose box scaled by 0.8.
        assert t2["boxes"].tolist() == ([[8.0, 8, 24, 16]] if recompute else [[4.0, 4, 28, 20]])
    # Boxes without masks are scaled (nothing to recompute them from).
    no_masks = {k: v for k, v in target.items() if k != "masks"}
    tf = detection_train_transforms(
        mode="lsj", lsj_size=(40, 80), lsj_scale=(1.0, 1.0), hflip_prob=0
    )
    _, t2 = tf(image, {**no_masks, "boxes": loose})
    assert t2["boxes"].tolist() == [[4.0, 4, 28, 20]] and "masks" not in t2
    with pytest.raises(UserValueError, match="unknown augmentation mode 'big'"):
        detection_train_transforms(mode="big")


def test_train_transform_defaults_are_the_coco_recipes():
    """Multi-scale: short side 480..800, long side at most 1333 (a 1:3 image always hits the
    cap: 1333 x 444); LSJ: 1024 x 1024."""
    image = tv_tensors.Image(torch.zeros(3, 100, 300, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[10.0, 10, 50, 50]], format="XYXY", canvas_size=(100, 300))
    target = {"boxes": boxes, "labels": torch.tensor([1])}
    torch.manual_seed(0)
    assert detection_train_transforms()(image, target)[0].shape == (3, 444, 1333)
    assert detection_train_transforms(mode="lsj")(image, target)[0].shape == (3, 1024, 1024)
    tall = tv_tensors.Image(torch.zeros(3, 300, 100, dtype=torch.uint8))
    tf = detection_train_transforms(max_size=10_000)
    tall_boxes = tv_tensors.BoundingBoxes(
        [[10.0, 10, 50, 50]], format="XYXY", canvas_size=(300, 100)
    )
    tall_target = {"boxes": tall_boxes, "labels": torch.tensor([1])}
    sides = {tf(tall, tall_target)[0].shape[-1] for _ in range(40)}
    assert sides <= set(range(480, 801, 32)) and len(sides) > 3


def test_boxes_from_masks_are_tight_pixel_edge_boxes():
    masks = torch.zeros(3, 6, 8, dtype=torch.uint8)
    masks[0, 1:4, 2:7] = 1
    masks[0, 5, 0] = 1  # a stray pixel widens the box
    masks[2, 3, 4] = 1  # a single pixel
    old = tv_tensors.BoundingBoxes(
        torch.zeros(3, 4, dtype=torch.float64), format="XYXY", canvas_size=(6, 8)
    )
    target = {"boxes": old, "masks": tv_tensors.Mask(masks), "labels": torch.tensor([1, 2, 3])}
    image, out = BoxesFromMasks()("image", target)
    assert image == "image" and out["labels"] is target["labels"]
    assert out["boxes"].dtype == torch.float64 and out["boxes"].canvas_size == (6, 8)
    assert out["boxes"].tolist() == [[0.0, 1, 7, 6], [0, 0, 0, 0], [4, 3, 5, 4]]
    assert target["boxes"] is old  # the input target is not modified
    none = {"boxes": old[:0], "masks": tv_tensors.Mask(masks[:0])}
    assert BoxesFromMasks()("image", none)[1]["boxes"].shape == (0, 4)
    boxes_only = {"boxes": old}
    assert BoxesFromMasks()("image", boxes_only)[1] is boxes_only


def test_eval_transform_default_is_short_side_800_long_side_at_most_1333():
    tf = detection_eval_transforms()
    for (h, w), expected in (((100, 120), (800, 960)), ((100, 200), (666, 1333))):
        image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
        assert tf(image).shape[-2:] == expected
    image = tv_tensors.Image(torch.full((3, 5, 7), 255, dtype=torch.uint8))
    assert torch.equal(detection_eval_transforms(min_size=None)(image), torch.ones(3, 5, 7))
    # Downscaling is antialiased (torchvision's default), as for training.
    image = tv_tensors.Image(torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8))
    small = detection_eval_transforms(min_size=40)(image)
    ref = v2.functional.resize(image, [40, 50], antialias=True)
    assert torch.equal(small, v2.functional.to_dtype(ref, torch.float32, scale=True))
    assert not torch.equal(ref, v2.functional.resize(image, [40, 50], antialias=False))


def test_eval_transform_and_collate(scenes):
    ds = CocoDetection(
        *scenes.split("val"), transforms=detection_eval_transforms(min_size=144, max_size=200)
    )
    batch = [ds[0], ds[1]]
    images, targets = detection_collate(batch)
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert images[0].shape[-2:] == (144, 144) and images[0].dtype == torch.float32
    assert targets[0]["image_id"] == ds.records[0]["id"]
    assert detection_collate([]) == ([], [])


# ------------------------------------------------------------------ evaluation


def test_perfect_predictions_score_ap_one_and_worse_ones_less(scenes):
    ds = CocoDetection(*scenes.split("val"))
    preds, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        preds.append(_gt_prediction(t))
        ids.append(t["image_id"])
    res = predictions_to_coco(preds, ids, ds.label_to_cat_id)
    json.dumps(res)  # results are JSON-ready (RLE counts as str)
    ap = coco_evaluate(ds.coco, res)
    assert ap["bbox"]["AP"] == pytest.approx(1.0) and ap["segm"]["AP"] == pytest.approx(1.0)
    assert set(ap["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # Shifted boxes, wrong labels on half, eroded masks: lower AP.
    worse = []
    for p in preds:
        q = dict(p)
        q["boxes"] = p["boxes"] + 3.0
        q["labels"] = torch.where(
            torch.arange(len(p["labels"])) % 2 == 0, p["labels"], p["labels"] % 10 + 1
        )
        q["masks"] = p["masks"] * (torch.rand_like(p["masks"]) > 0.5)
        worse.append(q)
    ap2 = coco_evaluate(ds.coco, predictions_to_coco(worse, ids, ds.label_to_cat_id))
    assert ap2["bbox"]["AP"] < 0.6 and ap2["segm"]["AP"] < 0.6
    assert coco_evaluate(ds.coco, []) == {
        k: dict.fromkeys(ap["bbox"], 0.0) for k in ("bbox", "segm")
    }
    # Only the first image evaluated: still perfect on that subset.
    sub = [r for r in res if r["image_id"] == ids[0]]
    assert coco_evaluate(ds.coco, sub, ("bbox",), image_ids=ids[:1])["bbox"]["AP"] == pytest.approx(
        1.0
    )


def test_predictions_map_back_to_original_size_and_category_ids(scenes):
    ds = CocoDetection(
        *scenes.split("val"), transforms=detection_eval_transforms(min_size=192, max_size=400)
    )
    raw = CocoDetection(*scenes.split("val"))
    image, t = ds[0]
    _, t0 = raw[0]
    pred = rescale_prediction(_gt_prediction(t), image.shape[-2:], t["orig_size"])
    torch.testing.assert_close(
        pred["boxes"], t0["boxes"].as_subclass(torch.Tensor), atol=0.01, rtol=0
    )
    assert pred["masks"].shape[-2:] == tuple(t0["masks"].shape[-2:])
    res = predictions_to_coco([pred], [t["image_id"]], {k: 100 + k for k in range(1, 11)})
    assert [r["category_id"] for r in res] == [100 + y for y in t["labels"].tolist()]
    x0, y0, x1, y1 = t0["boxes"][0].tolist()
    assert res[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.02)
    m = mask_util.decode(res[0]["segmentation"])
    iou = (m & t0["masks"][0].numpy()).sum() / (m | t0["masks"][0].numpy()).sum()
    assert iou > 0.7  # strokes survive a 2x up- and down-sampling
