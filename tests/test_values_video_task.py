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
    return tiny_video_run(tmp_path_factory)


def tiny_video_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
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
    SlowFast's ``k * floor(slack / (K - 1))`` and spanning ``t * rate`` frames, crops at the
    left, centre and right, softmax averaged over the 9 views."""
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
    span = t * rate  # 12 frames: the clip's frames are floor(11 i / 2) = 0, 5, 11 after its start
    logits = []
    for k in range(3):
        start = k * math.floor((n - span) / 2)  # k * floor(17 / 2)
        for left in (0, (w - size) // 2, w - size):
            first, last = start, start + span - 1
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


NEWER_KEYS = ("sampling", "num_crops", "target_fps", "pad")


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


# ----------------------------------------------------------------------------- list files
def _task(**data):
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.video import VideoClassification

    return VideoClassification(TrainConfig(data=data))


def test_list_files_are_found_as_given_then_in_the_video_root(tmp_path, monkeypatch):
    """``--train-list``/``--val-list``/``--classes`` as given (relative to the current folder),
    else inside ``--data``; without ``--val-list`` the root's ``val.csv``/``val.txt``/``test.csv``."""
    monkeypatch.chdir(tmp_path)
    root = Path("k400")  # as given: relative to the current folder
    root.mkdir()
    for name in ("mine.csv", "k400/train.csv", "k400/test.csv", "k400/names.txt"):
        (tmp_path / name).write_text("x 0\n")
    task = _task(video_root="k400", train_list="mine.csv", classes_file="names.txt")
    assert task.resolve_lists() == (Path("mine.csv"), root / "test.csv", "k400", root / "names.txt")
    (root / "val.txt").write_text("x 0\n")  # val.csv, val.txt, test.csv: the first one there
    task = _task(video_root="k400", val_list="test.csv")
    assert task.resolve_lists() == (root / "train.csv", root / "test.csv", "k400", None)
    assert _task(video_root="k400").resolve_lists()[1] == root / "val.txt"
    # a train list outside any root: its validation list is looked for next to it
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/train.txt").write_text("x 0\n")
    assert _task(train_list="lists/train.txt").resolve_lists() == (
        Path("lists/train.txt"),
        None,  # none there: training without validation
        None,
        None,
    )
    (tmp_path / "lists/val.csv").write_text("x 0\n")
    assert _task(train_list="lists/train.txt").resolve_lists()[1] == Path("lists/val.csv")


@pytest.mark.parametrize(
    ("data", "flag", "given", "in_root"),
    [
        ({"train_list": "nope.csv"}, "--train-list", "nope.csv", False),
        ({"video_root": "k400", "train_list": "nope.csv"}, "--train-list", "nope.csv", True),
        ({"video_root": "k400", "val_list": "v.csv"}, "--val-list", "v.csv", True),
        ({"video_root": "k400", "classes_file": "c.txt"}, "--classes", "c.txt", True),
    ],
)
def test_a_missing_list_file_names_its_option_and_every_place_looked(
    tmp_path, monkeypatch, data, flag, given, in_root
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "k400").mkdir()
    (tmp_path / "k400/train.csv").write_text("x 0\n")
    with pytest.raises(FileNotFoundError) as e:
        _task(**data).resolve_lists()
    places = [str(tmp_path / given)] + [str(tmp_path / "k400" / given)] * in_root
    assert str(e.value) == f"{flag} {given}: no such file (looked at {' and '.join(places)})"


def test_an_absolute_list_path_is_looked_for_only_where_it_says(tmp_path):
    from mvitv2.tasks.video import locate_file

    (tmp_path / "root").mkdir()
    (tmp_path / "root/a.csv").write_text("x 0\n")
    assert locate_file("a.csv", tmp_path / "root", "--val-list") == tmp_path / "root/a.csv"
    missing = tmp_path / "elsewhere/a.csv"
    with pytest.raises(FileNotFoundError) as e:
        locate_file(missing, tmp_path / "root", "--val-list")
    assert str(e.value) == f"--val-list {missing}: no such file (looked at {missing})"


def test_a_video_root_without_a_train_list_says_which_names_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        _task(video_root=str(tmp_path)).resolve_lists()
    assert str(e.value) == (
        f"no train list in {tmp_path} (looked for train.csv, train.txt, annotations/train.csv "
        "and class folders "
        "train/<class>/*.mp4); pass --train-list FILE"
    )


def test_the_recipe_s_options_reach_the_clip_transform_and_the_dataset(monkeypatch, tmp_path):
    """Every data option a Kinetics recipe sets arrives at ``VideoTransform`` and
    ``VideoClipDataset`` unchanged (RandAugment only with ops > 0)."""
    import mvitv2.tasks.video as video_task

    calls: dict[str, tuple] = {}

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = (args, kwargs)
            return name

        return record

    monkeypatch.setattr(video_task, "VideoTransform", recorder("transform"))
    monkeypatch.setattr(video_task, "VideoClipDataset", recorder("dataset"))
    values = {
        "crop_size": 96,
        "train_crop": "short_side",
        "rrc_scale": [0.2, 0.9],
        "rrc_ratio": [0.5, 2.0],
        "short_side_range": [100, 120],
        "short_side_sampling": "inverse_uniform",
        "hflip": False,
        "randaug_n": 2,
        "randaug_m": 9,
        "reprob": 0.3,
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "test_short_side": 110,
        "test_pipeline": "torchvision",
        "num_frames": 8,
        "sampling_rate": 3,
        "sampling": "resampled",
        "test_clips": 4,
        "test_crops": 3,
        "num_repeats": 2,
        "pad": "loop",
        "target_fps": 15.0,
    }
    dc = VideoDataConfig.from_dict(values)
    assert dc.dataset("list.csv", tmp_path, True) == "dataset"
    args, kwargs = calls["transform"]
    assert args == (True,)
    assert kwargs == {
        "crop_size": 96,
        "crop": "short_side",
        "rrc_scale": (0.2, 0.9),
        "rrc_ratio": (0.5, 2.0),
        "short_side_range": (100, 120),
        "short_side_sampling": "inverse_uniform",
        "hflip": False,
        "randaug": (2, 9, 1.5, 0.5),
        "erase_prob": 0.3,
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "test_short_side": 110,
        "test_pipeline": "torchvision",
    }
    args, kwargs = calls["dataset"]
    assert args == ("list.csv", tmp_path)
    assert kwargs == {
        "train": True,
        "num_frames": 8,
        "sampling_rate": 3,
        "sampling": "resampled",
        "num_clips": 4,
        "num_crops": 3,
        "transform": "transform",
        "num_repeats": 2,
        "pad": "loop",
        "target_fps": 15.0,
        "classes": None,
    }
    VideoDataConfig.from_dict({**values, "randaug_n": 1}).transform(False)
    assert calls["transform"][0] == (False,) and calls["transform"][1]["randaug"] == (
        1,
        9,
        1.5,
        0.5,
    )
    VideoDataConfig.from_dict({**values, "randaug_n": 0}).transform(True)
    assert calls["transform"][1]["randaug"] is None


def test_class_names_come_from_the_classes_file_even_when_the_lists_use_fewer(tmp_path):
    from mvitv2.tasks.video import class_names

    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\ne\n")
    dc = VideoDataConfig.from_dict({})
    train, val = (
        SimpleNamespace(num_classes=3, class_names=None),
        SimpleNamespace(num_classes=2, class_names=None),
    )
    assert class_names(dc, names, train, val) == ["a", "b", "c", "d", "e"]
    assert class_names(dc, None, train, val) == ["0", "1", "2"]
    assert class_names(dc, None, train, SimpleNamespace(num_classes=4, class_names=None)) == [
        "0",
        "1",
        "2",
        "3",
    ]


def test_every_invalid_video_option_is_named_in_one_error_and_center_is_centre():
    from mvitv2.errors import UserValueError

    assert VideoDataConfig.from_dict({"init_inflation": "center"}).init_inflation == "center"
    with pytest.raises(UserValueError) as e:
        VideoDataConfig.from_dict(
            {"sampling": "segment", "target_fps": 10.0, "init_inflation": "mean", "pad": "zero"}
        )
    assert str(e.value) == (
        "invalid video data config: pad must be last or loop, got 'zero'; "
        "target_fps does not apply to segment sampling; set it to null; "
        "init_inflation must be centre or repeat, got 'mean'"
    )
