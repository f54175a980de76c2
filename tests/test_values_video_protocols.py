"""Two test protocols for Kinetics-style clips: PySlowFast's (``sampling: clip``, the default) and
torchvision's reference script (``sampling: resampled`` with ``test_pipeline: torchvision``), the
one torchvision's ported weights (``*_tv`` tags) report their accuracy under.

References: torchvision's own ``VideoClips`` (built from frame times, no decoding: its clips are
frame indices), ``UniformClipSampler`` and the ``VideoClassification`` preset of its video
weights; its ``MViT`` with the same weights; frames decoded by PyAV directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torchvision.datasets.samplers import UniformClipSampler
from torchvision.datasets.video_utils import VideoClips
from torchvision.transforms._presets import VideoClassification

from mvitv2.cli import main
from mvitv2.data.moving_digits import write_video
from mvitv2.data.video import (
    ClipSampler,
    VideoTransform,
    clip_indices,
    resampled_clip_indices,
    segment_indices,
    uniform_crop,
)
from mvitv2.predict import Predictor
from mvitv2.weights.classes import dataset_classes
from mvitv2.weights.registry import Preprocessing

# torchvision warns of each video too short for a clip (these tests make some on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:There aren't enough frames:UserWarning")

FPS = (30.0, 25.0, 30000 / 1001, 24.0, 60.0, 15.0, 7.5, 5.0, 12.5)


def torchvision_clips(lengths: list[int], fps: list[float], frames: int, rate: float):
    """torchvision's ``VideoClips`` over videos whose frame ``i`` has time ``i``: each clip's
    times are its frame indices."""
    meta = {
        "video_paths": [f"v{i}.mp4" for i in range(len(lengths))],
        "video_pts": [torch.arange(n) for n in lengths],
        "video_fps": list(fps),
    }
    return VideoClips(meta["video_paths"], frames, 1, rate, _precomputed_metadata=meta)


def torchvision_test_clips(vc: VideoClips, k: int) -> dict[int, list[list[int]]]:
    """The frames of the clips ``UniformClipSampler(vc, k)`` picks, per video."""
    out: dict[int, list[list[int]]] = {}
    for i in UniformClipSampler(vc, k):
        v, c = vc.get_clip_location(i)
        out.setdefault(v, []).append(vc.clips[v][c].tolist())
    return out


# ------------------------------------------------------------------ frames of the clips
@pytest.mark.parametrize("frames, rate", [(16, 4), (8, 8), (4, 1), (1, 2), (32, 3)])
def test_resampled_test_clips_are_those_torchvisions_uniform_sampler_picks(frames, rate):
    lengths = [frames * rate + d for d in (0, 1, 3, 17)] + [250, 300, 301, 997]
    for fps in FPS:
        for k in (1, 2, 3, 5, 10):
            vc = torchvision_clips(lengths, [fps] * len(lengths), frames, 30.0 / rate)
            want = torchvision_test_clips(vc, k)
            for v, n in enumerate(lengths):
                if v not in want:  # fewer than `frames` resampled frames: checked below
                    continue
                got = [
                    resampled_clip_indices(
                        n, frames, rate, clip_idx=i, num_clips=k, fps=fps, target_fps=30.0
                    )
                    for i in range(k)
                ]
                assert got == want[v], (fps, n, k)


def test_without_frame_rates_the_clips_take_every_sampling_rate_th_frame():
    for n, frames, rate, k in ((100, 8, 4, 3), (33, 4, 2, 5), (64, 16, 4, 1)):
        vc = torchvision_clips([n], [None], frames, None)  # torchvision: no resampling
        strided = [list(range(0, n, rate))[j : j + frames] for j in range(n)]
        starts = np.floor(np.linspace(0, len(range(0, n, rate)) - frames, k)).astype(int)
        want = [strided[j] for j in starts]
        got = [resampled_clip_indices(n, frames, rate, clip_idx=i, num_clips=k) for i in range(k)]
        assert got == want
        if rate == 1:
            assert got == torchvision_test_clips(vc, k)[0]


def test_a_training_clip_is_any_of_torchvisions_clips_with_equal_chances():
    g = torch.Generator().manual_seed(0)
    for n, fps in ((80, 30.0), (61, 25.0)):
        vc = torchvision_clips([n], [fps], 4, 7.5)
        clips = [c.tolist() for c in vc.clips[0]]
        drawn = [
            resampled_clip_indices(n, 4, 4, fps=fps, target_fps=30.0, generator=g)
            for _ in range(60 * len(clips))
        ]
        assert all(d in clips for d in drawn)
        counts = [drawn.count(c) for c in clips]
        assert min(counts) > 25 and max(counts) < 100  # 60 expected each


def test_a_video_shorter_than_a_clip_is_padded_where_torchvision_drops_it():
    # 20 frames at 30 fps resampled to 7.5: frames 0, 4, 8, 12, 16, 5 of the 16 a clip takes
    assert torchvision_clips([20], [30.0], 16, 7.5).num_clips() == 0
    last = resampled_clip_indices(20, 16, 4, clip_idx=2, num_clips=5, fps=30, target_fps=30)
    assert last == [0, 4, 8, 12] + [16] * 12
    loop = resampled_clip_indices(20, 16, 4, pad="loop", fps=30, target_fps=30)
    assert loop == [0, 4, 8, 12, 16] * 3 + [0]
    # 25 fps to 7.5: floor(i * 10 / 3) for i < floor(11 * 0.3) = 3: frames 0, 3, 6
    assert resampled_clip_indices(11, 4, 4, fps=25, target_fps=30, clip_idx=0) == [0, 3, 6, 6]
    # not one resampled frame (floor(3 * 7.5 / 25) = 0): the first frame
    assert resampled_clip_indices(3, 4, 4, fps=25, target_fps=30, clip_idx=0) == [0] * 4


def test_bad_resampled_arguments_are_refused():
    with pytest.raises(ValueError, match=r"clip_idx 5 not in \[0, 5\)"):
        resampled_clip_indices(100, 4, 1, clip_idx=5, num_clips=5)
    with pytest.raises(ValueError, match=r"clip_idx 1 not in \[0, 1\)"):
        resampled_clip_indices(100, 4, clip_idx=1)  # one test clip by default
    for fps, target in ((0, 30), (30, 0), (-25, 30), (30, -1)):
        with pytest.raises(ValueError, match="frame rates must be > 0"):
            resampled_clip_indices(100, 4, 1, fps=fps, target_fps=target)


def test_defaults_and_one_missing_rate_take_every_sampling_rate_th_frame():
    assert resampled_clip_indices(100, 4, clip_idx=0) == [0, 1, 2, 3]  # rate 1, the first clip
    for fps, target in ((30.0, None), (None, 30.0), (None, None)):
        got = resampled_clip_indices(100, 4, 2, clip_idx=1, num_clips=2, fps=fps, target_fps=target)
        assert got == [92, 94, 96, 98]  # 50 frames 0, 2, .., 98: clips from 0 .. 46 -> 46
    # rates below 1 frame per second are rates too: 0.5 fps to 0.5 / 1 is no resampling
    assert resampled_clip_indices(9, 3, 1, clip_idx=0, fps=0.5, target_fps=0.5) == [0, 1, 2]


def test_frames_are_resampled_in_float32_whatever_the_default_dtype():
    # NTSC 29.97 fps to 10 fps: in float64, i * 2.997 floors one frame lower at i = 1001
    n, fps = 3100, 30000 / 1001
    want = torchvision_clips([n], [fps], 1034, 10.0).clips[0][0].tolist()  # all 1034 frames
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = resampled_clip_indices(n, 1034, 3, clip_idx=0, fps=fps, target_fps=30.0)
    finally:
        torch.set_default_dtype(default)
    assert got == want and got[1001] == 3000


def test_a_seeded_generator_draws_the_training_clips_again():
    for sampling in ("resampled", "clip"):
        s = ClipSampler(sampling, 4, 2, target_fps=30.0)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        first = [s.indices(200, 25.0, None, g1) for _ in range(8)]
        torch.manual_seed(0)  # the global generator plays no part
        assert [s.indices(200, 25.0, None, g2) for _ in range(8)] == first
    # by hand: 200 frames at 25 fps to 15: floor(i * 5 / 3) for i < 120, 117 clips of 4
    g, want_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    frames = [int(i * 5 / 3) for i in range(120)]
    got = resampled_clip_indices(200, 4, 2, fps=25, target_fps=30, generator=g)
    start = int(torch.randint(117, (1,), generator=want_g))
    assert got == frames[start : start + 4]


def test_the_clip_sampler_takes_each_samplings_frames_and_says_when_it_pads():
    for n, fps in ((300, 30.0), (250, 25.0), (40, 30.0), (9, 24.0)):
        kw = {"num_clips": 5, "pad": "loop", "fps": fps, "target_fps": 30.0}
        for sampling, sample in (("clip", clip_indices), ("resampled", resampled_clip_indices)):
            s = ClipSampler(sampling, 16, 4, 5, "loop", 30.0)
            for i in range(5):
                assert s.indices(n, fps, i) == sample(n, 16, 4, clip_idx=i, **kw)
        seg = ClipSampler("segment", 8, 4, 1, "last", None)
        assert seg.indices(n, fps, 0) == segment_indices(n, 8, train=False)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert seg.indices(n, fps, None, g1) == segment_indices(n, 8, train=True, generator=g2)
    clip, resampled = ClipSampler("clip", 16, 4, 5), ClipSampler("resampled", 16, 4, 5)
    # SlowFast's clip ends at frame floor(64 - 1) = 63: a 63-frame video pads, a 64-frame not
    assert clip.pads(63, 30.0) and not clip.pads(64, 30.0)
    # the clip counts 64 frames at 30 fps: 128 of a 60 fps file
    at_60 = ClipSampler("clip", 16, 4, 5, target_fps=30.0)
    assert at_60.pads(127, 60.0) and not at_60.pads(128, 60.0)
    # torchvision's: 61 frames give 16 resampled (0, 4, ..., 60), 60 give 15
    assert resampled.pads(60, None) and not resampled.pads(61, None)
    at_30 = ClipSampler("resampled", 16, 4, 5, target_fps=30.0)
    assert not at_30.pads(54, 25.0) and at_30.pads(53, 25.0)  # floor(0.3 n): 16.2, 15.9
    assert not ClipSampler("segment", 16, 4).pads(2, 30.0)
    for bad, message in (
        ({"sampling": "dense"}, "unknown sampling 'dense'; expected 'clip', 'resampled' or"),
        ({"pad": "zero"}, "unknown pad mode 'zero'; expected 'last' or 'loop'"),
    ):
        with pytest.raises(ValueError, match=message):
            ClipSampler(**bad)


# ------------------------------------------------------------------ resize and crop
@pytest.mark.parametrize(
    "h, w, crop, short", [(30, 41, 16, 19), (41, 30, 16, 19), (24, 24, 12, 17)]
)
def test_torchvisions_test_pipeline_is_its_video_classification_preset(h, w, crop, short):
    clip = torch.randint(0, 256, (3, 3, h, w), generator=torch.Generator().manual_seed(h + w))
    clip = clip.to(torch.uint8)
    mean, std = (0.43, 0.45, 0.47), (0.2, 0.22, 0.25)
    preset = VideoClassification(crop_size=(crop, crop), resize_size=(short,), mean=mean, std=std)
    ours = VideoTransform(
        False,
        crop_size=crop,
        mean=mean,
        std=std,
        test_short_side=short,
        test_pipeline="torchvision",
    )
    torch.testing.assert_close(ours(clip), preset(clip), rtol=0, atol=1e-6)
    # the other two of 3 crops: the same rounded uint8 frames, cropped at the ends
    resized = torch.nn.functional.interpolate(
        clip.float(), size=preset_size(h, w, short), mode="bilinear"
    ).round()
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    for idx in (0, 2):
        want = (uniform_crop(resized, crop, idx) / 255 - m) / s
        torch.testing.assert_close(ours(clip, idx), want.permute(1, 0, 2, 3), rtol=0, atol=1e-6)


def preset_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's resize of the short side to ``short``: the long side ``int(short * long /
    short_side)``."""
    return (short, int(short * w / h)) if h <= w else (int(short * h / w), short)


def test_the_two_pipelines_crop_half_a_pixel_apart_where_torchvision_rounds_to_even():
    # 24 x 24 -> 17 x 17, crop 12: 5 / 2 = 2.5 slack; SlowFast's ceil takes 3, round-to-even 2
    clip = torch.arange(24 * 24, dtype=torch.float32).reshape(1, 1, 24, 24).expand(2, 3, -1, -1)
    clip = (clip % 251).to(torch.uint8)
    kw = {"crop_size": 12, "test_short_side": 17, "mean": (0, 0, 0), "std": (1, 1, 1)}
    sf = VideoTransform(False, **kw)(clip)
    tv = VideoTransform(False, test_pipeline="torchvision", **kw)(clip)
    resized = torch.nn.functional.interpolate(clip.float(), size=(17, 17), mode="bilinear") / 255
    torch.testing.assert_close(sf, resized[..., 3:15, 3:15].permute(1, 0, 2, 3))
    torch.testing.assert_close(
        tv, (resized * 255).round()[..., 2:14, 2:14].permute(1, 0, 2, 3) / 255
    )
    with pytest.raises(ValueError, match="unknown test_pipeline 'tv'"):
        VideoTransform(False, test_pipeline="tv")


# ------------------------------------------------------------------ released weights, end to end
def _decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="session")
def tv_small(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """torchvision's MViTv2-S layout on a 4 x 64 x 64 grid (random weights) and its file."""
    from test_weights_parity import small_torchvision

    with pytest.MonkeyPatch.context() as mp:
        ref = small_torchvision("mvit_v2_s", mp).eval()
    with torch.no_grad():
        ref.head[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("tv") / "tv_small.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture
def tv_tag(tv_small, tmp_path, monkeypatch):
    """``tv_small`` registered as Kinetics-400 weights evaluated as torchvision evaluates them,
    and two MP4s (30 and 25 fps)."""
    ref, file = tv_small
    pre = Preprocessing(
        input_size=(3, 4, 64, 64),
        interpolation="bilinear",
        mean=(0.45,) * 3,
        std=(0.225,) * 3,
        sampling_rate=2,
        clips=3,
        target_fps=30.0,
        video_protocol="torchvision",
    )  # fmt: skip  (resize 73, crop 64; 4 frames at 15 fps)
    from test_values_released_predict import _register

    tag = _register(
        monkeypatch, tmp_path, file, tag="mvitv2_small_16x4.test_tv", model="mvitv2_small_16x4",
        num_classes=400, classes="kinetics-400", preprocessing=pre, source_format="torchvision",
        task="video", model_kwargs={"img_size": 64, "num_frames": 4},
    )  # fmt: skip
    rng = np.random.default_rng(0)
    videos = []
    for name, n, fps in (("a.mp4", 23, 30), ("b.mp4", 19, 25)):
        frames = rng.integers(0, 256, (n, 60, 60, 3), dtype=np.uint8)
        write_video(tmp_path / name, frames, fps=fps, crf=0)
        videos.append((tmp_path / name, n, float(fps)))
    return tag, ref, videos


def _torchvision_probs(ref, path: Path, n: int, fps: float, k: int) -> torch.Tensor:
    """torchvision's test of one video: UniformClipSampler's k clips of 4 frames at 15 fps, the
    VideoClassification preset (resize 73, crop 64, Kinetics' mean/std), softmax averaged."""
    frames = torch.from_numpy(_decode_all(path)).permute(0, 3, 1, 2)
    preset = VideoClassification(  # as torchvision's MViT weights build it
        crop_size=(64, 64), resize_size=(73,), mean=(0.45,) * 3, std=(0.225,) * 3
    )
    clips = torchvision_test_clips(torchvision_clips([n], [fps], 4, 15.0), k)[0]
    with torch.no_grad():
        x = torch.stack([preset(frames[c]) for c in clips])
        return ref(x).double().softmax(-1).mean(0)


def test_torchvision_weights_predict_with_torchvisions_clips_and_preprocessing(tv_tag):
    tag, ref, videos = tv_tag
    predictor = Predictor.from_weights(tag)
    for path, n, fps in videos:
        want = _torchvision_probs(ref, path, n, fps, 3)
        v, i = want.topk(5)
        got = predictor(str(path))
        assert [c for c, _ in got] == [predictor.class_names[j] for j in i.tolist()]
        assert [p for _, p in got] == pytest.approx(v.tolist(), abs=2e-5)


def _slowfast_probs(ref, path: Path, n: int, fps: float, k: int) -> torch.Tensor:
    """PySlowFast's test of one video: its k clips (``clip_indices``, checked against SlowFast's
    own functions in test_video_sampling), the normalised frames resized to 73 x 73 and cropped
    at ceil((73 - 64) / 2) = 5, softmax averaged over the clips."""
    frames = torch.from_numpy(_decode_all(path)).permute(0, 3, 1, 2).float() / 255
    frames = (frames - 0.45) / 0.225
    clips = [
        clip_indices(n, 4, 2, clip_idx=i, num_clips=k, fps=fps, target_fps=30) for i in range(k)
    ]
    with torch.no_grad():
        x = [
            torch.nn.functional.interpolate(frames[c], size=(73, 73), mode="bilinear")
            for c in clips
        ]
        x = torch.stack([c[..., 5:69, 5:69].permute(1, 0, 2, 3) for c in x])
        return ref(x).double().softmax(-1).mean(0)


def _expected(probs: list[torch.Tensor], labels: list[int]) -> tuple[float, float]:
    top1 = [int(p.argmax()) == y for p, y in zip(probs, labels)]
    top5 = [y in p.topk(5).indices.tolist() for p, y in zip(probs, labels)]
    return 100 * sum(top1) / len(top1), 100 * sum(top5) / len(top5)


def test_eval_of_torchvision_weights_scores_torchvisions_test_and_protocol_switches_it(
    tv_tag, tmp_path
):
    tag, ref, videos = tv_tag
    tv = [_torchvision_probs(ref, p, n, fps, 3) for p, n, fps in videos]
    sf = [_slowfast_probs(ref, p, n, fps, 3) for p, n, fps in videos]
    # each video labelled with torchvision's top class; SlowFast's clips rank others first
    labels = [int(p.argmax()) for p in tv]
    assert _expected(tv, labels)[0] == 100.0 and _expected(sf, labels)[0] < 100.0
    rows = "".join(f"{p.name} {y}\n" for (p, _, _), y in zip(videos, labels))
    (tmp_path / "val.csv").write_text(rows)
    out = tmp_path / "m.json"
    argv = ["eval", "video", "--checkpoint", tag, "--data", str(tmp_path), "--output", str(out)]
    argv += ["--batch-size", "3", "--workers", "0"]
    for protocol, probs in ((None, tv), ("slowfast", sf), ("torchvision", tv)):
        assert main(argv + (["--protocol", protocol] if protocol else [])) == 0
        metrics = json.loads(out.read_text())
        assert (metrics["top1"], metrics["top5"]) == _expected(probs, labels), protocol
        assert metrics["count"] == 2 and "padded" not in metrics  # 12 and 11 frames at 15 fps
    with pytest.raises(SystemExit) as e:
        main([*argv, "--protocol", "torchvisionn"])
    assert e.value.code == 2


def test_eval_of_released_weights_says_what_was_reported_and_under_which_test():
    from torchvision.models.video import MViT_V2_S_Weights

    from mvitv2.engine.cli import describe_eval

    tv = MViT_V2_S_Weights.KINETICS400_V1.meta["_metrics"]["Kinetics-400"]
    line = describe_eval("mvitv2_small_16x4.k400_tv", 3, "videos", "val.csv")
    assert line.startswith("evaluating mvitv2_small_16x4.k400_tv on 3 videos of val.csv; device")
    assert line.endswith(
        f"; reported top-1 {tv['acc@1']:g}  top-5 {tv['acc@5']:g} by torchvision "
        "MViT_V2_S_Weights (5 clips x 1 crop, resize 256, crop 224, frame_rate 7.5)"
    )
    assert "reported" not in describe_eval("runs/r/best.pt", 3, "videos", "val.csv")
    assert "reported" not in describe_eval("mvitv2_base_cls.in21k", 3, "images", "val")


def test_predict_takes_the_weights_protocol_or_the_one_asked_for(tv_tag, capsys):
    tag, ref, videos = tv_tag
    path, n, fps = videos[1]  # 25 fps: the protocols take different frames
    for protocol, reference in ((None, _torchvision_probs), ("slowfast", _slowfast_probs)):
        argv = ["predict", "video", str(path), "--checkpoint", tag, "--json", "--topk", "3"]
        assert main(argv + (["--protocol", protocol] if protocol else [])) == 0
        (line,) = capsys.readouterr().out.splitlines()
        got = json.loads(line)["topk"]
        v, i = reference(ref, path, n, fps, 3).topk(3)
        names = dataset_classes("kinetics-400")
        assert [c for c, _ in got] == [names[j] for j in i.tolist()], protocol
        assert [p for _, p in got] == pytest.approx(v.tolist(), abs=2e-5)


def test_protocol_is_refused_for_segment_sampling_in_one_line():
    from argparse import Namespace

    from mvitv2.errors import UserValueError
    from mvitv2.tasks.video import PROTOCOLS, _protocol_option

    args = Namespace(protocol="torchvision", checkpoint="runs/ssv2/best.pt")
    assert _protocol_option(args, "clip") == PROTOCOLS["torchvision"]
    assert _protocol_option(Namespace(protocol=None, checkpoint="x"), "segment") == {}
    with pytest.raises(UserValueError) as e:
        _protocol_option(args, "segment")
    assert str(e.value) == (
        "--protocol chooses how Kinetics-style clips are taken, but runs/ssv2/best.pt samples "
        "one frame per segment (SSv2): leave --protocol out"
    )
