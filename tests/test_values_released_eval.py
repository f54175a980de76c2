"""``mvitv2 eval image`` on released weights, as timm's ``validate.py --pretrained`` and the
official repo's eval do: a weights tag, or a file in another project's format with ``--model``,
on an ImageNet-style folder, with the weights' own preprocessing.

The reference is timm's ``MultiScaleVit`` with the same (randomised) weights, fed images
prepared as the official eval and timm's ``validate.py`` prepare them (torchvision's functional
ops on the PIL image: short side 256 in PIL's bicubic, centre crop 224, ImageNet mean and std),
its top-1, top-5 and cross-entropy computed by a loop over the images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2.cli import main

CLASSES = ["n01", "n02", "n03", "n04", "n05", "n06"]  # sorted folder names = label order


def randomised_timm_tiny(path: Path, num_classes: int, seed: int, head_std: float):
    """timm's mvitv2_tiny (timm's init, then random rel-pos tables and head, so that the logits
    depend on the input and on its preprocessing), saved at ``path`` in timm's layout."""
    import timm

    torch.manual_seed(seed)
    ref = timm.create_model("mvitv2_tiny", pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
            elif name.startswith("head"):
                p.normal_(0, head_std)
    torch.save(ref.state_dict(), path)
    return ref


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """timm's mvitv2_tiny for 6 classes (timm's init, then random rel-pos tables and head, so
    that the logits depend on the input and on its preprocessing), saved in timm's layout, and
    a val folder of one patterned image per class, of odd sizes."""
    root = tmp_path_factory.mktemp("released")
    ref = randomised_timm_tiny(root / "timm_mvitv2_tiny.pth", 6, seed=0, head_std=1.0)
    rng = np.random.default_rng(0)
    files = []
    for label, c in enumerate(CLASSES):
        h, w = 260 + 20 * label, 300 - 16 * label
        yy, xx = np.mgrid[0:h, 0:w]
        waves = 80 * np.sin(xx[..., None] / (5 + 7 * label) + 6 * rng.random(3))
        waves += 60 * np.cos(yy[..., None] / (9 + 3 * label))
        pixels = rng.integers(0, 256, 3) + waves + rng.integers(0, 40, (h, w, 3))
        path = root / "data" / "val" / c / "a.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        files.append((path, label))
    return {"root": root, "ref": ref, "files": files}


def _reference_metrics(ref, files) -> dict:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    logits, labels = [], []
    for path, label in files:
        im = TF.resize(Image.open(path).convert("RGB"), 256, InterpolationMode.BICUBIC)
        x = TF.to_tensor(TF.center_crop(im, 224))  # PIL's bicubic, as the official eval
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


def test_a_file_named_like_a_tag_is_read_as_the_file(released, capsys, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(released["root"] / "timm_mvitv2_tiny.pth", tmp_path / "mvitv2_tiny.in1k")
    argv = ["--checkpoint", "mvitv2_tiny.in1k", "--model", "mvitv2_tiny"]
    got = _eval([*argv, "--data", str(released["root"] / "data")], capsys)
    want = _reference_metrics(released["ref"], released["files"])
    assert got["top1"] == want["top1"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert json.loads((tmp_path / "mvitv2_tiny_eval.json").read_text()) == got  # next to it


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


@pytest.fixture(scope="module")
def imagenet_1k(tmp_path_factory) -> dict:
    """timm's mvitv2_tiny with a random 1000-class head, saved in timm's layout (the variant's
    released weights are ImageNet-1k's, so ``--model mvitv2_tiny`` takes their label order)."""
    root = tmp_path_factory.mktemp("released_1k")
    ref = randomised_timm_tiny(root / "timm_tiny_1k.pth", 1000, seed=1, head_std=0.3)
    return {"root": root, "ref": ref}


def _val_folder(root: Path, names: list[str], seed: int) -> list[tuple[Path, str]]:
    """One patterned image in each of ``root/val/<name>/``."""
    rng = np.random.default_rng(seed)
    files = []
    for k, name in enumerate(names):
        h, w = 240 + 7 * k, 300 - 5 * k
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = 70 * np.sin(xx[..., None] / (4 + 3 * k) + 6 * rng.random(3))
        pixels += 120 + 50 * np.cos(yy[..., None] / (5 + 2 * k)) + rng.integers(0, 40, (h, w, 3))
        path = root / "val" / name / "a.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        files.append((path, name))
    return files


def test_folders_named_by_label_number_get_that_label_as_imagenet_v2_names_them(
    imagenet_1k, capsys, tmp_path
):
    """ImageNet-V2's folders are 0 .. 999: sorted as text, 10 would come before 2."""
    names = ["0", "2", "10", "11", "100", "999"]
    files = _val_folder(tmp_path / "v2", names, seed=3)
    want = _reference_metrics(imagenet_1k["ref"], [(f, int(n)) for f, n in files])
    ckpt = str(imagenet_1k["root"] / "timm_tiny_1k.pth")
    got = _eval(
        ["--checkpoint", ckpt, "--model", "mvitv2_tiny", "--data", str(tmp_path / "v2")], capsys
    )
    assert (got["top1"], got["top5"], got["count"]) == (want["top1"], want["top5"], 6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_a_subset_of_imagenet_wordnet_folders_gets_the_imagenet_labels(
    imagenet_1k, capsys, tmp_path
):
    import timm.data

    info = timm.data.ImageNetInfo("imagenet-1k")
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    names = ["n01440764", "n02085620", "n04548362", "n15075141"]  # labels 0, 151, 893, 999
    files = _val_folder(tmp_path / "sub", names, seed=4)
    want = _reference_metrics(imagenet_1k["ref"], [(f, synsets.index(n)) for f, n in files])
    ckpt = str(imagenet_1k["root"] / "timm_tiny_1k.pth")
    got = _eval(
        ["--checkpoint", ckpt, "--model", "mvitv2_tiny", "--data", str(tmp_path / "sub")], capsys
    )
    assert (got["top1"], got["top5"], got["count"]) == (want["top1"], want["top5"], 4)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_label_order_reads_label_numbers_and_wordnet_ids_and_nothing_else():
    from mvitv2.tasks.image import label_order
    from mvitv2.weights.classes import imagenet_wnids

    assert label_order(["2", "0"], 3, "test") == ["0", "<label 1: no folder>", "2"]
    assert label_order(["0", "3"], 3, "test") is None  # label 3 of 3 classes
    assert label_order(["1", "01"], 3, "test") is None  # two folders for label 1
    assert label_order(["1", "x"], 3, "test") is None
    assert label_order(["1", "\u00b2"], 3, "test") is None  # a superscript two is no label
    assert label_order(["n01440764"], 1000, "imagenet-1k") == imagenet_wnids()
    assert label_order(["n01440764"], 1000, "imagenet-21k") is None
    assert label_order(["n01440764", "n99999999"], 1000, "imagenet-1k") is None


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
            ["--model", "mvitv2_small_16x4"],
            "mvitv2_small_16x4 has no released image weights to take the preprocessing from",
        ),
        (
            ["--model", "mvitv2_huge"],
            "mvitv2_huge has no released image weights to take the preprocessing from; pass "
            "the weights tag of the file's variant as --checkpoint (`mvitv2 info --weights`)",
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


# ---------------------------------------------------------------------------------- video
def register_variant_weights(monkeypatch, **fields) -> None:
    """``Weights(**fields)`` registered for this test only as the one set of weights of their
    variant, never downloaded: the preprocessing and classes a file of that variant given with
    ``--model`` takes."""
    from mvitv2.weights.registry import WEIGHTS, Weights, register_weights

    monkeypatch.setattr("mvitv2.weights.registry.WEIGHTS", dict(WEIGHTS))
    monkeypatch.setattr("mvitv2.weights.registry.DEFAULT_WEIGHTS", {})
    register_weights(Weights(url="file:///none.pth", sha256=None, metrics={}, **fields))


@pytest.mark.parametrize(
    "tag, recipe, test",
    [
        ("mvitv2_small_16x4.k400", "k400_small", {}),
        # torchvision's reference script: 16 consecutive frames at 7.5 fps, its preset's resize
        ("mvitv2_small_16x4.k400_tv", "k400_small",
         {"sampling": "resampled", "test_pipeline": "torchvision"}),
        ("mvitv2_base_32x3.k400", "k400_base", {}),
        ("mvitv2_large_40x3.k400", "k400_large", {}),
    ],
)  # fmt: skip
def test_released_video_weights_are_evaluated_with_their_recipes_test_protocol(tag, recipe, test):
    """The registry's protocol (from the SlowFast and torchvision pages) against the recipes
    (from SlowFast's configs): clip length, stride, fps, crop, short side, views, mean/std; the
    weights torchvision ported take its clips and resize (``test``)."""
    import yaml

    from mvitv2.engine.cli import resolve_recipe
    from mvitv2.tasks.video import SPEC, VideoDataConfig
    from mvitv2.weights import get_weights

    w = get_weights(tag)
    written = yaml.safe_load(resolve_recipe(recipe).read_text())
    assert w.model == written["model"]
    got = VideoDataConfig.from_dict(SPEC.released_data(w.preprocessing))
    want = VideoDataConfig.from_dict({**written["data"], **test})
    fields = SPEC.released_data(w.preprocessing).keys()
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}


def _mp4(path: Path, seed: int, n: int = 24) -> None:
    import av

    frames = np.random.default_rng(seed).integers(0, 256, (n, 72, 88, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def test_released_video_weights_give_the_metrics_of_a_training_checkpoint_of_them(
    tmp_path, capsys, monkeypatch
):
    """torchvision's MViTv2-S layout (its builder on a 4 x 64 x 64 grid, random weights) as
    released weights with --model, against the same weights written as a `mvitv2 train video`
    checkpoint with the same test protocol (whose eval path is checked against a naive loop in
    test_values_video_task2): the same metrics, views and counts."""
    import torchvision.models.video.mvit as tv_mvit

    from mvitv2.tasks.video import SPEC, VideoClassification
    from mvitv2.weights.registry import Preprocessing
    from test_task_spec import _write
    from test_weights_parity import small_torchvision

    ref = small_torchvision("mvit_v2_s", monkeypatch)
    assert isinstance(ref, tv_mvit.MViT)
    torch.save(ref.state_dict(), tmp_path / "mvit_v2_s_small.pth")
    kwargs = {"img_size": 64, "num_frames": 4}
    pre = Preprocessing(
        input_size=(3, 4, 64, 64), interpolation="bilinear", mean=(0.45,) * 3, std=(0.225,) * 3,
        sampling_rate=2, clips=2, crops=3,
    )  # fmt: skip
    register_variant_weights(
        monkeypatch, tag="mvitv2_small_16x4.test64", model="mvitv2_small_16x4", num_classes=400,
        classes="kinetics-400", preprocessing=pre, source_format="torchvision", task="video",
        model_kwargs=kwargs,
    )  # fmt: skip
    for i in range(3):
        _mp4(tmp_path / f"v{i}.mp4", seed=i)
    (tmp_path / "val.csv").write_text("v0.mp4,7\nv1.mp4,399\nv2.mp4,0\n")
    # the same weights as a training checkpoint with the same test protocol
    import mvitv2
    from mvitv2.engine.config import TrainConfig

    ours = mvitv2.create_model("mvitv2_small_16x4", num_classes=400, **kwargs)
    mvitv2.load_checkpoint(ours, tmp_path / "mvit_v2_s_small.pth")
    task = VideoClassification(
        TrainConfig(model="mvitv2_small_16x4", model_args=kwargs, data=SPEC.released_data(pre))
    )
    task.classes = [str(i) for i in range(400)]
    trained = _write(tmp_path / "trained.pt", task, ours)

    def run(argv: list[str]) -> dict:
        argv = ["eval", "video", *argv, "--data", str(tmp_path), "--json", "--workers", "0"]
        assert main([*argv, "--output", str(tmp_path / f"{len(argv)}.json")]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    released = run(
        ["--checkpoint", str(tmp_path / "mvit_v2_s_small.pth"), "--model", "mvitv2_small_16x4"]
    )
    want = run(["--checkpoint", str(trained)])
    assert want["count"] == 3 and want["views"] == 2 * 3
    assert released == want


def test_released_video_weights_need_a_list_to_evaluate(capsys):
    assert main(["eval", "video", "--checkpoint", "mvitv2_small_16x4.k400"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 eval video: error: released weights have no dataset of their own: pass --data "
        "(a video root with val.csv) or --val-list"
    )


def test_image_weights_given_to_eval_video_name_the_command_that_takes_them(capsys):
    assert main(["eval", "video", "--checkpoint", "mvitv2_tiny.in1k", "--data", "."]) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 eval video: error: mvitv2_tiny.in1k are classification weights; use "
        "`mvitv2 eval image`"
    )
