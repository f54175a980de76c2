"""Released classifier weights as the image/video commands read them
(:mod:`mvitv2.tasks.spec`, :func:`mvitv2.tasks.image.released_weights_eval`), on a narrow
mvitv2_tiny registered as weights for this test: the registry entry each tag or file resolves
to, the model loaded from the file tensor for tensor, the checkpoint info and preprocessing
written out by hand, and each refusal's one line."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

import mvitv2
from mvitv2.errors import UserValueError
from mvitv2.tasks import spec
from mvitv2.weights import registry
from mvitv2.weights.registry import Preprocessing
from test_values_image_task import TINY
from test_values_released_predict import _register

NARROW = {**TINY, "img_size": 32}
PRE = Preprocessing(
    input_size=(3, 32, 32),
    crop_pct=0.8,
    interpolation="bilinear",
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.3, 0.4),
)


@pytest.fixture
def narrow(tmp_path, monkeypatch) -> dict:
    """A 4-class narrow mvitv2_tiny saved in the official layout and registered as
    ``mvitv2_tiny.narrow`` (classes without a published order, :data:`PRE`), the default
    weights of mvitv2_tiny; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    source = mvitv2.create_model("mvitv2_tiny", num_classes=4, **NARROW).eval()
    file = tmp_path / "narrow.pyth"
    torch.save({"model_state": source.state_dict()}, file)
    tag = _register(
        monkeypatch, tmp_path, file, tag="mvitv2_tiny.narrow", model="mvitv2_tiny",
        num_classes=4, classes="mine", preprocessing=PRE, source_format="official",
        model_kwargs=NARROW,
    )  # fmt: skip
    monkeypatch.setitem(registry.DEFAULT_WEIGHTS, "mvitv2_tiny", tag)  # files of mvitv2_tiny
    return {"tag": tag, "file": file, "source": source}


def _same_weights(model: torch.nn.Module, source: torch.nn.Module) -> bool:
    got, want = model.state_dict(), source.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ which weights
def test_a_tag_resolves_to_its_own_variant_and_entry_and_a_file_to_its_variants_default():
    name, w = spec.released_weights("mvitv2_tiny.in1k", None, "image")
    assert (name, w) == ("mvitv2_tiny", registry.WEIGHTS["mvitv2_tiny.in1k"])
    name, w = spec.released_weights("some_file.pth", "mvitv2_base", "image", "predict")
    assert (name, w) == ("mvitv2_base", registry.WEIGHTS["mvitv2_base.in1k"])
    name, w = spec.released_weights("clip.pyth", "mvitv2_small_16x4", "video")
    assert (name, w.tag) == ("mvitv2_small_16x4", "mvitv2_small_16x4.k400")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("mvitv2_small_16x4.k400", None, "image", "predict"),
            "mvitv2_small_16x4.k400 are video weights; use `mvitv2 predict video`",
        ),
        (
            ("mvitv2_small_16x4.k400", None, "image"),
            "mvitv2_small_16x4.k400 are video weights; use `mvitv2 eval video`",
        ),
        (
            ("mvitv2_tiny.coco_cascade", None, "image", "export"),
            "mvitv2_tiny.coco_cascade are detection weights; use `mvitv2 export detect`",
        ),
        (
            ("w.pth", "mvitv2_small_16x4", "image", "eval"),
            "mvitv2_small_16x4 has no released image weights to take the preprocessing from; pass "
            "the weights tag of the file's variant as --checkpoint (`mvitv2 info --weights`)",
        ),
        (
            ("w.pth", "mvitv2_tiny", "video", "eval"),
            "mvitv2_tiny has no released video weights to take the preprocessing from; pass the "
            "weights tag of the file's variant as --checkpoint (`mvitv2 info --weights`)",
        ),
    ],
)
def test_weights_of_another_task_are_refused_naming_the_command_that_takes_them(args, message):
    with pytest.raises(UserValueError) as e:
        spec.released_weights(*args)
    assert str(e.value) == message


def test_an_unknown_variant_is_named_with_the_known_ones():
    with pytest.raises(Exception, match=r"unknown model 'mvitv2_tiniest'.*mvitv2_tiny"):
        spec.released_weights("w.pth", "mvitv2_tiniest", "image")


def test_the_task_of_released_weights_is_the_tags_or_the_file_variants():
    assert spec.released_task("mvitv2_tiny.in1k", None) == "image"
    assert spec.released_task("mvitv2_small_16x4.k400", "mvitv2_tiny") == "video"  # the tag's
    assert spec.released_task("w.pth", "mvitv2_small_16x4") == "video"
    assert spec.released_task("w.pth", "mvitv2_small") == "image"
    with pytest.raises(UserValueError) as e:
        spec.released_task("w.pth", None)
    assert str(e.value) == (
        "w.pth is no weights tag (`mvitv2 info --weights`): a file of released weights needs "
        "its variant (model='mvitv2_tiny', ...)"
    )
    with pytest.raises(UserValueError) as e:
        spec.released_task("mvitv2_tiny.coco_mask_rcnn", None)
    assert str(e.value) == (
        "mvitv2_tiny.coco_mask_rcnn are detection weights: predict with `mvitv2 predict "
        "detect` or mvitv2.tasks.detect.read_detector"
    )


# ------------------------------------------------------------------ the model
def test_released_classifier_is_the_file_loaded_whole_in_eval_mode(narrow):
    w = registry.WEIGHTS[narrow["tag"]]
    for checkpoint in (narrow["tag"], str(narrow["file"])):
        model = spec.released_classifier(checkpoint, "mvitv2_tiny", w, None, "used here")
        assert not model.training and _same_weights(model, narrow["source"])
    model = spec.released_classifier(narrow["tag"], "mvitv2_tiny", w, 4, "used here")
    assert _same_weights(model, narrow["source"])


def test_released_classifier_refuses_another_head_size_or_variant_in_one_line(narrow):
    w = registry.WEIGHTS[narrow["tag"]]
    with pytest.raises(UserValueError) as e:
        spec.released_classifier(narrow["tag"], "mvitv2_tiny", w, 6, "evaluated on d (6 folders)")
    assert str(e.value).startswith(
        "mvitv2_tiny.narrow cannot be evaluated on d (6 folders) with mvitv2_tiny: "
    )
    assert "head" in str(e.value) and "\n" not in str(e.value)
    file = str(narrow["file"])
    with pytest.raises(UserValueError) as e:
        spec.released_classifier(file, "mvitv2_base_cls", w, None, "used here")
    small = mvitv2.create_model("mvitv2_base_cls", num_classes=4, **NARROW)
    source = narrow["source"].state_dict()
    missing = [k for k in small.state_dict() if k not in source]
    shapes = [
        k for k, v in small.state_dict().items() if k in source and source[k].shape != v.shape
    ]
    unexpected = [k for k in source if k not in small.state_dict()]
    assert str(e.value) == (
        f"{file} (official layout) does not fit mvitv2_base_cls: {len(missing)} of its tensors "
        f"missing, {len(unexpected)} unexpected, {len(shapes)} of another shape; pass the "
        "variant the weights are for as --model"
    )
    assert missing


def test_released_info_is_a_checkpoint_of_the_weights_with_their_preprocessing(narrow):
    info, model = spec.released_info(narrow["tag"], None, "image", "predict")
    assert _same_weights(model, narrow["source"]) and not model.training
    assert (info.path, info.task, info.model_name) == (Path(narrow["tag"]), "image", "mvitv2_tiny")
    assert info.model_kwargs == NARROW and info.meta == {"weights": narrow["tag"]}
    assert info.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert info.state_dict.keys() == narrow["source"].state_dict().keys()
    assert info.preprocessing == {
        "input_size": [32, 32],
        "resize_size": 40,  # 32 / 0.8
        "crop_pct": 0.8,
        "interpolation": "bilinear",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.3, 0.4],
    }


def test_released_info_refusals_name_the_command_they_are_for(narrow, monkeypatch):
    """Weights of another task name the command given; a file whose head does not fit its
    entry's class count says what the weights were to be used by."""
    with pytest.raises(UserValueError) as e:
        spec.released_info("mvitv2_small_16x4.k400", None, "image", "export")
    assert str(e.value) == "mvitv2_small_16x4.k400 are video weights; use `mvitv2 export video`"
    entry = dataclasses.replace(registry.WEIGHTS[narrow["tag"]], num_classes=6)
    monkeypatch.setitem(registry.WEIGHTS, narrow["tag"], entry)
    with pytest.raises(UserValueError) as e:
        spec.released_info(narrow["tag"], None, "image", "predict")
    assert str(e.value).startswith(
        "mvitv2_tiny.narrow cannot be used by mvitv2 predict with mvitv2_tiny: "
    )


def test_released_video_info_is_the_clip_variant_with_the_weights_clips(tmp_path, monkeypatch):
    """Video weights (4 frames at stride 2, 3 clips x 1 crop of 32, short side 36): the video
    variant loaded whole, and its preprocessing in the video keys."""
    kwargs = {**NARROW, "num_frames": 4}
    source = mvitv2.create_model("mvitv2_small_16x4", num_classes=5, **kwargs).eval()
    torch.save({"model_state": source.state_dict()}, tmp_path / "v.pyth")
    pre = Preprocessing(
        input_size=(3, 4, 32, 32), crop_pct=32 / 36, interpolation="bilinear",
        mean=(0.45,) * 3, std=(0.225,) * 3, sampling_rate=2, clips=3, crops=1,
    )  # fmt: skip
    tag = _register(
        monkeypatch, tmp_path, tmp_path / "v.pyth", tag="mvitv2_small_16x4.narrow",
        model="mvitv2_small_16x4", num_classes=5, classes="mine", preprocessing=pre,
        source_format="official", model_kwargs=kwargs, task="video",
    )  # fmt: skip
    info, model = spec.released_info(tag, None, "video", "predict")
    assert _same_weights(model, source) and (info.task, info.model_name) == (
        "video",
        "mvitv2_small_16x4",
    )
    p = info.preprocessing
    assert (p["input_size"], p["resize_size"], p["num_frames"], p["sampling_rate"]) == (
        [32, 32],
        36,
        4,
        2,
    )
    assert (p["num_clips"], p["num_crops"], p["mean"]) == (3, 1, [0.45] * 3)


def test_released_classifier_names_every_kind_of_tensor_left_unfilled_in_one_line(tmp_path):
    """Image weights without a classifier given to a video variant with a class token leave
    two kinds of tensor unfilled: both reasons are named, sorted, joined by '; '."""
    source = mvitv2.create_model("mvitv2_tiny", num_classes=4, **NARROW).state_dict()
    file = tmp_path / "headless.pyth"
    torch.save({"model_state": {k: v for k, v in source.items() if "head" not in k}}, file)
    video = {**NARROW, "num_frames": 4}
    w = dataclasses.replace(registry.WEIGHTS["mvitv2_small_16x4.k400"], model_kwargs=video)
    with pytest.raises(UserValueError) as e:
        spec.released_classifier(str(file), "mvitv2_small_16x4", w, 4, "used here")
    assert str(e.value) == (
        f"{file} cannot be used here with mvitv2_small_16x4: checkpoint has no classifier; "
        "image checkpoint has no class token"
    )


# ------------------------------------------------------------------ --checkpoint readers
def test_classifier_checkpoint_reads_released_weights_or_a_training_checkpoint(narrow, tmp_path):
    info, model = spec.classifier_checkpoint("image", str(narrow["file"]), "mvitv2_tiny", "export")
    assert _same_weights(model, narrow["source"]) and info.meta == {"weights": narrow["tag"]}
    with pytest.raises(UserValueError) as e:
        spec.classifier_checkpoint("image", narrow["tag"], None, "predict", ema=True)
    assert str(e.value) == (
        f"--ema: {narrow['tag']} are released weights, which have no EMA copy; drop --ema"
    )
    from mvitv2.engine.config import TrainConfig
    from mvitv2.engine.ema import build_ema
    from mvitv2.tasks.image import ImageClassification
    from test_task_spec import _perturb, _write
    from test_values_image_task import TINY

    task = ImageClassification(TrainConfig(model="mvitv2_tiny", model_args=TINY, data={}))
    task.classes = ["x", "y"]
    trained = task.build_model()
    ema = build_ema(trained, 0.5)
    _perturb(ema.module, seed=9)
    ckpt = _write(tmp_path / "last.pt", task, trained, ema=ema.state_dict())
    for use_ema, want in ((False, trained), (True, ema.module)):
        info, model = spec.classifier_checkpoint("image", str(ckpt), None, "predict", ema=use_ema)
        assert model is None and (info.task, info.class_names) == ("image", ["x", "y"])
        assert all(torch.equal(info.state_dict[k], v) for k, v in want.state_dict().items())
    read = spec.classifier_export_reader("image")
    info, model = read(argparse.Namespace(checkpoint=narrow["tag"], model=None))
    assert _same_weights(model, narrow["source"]) and info.task == "image"


# ------------------------------------------------------------------ eval image of released weights
def _val_folders(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / "val" / name).mkdir(parents=True)
    return root


def test_released_weights_eval_labels_number_folders_by_their_number(narrow, tmp_path):
    """Folders ``2`` and ``0``: labels 2 and 0 of the 4-class weights (the others named for no
    folder); the weights' preprocessing as the data options; the folder given."""
    from mvitv2.data.image import ImageDataConfig
    from mvitv2.tasks.image import released_weights_eval

    root = _val_folders(tmp_path / "d", ["2", "0"])
    model, classes, dc, got_root = released_weights_eval(narrow["tag"], None, str(root))
    assert classes == ["0", "<label 1: no folder>", "2", "<label 3: no folder>"]
    assert _same_weights(model, narrow["source"]) and not model.training and got_root == root
    assert dc == ImageDataConfig(
        img_size=32,
        crop_pct=0.8,
        interpolation="bilinear",
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.3, 0.4),
    )


def test_released_weights_eval_takes_other_folder_names_as_the_labels_in_sorted_order(
    narrow, tmp_path
):
    from mvitv2.tasks.image import released_weights_eval

    root = _val_folders(tmp_path / "d", ["owl", "cat", "emu", "bee"])
    model, classes, _, _ = released_weights_eval(str(narrow["file"]), "mvitv2_tiny", str(root))
    assert classes == ["bee", "cat", "emu", "owl"] and _same_weights(model, narrow["source"])
    root = _val_folders(tmp_path / "e", ["owl", "cat"])
    with pytest.raises(UserValueError) as e:
        released_weights_eval(narrow["tag"], None, str(root))
    assert str(e.value).startswith(
        f"mvitv2_tiny.narrow cannot be evaluated on {root / 'val'} (2 class folders) with "
        "mvitv2_tiny: "
    )
    with pytest.raises(UserValueError) as e:
        released_weights_eval(narrow["tag"], None, None)
    assert str(e.value) == (
        "released weights have no dataset of their own: pass --data, an ImageNet-style folder "
        "with val/<class>/*.jpg"
    )


def test_released_weights_eval_gives_each_wordnet_folder_its_imagenet_label(tmp_path, monkeypatch):
    """ImageNet-1k weights on folders named by WordNet id: the labels in ImageNet's order
    (tench n01440764 is label 0, goldfish n01443537 label 1), whatever subset is there."""
    from mvitv2.tasks.image import released_weights_eval

    source = mvitv2.create_model("mvitv2_tiny", num_classes=1000, **NARROW).eval()
    torch.save({"model_state": source.state_dict()}, tmp_path / "w1k.pyth")
    tag = _register(
        monkeypatch, tmp_path, tmp_path / "w1k.pyth", tag="mvitv2_tiny.narrow1k",
        model="mvitv2_tiny", num_classes=1000, classes="imagenet-1k", preprocessing=PRE,
        source_format="official", model_kwargs=NARROW,
    )  # fmt: skip
    root = _val_folders(tmp_path / "d", ["n01443537", "n01440764"])
    model, classes, _, _ = released_weights_eval(tag, None, str(root))
    assert len(classes) == 1000 and classes[:2] == ["n01440764", "n01443537"]
    assert _same_weights(model, source)


@pytest.mark.parametrize("as_file", [False, True])
def test_eval_image_of_a_tag_scores_the_weights_with_their_preprocessing_by_hand(
    narrow, as_file, tmp_path, capsys
):
    """``mvitv2 eval image --checkpoint TAG --data DIR`` (or the file with ``--model``) on
    folders named by label number: top-1/top-5/loss as a loop counts them over the weights'
    logits of each image prepared by hand (short side 40 = 32 / 0.8 in PIL's bilinear,
    centre crop 32, the weights' mean and std)."""
    import json

    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from mvitv2.cli import main
    from test_values_image_task import _naive

    root = _val_folders(tmp_path / "d", ["3", "1"])
    rng = np.random.default_rng(3)
    logits, labels = [], []
    for i in range(6):
        label = (1, 3)[i % 2]
        image = Image.fromarray(rng.integers(0, 256, (36 + 4 * i, 44, 3), np.uint8))
        image.save(root / "val" / str(label) / f"{i}.png")
        x = TF.pil_to_tensor(TF.resize(image, [40], InterpolationMode.BILINEAR))  # PIL's
        x = TF.normalize(TF.center_crop(x, [32]).float() / 255, PRE.mean, PRE.std)
        with torch.no_grad():
            logits.append(narrow["source"](x[None])[0].double())
        labels.append(label)
    weights = ["--checkpoint", str(narrow["file"]), "--model", "mvitv2_tiny"] if as_file else []
    weights = weights or ["--checkpoint", narrow["tag"]]
    argv = ["eval", "image", *weights, "--data", str(root), "--json"]
    assert main([*argv, "--workers", "0", "--batch-size", "4"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = _naive(torch.stack(logits), labels)
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-5), "skipped": 0}


def test_checkpoint_readers_of_image_commands_refuse_other_tasks_naming_the_command(
    narrow, tmp_path
):
    """``export image`` and ``predict image`` on video weights or a video training
    checkpoint: one line naming the command that takes them; a file with ``--model`` is read
    as released weights by the export reader too."""
    from mvitv2.predict import WrongTaskError
    from test_predictor import make_video_checkpoint

    read = spec.classifier_export_reader("image")
    with pytest.raises(UserValueError) as e:
        read(argparse.Namespace(checkpoint="mvitv2_small_16x4.k400", model=None))
    assert str(e.value) == "mvitv2_small_16x4.k400 are video weights; use `mvitv2 export video`"
    with pytest.raises(UserValueError) as e:
        spec.classifier_checkpoint("image", "mvitv2_small_16x4.k400", None, "predict")
    assert str(e.value) == "mvitv2_small_16x4.k400 are video weights; use `mvitv2 predict video`"
    info, model = read(argparse.Namespace(checkpoint=str(narrow["file"]), model="mvitv2_tiny"))
    assert _same_weights(model, narrow["source"]) and info.model_name == "mvitv2_tiny"
    video = make_video_checkpoint(tmp_path / "video.pt")
    with pytest.raises(WrongTaskError) as e:
        spec.classifier_checkpoint("image", str(video), None, "predict")
    assert (e.value.found, e.value.expected) == ("video", "image")


# ------------------------------------------------------------------ the specs themselves
def test_an_unknown_task_name_lists_the_tasks():
    with pytest.raises(ValueError) as e:
        spec.get_spec("images")
    assert str(e.value) == "unknown task 'images'; choose one of image, video, detect"


def test_a_classification_spec_builds_the_variant_with_its_options_and_classes():
    """``build_model(name, n, kwargs)``: the registered variant with ``kwargs``, ``n``
    outputs: every tensor shaped as ``create_model``'s."""
    for task, name in (("image", "mvitv2_tiny"), ("video", "mvitv2_small_16x4")):
        model = spec.get_spec(task).build_model(name, 3, dict(NARROW))
        want = mvitv2.create_model(name, num_classes=3, **NARROW).state_dict()
        got = model.state_dict()
        assert got.keys() == want.keys() and got["head.projection.weight"].shape[0] == 3
        assert all(got[k].shape == v.shape for k, v in want.items())


def test_checkpoint_meta_sizes_the_preprocessing_from_the_model_without_a_data_size():
    """No ``img_size`` in the data: the preprocessing is at the model's size (64), resized
    to int(64 / 0.875) = 73 first; ``num_classes`` is not a model option kept."""
    from mvitv2.tasks.image import SPEC

    meta = SPEC.checkpoint_meta(
        class_names=["a", "b"],
        model_name="mvitv2_tiny",
        model_kwargs={**NARROW, "img_size": 64, "num_classes": 2},
        data={},
    )
    assert meta["model_kwargs"] == {**NARROW, "img_size": 64}
    assert (meta["preprocessing"]["input_size"], meta["preprocessing"]["resize_size"]) == (
        [64, 64],
        73,
    )


def test_a_task_without_data_options_of_its_own_keeps_the_run_s_model_args():
    base = spec.TaskSpec()
    args = {"embed_dim": 8}
    got = base.legacy_model_kwargs(args, {"img_size": 64})
    assert got == {"embed_dim": 8} and got is not args
