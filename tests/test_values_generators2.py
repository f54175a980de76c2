"""More of the embedded data generators by value (gaps found by mutation testing): the split
lookup's error, ``write_video``'s defaults and codec names (read back with PyAV), the clip
parameters' sizes, directions, widths and colours, the scenes' margins, widths and noise, the
builders' documented defaults, and the files' codec, rate and COCO schema."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from mvitv2.data import digit_scenes, moving_digits
from mvitv2.data.common import load_digits_arrays, render_digit
from mvitv2.data.digit_scenes import STROKE_THRESHOLD, DigitScenes, render_scene
from mvitv2.data.moving_digits import DIRECTIONS, sample_clip_params, write_video
from mvitv2.data.video import read_video_list
from test_values_generators import _layer_size
from test_values_video_protocols import _decode_all


def test_digit_scenes_refuse_an_unknown_split_by_name():
    root = Path("/nowhere/ds")
    ds = DigitScenes(root, root / "train", root / "val", root / "a.json", root / "b.json")
    assert ds.split("train") == (root / "train", root / "a.json")
    assert ds.split("val") == (root / "val", root / "b.json")
    with pytest.raises(ValueError) as e:
        ds.split("test")
    assert str(e.value) == "unknown split 'test'; expected 'train' or 'val'"


# ------------------------------------------------------------------ write_video
def test_write_video_defaults_are_h264_at_16_fps_a_keyframe_every_8_frames_index_last(tmp_path):
    """Read back with plain PyAV: codec, rate, keyframe positions, the MP4 index after the data;
    and the default quality is crf 18 (the same bytes as asking for it, not those of crf 19)."""
    frames = np.full((17, 16, 16, 3), 90, np.uint8)
    frames[:, 4:8, 4:12] = np.random.default_rng(0).integers(60, 200, (17, 1, 1, 3))
    write_video(tmp_path / "d.mp4", frames)
    with av.open(str(tmp_path / "d.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.average_rate) == ("h264", 16)
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    assert keys == [0, 8, 16]
    data = (tmp_path / "d.mp4").read_bytes()
    assert data.find(b"mdat") < data.find(b"moov")
    for crf in (18, 19):
        write_video(tmp_path / f"{crf}.mp4", frames, crf=crf)
    assert data == (tmp_path / "18.mp4").read_bytes() != (tmp_path / "19.mp4").read_bytes()


def test_write_video_takes_h264_as_a_name_for_libx264_with_its_quality(tmp_path):
    """``codec="h264"`` is the same encoder with the same options: crf 0 keeps grey frames within
    the colour conversion's rounding, and the file has the bytes of ``codec="libx264"``."""
    rng = np.random.default_rng(1)
    frames = np.repeat(rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8), 3, -1)
    write_video(tmp_path / "a.mp4", frames, codec="h264", crf=0)
    write_video(tmp_path / "b.mp4", frames, codec="libx264", crf=0)
    assert np.abs(_decode_all(tmp_path / "a.mp4").astype(int) - frames).max() <= 2
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


# ------------------------------------------------------------------ sample_clip_params
def test_clip_params_default_to_a_64_px_frame_and_all_layers_are_float32():
    p = sample_clip_params(np.random.default_rng(0), 5, direction="up", num_frames=4)
    assert p["alpha"].shape == (64, 64) and p["background"].shape == (64, 64, 3)
    assert {p[k].dtype for k in ("alpha", "background", "colour")} == {np.dtype(np.float32)}


def test_a_direction_given_as_a_step_samples_what_its_name_samples():
    for name, step in DIRECTIONS.items():
        kw = {"num_frames": 4, "size": 24, "digit_size": (8, 10), "speed": (1, 2)}
        a = sample_clip_params(np.random.default_rng(7), 11, direction=name, **kw)
        b = sample_clip_params(np.random.default_rng(7), 11, direction=step, **kw)
        assert a["start"] == b["start"] and a["speed"] == b["speed"]
        np.testing.assert_array_equal(a["alpha"], b["alpha"])


def test_clip_digit_widths_spread_over_three_quarters_to_all_of_the_height():
    """A 12 px digit is round(12 u) wide with u uniform in [0.75, 1]: 9, 10, 11 and 12 all occur
    (each has probability >= 1/6; 60 clips)."""
    widths = set()
    for i in range(60):
        p = sample_clip_params(
            np.random.default_rng(i), 3, direction="left", num_frames=2, size=16,
            digit_size=(12, 12), speed=(1, 1),
        )  # fmt: skip
        widths.add(_layer_size(p["alpha"], 3)[1])
    assert widths == {9, 10, 11, 12}


def test_clip_colours_are_light_and_varied_and_a_noisy_background_is_clipped_to_0_1():
    """Over 40 clips every colour channel lies in [0.55, 1] and they spread over that range;
    with noise 0.5 the background reaches both ends of [0, 1] and never leaves it."""
    colours = np.stack(
        [
            sample_clip_params(
                np.random.default_rng(i),
                i,
                direction="up",
                num_frames=2,
                size=16,
                digit_size=(6, 8),
            )["colour"]  # fmt: skip
            for i in range(40)
        ]
    )
    assert colours.min() >= 0.55 and colours.max() <= 1.0
    assert colours.min() < 0.6 and colours.max() > 0.95
    p = sample_clip_params(
        np.random.default_rng(0), 0, direction="up", num_frames=2, size=16, digit_size=(6, 8),
        noise=0.5,
    )  # fmt: skip
    assert (p["background"].min(), p["background"].max()) == (0.0, 1.0)


# ------------------------------------------------------------------ render_scene
@pytest.mark.parametrize("axis", [1, 0])
def test_scene_digits_may_be_one_pixel_apart_by_default_and_no_closer_than_the_margin(axis):
    """4 x 4 digits on a 4 x 9 canvas (or 9 x 4): two fit only at 0 and 5 along the long side, a
    1 px gap. By default (margin 1) some scenes hold both, placed in either order; with margin 2
    none does."""
    pool = np.arange(len(load_digits_arrays()[1]))
    size = (4, 9) if axis == 1 else (9, 4)
    kw = {"image_size": size, "digits_per_image": (2, 2), "digit_size": (4, 4)}
    orders = set()
    for i in range(40):
        _, inst = render_scene(np.random.default_rng(i), pool, **kw)
        if len(inst) == 2:
            lo = [int(np.flatnonzero(m.any(1 - axis)).min()) for _, m in inst]
            assert sorted(lo)[0] <= 3 < 5 <= sorted(lo)[1]
            orders.add(lo[0] < lo[1])
        _, inst = render_scene(np.random.default_rng(i), pool, **kw, margin=2)
        assert len(inst) <= 1
    assert orders == {True, False}


def _scene_digit_width(mask: np.ndarray, scan: int, height: int) -> int:
    """The width w such that ``render_digit(scan, height, w) >= 0.3`` is ``mask``'s strokes."""
    images8, _ = load_digits_arrays()
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    found = []
    for w in range(2, 3 * height):
        r = render_digit(images8[scan], height, w) >= STROKE_THRESHOLD
        ry, rx = np.nonzero(r)
        if np.array_equal(r[ry.min() : ry.max() + 1, rx.min() : rx.max() + 1], crop):
            found.append(w)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("height, widths", [(12, {9, 10, 11, 12}), (4, {4}), (5, {4, 5})])
def test_scene_digit_widths_are_three_quarters_to_all_of_the_height_and_at_least_4(height, widths):
    """One scan drawn at a fixed height; its width is recovered from the mask by re-rendering the
    scan at every width: round(h u), u uniform in [0.75, 1], at least 4 px; every width occurs."""
    scan = 8  # a wide "8": its strokes show every column
    got = set()
    for i in range(60):
        _, inst = render_scene(
            np.random.default_rng(i), np.array([scan]), image_size=(16, 16),
            digits_per_image=(1, 1), digit_size=(height, height),
        )  # fmt: skip
        got.add(_scene_digit_width(inst[0][1], scan, height))
    assert got == widths


# ------------------------------------------------------------------ the dataset builders
def test_generator_defaults_are_the_documented_datasets(tmp_path, monkeypatch):
    """Without arguments: 2000 / 250 scenes of 128 x 128 px, noise 0.03, seed 0, in the data
    folder; 40 / 10 clips per class of 8 frames of 32 px at 16 fps (H.264), seed 0. An explicit
    root is used as given."""
    seen = []
    for mod in (digit_scenes, moving_digits):
        monkeypatch.setattr(mod, "build_cached", lambda root, params, build: seen.append(params))
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    ds = digit_scenes.make_digit_scenes()
    md = moving_digits.make_moving_digits()
    assert (ds.root, md.root) == (tmp_path / "digit_scenes", tmp_path / "moving_digits")
    scenes, clips = seen
    assert (scenes["num_train"], scenes["num_val"], scenes["image_size"]) == (2000, 250, (128, 128))
    assert (scenes["noise"], scenes["seed"]) == (0.03, 0)
    assert (clips["num_train_per_class"], clips["num_val_per_class"]) == (40, 10)
    assert (clips["num_frames"], clips["size"], clips["fps"], clips["codec"]) == (
        8,
        32,
        16,
        "libx264",
    )
    assert clips["seed"] == 0 and (md.num_frames, md.size) == (8, 32)
    assert moving_digits.make_moving_digits(tmp_path / "x").root == tmp_path / "x"


def test_moving_digit_files_have_the_asked_rate_and_codec(tmp_path):
    md = moving_digits.make_moving_digits(
        tmp_path / "md", num_train_per_class=1, num_val_per_class=1, digits=(1,),
        directions=("left", "right"), num_frames=3, size=16, digit_size=(6, 8), fps=10,
        codec="mpeg4",
    )  # fmt: skip
    for s in read_video_list(md.val_list):
        with av.open(str(s.path)) as c:
            v = c.streams.video[0]
            assert (v.codec_context.name, v.average_rate, v.frames) == ("mpeg4", 10, 3)


def test_digit_scene_files_follow_the_coco_schema(tmp_path):
    """COCO's top-level blocks (info with a description, licenses, images, annotations,
    categories) and a supercategory on every category."""
    ds = digit_scenes.make_digit_scenes(
        tmp_path / "ds", num_train=1, num_val=1, image_size=32, digit_size=(10, 12)
    )
    for split in ("train", "val"):
        data = json.loads(ds.split(split)[1].read_text())
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert isinstance(data["info"]["description"], str) and data["licenses"] == []
        assert all(set(c) == {"id", "name", "supercategory"} for c in data["categories"])


def test_a_very_noisy_scene_saturates_at_black_and_white_without_wrapping():
    """Noise std 1 on a background in [0, 0.55]: at least P(N(0, 1) < -0.55) ~ 0.29 of the
    pixels are clipped to 0 and P(N(0, 1) > 1) ~ 0.16 to 255, and no value wraps around."""
    img, _ = render_scene(
        np.random.default_rng(0), np.arange(10), image_size=(64, 64), digits_per_image=(0, 0),
        noise=1.0,
    )  # fmt: skip
    assert (img == 0).mean() > 0.25 and (img == 255).mean() > 0.13
    grey = img[(img > 0) & (img < 255)]
    assert grey.size > 0.3 * img.size
