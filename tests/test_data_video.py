"""Video data: embedded moving digits (and why they need time), seeking decoder, samplers,
list files, tolerant dataset, clip-consistent transforms."""

from __future__ import annotations

import re
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from torchvision import tv_tensors
from torchvision.transforms import v2

from mvitv2.data.moving_digits import (
    DIRECTIONS,
    make_moving_digits,
    render_clip,
    sample_clip_params,
    write_video,
)
from mvitv2.data.video import (
    VideoClipDataset,
    VideoDecodeError,
    VideoReader,
    VideoTransform,
    clip_indices,
    clip_span,
    read_class_names,
    read_video_list,
    segment_indices,
    uniform_crop,
    video_collate,
)
from mvitv2.engine.data import build_loader
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
    """Every clip has the same bytes in every build (x264's default CPU-specific code gave some
    clips other bytes from one build to the next: 4 of 16 clips over 8 builds)."""
    kw = {**SMALL, "num_train_per_class": 1, "num_val_per_class": 1}
    a, *others = [make_moving_digits(tmp_path / name, **kw) for name in "abcde"]
    clips = sorted(p.relative_to(a.root) for p in a.root.rglob("*.mp4"))
    assert len(clips) == 2 * len(a.class_names)
    for other in others:
        assert sorted(p.relative_to(other.root) for p in other.root.rglob("*.mp4")) == clips
        for clip in clips:
            assert (a.root / clip).read_bytes() == (other.root / clip).read_bytes(), clip
    rel = "train/7_left/0000.mp4"
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
    for _ in range(20):  # 8 x 4 spans 32 frames: floor(31 i / 7) after the start
        idx = clip_indices(100, 8, 4)
        assert [i - idx[0] for i in idx] == [0, 4, 8, 13, 17, 22, 26, 31] and idx[-1] < 100
    starts = {clip_indices(100, 8, 4)[0] for _ in range(200)}
    assert min(starts) == 0 and max(starts) == 100 - 32 and len(starts) > 30
    test = [clip_indices(100, 8, 4, clip_idx=k, num_clips=5) for k in range(5)]
    assert [c[0] for c in test] == [0, 17, 34, 51, 68]  # k * floor(68 / 4)
    assert test[-1][-1] == 99
    assert clip_indices(100, 8, 4, clip_idx=0, num_clips=1)[0] == (100 - 32) // 2  # centre clip
    assert clip_indices(10, 8, 2, clip_idx=0) == [0, 2, 4, 6, 8, 9, 9, 9]  # padded: last frame
    assert clip_indices(10, 8, 2, clip_idx=0, pad="loop") == [0, 2, 4, 6, 8, 0, 2, 5]


def test_segment_indices():
    """PySlowFast's SSv2 frames by hand: 100 frames in 8 segments of 99 / 8 = 12.375 frames,
    bounds round(12.375 i) = 0, 12, 25, 37, 50 (49.5 to even), 62, 74, 87, 99."""
    bounds = [0, 12, 25, 37, 50, 62, 74, 87, 99]
    torch.manual_seed(0)
    for _ in range(20):
        idx = segment_indices(100, 8, train=True)
        assert all(bounds[i] <= idx[i] <= bounds[i + 1] for i in range(8))
    assert segment_indices(100, 8, train=False) == [6, 18, 31, 43, 56, 68, 80, 93]
    # 30 frames, 8 segments of 29 / 8 = 3.625: bounds 0, 4, 7, 11, 14 (14.5 to even), 18, 22, 25, 29
    assert segment_indices(30, 8, train=False) == [2, 5, 9, 12, 16, 20, 23, 27]
    # 5 frames, 8 segments of 0.5: bounds 0, 0, 1, 2, 2, 2, 3, 4, 4 (halves to even)
    assert segment_indices(5, 8, train=False) == [0, 0, 1, 2, 2, 2, 3, 4]


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


def test_read_video_list_edge_cases(tmp_path):
    # a space-separated .csv whose path has spaces; an absolute path stays as it is
    (tmp_path / "s.csv").write_text("a dir/b c.mp4 3\n/abs/x.mp4 1\n")
    got = [(str(x.path), x.label) for x in read_video_list(tmp_path / "s.csv", "/root")]
    assert got == [("/root/a dir/b c.mp4", 3), ("/abs/x.mp4", 1)]
    (tmp_path / "e.csv").write_text("a.mp4,1\n,3\n")
    with pytest.raises(
        UserValueError,
        match=re.escape("e.csv:2: expected '<path> <label>' or <path>,<label>, got ',3'"),
    ):
        read_video_list(tmp_path / "e.csv")
    (tmp_path / "e.txt").write_text("a.mp4 1\njustapath\n")
    with pytest.raises(
        UserValueError, match=re.escape("e.txt:2: expected '<path> <label>', got 'justapath'")
    ):
        read_video_list(tmp_path / "e.txt")
    (tmp_path / "h.csv").write_text("path,label\na.mp4,1\nb.mp4,dog\n")  # only line 1 is a header
    with pytest.raises(UserValueError, match=r"h\.csv:3: label 'dog' is not an integer"):
        read_video_list(tmp_path / "h.csv")
    (tmp_path / "h.txt").write_text("path label\na.mp4 1\n")  # no header in a .txt list
    with pytest.raises(UserValueError, match=r"h\.txt:1: label 'label' is not an integer"):
        read_video_list(tmp_path / "h.txt")
    (tmp_path / "crlf.csv").write_bytes(b"path,label\r\na.mp4,1\r\n")
    assert [(x.path.name, x.label) for x in read_video_list(tmp_path / "crlf.csv")] == [
        ("a.mp4", 1)
    ]


def test_frame_rates_must_be_positive():
    assert clip_span(10, 2, 0.5, 1) == 10.0 and clip_span(10, 2, 30, 0.5) == 1200.0
    for fps, target in ((0, 30), (30, 0), (-25, 30)):
        with pytest.raises(ValueError, match=r"frame rates must be > 0"):
            clip_indices(10, 2, 1, fps=fps, target_fps=target)


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
    # A keyframe every 8 frames: frame 61 decodes 56..61 only; 5 and 61 (more than seek_gap
    # apart) seek twice: 0..5 and 56..61; a keyframe alone decodes one frame.
    for idx, decoded in (([61], 6), ([5, 61], 12), ([56], 1)):
        with VideoReader(tmp_path / "v.mp4") as r:
            r.get_frames(idx)
            assert (r.frames_decoded, r.truncated) == (decoded, False)


@pytest.mark.parametrize("kind", ["mp4", "mkv", "ts", "live.mkv"])
def test_reader_counts_frames_in_every_container(tmp_path, kind):
    """The frame count comes from the last packets (mp4, mkv, a streamed mkv without any
    duration) or from the stream duration (ts, whose seek to the end lands past its last
    keyframe)."""
    levels = (16 + 8 * np.arange(20)).astype(np.uint8)  # frame i: flat grey 16 + 8 i
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (20, 32, 48, 3)))
    path = tmp_path / f"v.{kind}"
    if kind == "live.mkv":  # Matroska written for streaming: no duration anywhere
        with av.open(str(path), "w", options={"live": "1"}) as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
            for f in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            c.mux(s.encode())
        with av.open(str(path)) as c:
            assert not (c.streams.video[0].frames or c.streams.video[0].duration or c.duration)
    else:
        write_video(path, frames, fps=25, crf=0, gop=4)
    with VideoReader(path) as r:
        assert (r.num_frames, r.fps) == (20, 25.0)
        for idx in (list(range(20)), [19, 3, 11, 11, 0]):
            got = r.get_frames(idx).float().mean((1, 2, 3))
            assert ((got - 16) / 8).round().int().tolist() == idx
        assert not r.truncated


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


def _next_good(i: int, bad: set[int], n: int) -> int:
    """The item that stands in for item ``i`` in training: the next readable one."""
    while i in bad:
        i = (i + 1) % n
    return i


def test_bad_videos_are_skipped_and_counted_across_workers(bad_list):
    # items 4-8 are unreadable (missing, empty, garbage, cut, no stream); 9 is truncated
    ds = VideoClipDataset(bad_list, num_frames=8, sampling_rate=4)
    labels = [s.label for s in ds.samples]
    loader = build_loader(ds, batch_size=5, train=True, workers=2, collate_fn=video_collate)
    loader.sampler.set_epoch(0)
    order = [i for i, _ in loader.sampler]
    batches = list(loader)
    # full batches: each bad video's item is taken by the next readable one
    assert [len(y) for _, y, _ in batches] == [5, 5]
    bad = set(range(4, 9))
    want = [_next_good(i, bad, 10) for i in order]
    assert torch.cat([v for _, _, v in batches]).tolist() == want
    assert torch.cat([y for _, y, _ in batches]).tolist() == [labels[i] for i in want]
    # item 4 meets 5 bad files before 9, item 5 meets 4, ...: 5 + 4 + 3 + 2 + 1 skips
    assert loader.dataset.skipped == sum(9 - i for i in order if i in bad) == 15
    c = ds.skipped.as_dict()  # counted inside the workers, read in the main process
    assert (c["bad_missing"], c["bad_empty"], c["bad_corrupt"]) == (1, 2, 2), c
    assert ds.skipped.flagged("missing") == [4] and ds.skipped.flagged("empty") == [5, 8]
    assert ds.skipped.flagged("corrupt") == [6, 7]
    # The truncated file is used: sampled again within the frames that do decode.
    trunc = VideoClipDataset(bad_list, num_frames=8, sampling_rate=2, train=False)
    clip, label, vid = trunc[9]
    assert (label, vid) == (50, 9) and clip.shape == (3, 8, 32, 32)
    assert trunc.skipped["truncated"] == 1
    assert len(torch.unique(clip.flatten(2).mean(-1)[0])) == 8  # real, distinct frames
    # Test mode drops the views of a bad video (no other video gets extra views).
    test = VideoClipDataset(bad_list, num_frames=8, sampling_rate=2, train=False, num_clips=2)
    loader = build_loader(test, batch_size=4, train=False, workers=2, collate_fn=video_collate)
    vids = torch.cat([v for _, _, v in filter(None, loader)]).tolist()
    assert vids == [v for v in range(10) if v not in bad for _ in range(2)]
    assert loader.dataset.skipped == 5 * 2  # 5 bad videos x 2 views
    assert test.skipped.as_dict()["bad_missing"] == 1


def test_each_bad_video_is_named_once_with_its_reason(bad_list):
    ds = VideoClipDataset(bad_list, num_frames=8, sampling_rate=4)
    loader = build_loader(ds, batch_size=5, train=True, workers=1, collate_fn=video_collate)
    named = []
    for epoch in range(2):  # two epochs: every bad file is met (and replaced) more than once
        loader.sampler.set_epoch(epoch)
        list(loader)
        named += loader.dataset.take_new_bad()
    assert loader.dataset.skipped == 2 * 15
    cannot_open = "cannot open video (Invalid data found when processing input)"
    folder = bad_list.parent
    assert sorted(named) == sorted(
        [
            (str(folder / "missing.mp4"), "no such file"),
            (str(folder / "empty.mp4"), "zero-length file"),
            (str(folder / "garbage.mp4"), cannot_open),
            (str(folder / "cut.mp4"), cannot_open),
            (str(folder / "nostream.mp4"), "no video stream"),
        ]
    )
    # at test time a bad video is several items (views), and still named once
    test = VideoClipDataset(bad_list, num_frames=4, sampling_rate=2, train=False, num_clips=3)
    loader = build_loader(test, batch_size=6, train=False, collate_fn=video_collate)
    list(loader)
    assert loader.dataset.skipped == 5 * 3
    assert sorted(loader.dataset.take_new_bad()) == sorted(named)


def test_all_bad_videos_give_a_clear_error(tmp_path):
    (tmp_path / "list.txt").write_text("a.mp4 0\nb.mp4 1\n")
    ds = VideoClipDataset(tmp_path / "list.txt")
    loader = build_loader(ds, batch_size=1, train=True, seed=3)
    first = next(i for i, _ in loader.sampler)
    last = tmp_path / "ab"[1 - first]  # the other video: each of the 2 is tried once
    with pytest.raises(UserValueError) as e:
        list(loader)
    assert str(e.value) == (
        f"2 unreadable videos in a row from index {first}, the last {last}.mp4: no such file; "
        "the data looks broken: check that the data root and the list or annotation file point "
        "at existing, readable files"
    )
    assert ds.skipped.as_dict()["bad_missing"] == 2
    # evaluation has nothing to score: every batch empty, every view counted
    test = build_loader(
        VideoClipDataset(tmp_path / "list.txt", train=False, num_clips=2),
        batch_size=2,
        train=False,
        collate_fn=video_collate,
    )
    assert list(test) == [None, None] and test.dataset.skipped == 4
    for split in (True, False):
        strict = build_loader(ds, batch_size=1, train=split, strict=True)
        with pytest.raises(UserValueError, match=r"^unreadable video \(strict data\): .*[ab]\.mp4"):
            list(strict)


def _coded_video(path, n, fps=25, step=5, w=48, **kw):
    """Frame i is flat grey 16 + step * i (its index survives the codec); returns the path."""
    levels = (16 + step * np.arange(n)).astype(np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (n, 32, w, 3)))
    write_video(path, frames, fps=fps, crf=0, **kw)
    return path


def _ids(frames, step=5):
    """Frame indices of uint8 (T, H, W, 3) frames or of a [0, 1] clip (C, T, H, W)."""
    levels = frames.float().mean((1, 2, 3)) if frames.dtype == torch.uint8 else None
    if levels is None:
        levels = frames.mean((0, 2, 3)) * 255
    return ((levels - 16) / step).round().int().tolist()


def test_reader_errors_and_seek_groups(tmp_path):
    _noise_video(tmp_path / "v.mp4", 64, gop=8)
    with av.open(str(tmp_path / "v.mp4")) as c:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(tmp_path / "v.mp4")) as c:  # keyframes, as frame indices (16 fps)
        s = c.streams.video[0]
        keys = [round(float(p.pts * s.time_base) * 16) for p in c.demux(s) if p.is_keyframe]
    with VideoReader(tmp_path / "v.mp4") as r:
        with pytest.raises(ValueError, match="no frame indices requested"):
            r.get_frames([])
        for bad in ([64], [-1, 3], [3, 70]):
            with pytest.raises(IndexError, match=r"v\.mp4: frame indices must be in \[0, 64\)"):
                r.get_frames(bad)
    # Frames up to seek_gap (32) apart are decoded through; a longer gap seeks again, to the
    # keyframe at or before the next wanted frame.
    for groups in ([[5, 6], [61]], [[0, 32]], [[0], [33]], [[0], [63]], [[20, 40, 63]]):
        idx = [i for g in groups for i in g][::-1]
        decoded = sum(g[-1] - max(k for k in keys if k <= g[0]) + 1 for g in groups)
        with VideoReader(tmp_path / "v.mp4") as r:
            np.testing.assert_array_equal(r.get_frames(idx).numpy(), reference[idx])
            assert r.frames_decoded == decoded, (groups, keys)


def test_reader_decodes_a_truncated_file_up_to_its_end(tmp_path):
    """A file cut short (header promises 40 frames): the frames that decode come back exactly,
    later ones repeat the last decodable frame, and the reader lowers its frame count."""
    n = 40
    levels = (16 + 5 * np.arange(n)).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (n, 32, 48, 3)).copy()
    frames[:, :8, :8] = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    write_video(tmp_path / "full.mp4", frames, fps=25, crf=0, gop=8, faststart=True)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    good = 0  # the reference: plain sequential decoding until the first error
    with av.open(str(tmp_path / "cut.mp4")) as c:
        assert c.streams.video[0].frames == n
        try:
            for _ in c.decode(video=0):
                good += 1
        except av.FFmpegError:
            pass
    assert 8 < good < n - 8

    def ids(x):
        return ((x[:, 16:, 16:].float().mean((1, 2, 3)) - 16) / 5).round().int().tolist()

    with VideoReader(tmp_path / "cut.mp4") as r:
        assert r.num_frames == n and not r.truncated
        got = ids(r.get_frames([0, 5, good - 1, good + 3, n - 1, 2]))
        assert got == [0, 5, good - 1, good - 1, good - 1, 2]
        assert r.truncated and r.num_frames == good
    with VideoReader(tmp_path / "cut.mp4") as r:  # nothing wanted decodes: the last frame
        assert ids(r.get_frames([good + 1, n - 1])) == [good - 1, good - 1]
        assert r.truncated and r.num_frames == good
    # The dataset samples again inside the decodable frames (here at 30 fps).
    (tmp_path / "l.txt").write_text("cut.mp4 0\n")
    ds = VideoClipDataset(
        tmp_path / "l.txt",
        train=False,
        num_frames=3,
        sampling_rate=2,
        num_clips=2,
        target_fps=30,
        stack_views=True,
    )
    clips, _, _ = ds[0]
    for k in range(2):
        want = clip_indices(good, 3, 2, clip_idx=k, num_clips=2, fps=25, target_fps=30)
        assert ids(clips[k].permute(1, 2, 3, 0).mul(255).round().to(torch.uint8)) == want
    assert ds.skipped["truncated"] == 1


def test_reader_skips_audio_and_starts_at_the_first_frame(tmp_path):
    """Kinetics files carry audio, and streams may start late: frame 0 is the first video frame."""
    n = 12
    levels = (16 + 8 * np.arange(n)).astype(np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (n, 32, 48, 3)))
    with av.open(str(tmp_path / "av.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 48, 32, "yuv420p", {"crf": "0", "g": "4"}
        audio = c.add_stream("aac", rate=8000)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = i + 5, Fraction(1, 25)  # starts at 0.2 s
            c.mux(s.encode(frame))
        c.mux(s.encode())
        for j in range(8):
            a = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            a.sample_rate, a.pts = 8000, j * 1024
            c.mux(audio.encode(a))
        c.mux(audio.encode())
    with VideoReader(tmp_path / "av.mp4") as r:
        assert (r.num_frames, r.fps) == (n, 25.0) and r.start_pts > 0
        assert _ids(r.get_frames(list(range(n))), 8) == list(range(n))
        assert _ids(r.get_frames([9, 2]), 8) == [9, 2]


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


def test_padding_and_padded_counts(tmp_path):
    """A clip of 4 frames x 3 spans 12 frames (SlowFast's clip size) and takes frames
    floor(11 i / 3) = 0, 3, 7, 11: a 12-frame video is not padded, an 11-frame one is, at its own
    rate (25 fps); at 30 fps the clip spans 10 frames of the 25 fps file, and neither is."""
    for n in (11, 12):
        _coded_video(tmp_path / f"v{n}.mp4", n)
    (tmp_path / "l.txt").write_text("v11.mp4 0\nv12.mp4 1\n")
    kw = {"num_frames": 4, "sampling_rate": 3, "train": False, "num_clips": 3, "stack_views": True}
    ds = VideoClipDataset(tmp_path / "l.txt", **kw)
    clips, _, _ = ds[1]
    assert [_ids(c) for c in clips] == [[0, 3, 7, 11]] * 3 and ds.skipped["padded"] == 0
    clips, _, _ = ds[0]
    assert [_ids(c) for c in clips] == [[0, 3, 7, 10]] * 3 and ds.skipped["padded"] == 3
    loop = VideoClipDataset(tmp_path / "l.txt", pad="loop", **kw)
    assert [_ids(c) for c in loop[0][0]] == [[0, 3, 7, 0]] * 3
    fps30 = VideoClipDataset(tmp_path / "l.txt", target_fps=30, **kw)
    clips, _, _ = fps30[0]  # slack 1: every clip starts at k * floor(1 / 2) = 0
    assert [_ids(c) for c in clips] == [[0, 3, 6, 9]] * 3 and fps30.skipped["padded"] == 0
    clips, _, _ = fps30[1]  # slack 2: clips start at 0, 1, 2
    assert [_ids(c) for c in clips] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert fps30.skipped["padded"] == 0
    native = VideoClipDataset(tmp_path / "l.txt", **{**kw, "sampling_rate": 4})
    native[1]  # 12 frames, span 16: padded
    assert native.skipped["padded"] == 3
    with pytest.raises(ValueError, match="unknown pad mode 'mirror'; expected 'last' or 'loop'"):
        clip_indices(10, 4, 3, pad="mirror")


def test_dataset_options(tmp_path):
    _coded_video(tmp_path / "v.mp4", 80, step=3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "l.txt").write_text("v.mp4 2\n")
    with pytest.raises(VideoDecodeError) as e:  # relative to the list's folder: not in sub/
        VideoClipDataset(tmp_path / "sub" / "l.txt", train=False)[0]
    assert (e.value.path, e.value.reason, e.value.kind) == (
        str(tmp_path / "sub" / "v.mp4"),
        "no such file",
        "missing",
    )
    ds = VideoClipDataset(tmp_path / "sub" / "l.txt", tmp_path, train=False)  # video root
    clip, label, vid = ds[0]
    # defaults: 16 frames spread over 64 (floor(4.2 i)), the centre clip: start (80 - 64) // 2
    steps = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63]
    assert (label, vid) == (2, 0) and _ids(clip, 3) == [8 + i for i in steps]
    assert ds.skipped.as_dict() == dict.fromkeys(VideoClipDataset.SKIP_KEYS, 0)
    # training: one clip, one crop, whatever the test options; testing: no repeats
    train = VideoClipDataset(
        tmp_path / "sub" / "l.txt",
        tmp_path,
        num_clips=5,
        num_crops=3,
        num_frames=4,
        stack_views=True,
    )
    assert len(train) == 1 and train[0][0].shape == (3, 4, 32, 48)
    test = VideoClipDataset(
        tmp_path / "sub" / "l.txt", tmp_path, train=False, num_repeats=3, num_frames=4
    )
    assert test[0][0].shape == (3, 4, 32, 48)
    # segment sampling draws a random frame of each segment in training, the middle in testing:
    # 80 frames in 4 segments of 79 / 4 = 19.75, bounds 0, 20, 40 (39.5 to even), 59, 79
    seg = {
        tr: VideoClipDataset(
            tmp_path / "sub" / "l.txt", tmp_path, sampling="segment", num_frames=4, train=tr
        )
        for tr in (True, False)
    }
    assert _ids(seg[False][0][0], 3) == [10, 30, 49, 69]
    bounds = [0, 20, 40, 59, 79]
    drawn = {tuple(_ids(seg[True][0][0], 3)) for _ in range(6)}
    assert len(drawn) > 1 and all(
        bounds[i] <= f <= bounds[i + 1] for d in drawn for i, f in enumerate(d)
    )
    for kw, message in (
        (
            {"sampling": "dense"},
            "unknown sampling 'dense'; expected 'clip', 'resampled' or 'segment'",
        ),
        ({"num_crops": 2}, "num_crops must be 1 or 3, got 2"),
        ({"pad": "mirror"}, "unknown pad mode 'mirror'; expected 'last' or 'loop'"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            VideoClipDataset(tmp_path / "sub" / "l.txt", **kw)
    VideoClipDataset(tmp_path / "sub" / "l.txt", pad="loop")


def test_samplers_follow_their_generator():
    for draw in (
        lambda g: clip_indices(100, 4, 4, generator=g),
        lambda g: segment_indices(100, 4, train=True, generator=g),
    ):
        runs = []
        for seed in (1, 2):
            torch.manual_seed(seed)  # the global RNG plays no part
            g = torch.Generator().manual_seed(7)
            runs.append([draw(g) for _ in range(5)])
        assert runs[0] == runs[1] and len({tuple(x) for x in runs[0]}) > 1
        assert all(type(i) is int for x in runs[0] for i in x)
    assert all(type(i) is int for i in segment_indices(7, 3, train=False))
    assert all(type(i) is int for i in clip_indices(30, 4, 2, fps=25, target_fps=30))


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
    # half a pixel of slack rounds up, as SlowFast's offsets ceil((side - size) / 2)
    odd = torch.arange(7 * 10).reshape(1, 1, 7, 10)
    assert uniform_crop(odd, 5, 1)[0, 0, 0].tolist() == [13, 14, 15, 16, 17]  # row 1, from 3
    assert uniform_crop(odd, 4, 1)[0, 0, :, 0].tolist() == [23, 33, 43, 53]  # rows 2-5, col 3


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


def _pipeline(crop: list, *, randaug=None, erase=0.0, hflip=True) -> v2.Compose:
    """The training transform of a Kinetics recipe, written directly with torchvision: crop,
    flip, RandAugment (bilinear, grey 128 fill as SlowFast's), to float, normalise with
    0.45 / 0.225, random erasing to 0."""
    ops = [*crop, *([v2.RandomHorizontalFlip()] if hflip else [])]
    bilinear = v2.InterpolationMode.BILINEAR
    ra = v2.RandAugment(*randaug, interpolation=bilinear, fill=128) if randaug else None
    ops += [ra] if ra else []
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.45] * 3, [0.225] * 3)]
    return v2.Compose(ops + ([v2.RandomErasing(p=erase)] if erase else []))


@pytest.mark.parametrize("kind", ["rrc", "short_side"])
def test_training_transform_is_the_recipe_pipeline(kind):
    """Same seed, same clip: the same output as the pipeline written with torchvision."""
    clip = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    if kind == "rrc":
        kw = {"rrc_scale": (0.2, 0.9), "rrc_ratio": (0.5, 2.0)}
        crop = [v2.RandomResizedCrop(32, scale=(0.2, 0.9), ratio=(0.5, 2.0))]
    else:
        kw = {"short_side_range": (34, 48)}
        crop = [v2.RandomShortestSize(list(range(34, 49))), v2.RandomCrop(32)]
    for randaug, erase, hflip in (((3, 5), 1.0, True), ((1, 12), 0.5, False), (None, 0.0, True)):
        ours = VideoTransform(
            True, crop_size=32, crop=kind, randaug=randaug, erase_prob=erase, hflip=hflip, **kw
        )
        ref = _pipeline(crop, randaug=randaug, erase=erase, hflip=hflip)
        for seed in range(4):
            torch.manual_seed(seed)
            got = ours(clip)
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            want = ref(tv_tensors.Video(clip)).permute(1, 0, 2, 3)
            torch.testing.assert_close(got, want.as_subclass(torch.Tensor), rtol=0, atol=0)
            assert torch.equal(state, torch.get_rng_state())  # the same draws: same later ones


def test_training_crops_are_windows_of_the_right_size():
    """RRC at a fixed area and square aspect, and a short side fixed at 40, give exact windows
    (no resampling) of the frame or of the frame resized to short side 40; a short side below
    the crop pads with zeros (pixel 0 -> (0 - 0.45) / 0.225)."""
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    clip = frame.expand(2, -1, -1, -1)

    def windows(img: torch.Tensor, size: int) -> list[torch.Tensor]:
        h, w = img.shape[-2:]
        return [
            img[..., t : t + size, x : x + size]
            for t in range(h - size + 1)
            for x in range(w - size + 1)
        ]

    def pixels(out: torch.Tensor) -> torch.Tensor:  # (C, T, H, W) normalised -> uint8 frame
        return (out[:, 0] * 0.225 + 0.45).mul(255).round().to(torch.uint8)

    rrc = VideoTransform(
        True, crop_size=32, rrc_scale=(0.25, 0.25), rrc_ratio=(1.0, 1.0), hflip=False
    )
    wins = windows(frame[0], 32)
    for _ in range(5):
        got = pixels(rrc(clip))
        assert any(torch.equal(got, w) for w in wins)
    short = VideoTransform(
        True, crop_size=32, crop="short_side", short_side_range=(40, 40), hflip=False
    )
    wins = windows(v2.functional.resize(frame[0], 40, antialias=True), 32)
    for _ in range(5):
        got = pixels(short(clip))
        assert any(torch.equal(got, w) for w in wins)
    pad = VideoTransform(
        True, crop_size=32, crop="short_side", short_side_range=(24, 24), hflip=False
    )
    out = pad(clip)
    assert out.shape == (3, 2, 32, 32)
    zero = (0 - 0.45) / 0.225
    assert (out == zero).float().mean() >= 1 - 24 * 24 / 32**2 - 1e-6  # the padding
    with pytest.raises(ValueError, match="unknown crop 'centre'; expected 'rrc' or 'short_side'"):
        VideoTransform(True, crop="centre")


def test_transform_defaults():
    """Defaults: a 224 crop; test short side 256 (crop x 256 / 224); flips on, no erasing."""
    torch.manual_seed(0)
    clip = torch.full((2, 3, 240, 320), 77, dtype=torch.uint8)
    clip[..., :160] = 200  # left half bright
    test = VideoTransform(False)
    assert test.test_short_side == 256 and VideoTransform(False, crop_size=32).test_short_side == 37
    assert test(clip).shape == (3, 2, 224, 224)
    train = VideoTransform(True, rrc_scale=(1.0, 1.0), rrc_ratio=(4 / 3, 4 / 3))
    level = {v: (v / 255 - 0.45) / 0.225 for v in (77, 200)}
    lefts = []
    for _ in range(20):
        out = train(clip)
        assert out.shape == (3, 2, 224, 224)
        away = torch.cat([out[..., :100], out[..., 124:]], -1)  # from the blended middle
        near = [(away - v).abs() < 1e-5 for v in level.values()]
        assert bool((near[0] | near[1]).all())  # nothing erased
        lefts.append(out[0, 0, 0, 0].item() == pytest.approx(level[200]))
    assert 3 <= sum(lefts) <= 17  # flipped about half of the time


def test_test_transform_never_augments():
    clip = torch.randint(0, 256, (2, 3, 36, 48), dtype=torch.uint8)
    tf = VideoTransform(False, crop_size=32, test_short_side=32, randaug=(4, 9), erase_prob=1.0)
    normed = (clip.float() / 255 - 0.45) / 0.225  # as SlowFast's test: normalise, then
    resized = torch.nn.functional.interpolate(normed, size=(32, 42), mode="bilinear")  # 48*32/36
    expected = resized[..., 5:37].permute(1, 0, 2, 3)  # centre 32 crop
    for _ in range(3):
        torch.testing.assert_close(tf(clip), expected)


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


def test_repeated_augmentation_is_training_only(digits):
    """A test-time dataset asked for 3 repeats keeps one copy per view: ``num_repeats`` is 1 and
    an item is one (C, T, H, W) clip."""
    ds = VideoClipDataset(digits.val_list, train=False, num_frames=4, num_repeats=3)
    clip, _, _ = ds[0]
    assert ds.num_repeats == 1 and clip.dim() == 4


def test_segment_sampling_dataset(digits):
    ds = VideoClipDataset(digits.val_list, train=False, num_frames=4, sampling="segment")
    clip, _, _ = ds[0]
    with VideoReader(ds.samples[0].path) as r:
        assert (
            r.num_frames == 16
        )  # 4 segments of 15 / 4 = 3.75: bounds 0, 4, 8 (7.5 to even), 11, 15
        expected = r.get_frames([2, 6, 9, 13]).permute(3, 0, 1, 2).float() / 255
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


def test_a_bad_video_is_a_bad_sample_and_strict_data_is_one_line_in_workers_too(bad_list):
    from mvitv2.data.common import BadSample, StrictDataError

    folder = bad_list.parent
    with pytest.raises(BadSample) as e:
        VideoReader(folder / "empty.mp4")
    assert (e.value.path, e.value.reason, e.value.kind) == (
        str(folder / "empty.mp4"),
        "zero-length file",
        "empty",
    )
    # list items 4, 5: missing.mp4, empty.mp4
    for workers in (0, 1):
        subset = torch.utils.data.Subset(VideoClipDataset(bad_list, train=False), [4])
        loader = build_loader(
            subset,
            batch_size=1,
            train=False,
            strict=True,
            workers=workers,
            collate_fn=video_collate,
        )
        with pytest.raises(StrictDataError) as e:
            list(loader)
        assert str(e.value) == (
            f"unreadable video (strict data): {folder / 'missing.mp4'}: no such file; without "
            "strict_data such videos are skipped and counted"
        )
