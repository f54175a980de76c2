"""mvitv2.tasks.video by value, part 3: initialising from a run's checkpoint names the file it
read (the training log's ``initialised from ...`` line) and a missing ``init_from`` file is one
line naming the option and the path; ``build_datasets`` with and without a validation list, the
run's mixing options and the training loss they give; ``pretrained`` reaching ``create_model``;
multi-view scores on the process's device and on a rank that saw no batch; the digits cache."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError
from mvitv2.tasks.video import VideoClassification, init_weights
from test_values_video_task2 import TINY


def _video_model(classes: int = 7) -> nn.Module:
    torch.manual_seed(1)
    return mvitv2.create_model("mvitv2_small_16x4", num_classes=classes, num_frames=4, **TINY)


def test_a_run_checkpoint_that_does_not_fit_is_refused_naming_the_file(tmp_path):
    """A run of another size: the error names ``init_from``, the file, and the mismatch."""
    other = mvitv2.create_model("mvitv2_small_16x4", num_classes=7, num_frames=4,
                                depths=(1, 1), embed_dim=24, img_size=32)  # fmt: skip
    path = tmp_path / "best.pt"
    torch.save({"model": other.state_dict(), "config": {"model": "x"}}, path)
    with pytest.raises(UserValueError) as e:
        init_weights(_video_model(), str(path))
    msg = str(e.value)
    assert msg.startswith(f"init_from {path}: checkpoint {path} (detected format: ")


@pytest.mark.parametrize("name", ["gone.pt", "gone.pth"])
def test_a_missing_init_from_file_is_one_line_naming_the_option_and_the_path(tmp_path, name):
    """Whatever the suffix, the same user error: ``init_from PATH: checkpoint file not found``."""
    path = tmp_path / name
    with pytest.raises(UserValueError) as e:
        init_weights(_video_model(), str(path))
    assert str(e.value) == f"init_from {path}: checkpoint file not found: {path}"


# ----------------------------------------------------------------------------- datasets and loss
def _lists(root, train: str, val: str | None = None):
    (root / "train.txt").write_text(train)
    if val is not None:
        (root / "val.txt").write_text(val)


def test_without_a_val_list_build_datasets_gives_no_validation_set(tmp_path):
    """A root with only ``train.txt``: a training set of its two videos, no validation set, and
    classes ``0..K-1`` from the training labels (K = 1 + the largest, 3)."""
    _lists(tmp_path, "a.mp4 2\nb.mp4 0\n")
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path)}))
    train, val = task.build_datasets()
    assert val is None and task.val_ds is None
    assert [(s.path, s.label) for s in train.samples] == [
        (tmp_path / "a.mp4", 2), (tmp_path / "b.mp4", 0),
    ]  # fmt: skip
    assert task.classes == ["0", "1", "2"]


def test_a_validation_label_above_every_training_label_adds_classes(tmp_path):
    """Training labels 0-1, validation label 4: five classes, so the head can score label 4."""
    _lists(tmp_path, "a.mp4 1\nb.mp4 0\n", "c.mp4 4\n")
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path)}))
    train, val = task.build_datasets()
    assert val is not None and [s.label for s in val.samples] == [4]
    assert task.classes == ["0", "1", "2", "3", "4"]
    assert task.mix is not None and task.mix.num_classes == 5


def test_the_runs_mixing_options_reach_the_mix_criterion(tmp_path):
    """mixup / cutmix alphas, the batch probability, the cutmix share and the smoothing of the
    run config are the ones the training batches are mixed with."""
    _lists(tmp_path, "a.mp4 1\n")
    cfg = TrainConfig(data={"video_root": str(tmp_path)}, mixup=0.3, cutmix=0.6, mix_prob=0.7,
                      switch_prob=0.2, label_smoothing=0.05)  # fmt: skip
    task = VideoClassification(cfg)
    task.build_datasets()
    mix = task.mix
    assert (mix.prob, mix.label_smoothing, mix.num_classes) == (0.7, 0.05, 2)
    ops = mix.mix.transforms
    assert [type(op).__name__ for op in ops] == ["MixUp", "CutMix"]
    assert [op.alpha for op in ops] == [0.3, 0.6]
    assert mix.mix.p == pytest.approx([0.8, 0.2])


class _Fixed(nn.Module):
    """Logits fixed per batch item, whatever the clip."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def test_without_mixing_the_training_loss_is_label_smoothed_cross_entropy(tmp_path):
    """mixup = cutmix = 0: the loss is torch's cross-entropy with the run's label smoothing
    (computed by hand: (1 - s) * -log p_y + s * mean_k -log p_k)."""
    _lists(tmp_path, "a.mp4 0\nb.mp4 3\n")
    cfg = TrainConfig(data={"video_root": str(tmp_path)}, mixup=0.0, cutmix=0.0,
                      label_smoothing=0.2)  # fmt: skip
    task = VideoClassification(cfg)
    task.build_datasets()
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.1, -2.0, 1.5]])
    labels = torch.tensor([0, 3])
    loss, extra = task.training_loss(_Fixed(logits), (torch.zeros(2, 3, 1, 2, 2), labels, None))
    logp = logits.log_softmax(-1)
    want = ((1 - 0.2) * -logp[[0, 1], labels] + 0.2 * -logp.mean(-1)).mean()
    torch.testing.assert_close(loss, want)
    assert extra == {}


def test_the_training_loss_before_build_datasets_is_an_internal_error_saying_so():
    task = VideoClassification(TrainConfig())
    with pytest.raises(AssertionError, match=r"^build_datasets\(\) first$"):
        task.training_loss(nn.Identity(), (torch.zeros(1), torch.zeros(1), None))


# ----------------------------------------------------------------------------- model and devices
def test_build_model_passes_the_runs_pretrained_choice_to_create_model(monkeypatch):
    """``pretrained=<tag>`` in the run config reaches ``create_model`` (the weights are fetched
    there; recorded here instead of downloaded), with the class count and the clip size."""
    from mvitv2.tasks.video import build_model

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(mvitv2, "create_model", lambda name, **kw: calls.append((name, kw)))
    for pretrained in (True, "mvitv2_small_16x4.k400", False):
        cfg = TrainConfig(model="mvitv2_small_16x4", pretrained=pretrained,
                          data={"crop_size": 64, "num_frames": 8})  # fmt: skip
        build_model(cfg, 9)
    assert calls == [
        ("mvitv2_small_16x4",
         {"pretrained": p, "num_classes": 9, "img_size": 64, "num_frames": 8})
        for p in (True, "mvitv2_small_16x4.k400", False)
    ]  # fmt: skip


class _DeviceProbe(nn.Module):
    """Records the device of its input; fixed logits on the CPU (a meta tensor has no values)."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.devices.append(x.device)
        return torch.tensor([[0.0, 3.0]]).expand(x.shape[0], 2)


class _MetaProcess:
    """A single process computing on ``meta``; its sums stay on the CPU (meta has no values)."""

    device = torch.device("meta")

    def all_gather_object(self, obj):
        return [obj]

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.double()


def test_evaluate_views_runs_the_model_on_the_process_device():
    """The clips are moved to ``dist.device`` (a GPU in a real run; ``meta`` here) before the
    forward; the scores are those of the logits: class 1 for both videos."""
    from mvitv2.tasks.video import evaluate_views

    model = _DeviceProbe()
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=1), SimpleNamespace(label=0)])
    batch = (torch.zeros(3, 3, 1, 2, 2), torch.zeros(3), torch.tensor([0, 0, 1]))
    m = evaluate_views(model, [batch], _MetaProcess(), dataset)  # type: ignore[arg-type]
    assert model.devices == [torch.device("meta")]
    assert (m["top1"], m["count"], m["views"]) == (50.0, 2, 1.5)


def test_each_set_of_digits_options_has_its_own_cache_folder_named_by_a_short_tag(
    monkeypatch, tmp_path
):
    """``MVITV2_DATA/moving_digits-<10 hex digits>``; the order of the directions (which numbers
    the classes) is part of the options, so reversing it is another folder."""
    import re

    import mvitv2.data.moving_digits as md
    from mvitv2.tasks.video import VideoDataConfig, moving_digits_lists

    made: list[tuple[Path, dict]] = []

    def fake(root, **params):
        made.append((Path(root), params))
        return SimpleNamespace(train_list=root / "t", val_list=root / "v", classes_file=root / "c")

    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    monkeypatch.setattr(md, "make_moving_digits", fake)
    dc = VideoDataConfig(digits_directions=("left", "right"), digits_seed=3)
    train, val, classes = moving_digits_lists(dc)
    folder = made[0][0]
    assert (train, val, classes) == (folder / "t", folder / "v", folder / "c")
    assert folder.parent == tmp_path and re.fullmatch(r"moving_digits-[0-9a-f]{10}", folder.name)
    assert made[0][1]["directions"] == ["left", "right"] and made[0][1]["seed"] == 3
    moving_digits_lists(VideoDataConfig(digits_directions=("right", "left"), digits_seed=3))
    moving_digits_lists(VideoDataConfig(digits_directions=("left", "right"), digits_seed=3))
    assert made[1][0] != folder and made[2][0] == folder


class _SecondRank:
    """Rank 1 of 2 under ``torchrun``, with rank 0's sums given: gathers ``[width, None]`` and
    adds rank 0's tensors, which (like NCCL's all_reduce) must have this rank's shape."""

    def __init__(self, probs: torch.Tensor, counts: torch.Tensor) -> None:
        self.device = torch.device("cpu")
        self.others = [probs, counts]

    def all_gather_object(self, obj):
        return [self.others[0].shape[1], obj]

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        other = self.others.pop(0)
        assert values.shape == other.shape, (values.shape, other.shape)
        return values.double() + other


def test_a_rank_whose_batches_were_all_skipped_still_joins_the_sums_with_the_right_width():
    """This rank saw only an all-skipped batch; rank 0 scored video 0 twice and video 1 once
    over 3 classes: the result is rank 0's views averaged, computed by hand."""
    from mvitv2.tasks.video import evaluate_views

    probs = torch.tensor([[0.1 + 0.3, 0.2 + 0.3, 0.7 + 0.4], [0.6, 0.3, 0.1]], dtype=torch.float64)
    counts = torch.tensor([2.0, 1.0], dtype=torch.float64)
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=2), SimpleNamespace(label=0)])
    model = _DeviceProbe()
    m = evaluate_views(model, [None], _SecondRank(probs, counts), dataset)  # type: ignore[arg-type]
    assert model.devices == []
    assert (m["top1"], m["top5"], m["count"], m["views"]) == (100.0, 100.0, 2, 1.5)
    assert m["loss"] == pytest.approx(-(math.log(0.55) + math.log(0.6)) / 2)


def test_a_new_task_has_built_nothing_and_a_model_without_init_from_reports_no_init():
    """Before ``build_datasets``: no classes, mixing, datasets or skip counts; a model built
    without ``init_from`` leaves ``init_report`` None (``train`` then logs no initialisation)."""
    cfg = TrainConfig(model="mvitv2_small_16x4", data={"crop_size": 32, "num_frames": 4},
                      model_args={"depths": [1, 1], "embed_dim": 16})  # fmt: skip
    task = VideoClassification(cfg)
    assert (task.classes, task.mix, task.train_ds, task.val_ds) == ([], None, None, None)
    assert task.skipped("train") == {} and task.skipped("val") == {}
    task.classes = ["a", "b", "c"]
    model = task.build_model()
    assert task.init_report is None
    assert model.head.projection.out_features == 3
