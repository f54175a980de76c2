"""mvitv2.tasks.video by value: ``mvitv2 eval video`` scores against the same views taken and
averaged one file at a time by the Predictor, the test views of a video array (clips x crops)
against SlowFast's clip formula and plain slicing, and the command line's one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mvitv2.cli import main
from mvitv2.data.moving_digits import write_video
from mvitv2.engine.distributed import DistInfo
from mvitv2.predict import Predictor
from mvitv2.tasks.video import VideoDataConfig, evaluate_views

NUM_CLASSES = 7
# A tiny model and clips; the recipe (moving_digits) sets everything else.
TINY = [
    "model_args.depths=[1,1]",
    "model_args.embed_dim=16",
    "data.num_frames=4",
    "data.sampling_rate=2",
    "data.target_fps=null",
    "data.crop_size=32",
    "data.test_short_side=36",
    "batch_size=4",
    "epochs=1",
    "workers=0",
    "progress=false",
    "tensorboard=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(video root, checkpoint): 7 training videos (one per class) and 5 validation videos of
    noise, 14-20 frames of 36x48 at 25 fps; a one-epoch run on them."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    lines: dict[str, str] = {"train": "", "val": ""}
    for split, labels in (("train", range(NUM_CLASSES)), ("val", [3, 0, 6, 6, 1])):
        for i, y in enumerate(labels):
            frames = rng.integers(0, 256, (14 + i % 7, 36, 48, 3), dtype=np.uint8)
            write_video(root / f"{split}{i}.mp4", frames, fps=25)
            lines[split] += f"{split}{i}.mp4 {y}\n"
        (root / f"{split}.txt").write_text(lines[split])
    out = root / "runs"
    args = ["train", "video", "--data", str(root), "--config", "moving_digits"]
    assert main([*args, f"output={out}", "name=r", *TINY]) == 0
    return root, out / "r" / "last.pt"


def _eval_json(ckpt: Path, capsys: pytest.CaptureFixture, *args: str) -> dict[str, float]:
    capsys.readouterr()
    assert main(["eval", "video", "--checkpoint", str(ckpt), "--workers", "0", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _reference(
    ckpt: Path, root: Path, clips: int, crops: int, list_name: str = "val.txt"
) -> dict[str, float]:
    """Top-1 / top-5 (%) and the mean negative log-likelihood of the validation videos, each
    video's class distribution taken from the Predictor (one file at a time, its own views)."""
    pred = Predictor.from_checkpoint(ckpt, topk=NUM_CLASSES)
    pred.preprocessing.update(num_clips=clips, num_crops=crops)
    top1 = top5 = nll = 0.0
    lines = (root / list_name).read_text().splitlines()
    for line in lines:
        name, label = line.split()
        ranked = pred(root / name)  # all classes, most probable first
        classes = [int(c) for c, _ in ranked]
        top1 += classes[0] == int(label)
        top5 += int(label) in classes[:5]
        nll -= math.log(dict(ranked)[label])
    n = len(lines)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": nll / n}


@pytest.mark.parametrize("clips, crops", [(None, None), (2, 3)])
def test_eval_scores_every_video_by_its_averaged_views(run, capsys, clips, crops):
    """``mvitv2 eval video``: the recipe's views (3 clips x 1 crop) or ``--clips 2 --crops 3``;
    by default the run's own validation list and root (no ``--data``)."""
    root, ckpt = run
    flags = [] if clips is None else ["--clips", str(clips), "--crops", str(crops)]
    got = _eval_json(ckpt, capsys, *flags, "--json")
    k, s = (3, 1) if clips is None else (clips, crops)
    want = _reference(ckpt, root, k, s)
    assert (got["count"], got["views"], got["skipped"]) == (5, k * s, 0)
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_eval_reads_another_list_relative_to_data(run, capsys, tmp_path, monkeypatch):
    """``--data ROOT --val-list NAME``: NAME in ROOT; ``--data`` alone: ROOT's val list."""
    root, ckpt = run
    (root / "two.txt").write_text("val3.mp4 6\nval0.mp4 3\n")
    monkeypatch.chdir(tmp_path)  # no two.txt here
    got = _eval_json(ckpt, capsys, "--data", str(root), "--val-list", "two.txt", "--json")
    want = _reference(ckpt, root, 3, 1, "two.txt")
    assert got["count"] == 2 and got["top1"] == pytest.approx(want["top1"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert _eval_json(ckpt, capsys, "--data", str(root), "--json")["count"] == 5


def test_eval_refuses_a_list_with_labels_the_model_does_not_have(run, capsys, tmp_path):
    root, ckpt = run
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{root / 'val0.mp4'} 3\n{root / 'val1.mp4'} 9\n")
    capsys.readouterr()
    assert main(["eval", "video", "--checkpoint", str(ckpt), "--val-list", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"mvitv2 eval video: error: {bad}: label 9 but the model has {NUM_CLASSES} classes"
    )


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("clips", ["0", "-1"])
def test_clips_below_one_is_a_one_line_error(command, clips, tmp_path, capsys):
    """``--clips 0`` used to fall back to the recipe's count silently, and ``predict --clips -1``
    to fail with a traceback."""
    files = [str(tmp_path / "a.mp4")] if command == "predict" else []
    ckpt = str(tmp_path / "never-read.pt")
    assert main([command, "video", *files, "--checkpoint", ckpt, "--clips", clips]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mvitv2 {command} video: error: --clips must be >= 1, got {clips}"]


def test_predict_clips_sets_the_views_averaged_per_file(run, capsys):
    """``predict --clips 2 --topk 3``: the 3 most probable classes of 2 clips, averaged."""
    root, ckpt = run
    capsys.readouterr()
    file = str(root / "val2.mp4")
    flags = ["--json", "--clips", "2", "--topk", "3"]
    assert main(["predict", "video", file, "--checkpoint", str(ckpt), *flags]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["topk"]
    pred = Predictor.from_checkpoint(ckpt, topk=5)
    views = pred.preprocess_video(file)
    assert len(views) == 3  # the recipe's 3 clips: --clips changes them
    pred.preprocessing["num_clips"] = 2
    views = pred.preprocess_video(file)
    with torch.no_grad():
        probs = pred.model(views).softmax(-1).mean(0)
    want = sorted(((str(c), p) for c, p in enumerate(probs.tolist())), key=lambda x: -x[1])[:3]
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-4)


def test_predict_refuses_another_tasks_checkpoint_and_a_missing_device(run, tmp_path, capsys):
    root, ckpt = run
    image = tmp_path / "image.pt"
    torch.save({"model": {}, "config": {"model": "mvitv2_tiny"}, "meta": {"task": "image"}}, image)
    file = str(root / "val0.mp4")
    capsys.readouterr()
    assert main(["predict", "video", file, "--checkpoint", str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'image' checkpoint, not 'video'" in err[0], err
    assert main(["predict", "video", file, "--checkpoint", str(ckpt), "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvitv2 predict video: error: --device cuda:99: ")


# ----------------------------------------------------------------------------- predictor views
class _Reader(nn.Module):
    """Logits that read a view: its first and last frame's level (top-left pixel, channel 0)
    and the level of its top-right pixel's column; frames and columns are coded in the levels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0, 0], x[:, 0, -1, 0, 0], x[:, 1, 0, 0, -1]], 1) * 255 / 40


def test_predictor_averages_the_softmax_of_clips_times_crops_views():
    """A (T, H, W, 3) array, 3 clips x 3 crops: views clip-major then crop, clip k starting at
    SlowFast's ``round(k * slack / (K - 1))``, crops at the left, centre and right, softmax
    averaged over the 9 views."""
    n, t, rate, h, w, size = 29, 3, 4, 24, 40, 24
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = (5 * np.arange(n))[:, None, None]  # red: the frame index
    frames[..., 1] = (3 * np.arange(w))[None, None, :]  # green: the column
    data = VideoDataConfig(
        num_frames=t,
        sampling_rate=rate,
        crop_size=size,
        test_short_side=size,  # the frame's own size: no resize
        test_clips=3,
        test_crops=3,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    pred = Predictor(
        _Reader(), task="video", class_names=["first", "last", "right"], topk=3,
        preprocessing=data.preprocessing(),
    )  # fmt: skip
    slack = n - ((t - 1) * rate + 1)  # 20
    logits = []
    for k in range(3):
        start = math.floor(slack * k / 2 + 0.5)
        for left in (0, (w - size) // 2, w - size):
            first, last = start, start + (t - 1) * rate
            logits.append([5 * first / 40, 5 * last / 40, 3 * (left + size - 1) / 40])
    want = torch.tensor(logits, dtype=torch.float64).softmax(-1).mean(0)
    views = pred.preprocess_video(frames)
    assert views.shape == (9, 3, t, size, size)
    torch.testing.assert_close(_Reader()(views).double(), torch.tensor(logits, dtype=torch.float64))
    got = dict(pred(frames))
    for c, name in enumerate(["first", "last", "right"]):
        assert got[name] == pytest.approx(want[c].item(), abs=1e-6)
    # preprocessing stored before sampling, crops and target fps were: clips, centre crops
    old = {k: v for k, v in pred.preprocessing.items() if k not in NEWER_KEYS}
    legacy = Predictor(_Reader(), task="video", class_names=["a", "b", "c"], preprocessing=old)
    torch.testing.assert_close(legacy.preprocess_video(frames), views[1::3])


NEWER_KEYS = ("sampling", "num_crops", "target_fps")


# ----------------------------------------------------------------------------- multi-view scores
class _LogProbs(nn.Module):
    """Logits = the input, flattened: feed log-probabilities to get them back from the softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_multi_view_top1_top5_and_loss_computed_by_hand():
    """Four videos, six classes. Video 0 (label 2): two views averaged to
    [.2, .1, .4, .1, .1, .1], label first. Video 1: no view. Video 2 (label 5): its label 6th of
    6. Video 3 (label 4): its label 5th. Top-1 1/3, top-5 2/3, loss -(ln .4 + ln .05 + ln .07) / 3."""
    views = [
        (0, [0.1, 0.1, 0.5, 0.1, 0.1, 0.1]),
        (2, [0.3, 0.25, 0.2, 0.1, 0.1, 0.05]),
        (3, [0.3, 0.25, 0.2, 0.15, 0.07, 0.03]),
        (0, [0.3, 0.1, 0.3, 0.1, 0.1, 0.1]),
    ]
    logits = torch.tensor([p for _, p in views]).log().view(4, 1, 1, 1, 6)
    vids = torch.tensor([v for v, _ in views])
    batches = [(logits[:3], torch.zeros(3), vids[:3]), None, (logits[3:], torch.zeros(1), vids[3:])]
    # video 1: no view (every attempt unreadable), not scored
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=y) for y in (2, 1, 5, 4)])
    m = evaluate_views(_LogProbs(), batches, DistInfo(), dataset)  # type: ignore[arg-type]
    assert (m["count"], m["views"]) == (3, pytest.approx(4 / 3))
    assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == pytest.approx(200 / 3)
    assert m["loss"] == pytest.approx(-(math.log(0.4) + math.log(0.05) + math.log(0.07)) / 3)


def test_no_video_with_a_view_scores_nothing():
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=0), SimpleNamespace(label=1)])
    m = evaluate_views(_LogProbs(), [None, None], DistInfo(), dataset)  # type: ignore[arg-type]
    assert (m["count"], m["views"], m["top1"], m["top5"]) == (0, 0.0, 0.0, 0.0)
    assert math.isnan(m["loss"])
