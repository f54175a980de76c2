"""Video data: embedded moving digits (and why they need time), seeking decoder, samplers,
list files, tolerant dataset, clip-consistent transforms."""

from __future__ import annotations

import re
import shutil

import av
import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from torch.utils.data import DataLoader

from mvitv2.data.moving_digits import (
    DIRECTIONS,
    make_moving_digits,
    render_clip,
    sample_clip_params,
    write_video,
)
from mvitv2.data.video import (
    VideoClipDataset,
    VideoReader,
    VideoTransform,
    clip_indices,
    read_class_names,
    read_video_list,
    segment_indices,
    uniform_crop,
    video_collate,
)
from mvitv2.errors import UserFileNotFoundError, UserValueError

SMALL = {
    "num_train_per_class": 20,
    "num_val_per_class": 10,
    "digits": (3, 7),
    "num_frames": 16,
    "size": 32,
    "digit_size": (12, 16),
    "speed": (1, 1),
    "seed": 0,
}
DIRS = ("up", "down", "left", "right")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_moving_digits(tmp_path_factory.mktemp("md") / "ds", **SMALL)


def _noise_video(path, n, size=32, seed=0, **kw):
    frames = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    write_video(path, frames, **kw)
    return frames


# ------------------------------------------------------------------ embedded data


def test_moving_digits_files_and_lists(digits):
    names = read_class_names(digits.classes_file)
    assert names == [f"{d}_{m}" for d in (3, 7) for m in DIRS] == list(digits.class_names)
    for split, per_class in (("train", 20), ("val", 10)):
        samples = read_video_list(digits.split(split))
        assert len(samples) == per_class * len(names)
        assert np.bincount([s.label for s in samples]).tolist() == [per_class] * len(names)
        assert all(s.path.is_file() and s.path.suffix == ".mp4" for s in samples)
        assert all(names[s.label] == s.path.parent.name for s in samples)
    with av.open(str(read_video_list(digits.train_list)[0].path)) as c:
        s = c.streams.video[0]
        assert (s.frames, s.width, s.height, s.codec_context.name) == (16, 32, 32, "h264")


def test_moving_digits_deterministic_and_cached(digits, tmp_path):
    kw = {**SMALL, "num_train_per_class": 1, "num_val_per_class": 1}
    a = make_moving_digits(tmp_path / "a", **kw)
    b = make_moving_digits(tmp_path / "b", **kw)
    rel = "train/7_left/0000.mp4"
    assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    assert (a.root / rel).read_bytes() != (a.root / "train/7_right/0000.mp4").read_bytes()
    mtime = (a.root / rel).stat().st_mtime_ns
    make_moving_digits(tmp_path / "a", **kw)
    assert (a.root / rel).stat().st_mtime_ns == mtime


def test_opposite_directions_are_exact_time_reversals(tmp_path):
    """The core of "time is needed": for every clip moving in direction d there is an equally
    likely clip moving in -d (same digit, start = the first clip's end: the start ranges of d and -d
    are each other's end points) whose frames are the same frames in reverse order. Any model that ignores frame order -
    a single (repeated) frame, an average of frames, a bag of frames - sees the same input for
    both and so cannot beat 50% between d and -d."""
    rng = np.random.default_rng(1)
    size, t = 32, 8
    for name in DIRS:
        dx, dy = DIRECTIONS[name]
        kw = {"size": size, "digit_size": (12, 16), "speed": (2, 2), "num_frames": t}
        p = sample_clip_params(rng, int(rng.integers(0, 1797)), direction=name, **kw)
        clip = render_clip(**p, direction=name, num_frames=t)
        end = (p["start"][0] + (t - 1) * p["speed"] * dx, p["start"][1] + (t - 1) * p["speed"] * dy)
        # The digit stays whole in every frame (no wrap-around), so the end lies in the range of
        # starts that the sampler draws for -d: [path, size - extent] along a moving axis.
        rows, cols = np.nonzero(p["alpha"])
        path = (t - 1) * p["speed"]
        for pos, step, extent in ((end[0], dx, cols.max() + 1), (end[1], dy, rows.max() + 1)):
            lo, hi = (path, size - extent) if step > 0 else (0, size - extent - path)
            assert lo <= pos <= hi if step else 0 <= pos <= size - extent
        twin = render_clip(**{**p, "start": end}, direction=(-dx, -dy), num_frames=t)
        assert np.array_equal(twin, clip[::-1])
        assert not np.array_equal(twin, clip)  # yet the clips (and their labels) differ
        # ... and so does every single frame of the twin appear in the clip: a frame tells
        # nothing about the direction. Still true after MP4 encoding and decoding.
        write_video(tmp_path / "a.mp4", clip)
        write_video(tmp_path / "b.mp4", twin)
        with VideoReader(tmp_path / "a.mp4") as ra, VideoReader(tmp_path / "b.mp4") as rb:
            a = ra.get_frames(range(t)).float()
            b = rb.get_frames(range(t)).float()
        assert (a.mean(0) - b.mean(0)).abs().mean() < 4.0  # time-averaged clips: same
        assert (a - b.flip(0)).abs().mean() < 4.0  # reversed: same up to codec noise
        assert (a - b).abs().mean() > 10.0  # in order: different


def test_direction_needs_frame_order_on_the_dataset(digits):
    """On the written MP4 dataset: one fixed feature extractor + linear classifier, given
    translation-invariant appearance (|FFT| of the frames) and frame-to-frame motion (phase
    correlation of consecutive frames). With the real clips it gets the direction; with the centre
    frame repeated it still recognises the digit but the direction falls to chance (1/4); with
    frames shuffled (an order-blind bag of frames) it cannot pass either."""

    def load(list_file):
        clips, labels = [], []
        for s in read_video_list(list_file):
            with VideoReader(s.path) as r:
                clips.append(r.get_frames(range(r.num_frames)).numpy().mean(-1) / 255)
            labels.append(s.label)
        return np.stack(clips), np.array(labels)

    def features(clips):
        f = np.fft.fft2(clips - clips.mean((-1, -2), keepdims=True))
        appearance = np.log1p(np.abs(f).mean(1)).reshape(len(clips), -1)
        cross = f[:, :-1] * np.conj(f[:, 1:])
        motion = np.real(np.fft.ifft2((cross / (np.abs(cross) + 1e-6)).mean(1)))
        motion = motion.reshape(len(clips), -1)
        return np.concatenate([appearance / appearance.std(), motion / (motion.std() + 1e-9)], 1)

    rng = np.random.default_rng(0)
    views = {
        "ordered": lambda c: c,
        "centre_repeated": lambda c: np.repeat(c[:, c.shape[1] // 2, None], c.shape[1], 1),
        "shuffled": lambda c: np.stack([x[rng.permutation(len(x))] for x in c]),
    }
    xtr, ytr = load(digits.train_list)
    xva, yva = load(digits.val_list)
    n_dirs = len(DIRS)
    acc = {}
    for name, view in views.items():
        pred = RidgeClassifier().fit(features(view(xtr)), ytr).predict(features(view(xva)))
        acc[name] = {
            "direction": float(np.mean(pred % n_dirs == yva % n_dirs)),
            "digit": float(np.mean(pred // n_dirs == yva // n_dirs)),
        }
    assert acc["ordered"]["direction"] >= 0.9, acc
    assert acc["centre_repeated"]["digit"] >= 0.7, acc  # the frame is informative about the digit
    assert acc["centre_repeated"]["direction"] <= 0.4, acc  # chance is 0.25
    assert acc["shuffled"]["direction"] <= 0.7, acc  # axis maybe, sign no: capped near 0.5


# ------------------------------------------------------------------ samplers


def test_clip_indices():
    torch.manual_seed(0)
    for _ in range(20):
        idx = clip_indices(100, 8, 4)
        assert np.all(np.diff(idx) == 4) and idx[0] >= 0 and idx[-1] < 100
    starts = {clip_indices(100, 8, 4)[0] for _ in range(200)}
    assert min(starts) == 0 and max(starts) == 100 - 29 and len(starts) > 30
    test = [clip_indices(100, 8, 4, clip_idx=k, num_clips=5) for k in range(5)]
    assert test[0][0] == 0 and test[-1][-1] == 99  # K uniform clips cover the whole video
    assert np.all(np.diff([c[0] for c in test]) > 0)
    assert clip_indices(100, 8, 4, clip_idx=0, num_clips=1)[0] == (100 - 29) // 2  # centre clip
    assert clip_indices(10, 8, 2, clip_idx=0) == [0, 2, 4, 6, 8, 9, 9, 9]  # padded: last frame
    assert clip_indices(10, 8, 2, clip_idx=0, pad="loop") == [0, 2, 4, 6, 8, 0, 2, 4]


def test_segment_indices():
    torch.manual_seed(0)
    for _ in range(20):
        idx = segment_indices(100, 8, train=True)
        bounds = np.linspace(0, 100, 9)
        assert all(int(bounds[i]) <= idx[i] < bounds[i + 1] for i in range(8))
    assert segment_indices(100, 8, train=False) == [6, 18, 31, 43, 56, 68, 81, 93]
    short = segment_indices(5, 8, train=False)
    assert len(short) == 8 and sorted(set(short)) == [0, 1, 2, 3, 4] and short == sorted(short)


# ------------------------------------------------------------------ list files


def test_read_video_list_formats_and_errors(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\na/x y.mp4 3\n\n/abs/v.mp4   0\n")
    s = read_video_list(tmp_path / "l.txt", video_root="/root")
    assert [(str(x.path), x.label) for x in s] == [("/root/a/x y.mp4", 3), ("/abs/v.mp4", 0)]
    (tmp_path / "l.csv").write_text("path,label\nb.mp4,2\nc.mp4,5,\n")
    s = read_video_list(tmp_path / "l.csv")
    assert [(x.path, x.label) for x in s] == [(tmp_path / "b.mp4", 2), (tmp_path / "c.mp4", 5)]
    (tmp_path / "bad.txt").write_text("a.mp4 1\nb.mp4 dog\n")
    with pytest.raises(UserValueError, match=r"bad\.txt:2: label 'dog' is not an integer"):
        read_video_list(tmp_path / "bad.txt")
    (tmp_path / "bad2.txt").write_text("a.mp4 1\n\njustapath\n")
    with pytest.raises(UserValueError, match=r"bad2\.txt:3: expected"):
        read_video_list(tmp_path / "bad2.txt")
    (tmp_path / "bad3.csv").write_text("a.mp4,1\nb.mp4,2,3\n")
    with pytest.raises(UserValueError, match=r"bad3\.csv:2"):
        read_video_list(tmp_path / "bad3.csv")
    with pytest.raises(UserFileNotFoundError, match="nothere.txt"):
        read_video_list(tmp_path / "nothere.txt")
    with pytest.raises(UserFileNotFoundError, match="nothere.txt"):
        VideoClipDataset(tmp_path / "nothere.txt")
    (tmp_path / "neg.txt").write_text("a.mp4 -1\n")
    with pytest.raises(UserValueError, match=r"neg\.txt:1: negative label -1"):
        read_video_list(tmp_path / "neg.txt")
    (tmp_path / "none.txt").write_text("# only a comment\n")
    with pytest.raises(UserValueError, match=r"none\.txt: no samples"):
        read_video_list(tmp_path / "none.txt")
    with pytest.raises(UserFileNotFoundError, match="classes.txt"):
        read_class_names(tmp_path / "classes.txt")
    (tmp_path / "classes.txt").write_text("cat\n\n dog \n")
    assert read_class_names(tmp_path / "classes.txt") == ["cat", "dog"]


# ------------------------------------------------------------------ decoding


def test_reader_seeks_and_matches_sequential_decoding(tmp_path):
    _noise_video(tmp_path / "v.mp4", 64, gop=8)
    with av.open(str(tmp_path / "v.mp4")) as c:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    rng = np.random.default_rng(0)
    with VideoReader(tmp_path / "v.mp4") as r:
        assert (r.num_frames, r.fps) == (64, 16.0)
        for _ in range(10):
            idx = rng.integers(0, 64, size=rng.integers(1, 12)).tolist()
            np.testing.assert_array_equal(r.get_frames(idx).numpy(), reference[idx])
    with VideoReader(tmp_path / "v.mp4") as r:
        r.get_frames([61])
        assert r.frames_decoded <= 16  # from the keyframe before frame 61, not from frame 0


@pytest.fixture()
def bad_list(tmp_path, digits):
    good = read_video_list(digits.train_list)[:4]
    lines = [f"{s.path} {s.label}" for s in good]
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    data = good[0].path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index at the end: unreadable
    with av.open(str(tmp_path / "nostream.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    _noise_video(tmp_path / "long.mp4", 40, faststart=True)
    data = (tmp_path / "long.mp4").read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: int(len(data) * 0.6)])  # decodable beginning
    lines += [
        f"{tmp_path / n} 99"
        for n in ("missing.mp4", "empty.mp4", "garbage.mp4", "cut.mp4", "nostream.mp4")
    ]
    lines.append(f"{tmp_path / 'trunc.mp4'} 50")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt"


def test_bad_videos_are_skipped_and_counted_across_workers(bad_list):
    ds = VideoClipDataset(bad_list, num_frames=8, sampling_rate=4)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=video_collate)
    labels = torch.cat([y for _, y, _ in loader])
    assert len(labels) == len(ds) == 10
    assert 99 not in labels.tolist()  # unreadable files never reach the batch
    c = ds.skipped.as_dict()  # counted inside the workers, read in the main process
    assert (c["bad_missing"], c["bad_empty"], c["bad_corrupt"]) == (1, 2, 2), c
    assert ds.skipped.flagged("missing") == [4]
    assert c["replaced"] >= 5
    # The truncated file is used: sampled again within the frames that do decode.
    trunc = VideoClipDataset(bad_list, num_frames=8, sampling_rate=2, train=False)
    clip, label, vid = trunc[9]
    assert (label, vid) == (50, 9) and clip.shape == (3, 8, 32, 32)
    assert trunc.skipped["truncated"] == 1
    assert len(torch.unique(clip.flatten(2).mean(-1)[0])) == 8  # real, distinct frames
    # Test mode drops the views of a bad video (no other video gets extra views).
    with pytest.warns(UserWarning, match=r"skipping unreadable video \(missing\).*missing\.mp4"):
        assert trunc[4] is None
    assert trunc[4] is None  # known bad: no second attempt, no second warning
    assert trunc.skipped["dropped"] == 2 and trunc.skipped["replaced"] == 0
    assert video_collate([None, trunc[9], None])[2].tolist() == [9]
    assert video_collate([None, None]) is None


def test_each_bad_video_is_named_once_with_its_reason(bad_list, recwarn):
    ds = VideoClipDataset(bad_list, num_frames=8, sampling_rate=4)
    for _ in range(2):  # two epochs: every bad file is met (and replaced) more than once
        for i in range(len(ds)):
            ds[i]
    messages = [str(w.message) for w in recwarn.list]
    expected = {
        "missing": "missing",
        "empty": "empty",
        "garbage": "corrupt",
        "cut": "corrupt",
        "nostream": "empty",
    }
    for name, reason in expected.items():
        named = [m for m in messages if f"{name}.mp4" in m]
        assert named and named[0].startswith(
            f"skipping unreadable video ({reason}) {bad_list.parent / name}.mp4"
        ), messages
        assert len(named) == 1, messages
    assert len(messages) == len(expected)


def test_all_bad_videos_give_a_clear_error(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 1\n")
    ds = VideoClipDataset(tmp_path / "list.txt", max_retries=3)
    with pytest.warns(UserWarning), pytest.raises(UserValueError) as info:
        ds[0]
    assert re.search(
        r"^4 unreadable video\(s\) in a row \(last: .*[ab]\.mp4: no such file", str(info.value)
    )
    assert ds.skipped["replaced"] == 3
    for split in (True, False):
        strict = VideoClipDataset(tmp_path / "list.txt", train=split, strict=True)
        with pytest.raises(UserValueError, match=r"unreadable video \(strict data\): .*a\.mp4"):
            strict[0]


def test_short_videos_are_padded(tmp_path):
    frames = _noise_video(tmp_path / "short.mp4", 5)
    (tmp_path / "l.txt").write_text("short.mp4 1\n")
    ds = VideoClipDataset(tmp_path / "l.txt", num_frames=8, sampling_rate=2)
    clip, label, _ = ds[0]
    assert clip.shape == (3, 8, 32, 32) and label == 1
    # frames 0, 2, 4 then the last frame repeated
    means = clip.mean((0, 2, 3))
    assert torch.allclose(means[2:], means[2].expand(6))
    assert abs(means[0].item() - frames[0].mean() / 255) < 0.05
    assert ds.skipped["padded"] == 1


# ------------------------------------------------------------------ test views and transforms


def test_multi_view_testing(digits):
    tf = VideoTransform(False, crop_size=32, test_short_side=32)
    kw = {
        "train": False,
        "num_frames": 4,
        "sampling_rate": 2,
        "num_clips": 3,
        "num_crops": 3,
        "transform": tf,
    }
    flat = VideoClipDataset(digits.val_list, **kw)
    stacked = VideoClipDataset(digits.val_list, stack_views=True, **kw)
    assert len(flat) == 9 * len(stacked) and flat.views_per_video == 9
    views, label, vid = stacked[1]
    assert views.shape == (9, 3, 4, 32, 32) and vid == 1
    for j in range(9):
        clip, label_j, vid_j = flat[9 + j]
        assert (label_j, vid_j) == (label, 1)
        torch.testing.assert_close(clip, views[j])
    assert not torch.equal(views[0], views[3])  # different temporal clips
    clips, labels, vids = video_collate([stacked[0], stacked[1]])
    assert clips.shape == (18, 3, 4, 32, 32) and vids.tolist() == [0] * 9 + [1] * 9
    assert labels.tolist() == [stacked.samples[0].label] * 9 + [label] * 9


def test_uniform_crop_positions():
    x = torch.arange(2 * 4 * 10).reshape(2, 1, 4, 10)
    assert uniform_crop(x, 4, 0)[0, 0, 0].tolist() == [0, 1, 2, 3]
    assert uniform_crop(x, 4, 1)[0, 0, 0].tolist() == [3, 4, 5, 6]
    assert uniform_crop(x, 4, 2)[0, 0, 0].tolist() == [6, 7, 8, 9]
    tall = x.transpose(-1, -2)
    assert uniform_crop(tall, 4, 2)[0, 0, :, 0].tolist() == [6, 7, 8, 9]


def test_transforms_share_parameters_across_frames():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    clip = frame.repeat(6, 1, 1, 1)
    tf = VideoTransform(True, crop_size=32, randaug=(4, 9), erase_prob=1.0)
    ss = VideoTransform(
        True, crop_size=32, crop="short_side", short_side_range=(32, 40), randaug=(2, 9)
    )
    for t in (tf, ss):
        for _ in range(5):
            out = t(clip)
            assert out.shape == (3, 6, 32, 32) and out.dtype == torch.float32
            assert torch.equal(out, out[:, :1].expand_as(out))  # every frame got the same params


def test_no_flip_for_ssv2_and_normalisation():
    torch.manual_seed(0)
    clip = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    clip[..., :8] = 255  # bright left edge
    keep = VideoTransform(True, crop_size=32, rrc_scale=(1, 1), rrc_ratio=(1, 1), hflip=False)
    flip = VideoTransform(True, crop_size=32, rrc_scale=(1, 1), rrc_ratio=(1, 1), hflip=True)
    lefts = [keep(clip)[0, 0, 0, 0].item() for _ in range(20)]
    assert lefts == [pytest.approx((1 - 0.45) / 0.225)] * 20  # never mirrored, normalised
    flipped = [flip(clip)[0, 0, 0, 0].item() < 0 for _ in range(40)]
    assert 5 < sum(flipped) < 35


def test_repeated_augmentation(digits):
    tf = VideoTransform(True, crop_size=32, crop="rrc", rrc_scale=(0.3, 1.0))
    ds = VideoClipDataset(
        digits.train_list, num_frames=4, sampling_rate=2, transform=tf, num_repeats=3
    )
    clips, label, vid = ds[0]
    assert clips.shape == (3, 3, 4, 32, 32)
    assert not torch.equal(clips[0], clips[1])  # independent augmentations of one clip
    x, y, v = video_collate([ds[0], ds[1]])
    assert x.shape == (6, 3, 4, 32, 32) and y.tolist() == [label] * 3 + [ds.samples[1].label] * 3


def test_segment_sampling_dataset(digits):
    ds = VideoClipDataset(digits.val_list, train=False, num_frames=4, sampling="segment")
    clip, _, _ = ds[0]
    with VideoReader(ds.samples[0].path) as r:
        expected = r.get_frames([2, 6, 10, 14]).permute(3, 0, 1, 2).float() / 255
    torch.testing.assert_close(clip, expected)


def test_default_data_dir_env(monkeypatch, tmp_path, digits):
    from mvitv2.data.common import default_data_dir

    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    assert default_data_dir("moving_digits") == tmp_path / "moving_digits"
    shutil.copytree(digits.root, tmp_path / "moving_digits")
    got = make_moving_digits(**SMALL)  # found in the default place: reused, not rebuilt
    assert got.root == tmp_path / "moving_digits" and got.train_list.is_file()


def test_space_separated_csv_list_as_slowfast_writes_it(tmp_path):
    from mvitv2.data.video import read_video_list

    (tmp_path / "train.csv").write_text("a/x.mp4 3\nb/y.mp4 0\n")
    samples = read_video_list(tmp_path / "train.csv", tmp_path)
    assert [(s.path.name, s.label) for s in samples] == [("x.mp4", 3), ("y.mp4", 0)]
