"""The video task: train -> eval -> predict through the CLI, multi-view scoring, recipes, init."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.cli import main
from mvitv2.engine.cli import resolve_recipe
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo
from mvitv2.tasks.video import (
    RECIPE_NAMES,
    VideoDataConfig,
    evaluate_views,
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
    printed = capsys.readouterr().out
    assert "val top-1" in printed and "wall time" in printed
    ckpt = out / "t" / "last.pt"
    saved = torch.load(ckpt, weights_only=True)
    meta = saved["meta"]
    assert meta["task"] == "video" and len(meta["class_names"]) == 20
    assert meta["class_names"][:2] == ["0_left", "0_right"]
    assert meta["preprocessing"]["num_frames"] == 4

    # Multi-view eval: 2 clips x 3 crops per video, scored once per video.
    assert main(["eval", "video", "--checkpoint", str(ckpt), "--clips", "2", "--crops", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 20  # 20 classes x 1 val video
    assert result["views"] == pytest.approx(6.0)
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
            cfg.model, num_classes=10, img_size=dc.crop_size, num_frames=dc.num_frames,
            **cfg.model_args,
        )  # fmt: skip
    assert model.cfg.num_frames == dc.num_frames
    dc.transform(train=True), dc.transform(train=False)
    if name.startswith("ssv2"):
        assert not dc.hflip and dc.sampling == "segment" and dc.views == 3


def test_train_flags_map_to_config() -> None:
    ns = SimpleNamespace(
        data="/v", train_list="/v/a.csv", val_list=None, classes=None, model=None, config=None,
        init="img.pyth", output=None, strict_data=False, overrides=["init_from=other.pth", "epochs=3"],
    )  # fmt: skip
    cfg = train_config(ns)  # type: ignore[arg-type]
    assert cfg.model == "mvitv2_small_16x4" and cfg.epochs == 3  # k400_small with --data
    assert cfg.data["video_root"] == "/v" and cfg.data["train_list"] == "/v/a.csv"
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
