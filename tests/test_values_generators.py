"""The embedded data generators by value: a moving-digit clip shows the scikit-learn digit its label
names, moving the way its label says, from a start that keeps it whole in the frame; a digit
scene's COCO boxes, masks, areas and categories agree with its pixels (checked with pycocotools and
a nearest-neighbour reading of the digits)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from mvitv2.data.common import load_digits_arrays, render_digit
from mvitv2.data.digit_scenes import make_digit_scenes, mask_to_polygon, render_scene
from mvitv2.data.moving_digits import (
    DIRECTIONS,
    MovingDigits,
    make_moving_digits,
    render_clip,
    sample_clip_params,
    write_video,
)
from mvitv2.data.video import read_video_list
from test_values_video_protocols import _decode_all


# ------------------------------------------------------------------ a digit reader (the reference)
def _templates() -> tuple[torch.Tensor, np.ndarray]:
    """Every scikit-learn scan cropped to its strokes, resized to 8x8 and normalised."""
    images8, labels = load_digits_arrays()
    out = []
    for im in images8:
        ys, xs = np.nonzero(im > 0.2)
        crop = torch.tensor(im[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])[None, None]
        out.append(torch.nn.functional.interpolate(crop, (8, 8), mode="bilinear").flatten())
    t = torch.stack(out)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True), labels


TEMPLATES = _templates()


def _read_digit(weight: np.ndarray) -> int:
    """The label of the scan most correlated with the strokes ``weight`` (0 = background)."""
    ys, xs = np.nonzero(weight > 0)
    crop = torch.tensor(weight[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]).float()
    small = torch.nn.functional.adaptive_avg_pool2d(crop[None, None], (8, 8)).flatten()
    small = small - small.mean()
    t, labels = TEMPLATES
    return int(labels[int((t @ (small / small.norm())).argmax())])


# ------------------------------------------------------------------ moving digits: clip parameters
def test_clip_alpha_is_the_scan_at_a_height_in_range_and_three_quarters_to_all_of_it_wide():
    """Over 48 clips: the digit layer is exactly ``render_digit(scan, h, w)`` at the top-left
    corner with h in ``digit_size`` (both ends drawn) and w in [max(4, round(.75 h)), h]; the
    speed is drawn from the inclusive ``speed`` range (both ends)."""
    images8, _ = load_digits_arrays()
    heights, speeds = set(), set()
    for i in range(48):
        rng = np.random.default_rng(i)
        scan = 17 * i
        direction = list(DIRECTIONS)[i % 8]
        p = sample_clip_params(
            rng, scan, direction=direction, num_frames=4, size=40, digit_size=(10, 13), speed=(1, 3)
        )
        a = p["alpha"]
        assert a.shape == (40, 40)
        h, w = _layer_size(a, scan)
        assert 10 <= h <= 13 and max(4, round(0.75 * h)) <= w <= h
        heights.add(h)
        speeds.add(p["speed"])
        assert p["background"].shape == (40, 40, 3) and p["background"].dtype == np.float32
        assert p["colour"].shape == (3,) and (p["colour"] >= 0.55).all()
    assert heights == {10, 11, 12, 13} and speeds == {1, 2, 3}


def test_a_tiny_digit_is_four_pixels_wide():
    images8, _ = load_digits_arrays()
    for i in range(10):
        p = sample_clip_params(
            np.random.default_rng(i), 3, direction="up", num_frames=2, size=8, digit_size=(4, 4)
        )
        # round(4 * [.75, 1]) is 3 or 4: widened to 4
        assert np.array_equal(p["alpha"][:4, :4], render_digit(images8[3], 4, 4))
        assert not p["alpha"][4:].any() and not p["alpha"][:, 4:].any()


def _layer_size(alpha: np.ndarray, scan: int) -> tuple[int, int]:
    """(h, w) such that the digit layer is ``render_digit(scan, h, w)`` at the top-left corner."""
    images8, _ = load_digits_arrays()
    found = [
        (h, w)
        for h in range(3, 17)
        for w in range(3, 17)
        if not alpha[h:].any()
        and not alpha[:, w:].any()
        and np.array_equal(alpha[:h, :w], render_digit(images8[scan], h, w))
    ]
    assert len(found) == 1, found
    return found[0]


def test_starts_are_every_position_that_keeps_the_digit_whole_for_the_whole_clip():
    """size 20, a 12 px digit (9-12 px wide), 2 px/frame over 4 frames (6 px of travel): along a
    moving axis the starts are [0, 20 - extent - 6] (+) or [6, 20 - extent] (-), along a still
    axis [0, 20 - extent]; each end is drawn."""
    ends: dict[int, set[tuple[bool, bool]]] = {1: set(), -1: set(), 0: set()}
    for i in range(160):
        rng = np.random.default_rng(1000 + i)
        name = list(DIRECTIONS)[i % 8]
        dx, dy = DIRECTIONS[name]
        p = sample_clip_params(
            rng, i, direction=name, num_frames=4, size=20, digit_size=(12, 12), speed=(2, 2)
        )
        h, w = _layer_size(p["alpha"], i)
        x0, y0 = p["start"]
        for pos, step, extent in ((x0, dx, w), (y0, dy, h)):
            if step > 0:
                lo, hi = 0, 20 - extent - 6
            elif step < 0:
                lo, hi = 6, 20 - extent
            else:
                lo, hi = 0, 20 - extent
            assert lo <= pos <= hi, (name, pos, lo, hi)
            ends[step].add((pos == lo, pos == hi))
        # hence every frame shows the whole layer: the clip never wraps around
        for t in range(4):
            sx, sy = x0 + 2 * t * dx, y0 + 2 * t * dy
            assert 0 <= sx <= 20 - w and 0 <= sy <= 20 - h
    for step in (1, -1, 0):
        assert (True, False) in ends[step] and (False, True) in ends[step], (step, ends[step])


def test_a_digit_that_would_leave_the_frame_is_refused_and_one_that_just_fits_is_not():
    kw = {"direction": "right", "num_frames": 5, "digit_size": (10, 12), "speed": (1, 2)}
    p = sample_clip_params(np.random.default_rng(0), 0, size=20, **kw)  # 12 + 4 * 2 = 20
    assert p["alpha"].shape == (20, 20)
    with pytest.raises(ValueError) as e:
        sample_clip_params(np.random.default_rng(0), 0, size=18, **kw)
    assert str(e.value) == (
        "a 12 px digit moving 2 px/frame for 5 frames leaves a 18 px frame; "
        "lower digit_size, speed or num_frames"
    )


# ------------------------------------------------------------------ moving digits: rendering
@pytest.mark.parametrize(
    "direction, start, speed",
    [("down_right", (1, 2), 2), ((-1, 0), (6, 3), 1), ("up", (4, 9), 3), ((1, -1), (7, 1), 2)],
)
def test_frame_t_blends_the_digit_at_start_plus_t_speed_direction_wrapping_at_the_border(
    direction, start, speed
):
    rng = np.random.default_rng(3)
    size, t_max = 10, 4
    alpha = np.zeros((size, size), np.float32)
    alpha[:3, :2] = [[1.0, 0.5], [0.25, 1.0], [0.0, 0.75]]
    colour = np.array([0.9, 0.6, 0.8], np.float32)
    background = rng.uniform(0, 0.4, (size, size, 3)).astype(np.float32)
    clip = render_clip(alpha, colour, background, start, speed, direction, t_max)
    assert clip.shape == (t_max, size, size, 3) and clip.dtype == np.uint8
    dx, dy = DIRECTIONS[direction] if isinstance(direction, str) else direction
    for t in range(t_max):
        want = background.copy()  # float32, the generator's precision
        for r in range(3):
            for c in range(2):
                a = alpha[r, c]
                y, x = (
                    (r + start[1] + t * speed * dy) % size,
                    (c + start[0] + t * speed * dx) % size,
                )
                want[y, x] = background[y, x] * (1 - a) + colour * a
        np.testing.assert_array_equal(
            clip[t], np.floor(want * np.float32(255) + np.float32(0.5)).astype(np.uint8)
        )


# ------------------------------------------------------------------ moving digits: the files
@pytest.fixture(scope="module")
def md(tmp_path_factory) -> MovingDigits:
    return make_moving_digits(
        tmp_path_factory.mktemp("md") / "ds",
        num_train_per_class=1,
        num_val_per_class=1,
        digits=(2, 5),
        directions=("down_left", "up", "right"),
        num_frames=5,
        size=32,
        digit_size=(10, 12),
        speed=(2, 2),
    )


def test_every_video_shows_its_labels_digit_moving_its_labels_way(md):
    """Label = digit position x 3 + direction position. The bright strokes' centroid moves
    4 x 2 px along the label's direction, and the first frame reads as the label's digit."""
    assert md.class_names == ("2_down_left", "2_up", "2_right", "5_down_left", "5_up", "5_right")
    for split in ("train", "val"):
        samples = read_video_list(md.split(split))
        assert [s.label for s in samples] == list(range(6))
        for s in samples:
            digit, direction = (2, 5)[s.label // 3], ("down_left", "up", "right")[s.label % 3]
            assert s.path.parent.name == f"{digit}_{direction}"
            grey = _decode_all(s.path).astype(np.float64).mean(-1)
            assert grey.shape == (5, 32, 32)
            ys, xs = np.mgrid[:32, :32]
            cents = []
            for g in grey:
                w = np.clip(g - np.median(g) - 60, 0, None)
                cents.append(((w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()))
            moved = np.array(cents[-1]) - np.array(cents[0])
            dx, dy = DIRECTIONS[direction]
            np.testing.assert_allclose(moved, [8 * dx, 8 * dy], atol=1.5)
            assert _read_digit(np.clip(grey[0] - np.median(grey[0]) - 60, 0, None)) == digit


def test_the_videos_have_the_asked_frames_size_and_rate(md):
    s = read_video_list(md.train_list)[0]
    with av.open(str(s.path)) as c:
        v = c.streams.video[0]
        assert (v.frames, v.width, v.height, v.average_rate) == (5, 32, 32, 16)
    assert (md.num_frames, md.size) == (5, 32)
    assert md.split("val") == md.val_list == md.root / "val.txt"
    assert md.split("train") == md.train_list == md.root / "train.txt"
    with pytest.raises(ValueError, match="unknown split 'test'; expected 'train' or 'val'"):
        md.split("test")


def test_bad_directions_and_odd_sizes_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError) as e:
        make_moving_digits(tmp_path / "a", directions=("up", "sideways"))
    assert str(e.value) == f"unknown direction 'sideways'; expected one of {sorted(DIRECTIONS)}"
    with pytest.raises(ValueError) as e:
        make_moving_digits(tmp_path / "b", size=31)
    assert str(e.value) == "size must be even for yuv420p video, got 31"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("codec, name", [("libx264", "h264"), ("mpeg4", "mpeg4")])
def test_write_video_puts_a_keyframe_every_gop_frames_and_faststart_puts_the_index_first(
    tmp_path, codec, name
):
    frames = np.full((12, 16, 24, 3), 90, np.uint8)
    for faststart in (False, True):
        path = tmp_path / f"v{faststart}.mp4"
        write_video(path, frames, fps=10, codec=codec, gop=4, faststart=faststart)
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.width, s.height, s.average_rate) == (name, 24, 16, 10)
            keys = [f.key_frame for f in c.decode(video=0)]
        assert [i for i, k in enumerate(keys) if k] == [0, 4, 8]
        data = path.read_bytes()
        assert (data.find(b"moov") < data.find(b"mdat")) == faststart


def test_crf_zero_h264_gives_back_the_frames_and_a_higher_crf_loses_detail(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 32, 32, 1), dtype=np.uint8), 3, -1)
    frames = np.repeat(frames, 3, 0)
    write_video(tmp_path / "a.mp4", frames, crf=0)
    write_video(tmp_path / "b.mp4", frames, crf=40)
    a, b = _decode_all(tmp_path / "a.mp4"), _decode_all(tmp_path / "b.mp4")
    # grey frames survive yuv420p exactly up to the colour conversion's rounding
    assert np.abs(a.astype(int) - frames).max() <= 2
    assert np.abs(b.astype(int) - frames).mean() > 5


# ------------------------------------------------------------------ digit scenes
def test_scene_digit_counts_sizes_and_gaps_follow_the_arguments():
    """On a roomy canvas the count is drawn from the inclusive range (both ends); each mask's
    box is at most the largest digit; boxes of two digits are >= margin pixels apart; masks are
    disjoint, non-empty and cover the pixels brighter than the background."""
    _, labels = load_digits_arrays()
    pool = np.flatnonzero(labels < 10)
    counts = set()
    for i in range(30):
        img, inst = render_scene(
            np.random.default_rng(i), pool, image_size=(60, 90), digits_per_image=(1, 3),
            digit_size=(10, 14), margin=4,
        )  # fmt: skip
        assert img.shape == (60, 90, 3) and img.dtype == np.uint8
        counts.add(len(inst))
        boxes = []
        for digit, m in inst:
            assert m.shape == (60, 90) and m.dtype == bool and m.sum() >= 8 and 0 <= digit <= 9
            ys, xs = np.nonzero(m)
            assert ys.max() + 1 - ys.min() <= 14 and xs.max() + 1 - xs.min() <= 14
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        for j, (ax0, ay0, ax1, ay1) in enumerate(boxes):
            for bx0, by0, bx1, by1 in boxes[j + 1 :]:
                assert bx0 >= ax1 + 4 or ax0 >= bx1 + 4 or by0 >= ay1 + 4 or ay0 >= by1 + 4
        if inst:
            masks = np.stack([m for _, m in inst])
            assert masks.sum(0).max() == 1
            grey = img.astype(float).mean(-1)
            assert grey[masks.any(0)].mean() > grey[~masks.any(0)].mean() + 40
    assert counts == {1, 2, 3}


def test_a_crowded_canvas_gets_fewer_digits_never_overlapping_ones():
    _, labels = load_digits_arrays()
    for i in range(5):
        _, inst = render_scene(
            np.random.default_rng(i), np.arange(len(labels)), image_size=(24, 24),
            digits_per_image=(6, 6), digit_size=(12, 12),
        )  # fmt: skip
        assert 1 <= len(inst) <= 4
        assert np.stack([m for _, m in inst]).sum(0).max() == 1


def test_digit_scene_annotations_agree_with_the_pixels_by_pycocotools(tmp_path):
    """A non-square canvas: image sizes are (height 40, width 72) like the PNGs; annotation ids
    run 1..N; polygons on even image ids, RLE on odd ones; pycocotools' decoded masks give the
    box and area; the category is the digit the strokes read as (nearest scikit-learn scan)."""
    ds = make_digit_scenes(
        tmp_path / "ds", num_train=6, num_val=4, image_size=(40, 72), digits_per_image=(2, 3),
        digit_size=(14, 18), seed=1,
    )  # fmt: skip
    agree = total = 0
    for split, n in (("train", 6), ("val", 4)):
        img_dir, ann_file = ds.split(split)
        coco = COCO(str(ann_file))
        coco.info()  # pycocotools' reader of the dataset's "info" block
        assert sorted(coco.getImgIds()) == list(range(1, n + 1))
        assert sorted(coco.getAnnIds()) == list(range(1, len(coco.getAnnIds()) + 1))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(d) for d in range(10)]
        assert coco.getCatIds() == list(range(1, 11))
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            assert info["file_name"] == f"{image_id - 1:06d}.png"
            assert (info["height"], info["width"]) == (40, 72)
            with Image.open(img_dir / info["file_name"]) as im:
                assert im.size == (72, 40)
                grey = np.asarray(im.convert("RGB"), np.float64).mean(-1)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert len(anns) >= 1
            for ann in anns:
                seg = ann["segmentation"]
                assert isinstance(seg, list) == (image_id % 2 == 0)
                m = coco.annToMask(ann).astype(bool)
                ys, xs = np.nonzero(m)
                box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["bbox"] == [float(v) for v in box]
                assert ann["area"] == float(m.sum()) == float(mask_util.area(coco.annToRLE(ann)))
                assert ann["iscrowd"] == 0
                total += 1
                weight = np.where(m, np.clip(grey - np.median(grey), 0, None), 0)
                agree += _read_digit(weight) == ann["category_id"] - 1
    assert agree >= 0.7 * total, (agree, total)
    # validation scenes come from held-out scans: another file than training's
    assert ds.val_json != ds.train_json and ds.split("val") == (ds.val_images, ds.val_json)


def test_validation_scenes_are_not_training_scenes_with_other_digits(tmp_path):
    """Scene i of val is drawn independently of scene i of train: their backgrounds (pixels
    outside every digit of both) differ, not only the digits drawn on them."""
    ds = make_digit_scenes(tmp_path / "ds", num_train=3, num_val=3, image_size=48, seed=2)
    for i in range(3):
        pixels, outside = [], np.ones((48, 48), bool)
        for split in ("train", "val"):
            img_dir, ann_file = ds.split(split)
            coco = COCO(str(ann_file))
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=i + 1)):
                x, y, w, h = (int(v) for v in ann["bbox"])
                outside[max(0, y - 2) : y + h + 2, max(0, x - 2) : x + w + 2] = False
            with Image.open(img_dir / f"{i:06d}.png") as im:
                pixels.append(np.asarray(im, np.int16))
        assert outside.sum() > 100
        assert np.median(np.abs(pixels[0] - pixels[1])[outside]) > 2


def test_digit_scenes_default_to_the_data_folder_and_report_their_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    ds = make_digit_scenes(num_train=1, num_val=1, image_size=32, digit_size=(10, 12))
    assert ds.root == tmp_path / "digit_scenes"
    assert ds.split("train") == (ds.root / "train", ds.root / "annotations/instances_train.json")
    assert ds.val_json.is_file() and (ds.val_images / "000000.png").is_file()
    assert make_digit_scenes(tmp_path / "x", num_train=1, num_val=1, image_size=32).root == (
        tmp_path / "x"
    )


def test_a_scene_background_is_smooth_shading_plus_pixel_noise():
    """No digits: with noise 0 the canvas varies smoothly (a shading, not one flat colour); with
    noise s the pixel-to-pixel differences have the std of two independent N(0, s) draws."""
    pool = np.arange(10)
    flat, _ = render_scene(np.random.default_rng(0), pool, image_size=(40, 40),
                           digits_per_image=(0, 0), noise=0.0)  # fmt: skip
    grey = flat.astype(float).mean(-1)
    assert grey.std() > 1.0 and np.abs(np.diff(grey, axis=1)).max() <= 12
    noisy, _ = render_scene(np.random.default_rng(0), pool, image_size=(40, 40),
                            digits_per_image=(0, 0), noise=0.04)  # fmt: skip
    d = np.diff(noisy[..., 0].astype(float), axis=1)
    assert d.std() == pytest.approx(0.04 * 255 * np.sqrt(2), rel=0.15)


def test_scene_digit_heights_span_the_digit_size_range():
    _, labels = load_digits_arrays()
    heights = []
    for i in range(20):
        _, inst = render_scene(
            np.random.default_rng(i), np.arange(len(labels)), image_size=(64, 64),
            digits_per_image=(3, 3), digit_size=(8, 16),
        )  # fmt: skip
        heights += [int(np.ptp(np.nonzero(m.any(1))[0])) + 1 for _, m in inst]
    assert max(heights) <= 16 and min(heights) <= 8 and max(heights) >= 14


@pytest.mark.parametrize(
    "mask, corners",
    [
        (np.pad(np.ones((2, 3), bool), ((1, 2), (1, 0))), {(1, 1), (4, 1), (4, 3), (1, 3)}),
        (
            np.pad(np.pad(np.zeros((2, 2), bool), 1, constant_values=True), ((0, 1), (2, 0))),
            {(2, 0), (6, 0), (6, 4), (2, 4), (3, 1), (5, 1), (5, 3), (3, 3)},
        ),
    ],
)
def test_a_polygon_keeps_only_the_corners_of_its_rings(mask, corners):
    """A rectangle: its 4 corners and back to the first; a square ring with a square hole: the
    outer 4 corners, the hole's 4 and the bridges back (5 + 6 points). Decoding gives the mask."""
    poly = mask_to_polygon(mask)
    pts = list(zip(poly[0][0::2], poly[0][1::2]))
    assert set(pts) == {(float(x), float(y)) for x, y in corners}
    assert len(pts) == (5 if len(corners) == 4 else 11)
    rle = mask_util.merge(mask_util.frPyObjects(poly, *mask.shape))
    np.testing.assert_array_equal(mask_util.decode(rle), mask.astype(np.uint8))


def test_moving_digits_are_rebuilt_for_other_arguments_and_default_to_the_data_folder(
    tmp_path, monkeypatch
):
    kw = {"num_train_per_class": 1, "num_val_per_class": 1, "digits": (4,),
          "directions": ("up", "down"), "num_frames": 3, "size": 16, "digit_size": (6, 8)}  # fmt: skip
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    md = make_moving_digits(**kw)
    assert md.root == tmp_path / "moving_digits" and len(read_video_list(md.val_list)) == 2
    # the same place, another count: rebuilt, not the stale files
    again = make_moving_digits(tmp_path / "moving_digits", **{**kw, "num_val_per_class": 2})
    assert again.root == md.root and len(read_video_list(again.val_list)) == 4
    with av.open(str(read_video_list(again.train_list)[0].path)) as c:
        assert c.streams.video[0].frames == 3
