"""Which frames and pixels a video model sees, by value: clip and segment sampling (with target
fps), test views, spatial crops and normalisation, in the data layer and in the Predictor, each
checked against a naive reference written here (SlowFast's clip arithmetic in exact fractions,
plain slicing), and test clips against PySlowFast's own decoder functions (tests/data)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mvitv2.data.moving_digits import write_video
from mvitv2.data.video import (
    VideoClipDataset,
    VideoReader,
    VideoTransform,
    clip_indices,
    clip_span,
    segment_indices,
    uniform_crop,
)
from mvitv2.predict import Predictor
from mvitv2.tasks.video import VideoDataConfig

MEAN, STD = 0.45, 0.225  # the video task's normalisation (Kinetics), the same for R, G and B


# ----------------------------------------------------------------------------- references
def ref_clip(
    n_src: int,
    fps: float,
    num_frames: int,
    rate: int,
    target_fps: float | None,
    *,
    k: int = 0,
    num_clips: int = 1,
    start: int | None = None,
    pad: str = "last",
) -> list[int]:
    """PySlowFast's Kinetics clip in exact arithmetic: a clip spans ``c = num_frames * rate``
    frames at ``target_fps``, ``c * fps / target_fps`` frames of the file (at least 1); test clip
    ``k`` of ``K`` starts at ``k * floor((n - c) / (K - 1))`` (one clip: ``floor((n - c) / 2)``);
    frame ``i`` of a clip is ``start + floor(i * (c - 1) / (num_frames - 1))``."""
    c = Fraction(num_frames * rate)
    if target_fps is not None:
        c *= Fraction(fps).limit_denominator(10**6) / Fraction(target_fps).limit_denominator(10**6)
    c = max(c, 1)
    slack = max(n_src - c, 0)
    if start is None:
        each = slack / 2 if num_clips == 1 else slack / (num_clips - 1)
        start = math.floor(each) * (1 if num_clips == 1 else k)
    out = []
    for i in range(num_frames):
        pos = start + (math.floor(i * (c - 1) / (num_frames - 1)) if num_frames > 1 else 0)
        out.append(min(pos, n_src - 1) if pad == "last" else pos % n_src)
    return out


def ref_slack(n_src: int, fps: float, num_frames: int, rate: int, target: float | None) -> int:
    """The last start of a training clip: ``floor(n - c)`` (see :func:`ref_clip`)."""
    c = Fraction(num_frames * rate)
    if target is not None:
        c *= Fraction(fps).limit_denominator(10**6) / Fraction(target).limit_denominator(10**6)
    return max(math.floor(n_src - c), 0)


def ref_segments(n: int, num_frames: int) -> list[tuple[int, int]]:
    """PySlowFast's SSv2 segments (``Ssv2.get_seq_frames``, slowfast/datasets/ssv2.py), as
    written there: each segment's first and last frame, both included."""
    seg_size = float(n - 1) / num_frames
    return [
        (int(np.round(seg_size * i)), int(np.round(seg_size * (i + 1)))) for i in range(num_frames)
    ]


def ref_crop(x: torch.Tensor, size: int, idx: int) -> torch.Tensor:
    """PySlowFast's ``uniform_crop`` (slowfast/datasets/transform.py at 287ec00), as written
    there: centre offsets ``ceil((side - size) / 2)``, start/end along the longer side."""
    height, width = x.shape[-2:]
    y_offset = int(math.ceil((height - size) / 2))
    x_offset = int(math.ceil((width - size) / 2))
    if height > width:
        if idx == 0:
            y_offset = 0
        elif idx == 2:
            y_offset = height - size
    else:
        if idx == 0:
            x_offset = 0
        elif idx == 2:
            x_offset = width - size
    return x[..., y_offset : y_offset + size, x_offset : x_offset + size]


# ----------------------------------------------------------------------------- index videos
LEVEL0, STEP = 16, 4  # frame i is flat grey 16 + 4 i: its index survives the codec


def index_video(path: Path, n: int, fps: int, h: int = 32, w: int = 48) -> Path:
    levels = (LEVEL0 + STEP * np.arange(n)).astype(np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)))
    write_video(path, frames, fps=fps, crf=0)
    return path


def frame_ids(levels: torch.Tensor) -> list[int]:
    """Frame indices from grey levels in 0..255."""
    ids = ((levels - LEVEL0) / STEP).round()
    assert (ids * STEP + LEVEL0 - levels).abs().max() < 1.5  # really one of the coded levels
    return ids.int().tolist()


def ids_of_clip(clip: torch.Tensor) -> list[int]:
    """Frame indices of a [0, 1] float clip (C, T, H, W)."""
    return frame_ids(clip.mean((0, 2, 3)) * 255)


def ids_of_view(view: torch.Tensor) -> list[int]:
    """Frame indices of a normalised view (C, T, H, W): undo the normalisation by hand."""
    return frame_ids((view.mean((0, 2, 3)) * STD + MEAN) * 255)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two seconds of video at 25 and at 15 fps (50 and 30 frames), frames coded by index."""
    root = tmp_path_factory.mktemp("fps")
    return {fps: index_video(root / f"v{fps}.mp4", 2 * fps, fps) for fps in (25, 15)}


# ----------------------------------------------------------------------------- samplers
RATES = [(25, 30), (15, 30), (30, 30), (30000 / 1001, 30), (30, 7.5), (24, None)]


def test_clip_indices_match_slowfasts_arithmetic_in_exact_fractions():
    for fps, target in RATES:
        for n_src in (1, 2, 5, 12, 13, 29, 50, 61, 64, 65, 100):
            for num_frames, rate in ((1, 1), (4, 1), (4, 4), (8, 2), (3, 5), (16, 4)):
                for pad in ("last", "loop"):
                    kw = {"fps": fps, "target_fps": target, "pad": pad}
                    for num_clips in (1, 2, 3, 5):
                        for k in range(num_clips):
                            got = clip_indices(
                                n_src, num_frames, rate, clip_idx=k, num_clips=num_clips, **kw
                            )
                            want = ref_clip(
                                n_src,
                                fps,
                                num_frames,
                                rate,
                                target,
                                k=k,
                                num_clips=num_clips,
                                pad=pad,
                            )
                            assert got == want, (fps, target, n_src, num_frames, rate, pad, k)


def test_test_clips_are_the_frames_pyslowfasts_decoder_takes():
    """1,152 cases (clip shapes 16x4, 32x3, 40x3, 8x8, 8x4, 3x2; 30, 25, 29.97 and 15 fps files
    of 10-301 frames; 1 and 5 clips) computed by PySlowFast's own ``get_multiple_start_end_idx``,
    ``get_start_end_idx`` and ``temporal_sampling`` (see the file's ``made_by``). In two of them
    (8x4 at 25 fps, 67 and 69 frames, the last clip) ``floor(start + x)`` in float32 falls one
    frame short of SlowFast's ``start + floor(x)``."""
    import json

    table = json.loads((Path(__file__).parent / "data" / "slowfast_test_clips.json").read_text())
    assert len(table["cases"]) == 1152
    for c in table["cases"]:
        got = clip_indices(
            c["frames"], c["num_frames"], c["rate"], clip_idx=c["clip"], num_clips=c["clips"],
            fps=c["fps"], target_fps=table["target_fps"],
        )  # fmt: skip
        assert got == c["indices"], c


def test_clip_indices_without_a_rate_count_frames_of_the_file():
    # 16x4 at 30 fps: 64 frames spanned, floor(4.2 i) apart, as SlowFast's float32 linspace
    steps = [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63]
    assert clip_indices(300, 16, 4, clip_idx=0) == [118 + s for s in steps]  # (300 - 64) // 2
    assert clip_indices(100, 8, 4, clip_idx=0) == [34, 38, 42, 47, 51, 56, 60, 65]  # 4.43 apart
    assert clip_indices(100, 8, 4, clip_idx=0, fps=25) == clip_indices(100, 8, 4, clip_idx=0)
    assert clip_indices(10, 8, 2, clip_idx=0) == [0, 2, 4, 6, 8, 9, 9, 9]  # decoded whole
    assert clip_indices(10, 8, 2, clip_idx=0, pad="loop") == [0, 2, 4, 6, 8, 0, 2, 5]  # 15 % 10
    # clip k of K starts at k * floor(slack / (K - 1)): the last may end before the last frame
    assert clip_indices(30, 4, 2, clip_idx=4, num_clips=5) == [20, 22, 24, 27]  # slack 22 -> 5 x 4
    assert clip_indices(12, 2, 2, clip_idx=1, num_clips=3) == [4, 7]  # slack 8 -> 4
    assert clip_indices(11, 2, 1, clip_idx=3, num_clips=5) == [6, 7]  # slack 9 -> 2 x 3
    with pytest.raises(ValueError, match=r"clip_idx 3 not in \[0, 3\)"):
        clip_indices(30, 4, 2, clip_idx=3, num_clips=3)


def test_random_training_clips_start_anywhere_in_the_slack():
    g = torch.Generator().manual_seed(0)
    for fps, target, n_src in ((25, 30, 20), (15, 30, 9), (30, None, 20), (30, 30, 40)):
        slack = ref_slack(n_src, fps, 4, 4, target)
        clips = {tuple(ref_clip(n_src, fps, 4, 4, target, start=s)) for s in range(slack + 1)}
        drawn = {
            tuple(clip_indices(n_src, 4, 4, fps=fps, target_fps=target, generator=g))
            for _ in range(300)
        }
        assert drawn == clips  # every start in [0, slack], and nothing else


def test_clip_span_is_the_clips_frames_at_the_files_rate():
    assert clip_span(16, 4, 30, 30) == 64.0 and clip_span(16, 4) == 64.0
    assert clip_span(16, 4, 25, 30) == pytest.approx(64 * 25 / 30, abs=1e-12)
    assert clip_span(40, 3, 60, 30) == 240.0
    assert clip_span(1, 1, 1, 30) == 1.0  # at least one frame
    assert clip_span(10, 2, 30, 1) == 600.0 and clip_span(10, 2, 30, 0.5) == 1200.0
    assert clip_span(16, 4, None, 30) == 64.0 == clip_span(16, 4, 30, None)
    for fps, target in ((0, 30), (30, 0), (-25, 30)):
        with pytest.raises(ValueError, match="frame rates must be > 0"):
            clip_span(16, 4, fps, target)


def test_segment_indices_are_pyslowfasts_ssv2_frames():
    """Test frames ``(start + end) // 2`` of each segment; training frames ``randint(start,
    end)``, every frame of the segment reachable and none outside it."""
    for n in (1, 3, 4, 5, 7, 16, 30, 50, 101, 117):
        for num_frames in (1, 2, 4, 8, 16):
            want = [(a + b) // 2 for a, b in ref_segments(n, num_frames)]
            assert segment_indices(n, num_frames, train=False) == want
    g = torch.Generator().manual_seed(0)
    for n, num_frames in ((50, 4), (7, 4), (3, 8), (30, 8)):
        allowed = {
            (i, f) for i, (a, b) in enumerate(ref_segments(n, num_frames)) for f in range(a, b + 1)
        }
        seen = set()
        for _ in range(300):
            seen |= set(enumerate(segment_indices(n, num_frames, train=True, generator=g)))
        assert seen == allowed, (n, num_frames)


def test_uniform_crop_matches_slicing():
    for h, w in ((4, 10), (10, 4), (6, 6), (5, 8), (8, 5), (7, 7), (9, 4)):
        x = torch.arange(2 * 3 * h * w).reshape(2, 3, h, w)
        for size in range(1, min(h, w) + 1):
            for idx in (0, 1, 2):
                assert torch.equal(uniform_crop(x, size, idx), ref_crop(x, size, idx))
    with pytest.raises(ValueError, match="cannot take a 5 crop from a 4x10 video"):
        uniform_crop(torch.zeros(1, 4, 10), 5, 1)
    with pytest.raises(ValueError, match="spatial_idx must be 0, 1 or 2"):
        uniform_crop(torch.zeros(1, 4, 10), 4, 3)


# ----------------------------------------------------------------------------- files
def test_decoder_reads_the_coded_frames(videos):
    for fps, path in videos.items():
        with VideoReader(path) as r:
            assert (r.fps, r.num_frames) == (fps, 2 * fps)
            assert frame_ids(r.get_frames(range(r.num_frames)).float().mean((1, 2, 3))) == list(
                range(2 * fps)
            )


@pytest.mark.parametrize("target", [30, None])
def test_dataset_test_clips_follow_the_target_fps(videos, tmp_path, target):
    for fps, path in videos.items():
        (tmp_path / "l.txt").write_text(f"{path} 0\n")
        ds = VideoClipDataset(
            tmp_path / "l.txt",
            train=False,
            num_frames=4,
            sampling_rate=4,
            num_clips=3,
            target_fps=target,
        )
        assert len(ds) == 3
        for k in range(3):
            clip, _, _ = ds[k]
            assert ids_of_clip(clip) == ref_clip(2 * fps, fps, 4, 4, target, k=k, num_clips=3)
        train = VideoClipDataset(
            tmp_path / "l.txt", num_frames=4, sampling_rate=4, target_fps=target
        )
        slack = ref_slack(2 * fps, fps, 4, 4, target)
        clips = [ref_clip(2 * fps, fps, 4, 4, target, start=s) for s in range(slack + 1)]
        for _ in range(3):
            assert ids_of_clip(train[0][0]) in clips


def test_dataset_views_are_ordered_clip_major_then_crop(videos, tmp_path):
    (tmp_path / "l.txt").write_text("".join(f"{p} {i}\n" for i, p in enumerate(videos.values())))

    def tag(clip: torch.Tensor, spatial_idx: int | None = None) -> torch.Tensor:
        ids = frame_ids(clip.float().mean((1, 2, 3)))
        return torch.tensor([*ids, -1 if spatial_idx is None else spatial_idx])

    for crops in (1, 3):
        ds = VideoClipDataset(
            tmp_path / "l.txt",
            train=False,
            num_frames=3,
            sampling_rate=5,
            num_clips=2,
            num_crops=crops,
            transform=tag,
        )
        assert len(ds) == 2 * 2 * crops
        for v, (fps, _) in enumerate(videos.items()):
            for k in range(2):
                for s in range(crops):
                    item, label, vid = ds[v * 2 * crops + k * crops + s]
                    assert (label, vid) == (v, v)
                    want = ref_clip(2 * fps, fps, 3, 5, None, k=k, num_clips=2)
                    assert item.tolist() == [*want, s if crops == 3 else -1]


# ----------------------------------------------------------------------------- predictor
def _predictor(**data) -> Predictor:
    """A Predictor with the preprocessing a checkpoint of this data config stores."""
    pre = VideoDataConfig(**data).preprocessing()
    return Predictor(nn.Identity(), task="video", class_names=["a"], preprocessing=pre)


@pytest.mark.parametrize("target", [30, None])
def test_predictor_clips_follow_the_checkpoint_sampling_and_fps(videos, target):
    pred = _predictor(
        num_frames=4,
        sampling_rate=4,
        test_clips=3,
        crop_size=32,
        test_short_side=32,
        target_fps=target,
    )
    assert pred.preprocessing["target_fps"] == target
    for fps, path in videos.items():
        views = pred.preprocess_video(path)
        assert views.shape == (3, 3, 4, 32, 32)
        for k in range(3):
            assert ids_of_view(views[k]) == ref_clip(2 * fps, fps, 4, 4, target, k=k, num_clips=3)


@pytest.mark.parametrize("pad", ["last", "loop"])
def test_predictor_pads_a_short_video_as_the_run_did(videos, tmp_path, pad):
    """4 frames x 16 span 64 frames: the 30-frame video is padded as the run's ``pad`` says, in
    predict as in the dataset eval reads."""
    kw = {"num_frames": 4, "sampling_rate": 16, "test_clips": 2, "pad": pad}
    pred = _predictor(crop_size=32, test_short_side=32, **kw)
    path = videos[15]
    (tmp_path / "l.txt").write_text(f"{path} 0\n")
    ds = VideoClipDataset(tmp_path / "l.txt", train=False, num_clips=2, stack_views=True,
                          num_frames=4, sampling_rate=16, pad=pad)  # fmt: skip
    want = [ref_clip(30, 15, 4, 16, None, k=k, num_clips=2, pad=pad) for k in range(2)]
    assert want[0] == ([0, 21, 29, 29] if pad == "last" else [0, 21, 12, 3])  # 0, 21, 42, 63
    assert [ids_of_view(v) for v in pred.preprocess_video(path)] == want
    assert [ids_of_clip(c) for c in ds[0][0]] == want


def test_predictor_segment_sampling_ignores_the_frame_rate(videos):
    pred = _predictor(
        num_frames=5,
        sampling="segment",
        test_clips=1,
        test_crops=3,
        crop_size=32,
        test_short_side=32,
    )
    for fps, path in videos.items():
        views = pred.preprocess_video(path)
        assert views.shape == (3, 3, 5, 32, 32)  # 1 clip x 3 crops
        for view in views:
            assert ids_of_view(view) == [(a + b) // 2 for a, b in ref_segments(2 * fps, 5)]


def test_predictor_resizes_the_short_side_then_crops():
    # Frames 64 x 96, constant down the rows, 2 x column along a row. Resized to short side 32
    # (a factor of 2), column c lands on input position 2 c + 1/2, so away from the borders it
    # holds 2 (2 c + 1/2) = 4 c + 1; the 3 crops of 32 start at columns 0, 8 and 16.
    ramp = np.broadcast_to(
        (2 * np.arange(96)).astype(np.uint8)[None, None, :, None], (2, 64, 96, 3)
    )
    frames = np.ascontiguousarray(ramp)
    for crops, starts in ((3, (0, 8, 16)), (1, (8,))):
        pred = _predictor(
            num_frames=2,
            sampling_rate=1,
            test_clips=1,
            test_crops=crops,
            crop_size=32,
            test_short_side=32,
        )
        views = pred.preprocess_video(frames)
        assert views.shape == (crops, 3, 2, 32, 32)
        for view, left in zip(views, starts):
            cols = torch.arange(32) + left
            inside = (cols > 0) & (cols < 47)  # the resized frame's border columns mix less
            expected = ((4 * cols + 1) / 255 - MEAN) / STD
            got = view[:, :, :, inside]
            want = expected[inside].expand_as(got)
            torch.testing.assert_close(got, want, atol=1.01 / 255 / STD, rtol=0)


def test_normalisation_is_the_kinetics_mean_and_std_in_rgb(tmp_path):
    rgb = torch.tensor([0, 100, 255], dtype=torch.uint8)
    clip = rgb.view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()  # (T, C, H, W)
    want = torch.tensor([(v / 255 - 0.45) / 0.225 for v in (0, 100, 255)])
    dc = VideoDataConfig(
        crop_size=8,
        test_short_side=8,
        rrc_scale=(1.0, 1.0),
        rrc_ratio=(1.0, 1.0),
        hflip=False,
        randaug_n=0,
        reprob=0.0,
    )
    for train in (False, True):
        out = dc.transform(train)(clip)
        assert out.shape == (3, 2, 8, 8)
        torch.testing.assert_close(out, want.view(3, 1, 1, 1).expand_as(out))
    pred = _predictor(crop_size=8, test_short_side=8, num_frames=2, sampling_rate=1, test_clips=1)
    out = pred.preprocess_video(clip.permute(0, 2, 3, 1).numpy())  # (T, H, W, 3) array
    torch.testing.assert_close(out, want.view(1, 3, 1, 1, 1).expand_as(out))
    # From a file the channels come in RGB order: frames pure red, green, blue.
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    for i in range(3):
        frames[i, ..., i] = 255
    write_video(tmp_path / "rgb.mp4", frames, fps=10, crf=0)
    pred = _predictor(crop_size=32, test_short_side=32, num_frames=3, sampling_rate=1, test_clips=1)
    means = pred.preprocess_video(tmp_path / "rgb.mp4")[0].mean((2, 3))  # (C, T)
    on, off = (1 - 0.45) / 0.225, (0 - 0.45) / 0.225
    torch.testing.assert_close(
        means, off + torch.eye(3) * (on - off), atol=12 / 255 / 0.225, rtol=0
    )


def test_transform_defaults_are_the_kinetics_constants():
    clip = torch.full((1, 3, 4, 4), 51, dtype=torch.uint8)
    out = VideoTransform(False, crop_size=4, test_short_side=4)(clip)
    torch.testing.assert_close(out, torch.full_like(out, (51 / 255 - 0.45) / 0.225))
