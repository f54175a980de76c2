"""The image task's own wiring against independent references: ``evaluate`` against a count by
hand, the datasets ``build_datasets`` makes (training augmentation on train, the evaluation
view on val, val labelled by the training classes) against the transforms applied by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2.data.image import build_transform
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo
from mvitv2.errors import UserValueError
from mvitv2.tasks.image import ImageClassification
from test_values_image_task import TINY, _naive


class _Rows(torch.nn.Module):
    """Returns the next rows of ``logits``, one per input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.done = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.done += len(x)
        return self.logits[self.done - len(x) : self.done]


def test_task_evaluate_gives_top1_top5_and_cross_entropy_counted_by_hand():
    """``evaluate`` over a loader of two batches: top-1/top-5 (%) and mean cross-entropy
    over all samples, as a loop over the rows counts them."""
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.0, -1.0, -2.0, -3.0, 0.5],  # label 0: top-1
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 2: rank 4, in the top-5
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 6: rank 6, missed
        ]
    )
    labels = [0, 2, 6]
    loader = [
        (torch.zeros(2, 3, 4, 4), torch.tensor(labels[:2])),
        (torch.zeros(1, 3, 4, 4), torch.tensor(labels[2:])),
    ]

    task = ImageClassification(TrainConfig(model="mvitv2_tiny", data={"img_size": 32}))
    got = task.evaluate(_Rows(logits), loader, DistInfo())
    want = _naive(logits.double(), labels)
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-12)}
    assert (want["top1"], want["top5"], want["count"]) == (100 / 3, 200 / 3, 3)


def _two_class_folder(root: Path) -> Path:
    """train/b, train/a (two odd-sized patterned images each) and val/b only."""
    rng = np.random.default_rng(1)
    for split, classes in (("train", "ba"), ("val", "b")):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                pixels = rng.integers(0, 256, (52 + 8 * i, 70, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_build_datasets_augments_train_and_evaluates_val_with_the_training_labels(tmp_path):
    """Train samples go through the training augmentation (the same draws as the training
    transform applied by hand with the same seed, and not the evaluation view); val samples
    through the evaluation transform, labelled by the training classes (val/b is label 1)."""
    root = _two_class_folder(tmp_path / "d")
    task = ImageClassification(TrainConfig(model="mvitv2_tiny", data={"img_size": 32}), root)
    train, val = task.build_datasets()
    assert task.classes == train.classes == ["a", "b"]
    image = Image.open(root / "train" / "a" / "1.png").convert("RGB")
    aug = build_transform(task.data_cfg, train=True)
    view = build_transform(task.data_cfg, train=False)
    torch.manual_seed(5)
    x, y = train[1]
    torch.manual_seed(5)
    torch.testing.assert_close(x, aug(image), rtol=0, atol=0)
    assert y == 0 and x.shape == (3, 32, 32) and not torch.allclose(x, view(image))
    x, y = val[0]
    torch.testing.assert_close(x, view(Image.open(root / "val" / "b" / "0.png").convert("RGB")))
    assert (y, len(val)) == (1, 1)


def test_training_loss_needs_the_datasets_built_first():
    """The mixing criterion comes from ``build_datasets``: asking for a loss before it fails
    with that said."""
    task = ImageClassification(TrainConfig(model="mvitv2_tiny", data={"img_size": 32}))
    with pytest.raises(AssertionError) as err:
        task.training_loss(torch.nn.Identity(), (torch.zeros(1, 3), torch.zeros(1)))
    assert str(err.value) == "build_datasets() first"


def test_task_model_is_sized_by_the_data_and_starts_from_the_recipes_pretrained_tag(
    tmp_path, monkeypatch
):
    """``build_model(cfg, n, img_size)``: the recipe's variant with ``model_args``, ``n``
    outputs, sized for ``img_size`` (no ``img_size`` in ``model_args``), and the weights of
    ``cfg.pretrained``: every tensor equals the tagged file's."""
    import dataclasses

    import mvitv2
    from mvitv2.tasks.image import build_model
    from mvitv2.weights import registry

    source = mvitv2.create_model("mvitv2_tiny", num_classes=3, img_size=64, **TINY)
    torch.save({"model_state": source.state_dict()}, tmp_path / "w.pyth")
    entry = dataclasses.replace(
        registry.WEIGHTS["mvitv2_tiny.in1k"],
        tag="test.tiny",
        url=(tmp_path / "w.pyth").as_uri(),
        sha256=None,
        num_classes=3,
    )
    monkeypatch.setitem(registry.WEIGHTS, "test.tiny", entry)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, pretrained="test.tiny")
    model = build_model(cfg, 3, 64)
    got = model.state_dict()
    assert got.keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(got[k], v), k


# ---------------------------------------------------------------------- prediction inputs
def test_spec_views_of_arrays_tensors_and_grey_or_alpha_images_are_one_rgb_view():
    """One image given as a uint8 array (H, W, 3) or a uint8 tensor (3, H, W) is one view,
    the transform of its (3, H, W) tensor; a PIL image in another mode, that of its RGB
    conversion."""
    from mvitv2.tasks.image import SPEC

    p = SPEC.default_preprocessing("mvitv2_tiny", {}, {"img_size": 32})
    transform = SPEC.transform(p)
    pixels = np.random.default_rng(2).integers(0, 256, (40, 48, 3), np.uint8)
    chw = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    for item in (pixels, chw):
        torch.testing.assert_close(SPEC.views(item, p, transform), transform(chw)[None])
    rgb = Image.fromarray(pixels)
    for mode in ("L", "RGBA", "P"):
        other = rgb.convert(mode)
        got = SPEC.views(other, p, transform)
        torch.testing.assert_close(got, transform(other.convert("RGB"))[None], rtol=0, atol=0)


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny image checkpoint (classes cat, dog, eel; 32 x 32) whose EMA weights differ
    from its live ones, and its live model."""
    from mvitv2.engine.ema import build_ema
    from test_task_spec import _perturb, _task, _write

    task, model = _task("image")
    ema = build_ema(model, 0.5)
    _perturb(ema.module, seed=9)
    path = _write(tmp_path_factory.mktemp("ckpt") / "last.pt", task, model, ema=ema.state_dict())
    return {"ckpt": path, "model": model, "data_cfg": task.data_cfg}


def test_read_and_model_from_checkpoint_default_to_the_live_weights(trained):
    from mvitv2.engine.checkpoint import read_training_checkpoint
    from mvitv2.tasks.image import model_from_checkpoint, read_image_checkpoint

    ckpt = read_training_checkpoint(trained["ckpt"])
    info = read_image_checkpoint(ckpt)
    model, classes = model_from_checkpoint(ckpt)
    assert info.class_names == classes == ["cat", "dog", "eel"]
    for k, v in ckpt["model"].items():
        assert torch.equal(info.state_dict[k], v) and torch.equal(model.state_dict()[k], v), k
    assert any(not torch.equal(ckpt["ema"]["module." + k], v) for k, v in ckpt["model"].items())


def test_an_image_reader_given_a_video_checkpoint_names_it_and_the_command_to_use(tmp_path):
    from mvitv2.engine.checkpoint import read_training_checkpoint
    from mvitv2.tasks.image import model_from_checkpoint
    from test_predictor import make_video_checkpoint

    ckpt = read_training_checkpoint(make_video_checkpoint(tmp_path / "video.pt"))
    with pytest.raises(UserValueError) as e:
        model_from_checkpoint(ckpt)
    assert str(e.value) == (
        "checkpoint: a 'video' checkpoint, not an image classification checkpoint written by "
        "`mvitv2 train image`: use `mvitv2 eval video`"
    )


# ---------------------------------------------------------------------- commands
@pytest.mark.parametrize("as_json", [False, True])
def test_eval_image_of_a_clean_folder_prints_its_metrics_and_where_they_went(
    trained, as_json, tmp_path, capsys
):
    """On a folder with nothing unreadable: one line with top-1/top-5/loss counted by hand,
    the image count and the folder (no "skipped" note), then the JSON line, and on stderr
    where the metrics were saved; with ``--json`` the JSON line alone and no such note."""
    from mvitv2.cli import main
    from test_values_image_task import _logits

    rng = np.random.default_rng(4)
    images, labels = [], []
    for i, c in enumerate(["cat", "eel", "dog", "eel", "cat"]):
        (tmp_path / "val" / c).mkdir(parents=True, exist_ok=True)
        images.append(Image.fromarray(rng.integers(0, 256, (34 + i, 40, 3), np.uint8)))
        images[-1].save(tmp_path / "val" / c / f"{i}.png")
        labels.append(["cat", "dog", "eel"].index(c))
    want = _naive(_logits(trained["model"], images, trained["data_cfg"]), labels)
    out_file = tmp_path / "m.json"
    argv = ["eval", "image", "--checkpoint", str(trained["ckpt"]), "--data", str(tmp_path)]
    argv += ["--workers", "0", "--output", str(out_file), *(["--json"] if as_json else [])]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert json.loads(lines[-1]) == {**want, "loss": pytest.approx(want["loss"]), "skipped": 0}
    assert ("metrics saved to" in err) == (not as_json) and len(lines) == 2 - as_json
    if not as_json:
        assert f"metrics saved to {out_file}" in err
        head, tail = lines[0].split("  [")
        assert head == (
            f"{trained['ckpt']}: top-1 {want['top1']:.2f}%  top-5 {want['top5']:.2f}%  "
            f"loss {want['loss']:.4f}  on 5 images of {tmp_path / 'val'}"
        )
        assert tail.endswith(" s]")


def test_export_image_reads_the_checkpoint_as_an_image_one(trained, monkeypatch, tmp_path):
    """``mvitv2 export image`` hands the export the task ``image`` and a reader of image
    checkpoints (the model left to build from them) that refuses a video one."""
    import mvitv2.export
    from mvitv2.predict import WrongTaskError
    from mvitv2.tasks import image
    from test_predictor import make_video_checkpoint

    calls = []
    monkeypatch.setattr(mvitv2.export, "run_export", lambda *a: calls.append(a) or 0)
    args = argparse.Namespace(checkpoint=str(trained["ckpt"]), model=None)
    assert image.run("export", args) == 0
    ((task, got_args, read),) = calls
    info, model = read(args)
    assert (task, got_args, model, info.task) == ("image", args, None, "image")
    assert info.class_names == ["cat", "dog", "eel"]
    video = make_video_checkpoint(tmp_path / "video.pt")
    with pytest.raises(WrongTaskError) as e:
        read(argparse.Namespace(checkpoint=str(video), model=None))
    assert (e.value.found, e.value.expected) == ("video", "image")


def test_an_image_command_that_does_not_exist_is_named():
    from mvitv2.tasks import image

    with pytest.raises(NotImplementedError) as e:
        image.run("benchmark", argparse.Namespace())
    assert str(e.value) == "`mvitv2 benchmark image` does not exist"


@pytest.mark.parametrize("data, recipe", [(None, "digits"), ("folder", "in1k_tiny")])
def test_train_image_takes_the_digits_recipe_without_data_and_prints_the_run_s_result(
    data, recipe, tmp_path, monkeypatch, capsys
):
    """Without ``--data`` the run is the ``digits`` recipe on the embedded digits, with it
    ``in1k_tiny`` on the folder; ``--resume`` reaches the trainer; the last line gives the
    final top-1/top-5 (nan for a run that evaluated nothing), a wall time no longer than the
    command took, and the checkpoint."""
    import time

    import yaml

    from mvitv2.cli import main
    from mvitv2.engine.cli import RECIPES_DIR
    from mvitv2.tasks import image

    made = []

    class Recorder:
        dist = DistInfo()
        run_dir = tmp_path / "runs" / "r"

        def __init__(self, task, cfg, resume=None):
            made.append((task, cfg, resume))

    monkeypatch.setattr(image, "Trainer", Recorder)
    monkeypatch.setattr(image, "fit", lambda trainer: {"top1": 12.5, "top5": 62.125})
    argv = ["train", "image", "--resume", "auto", "--output", str(tmp_path / "runs")]
    if data:
        (tmp_path / data).mkdir()
        argv += ["--data", str(tmp_path / data)]
    start = time.perf_counter()
    assert main(argv) == 0
    took = time.perf_counter() - start
    ((task, cfg, resume),) = made
    want = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    assert (cfg.model, cfg.epochs, cfg.base_lr) == (want["model"], want["epochs"], want["base_lr"])
    assert task.data_root == (str(tmp_path / data) if data else "digits") and resume == "auto"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    head, wall, tail = line.split("  wall time ")[0], *line.split("  wall time ")[1].split(" s  ")
    assert head == "val top-1 12.50%  top-5 62.12%" and 0 <= float(wall) <= took + 0.05
    assert tail == f"checkpoint {tmp_path / 'runs' / 'r' / 'last.pt'}"
    monkeypatch.setattr(image, "fit", lambda trainer: {"wall_s": 0.5})  # nothing evaluated
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("val top-1 nan%  top-5 nan%  wall time ")


# ---------------------------------------------------------------------- options
def test_image_command_options_and_their_defaults():
    from mvitv2.cli import parse

    args = vars(parse(["eval", "image", "--checkpoint", "c.pt"]).args)
    assert {k: args[k] for k in ("checkpoint", "model", "data", "batch_size", "workers")} == {
        "checkpoint": "c.pt",
        "model": None,
        "data": None,
        "batch_size": 64,
        "workers": 2,
    }
    assert not (args["ema"] or args["strict_data"] or args["json"]) and args["output"] is None
    args = vars(parse(["predict", "image", "a.png", "b/", "--checkpoint", "c.pt"]).args)
    assert {k: args[k] for k in ("files", "model", "topk", "device", "batch_size")} == {
        "files": ["a.png", "b/"],
        "model": None,
        "topk": 5,
        "device": "cpu",
        "batch_size": 16,
    }
    assert not (args["ema"] or args["json"])
    args = vars(parse(["export", "image", "--checkpoint", "c.pt", "--model", "m"]).args)
    assert (args["checkpoint"], args["model"], args["format"]) == ("c.pt", "m", "onnx")
    assert "whole_detector" not in args  # a detection export option only
    args = vars(parse(["train", "image", "epochs=2"]).args)
    assert {k: args[k] for k in ("data", "model", "config", "resume", "output")} == dict.fromkeys(
        ("data", "model", "config", "resume", "output")
    )
    assert args["overrides"] == ["epochs=2"] and not args["strict_data"]


@pytest.mark.parametrize(
    "command, phrases",
    [
        (
            "train",
            [
                "--data DATA ImageNet-style folder (train/<class>/*, val/<class>/*); default: "
                "embedded digits",
                "--config CONFIG recipe YAML or shipped name (default: digits, or in1k_tiny "
                "with --data)",
            ],
        ),
        (
            "eval",
            [
                "--checkpoint CHECKPOINT checkpoint from `mvitv2 train image`, or released",
                "released-weights file (e.g. mvitv2_tiny)",
                "--data DATA dataset folder (default: the one the checkpoint was trained on; "
                "needed for released weights)",
                "--strict-data fail on unreadable images",
            ],
        ),
        (
            "predict",
            [
                "image files, folders (searched recursively) or glob patterns",
                "--checkpoint CHECKPOINT checkpoint from `mvitv2 train image`, or released",
                "released-weights file (e.g. mvitv2_tiny)",
                "--batch-size BATCH_SIZE images per forward",
                "--json one JSON line per image",
                "--topk TOPK classes to print per image",
                "--ema use the EMA weights",
            ],
        ),
        ("export", ["released-weights file (e.g. mvitv2_tiny)"]),
    ],
)
def test_image_command_help_speaks_of_images_and_the_image_commands(command, phrases, capsys):
    from mvitv2.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "image", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for phrase in phrases:
        assert phrase in out, phrase


def test_a_whole_imagenet_val_folder_gets_the_imagenet_labels():
    """All 1000 WordNet-id folders (a full ImageNet val split), in any order: the labels in
    ImageNet's order, tench (n01440764) first and toilet tissue (n15075141) last."""
    from mvitv2.tasks.image import label_order
    from mvitv2.weights.classes import imagenet_wnids

    folders = list(reversed(imagenet_wnids()))
    got = label_order(folders, 1000, "imagenet-1k")
    assert got is not None and len(got) == 1000 and sorted(got) == sorted(folders)
    assert (got[0], got[-1]) == ("n01440764", "n15075141")
