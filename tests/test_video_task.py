"""The video task: train -> eval -> predict through the CLI, multi-view scoring, recipes, init."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.cli import main
from mvitv2.data.moving_digits import write_video
from mvitv2.data.video import VideoReader
from mvitv2.engine.cli import resolve_recipe
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo
from mvitv2.errors import UserFileNotFoundError, UserValueError
from mvitv2.tasks import video as video_task
from mvitv2.tasks.video import (
    RECIPE_NAMES,
    VideoDataConfig,
    class_names,
    evaluate_views,
    find_list,
    init_weights,
    train_config,
)

# A few tiny clips (left/right only: 20 classes) and a one-block-per-stage model.
TINY_RUN = [
    "data.digits_train_per_class=2",
    "data.digits_val_per_class=1",
    "data.digits_frames=8",
    "data.digits_size=16",
    "data.digits_digit_size=[6,8]",
    "data.digits_speed=[1,1]",
    "data.digits_directions=[left,right]",
    "data.num_frames=4",
    "data.sampling_rate=1",
    "data.crop_size=16",
    "data.test_short_side=16",
    "model_args.depths=[1,1]",
    "model_args.embed_dim=16",
    "epochs=1",
    "batch_size=8",
    "workers=0",
    "progress=false",
    "tensorboard=false",
]


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated datasets go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_train_eval_predict_on_moving_digits(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "runs"
    assert main(["train", "video", f"output={out}", "name=t", *TINY_RUN]) == 0
    printed = capsys.readouterr()
    assert "val top-1" in printed.out and "wall time" in printed.out
    # 20 classes x 2 train and x 1 val videos; the recipe's 3 test clips x 1 crop per val video
    assert "data: train 40 videos, val 20 videos (60 views); " in printed.out + printed.err
    ckpt = out / "t" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)
    meta = saved["meta"]
    assert meta["task"] == "video" and len(meta["class_names"]) == 20
    assert meta["class_names"][:2] == ["0_left", "0_right"]
    assert meta["preprocessing"]["num_frames"] == 4
    # the recipe's target fps is the rate the generated files are written at
    with VideoReader(next(data_dir.glob("moving_digits-*/val/*/*.mp4"))) as reader:
        assert meta["preprocessing"]["target_fps"] == meta["data"]["target_fps"] == reader.fps

    # Multi-view eval: 2 clips x 3 crops per video, scored once per video.
    assert main(["eval", "video", "--checkpoint", str(ckpt), "--clips", "2", "--crops", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["count"] == 20  # 20 classes x 1 val video
    assert result["views"] == 6.0 and "2 clip(s) x 3 crop(s) = 6 views per video" in out[0]
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0

    videos = sorted((data_dir).glob("moving_digits-*/val/*/*.mp4"))[:2]
    assert len(videos) == 2
    assert (
        main(
            [
                "predict",
                "video",
                *map(str, videos),
                "--checkpoint",
                str(ckpt),
                "--topk",
                "3",
                "--json",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["file"] for x in lines] == [str(v) for v in videos]
    for line in lines:
        probs = [p for _, p in line["topk"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert all(c in meta["class_names"] for c, _ in line["topk"])


def test_eval_rejects_other_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "image.pt"
    torch.save({"model": {}, "config": TrainConfig().to_dict(), "meta": {"task": "image"}}, bad)
    assert main(["eval", "video", "--checkpoint", str(bad)]) == 2
    assert "not a video checkpoint" in capsys.readouterr().err
    assert main(["eval", "video", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_train_reports_missing_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "video", "--data", str(tmp_path), "--config", "moving_digits", "epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no train list" in err and str(tmp_path) in err


class _ViewModel(nn.Module):
    """Logits read from the clip: pixel [0, 0, 0, 0] holds the predicted class."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, 0, 0, 0, 0].long()
        return nn.functional.one_hot(cls, self.num_classes).float() * 4.0


def test_evaluate_views_averages_softmax_per_video() -> None:
    # Video 0 (label 1): views vote 1, 1, 2 -> correct. Video 1 (label 0): votes 2, 2, 0 -> wrong.
    votes = {0: [1, 1, 2], 1: [2, 2, 0]}
    batches = []
    for vid, vs in votes.items():
        clips = torch.zeros(len(vs), 3, 2, 4, 4)
        clips[:, 0, 0, 0, 0] = torch.tensor(vs, dtype=torch.float)
        batches.append((clips, torch.zeros(len(vs)), torch.full((len(vs),), vid)))
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=1), SimpleNamespace(label=0)])
    m = evaluate_views(_ViewModel(3), batches + [None], DistInfo(), dataset)  # type: ignore[arg-type]
    assert m["count"] == 2 and m["views"] == 3
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipes_build(name: str) -> None:
    cfg = TrainConfig.load(resolve_recipe(name))
    dc = VideoDataConfig.from_dict(cfg.data)
    assert mvitv2.get_config(cfg.model).temporal
    # The recipe's clip shape fits its model (built on the meta device: no memory, no time).
    with torch.device("meta"):
        model = mvitv2.create_model(
            cfg.model,
            num_classes=10,
            img_size=dc.crop_size,
            num_frames=dc.num_frames,
            **cfg.model_args,
        )
    assert model.cfg.num_frames == dc.num_frames
    dc.transform(train=True), dc.transform(train=False)
    if name.startswith("ssv2"):
        assert not dc.hflip and dc.sampling == "segment" and dc.views == 3


def test_train_flags_map_to_config(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.csv").touch()
    ns = SimpleNamespace(
        data=str(tmp_path / "v"),
        train_list=str(tmp_path / "v" / "a.csv"),
        val_list=None,
        classes=None,
        model=None,
        config=None,
        init="img.pyth",
        output=None,
        strict_data=False,
        overrides=["init_from=other.pth", "epochs=3"],
    )
    cfg = train_config(ns)  # type: ignore[arg-type]
    assert cfg.model == "mvitv2_small_16x4" and cfg.epochs == 3  # k400_small with --data
    assert cfg.data["video_root"] == ns.data and cfg.data["train_list"] == ns.train_list
    assert cfg.data["init_from"] == "img.pyth"  # the flag wins over the override
    ns.data = ns.train_list = ns.init = None
    ns.overrides = []
    assert train_config(ns).data.get("video_root") is None  # type: ignore[arg-type]


def test_init_from_image_checkpoint_inflates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = {"depths": (1, 1), "embed_dim": 16, "img_size": 32}
    image = mvitv2.create_model("mvitv2_tiny", num_classes=5, use_cls_token=True, **tiny)
    path = tmp_path / "image.pth"
    torch.save(image.state_dict(), path)
    video = mvitv2.create_model("mvitv2_small_16x4", num_classes=7, num_frames=4, **tiny)
    report = init_weights(video, str(path))
    w2d = image.state_dict()["patch_embed.proj.weight"]
    w3d = video.state_dict()["patch_embed.proj.weight"]
    assert w3d.shape[2] == 3
    torch.testing.assert_close(w3d[:, :, 1], w2d.squeeze(2) if w2d.dim() == 5 else w2d)
    assert not w3d[:, :, 0].any()  # the paper's centre inflation
    assert any("head" in k for k in report.initialized)  # 5 -> 7 classes: head re-initialised


# ----------------------------------------------------------------------------- every recipe
def _noise_clips(root: Path, split: str, n: int, fps: int = 25) -> list[str]:
    rng = np.random.default_rng(len(split) + n)
    names = []
    for i in range(n):
        frames = rng.integers(0, 256, (12, 36, 48, 3), dtype=np.uint8)
        write_video(root / f"{split}{i}.mp4", frames, fps=fps)
        names.append(f"{split}{i}.mp4")
    return names


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kinetics-style root: 4 training and 2 validation clips of 12 frames at 25 fps."""
    root = tmp_path_factory.mktemp("videos")
    for split, n in (("train", 4), ("val", 2)):
        names = _noise_clips(root, split, n)
        (root / f"{split}.txt").write_text("".join(f"{x} {i % 2}\n" for i, x in enumerate(names)))
    return root


# Tiny model and clips; everything else (crop kind, RandAugment, erasing, repeats, mixup / cutmix,
# label smoothing, optimizer, amp, grad checkpointing, test views) as the recipe says.
RECIPE_TINY = [
    "model_args.depths=[1,1]",
    "model_args.embed_dim=16",
    "data.num_frames=4",
    "data.crop_size=32",
    "data.test_short_side=32",
    "data.short_side_range=[32,40]",
    "batch_size=2",
    "epochs=1",
    "workers=0",
    "progress=false",
    "tensorboard=false",
]


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_video_recipe_trains_through_the_cli(name: str, video_root: Path, tmp_path: Path):
    recipe = TrainConfig.load(resolve_recipe(name))
    out = tmp_path / "runs"
    args = ["train", "video", "--data", str(video_root), "--config", name]
    assert main([*args, f"output={out}", "name=r", *RECIPE_TINY]) == 0
    record = json.loads((out / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and math.isfinite(record["train_loss"])  # 4 videos, batch 2
    views = recipe.data["test_clips"] * recipe.data["test_crops"]
    assert record["val_count"] == 2 and record["val_views"] == views
    meta = torch.load(out / "r" / "last.pt", weights_only=True)["meta"]
    assert meta["preprocessing"]["target_fps"] == recipe.data["target_fps"]


# ----------------------------------------------------------------------------- bad data
def test_bad_videos_are_reported_per_split_and_named_once(
    video_root: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    train = video_root.joinpath("train.txt").read_text() + f"{tmp_path / 'garbage.mp4'} 1\n"
    (tmp_path / "train.txt").write_text(train)
    val = video_root.joinpath("val.txt").read_text() + f"{tmp_path / 'gone.mp4'} 0\n"
    (tmp_path / "val.txt").write_text(val)
    args = ["train", "video", "--data", str(video_root), "--config", "k400_small"]
    lists = ["--train-list", str(tmp_path / "train.txt"), "--val-list", str(tmp_path / "val.txt")]
    run = [f"output={tmp_path}", "name=r", *RECIPE_TINY, "epochs=2", "data.num_repeats=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named by the run's log, not by warnings
        assert main([*args, *lists, *run, "batch_size=5"]) == 0  # every train video, every epoch
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    # the trainer counts the skipped items: the bad training video once per epoch, the bad
    # validation video once per view (5 clips x 1 crop)
    assert [r["skipped_samples"] for r in records] == [1, 1]
    assert last["skipped_samples_total"] == 2 and last["val_skipped_samples"] == 5
    # the val metrics count the validation set's bad file only, not the training set's
    assert last["val_videos_bad_missing"] == 1 and "val_videos_bad_corrupt" not in last
    assert last["val_count"] == 2 and last["val_views"] == 5  # the protocol's views
    captured = capsys.readouterr()
    printed = captured.out
    assert "train videos skipped/padded: {" in printed and "'bad_corrupt': 1" in printed
    assert "val videos skipped/padded: {" in printed and "'bad_missing': 1" in printed
    # each bad file named once, with its reason, over two epochs of training and evaluation
    err = captured.err
    assert err.count("skipped unreadable sample") == 2, err
    assert err.count(f"skipped unreadable sample {tmp_path / 'gone.mp4'}: no such file") == 1
    garbage = f"skipped unreadable sample {tmp_path / 'garbage.mp4'}: cannot open video ("
    assert err.count(garbage) == 1


def test_eval_views_are_the_protocol_even_with_a_bad_video(
    video_root: Path, tmp_path: Path, capsys
):
    out = tmp_path / "runs"
    args = ["train", "video", "--data", str(video_root), "--config", "moving_digits"]
    assert main([*args, f"output={out}", "name=r", *RECIPE_TINY]) == 0
    val = f"{tmp_path / 'gone.mp4'} 1\n" + video_root.joinpath("val.txt").read_text()
    (tmp_path / "val.txt").write_text(val)
    capsys.readouterr()
    ckpt = str(out / "r" / "last.pt")
    lists = ["--data", str(video_root), "--val-list", str(tmp_path / "val.txt"), "--workers", "0"]
    assert main(["eval", "video", "--checkpoint", ckpt, *lists, "--clips", "5"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    result = json.loads(lines[-1])
    # the bad video is not scored and gives its views to no other video: 5 clips x 1 crop
    assert (result["count"], result["views"]) == (2, 5.0)
    assert (result["bad_missing"], result["skipped"]) == (1, 5)  # 1 file, 5 views skipped
    assert "5 clip(s) x 1 crop(s) = 5 views per video" in lines[0]
    assert "(5 unreadable views skipped)" in lines[0]
    named = f"skipped unreadable video {tmp_path / 'gone.mp4'}: no such file"
    assert captured.err.count("skipped unreadable") == captured.err.count(named) == 1
    # --strict-data: the first bad video fails the evaluation, one line, exit 2
    assert main(["eval", "video", "--checkpoint", ckpt, *lists, "--strict-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        f"unreadable video (strict data): {tmp_path / 'gone.mp4'}: no such file; without "
        "strict_data such videos are skipped and counted"
    )


def test_a_video_run_whose_videos_are_all_unreadable_stops_with_one_line(
    video_root: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "train.txt").write_text(
        "".join(f"{tmp_path}/gone{i}.mp4 {i % 2}\n" for i in range(3))
    )
    args = ["train", "video", "--data", str(video_root), "--config", "k400_small"]
    lists = ["--train-list", str(tmp_path / "train.txt"), "--val-list", str(tmp_path / "train.txt")]
    run = [f"output={tmp_path / 'runs'}", "name=r", *RECIPE_TINY, "batch_size=1"]
    assert main([*args, *lists, *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1, err
    assert re.search(
        rf"error: 3 unreadable videos in a row from index \d, the last {tmp_path}/gone\d\.mp4: "
        r"no such file; the data looks broken: check that the data root and the list or "
        r"annotation file point at existing, readable files$",
        err[-1],
    ), err


# ----------------------------------------------------------------------------- resume
def test_resume_auto_continues_a_run_whose_checkpoint_has_the_old_metadata_schema(
    video_root: Path, tmp_path: Path, capsys
) -> None:
    from mvitv2.engine.checkpoint import save_checkpoint

    out = tmp_path / "runs"
    args = ["train", "video", "--data", str(video_root), "--config", "moving_digits"]
    run = [*args, f"output={out}", "name=r", *RECIPE_TINY, "warmup_epochs=0.5"]
    assert main(run) == 0
    last = out / "r" / "last.pt"
    state = torch.load(last, weights_only=True)
    names = state["meta"]["class_names"]

    def write_old_schema(class_names: list[str]) -> None:
        """The meta of a checkpoint written before meta_version 2: no version, task, model name,
        model kwargs or preprocessing (the task is inferred from the model, a video model)."""
        save_checkpoint({**state, "meta": {"class_names": class_names, "data": data}}, last)

    data = state["meta"]["data"]
    write_old_schema(names)
    capsys.readouterr()
    assert main([*run, "epochs=2", "--resume", "auto"]) == 0
    assert f"resumed from {last} at epoch 2" in capsys.readouterr().err
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["meta"]["meta_version"] == 2
    # An old checkpoint of another experiment (other classes) is still refused.
    state = resumed
    write_old_schema(names[::-1])
    assert main([*run, "epochs=3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "is another experiment (its config differs in meta.class_names)" in err, err


# ----------------------------------------------------------------------------- errors
def test_user_mistakes_exit_2_with_one_line(video_root: Path, tmp_path: Path, capsys) -> None:
    base = ["train", "video", "--data", str(video_root), f"output={tmp_path}", *RECIPE_TINY]
    cases = {
        "data.pad=mirror": "pad must be last or loop, got 'mirror'",
        "data.frames=3": "unknown video data option 'frames' (did you mean 'num_frames'",
        "data.target_fps=0": "target_fps must be > 0 or null, got 0",
        "model=mvitv2_tiny": "mvitv2_tiny is an image model",
        "model=mvitv2_nope": "unknown model 'mvitv2_nope'",
        "model_args.depthz=[1]": "unknown option(s) for mvitv2_small_16x4",
        "model_args.depths=[0]": "model_args of mvitv2_small_16x4: depths must be positive",
    }
    for override, message in cases.items():
        assert main([*base, override]) == 2, override
        lines = capsys.readouterr().err.strip().splitlines()
        err = "\n".join(line for line in lines if not line.startswith("note: "))  # short-run warmup
        assert err.startswith("mvitv2 train video: error: ") and message in err, (override, err)
        assert len(err.splitlines()) == 1
    missing = ["eval", "video", "--checkpoint", str(tmp_path / "nope.pt")]
    assert main(missing) == 2 and "nope.pt does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main([*missing[:3], str(tmp_path / "bad.pt")]) == 2
    assert "bad.pt could not be read" in capsys.readouterr().err
    assert main(["predict", "video", "x.mp4", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(video_root: Path, tmp_path: Path, monkeypatch):
    def broken(self):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(video_task.VideoClassification, "build_model", broken)
    base = ["train", "video", "--data", str(video_root), f"output={tmp_path}", *RECIPE_TINY]
    with pytest.raises(ValueError, match="a bug, not a user mistake"):
        main(base)


def test_video_data_config_rejects_fps_for_segments_and_wrong_types():
    with pytest.raises(
        UserValueError, match="target_fps does not apply to segment sampling; set it to null"
    ):
        VideoDataConfig.from_dict({"sampling": "segment", "target_fps": 30})
    assert VideoDataConfig.from_dict({"sampling": "segment"}).target_fps is None
    with pytest.raises(UserValueError, match="^video data option num_frames: expected an integer"):
        VideoDataConfig.from_dict({"num_frames": "sixteen"})
    with pytest.raises(UserValueError, match="unknown video data option 'fps'"):
        VideoDataConfig.from_dict({"fps": 30})


def test_preprocessing_stored_with_checkpoints():
    dc = VideoDataConfig.from_dict(
        {
            "crop_size": 32,
            "num_frames": 8,
            "sampling_rate": 2,
            "test_clips": 3,
            "test_crops": 3,
            "target_fps": 30,
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.1, 0.3],
        }
    )
    assert dc.preprocessing() == {
        "input_size": [32, 32],
        "resize_size": 37,  # round(32 * 256 / 224) = round(36.57)
        "interpolation": "bilinear",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.1, 0.3],
        "num_frames": 8,
        "sampling_rate": 2,
        "sampling": "clip",
        "num_clips": 3,
        "num_crops": 3,
        "target_fps": 30,
        "pad": "last",
        "test_pipeline": "slowfast",
    }
    assert dc.views == 9
    assert VideoDataConfig(crop_size=224).preprocessing()["resize_size"] == 256
    assert VideoDataConfig(crop_size=224, test_short_side=300).preprocessing()["resize_size"] == 300
    assert VideoDataConfig().preprocessing()["mean"] == [0.45] * 3
    assert VideoDataConfig().preprocessing()["std"] == [0.225] * 3


def test_list_files_found_in_the_video_root(tmp_path: Path):
    with pytest.raises(UserFileNotFoundError, match="no train list in .* pass --train-list"):
        find_list(tmp_path, "train")
    for name in ("train.txt", "train.csv", "test.csv"):
        (tmp_path / name).write_text("a.mp4 0\n")
    assert find_list(tmp_path, "train") == tmp_path / "train.csv"
    assert find_list(tmp_path, "val") == tmp_path / "test.csv"
    (tmp_path / "val.txt").write_text("a.mp4 0\n")
    assert find_list(tmp_path, "val") == tmp_path / "val.txt"
    (tmp_path / "val.csv").write_text("a.mp4 0\n")
    assert find_list(tmp_path, "val") == tmp_path / "val.csv"


def test_class_names_from_file_count_or_labels(tmp_path: Path):
    train, val = (
        SimpleNamespace(num_classes=3, class_names=None),
        SimpleNamespace(num_classes=4, class_names=None),
    )
    names: Any = class_names  # called with stand-ins for the datasets

    assert names(VideoDataConfig(), None, train, val) == ["0", "1", "2", "3"]
    assert names(VideoDataConfig(), None, train, None) == ["0", "1", "2"]
    assert names(VideoDataConfig(num_classes=6), None, train, val)[-1] == "5"
    (tmp_path / "c.txt").write_text("a\nb\nc\nd\n")
    assert names(VideoDataConfig(), tmp_path / "c.txt", train, val) == list("abcd")
    with pytest.raises(UserValueError, match="4 class names, but num_classes=5"):
        names(VideoDataConfig(num_classes=5), tmp_path / "c.txt", train, val)
    with pytest.raises(UserValueError, match="use label 3, but there are only 3 classes"):
        names(VideoDataConfig(num_classes=3), None, train, val)


def test_evaluate_views_matches_a_naive_per_video_softmax_average():
    """Random logits for 5 videos with 1-4 views each, split over batches in mixed order, one
    all-skipped batch and one video without any view; the reference averages the softmax of each
    video's views in a plain loop."""
    torch.manual_seed(0)
    num_classes, labels = 7, [3, 0, 6, 2, 5, 1]
    views = {0: 3, 1: 1, 2: 4, 3: 2, 4: 3}  # video 5: no view (every attempt unreadable)
    items = [(v, torch.randn(num_classes) * 2) for v, n in views.items() for _ in range(n)]
    order = torch.randperm(len(items)).tolist()
    batches = []
    for chunk in torch.tensor(order).split(4):
        vids = torch.tensor([items[i][0] for i in chunk])
        logits = torch.stack([items[i][1] for i in chunk])
        batches.append((logits.view(-1, 1, 1, 1, num_classes), torch.zeros(len(chunk)), vids))
    batches.insert(1, None)

    class Logits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    dataset = SimpleNamespace(samples=[SimpleNamespace(label=y) for y in labels])
    m = evaluate_views(Logits(), batches, DistInfo(), dataset)  # type: ignore[arg-type]
    top1 = top5 = nll = 0.0
    for v in views:
        probs = [torch.softmax(lg.double(), 0) for u, lg in items if u == v]
        avg = sum(probs) / len(probs)
        ranked = sorted(range(num_classes), key=lambda c: -avg[c].item())
        top1 += ranked[0] == labels[v]
        top5 += labels[v] in ranked[:5]
        nll -= math.log(avg[labels[v]].item())
    assert m["count"] == 5 and m["views"] == pytest.approx(13 / 5)
    assert m["top1"] == pytest.approx(100 * top1 / 5) and m["top5"] == pytest.approx(100 * top5 / 5)
    assert 0 < top1 < top5 < 5  # the case tells top-1 from top-5
    assert m["loss"] == pytest.approx(nll / 5, rel=1e-6)
