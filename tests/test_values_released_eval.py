"""``mvitv2 eval image`` on released weights, as timm's ``validate.py --pretrained`` and the
official repo's eval do: a weights tag, or a file in another project's format with ``--model``,
on an ImageNet-style folder, with the weights' own preprocessing.

The reference is timm's ``MultiScaleVit`` with the same (randomised) weights, fed images
prepared with torchvision's functional ops (short side 256, bicubic, centre crop 224, ImageNet
mean and std), its top-1, top-5 and cross-entropy computed by a loop over the images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2.cli import main

CLASSES = ["n01", "n02", "n03", "n04", "n05", "n06"]  # sorted folder names = label order


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """timm's mvitv2_tiny for 6 classes with random weights (rel-pos tables included), saved in
    timm's layout, and a val folder of one image per class, of odd sizes."""
    import timm

    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    ref = timm.create_model("mvitv2_tiny", pretrained=False, num_classes=6).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 and p.shape[0] > 6 else 0))
    torch.save(ref.state_dict(), root / "timm_mvitv2_tiny.pth")
    rng = np.random.default_rng(0)
    files = []
    for label, c in enumerate(CLASSES):
        (root / "data" / "val" / c).mkdir(parents=True)
        h, w = (260 + 20 * label, 300 - 16 * label)
        path = root / "data" / "val" / c / "a.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append((path, label))
    return {"root": root, "ref": ref, "files": files}


def _reference_metrics(ref, files) -> dict:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    logits, labels = [], []
    for path, label in files:
        x = TF.pil_to_tensor(Image.open(path).convert("RGB"))
        x = TF.resize(x, 256, InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, 224).float() / 255
        x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        with torch.no_grad():
            logits.append(ref(x[None]).double()[0])
        labels.append(label)
    out, y = torch.stack(logits), torch.tensor(labels)
    loss = torch.nn.functional.cross_entropy(out, y).item()
    n = len(files)
    top1 = 100 * int((out.argmax(1) == y).sum()) / n
    top5 = 100 * int((out.topk(5, 1).indices == y[:, None]).any(1).sum()) / n
    return {"top1": top1, "top5": top5, "loss": loss, "count": len(files)}


def _eval(argv: list[str], capsys) -> dict:
    assert main(["eval", "image", *argv, "--json", "--batch-size", "4", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_of_a_timm_file_with_model_gives_timms_metrics(released, capsys, tmp_path):
    want = _reference_metrics(released["ref"], released["files"])
    ckpt = released["root"] / "timm_mvitv2_tiny.pth"
    argv = ["--checkpoint", str(ckpt), "--model", "mvitv2_tiny"]
    got = _eval(
        [*argv, "--data", str(released["root"] / "data"), "--output", str(tmp_path / "m.json")],
        capsys,
    )
    assert (got["top1"], got["top5"], got["count"]) == (want["top1"], want["top5"], want["count"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert json.loads((tmp_path / "m.json").read_text())["loss"] == got["loss"]


def test_eval_of_a_weights_tag_downloads_it_and_saves_the_metrics_under_the_tag(
    released, capsys, tmp_path, monkeypatch
):
    from mvitv2.weights.io import cached_path
    from mvitv2.weights.registry import WEIGHTS, Preprocessing, Weights, register_weights

    monkeypatch.setattr("mvitv2.weights.registry.WEIGHTS", dict(WEIGHTS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    ckpt = released["root"] / "timm_mvitv2_tiny.pth"
    register_weights(
        Weights(
            tag="mvitv2_tiny.test6",
            model="mvitv2_tiny",
            url=ckpt.as_uri(),
            sha256=None,
            num_classes=6,
            classes="test",
            preprocessing=Preprocessing(),
            metrics={},
            source_format="timm",
        )
    )
    got = _eval(
        ["--checkpoint", "mvitv2_tiny.test6", "--data", str(released["root"] / "data")], capsys
    )
    want = _reference_metrics(released["ref"], released["files"])
    assert got["top1"] == want["top1"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert cached_path(ckpt.as_uri()).is_file()  # downloaded into torch.hub's cache
    assert json.loads((tmp_path / "mvitv2_tiny.test6_eval.json").read_text()) == {**got}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "mvitv2_tiniest"],
            "unknown model 'mvitv2_tiniest'",
        ),
        (
            ["--model", "mvitv2_small"],
            "timm_mvitv2_tiny.pth (timm layout) does not fit mvitv2_small: {counts}; pass the "
            "variant the weights are for as --model",
        ),
        (
            ["--model", "mvitv2_tiny", "--no-data"],
            "released weights have no dataset of their own: pass --data, an ImageNet-style "
            "folder with val/<class>/*.jpg",
        ),
        (
            ["--model", "mvitv2_tiny", "--two-classes"],
            "cannot be evaluated on {val} (2 class folders) with mvitv2_tiny: head reset: "
            "checkpoint 6 classes, model 2",
        ),
    ],
)
def test_released_weights_mistakes_are_one_line_and_exit_2(
    released, capsys, tmp_path, argv, message
):
    data = released["root"] / "data"
    if "--two-classes" in argv:
        argv = [a for a in argv if a != "--two-classes"]
        data = tmp_path / "two"
        for c in CLASSES[:2]:
            (data / "val" / c).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(data / "val" / c / "a.png")
    ckpt = released["root"] / "timm_mvitv2_tiny.pth"
    full = ["eval", "image", "--checkpoint", str(ckpt), *argv]
    if "--no-data" in argv:
        full.remove("--no-data")
    else:
        full += ["--data", str(data)]
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(val=data / "val", counts=_tiny_in_small()) in err
    assert err.startswith("mvitv2 eval image: error:")


def _tiny_in_small() -> str:
    """What tiny's tensors leave of small's, from the two models' own state dicts."""
    import mvitv2

    tiny = mvitv2.create_model("mvitv2_tiny", num_classes=6).state_dict()
    small = mvitv2.create_model("mvitv2_small", num_classes=6).state_dict()
    missing, unexpected = len(small.keys() - tiny.keys()), len(tiny.keys() - small.keys())
    # rel-pos tables of another length (same width) are interpolated, as load reports say
    other = sum(
        tiny[k].shape != small[k].shape
        and not ("rel_pos" in k and tiny[k].shape[1:] == small[k].shape[1:])
        for k in tiny.keys() & small.keys()
    )
    return f"{missing} of its tensors missing, {unexpected} unexpected, {other} of another shape"


def test_a_tag_of_video_weights_names_the_command_that_takes_them(capsys):
    assert main(["eval", "image", "--checkpoint", "mvitv2_small_16x4.k400", "--data", "."]) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 eval image: error: mvitv2_small_16x4.k400 are video weights; use "
        "`mvitv2 eval video`"
    )


def test_a_file_that_is_no_training_checkpoint_and_no_model_keeps_its_one_line(released, capsys):
    ckpt = released["root"] / "timm_mvitv2_tiny.pth"
    assert main(["eval", "image", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an mvitv2 training checkpoint" in err and "\n" not in err
