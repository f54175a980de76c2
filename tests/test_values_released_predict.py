"""Released weights predict and export with their dataset's class names, as torchvision's
``weights.meta["categories"]`` and timm's ``ImageNetInfo`` give them: ``mvitv2 predict
image|video --checkpoint TAG`` (or a file with ``--model``), ``Predictor.from_weights`` and
``mvitv2 export image|video --checkpoint TAG``.

References: torchvision's category lists (``torchvision.models._meta``) and timm's ImageNet synset
list for the names; timm's ``MultiScaleVit`` (image, fed the official eval's PIL pipeline) and
torchvision's ``MViT`` (video) with the same weights for the probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import _meta as tv_meta

from mvitv2.cli import main
from mvitv2.predict import Predictor
from mvitv2.weights.classes import coco_category_ids, dataset_classes, imagenet_wnids
from mvitv2.weights.registry import WEIGHTS, Preprocessing, Weights, register_weights


# ------------------------------------------------------------------ the class lists
def test_imagenet_names_are_torchvisions_in_the_order_of_timms_synsets():
    import timm.data

    info = timm.data.ImageNetInfo("imagenet-1k")
    assert dataset_classes("imagenet-1k") == list(tv_meta._IMAGENET_CATEGORIES)
    assert imagenet_wnids() == [info.index_to_label_name(i) for i in range(1000)]
    assert imagenet_wnids() == sorted(imagenet_wnids())  # ImageNet's class folders, sorted


def test_kinetics_names_are_torchvisions_alphabetical_list():
    names = dataset_classes("kinetics-400")
    assert names == list(tv_meta._KINETICS400_CATEGORIES) and names == sorted(names)
    assert len(set(names)) == 400


def test_coco_names_and_ids_are_torchvisions_91_slot_list_without_its_gaps():
    """torchvision's COCO list is indexed by category id, with N/A where COCO has no class."""
    slots = list(tv_meta._COCO_CATEGORIES)
    kept = [i for i, c in enumerate(slots) if c not in ("__background__", "N/A")]
    assert coco_category_ids() == kept
    assert dataset_classes("coco") == [slots[i] for i in kept]

    from mvitv2.detection.detectron2 import COCO_CATEGORY_IDS, COCO_CLASS_NAMES

    assert (list(COCO_CLASS_NAMES), list(COCO_CATEGORY_IDS)) == ([slots[i] for i in kept], kept)


def test_every_registered_weights_names_each_output_except_imagenet_21k():
    for tag, w in WEIGHTS.items():
        if w.classes == "imagenet-21k":
            assert w.class_names is None, tag
        else:
            assert w.class_names is not None and len(w.class_names) == w.num_classes, tag
    assert dataset_classes("imagenet-21k") is None and dataset_classes("no such set") is None


# ------------------------------------------------------------------ image
@pytest.fixture(scope="module")
def timm_1k(tmp_path_factory) -> dict:
    """timm's mvitv2_tiny with a random 1000-class head and rel-pos tables (so that the top
    classes depend on the input), saved in timm's layout, and three patterned images."""
    from test_values_released_eval import randomised_timm_tiny

    root = tmp_path_factory.mktemp("released_1k")
    ref = randomised_timm_tiny(root / "timm_tiny_1k.pth", 1000, seed=0, head_std=1.0)
    rng = np.random.default_rng(1)
    files = []
    for k in range(3):
        h, w = 250 + 30 * k, 310 - 20 * k
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = 90 * np.sin(xx[..., None] / (4 + 5 * k) + 6 * rng.random(3))
        pixels += 100 + 50 * np.cos(yy[..., None] / (7 + 2 * k)) + rng.integers(0, 50, (h, w, 3))
        path = root / f"im{k}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        files.append(path)
    return {"root": root, "ref": ref, "files": files}


def _timm_top5(ref, path: Path) -> list[tuple[str, float]]:
    """The official eval's preprocessing (PIL bicubic short side 256, centre crop 224, ImageNet
    mean/std), timm's model, torchvision's ImageNet names."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    im = TF.resize(Image.open(path).convert("RGB"), 256, InterpolationMode.BICUBIC)
    x = TF.normalize(
        TF.to_tensor(TF.center_crop(im, 224)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    with torch.no_grad():
        p = ref(x[None]).double().softmax(-1)[0]
    v, i = p.topk(5)
    return [(tv_meta._IMAGENET_CATEGORIES[j], float(q)) for q, j in zip(v, i.tolist())]


def _register(monkeypatch, tmp_path: Path, file: Path, **fields) -> str:
    """``file`` registered as released weights (``fields``: the rest of :class:`Weights`), for
    this test only, downloaded from its file URL into a temporary torch.hub cache; the tag."""
    monkeypatch.setattr("mvitv2.weights.registry.WEIGHTS", dict(WEIGHTS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    register_weights(Weights(url=file.as_uri(), sha256=None, metrics={}, **fields))
    return fields["tag"]


def _register_timm_1k(monkeypatch, tmp_path: Path, timm_1k: dict, tag: str, classes: str) -> str:
    """The 1000-class timm file as released weights of mvitv2_tiny named by ``classes``."""
    return _register(
        monkeypatch, tmp_path, timm_1k["root"] / "timm_tiny_1k.pth", tag=tag,
        model="mvitv2_tiny", num_classes=1000, classes=classes, preprocessing=Preprocessing(),
        source_format="timm",
    )  # fmt: skip


@pytest.fixture
def tag_1k(timm_1k, tmp_path, monkeypatch) -> str:
    """The timm file registered as ImageNet-1k weights of mvitv2_tiny; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    return _register_timm_1k(monkeypatch, tmp_path, timm_1k, "mvitv2_tiny.test1k", "imagenet-1k")


def _assert_same_top5(got, want) -> None:
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=2e-5)


def test_predict_image_with_a_tag_prints_imagenet_names_with_timms_probabilities(
    timm_1k, tag_1k, capsys
):
    files = [str(f) for f in timm_1k["files"]]
    assert main(["predict", "image", *files, "--checkpoint", tag_1k, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in lines] == files
    for r, f in zip(lines, timm_1k["files"]):
        _assert_same_top5(r["topk"], _timm_top5(timm_1k["ref"], f))


def test_predict_image_with_a_file_and_model_takes_the_variants_imagenet_names(timm_1k, capsys):
    f = timm_1k["files"][1]
    argv = ["--checkpoint", str(timm_1k["root"] / "timm_tiny_1k.pth"), "--model", "mvitv2_tiny"]
    assert main(["predict", "image", str(f), *argv, "--json", "--topk", "3"]) == 0
    got = json.loads(capsys.readouterr().out)["topk"]
    _assert_same_top5(got, _timm_top5(timm_1k["ref"], f)[:3])


def test_predictor_from_weights_gives_the_tags_classes_and_preprocessing(timm_1k, tag_1k):
    predictor = Predictor.from_weights(tag_1k)
    assert predictor.task == "image" and predictor.class_names == list(tv_meta._IMAGENET_CATEGORIES)
    assert predictor.preprocessing == {
        "input_size": [224, 224], "resize_size": 256, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    f = timm_1k["files"][2]
    _assert_same_top5(predictor(str(f)), _timm_top5(timm_1k["ref"], f))


def test_predictor_from_weights_of_a_file_takes_its_variants_task_and_classes(timm_1k):
    from mvitv2.tasks.spec import released_task

    f = timm_1k["files"][0]
    predictor = Predictor.from_weights(
        str(timm_1k["root"] / "timm_tiny_1k.pth"), model="mvitv2_tiny"
    )
    assert predictor.task == "image" and predictor.class_names == list(tv_meta._IMAGENET_CATEGORIES)
    _assert_same_top5(predictor(str(f)), _timm_top5(timm_1k["ref"], f))
    assert released_task("w.pth", "mvitv2_small_16x4") == "video"  # a temporal variant
    assert released_task("mvitv2_base_32x3.k400", None) == "video"  # a tag's own task
    assert released_task("w.pth", "mvitv2_base") == "image"


def test_export_image_of_a_tag_is_named_after_it_and_carries_the_names(timm_1k, tag_1k, capsys):
    argv = ["export", "image", "--checkpoint", tag_1k, "--format", "torch-export"]
    assert main([*argv, "--static-batch"]) == 0
    path = Path("mvitv2_tiny.test1k.pt2")  # the tag's whole name, in the working directory
    assert capsys.readouterr().out == f"wrote {path} and {path}.json\n"
    side = json.loads(Path(f"{path}.json").read_text())
    assert side["class_names"] == list(tv_meta._IMAGENET_CATEGORIES)
    assert (side["model_name"], side["preprocessing"]["resize_size"]) == ("mvitv2_tiny", 256)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got, want = torch.export.load(path).module()(x), timm_1k["ref"](x)
    scale = float(want.abs().max())  # logits of tens: the random head's N(0, 1) weights
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)


def test_weights_without_published_names_predict_class_indices(timm_1k, tmp_path, monkeypatch):
    tag = _register_timm_1k(monkeypatch, tmp_path, timm_1k, "mvitv2_tiny.test21k", "imagenet-21k")
    predictor = Predictor.from_weights(tag, topk=2)
    assert predictor.class_names == [f"class_{i}" for i in range(1000)]
    f = timm_1k["files"][0]
    want = [
        (f"class_{tv_meta._IMAGENET_CATEGORIES.index(c)}", p)
        for c, p in _timm_top5(timm_1k["ref"], f)
    ]
    _assert_same_top5(predictor(str(f)), want[:2])


# ------------------------------------------------------------------ video
def test_predictor_from_video_weights_gives_kinetics_names_with_torchvisions_probabilities(
    tmp_path, monkeypatch
):
    """torchvision's MViTv2-S layout on a 4 x 64 x 64 grid (random weights) as Kinetics-400
    weights; one clip of an 8-frame array at the model's size (no resize, no crop): 4 frames x 2
    span the 8, SlowFast takes floor(7 i / 3) = 0, 2, 4, 7; Kinetics' mean/std."""
    from test_weights_parity import small_torchvision

    ref = small_torchvision("mvit_v2_s", monkeypatch).eval()
    with torch.no_grad():
        ref.head[-1].weight.normal_(0, 0.3)  # spread the classes out
    torch.save(ref.state_dict(), tmp_path / "tv_small.pth")
    pre = Preprocessing(
        input_size=(3, 4, 64, 64), crop_pct=1.0, interpolation="bilinear", mean=(0.45,) * 3,
        std=(0.225,) * 3, sampling_rate=2, clips=1, crops=1,
    )  # fmt: skip
    tag = _register(
        monkeypatch, tmp_path, tmp_path / "tv_small.pth", tag="mvitv2_small_16x4.test64",
        model="mvitv2_small_16x4", num_classes=400, classes="kinetics-400", preprocessing=pre,
        source_format="torchvision", task="video", model_kwargs={"img_size": 64, "num_frames": 4},
    )  # fmt: skip
    frames = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(frames[[0, 2, 4, 7]]).permute(3, 0, 1, 2).float() / 255  # (3, 4, 64, 64)
    x = (x - 0.45) / 0.225
    with torch.no_grad():
        p = ref(x[None]).double().softmax(-1)[0]
    v, i = p.topk(5)
    want = [(tv_meta._KINETICS400_CATEGORIES[j], float(q)) for q, j in zip(v, i.tolist())]

    predictor = Predictor.from_weights(tag)
    assert predictor.task == "video" and predictor.class_names == list(
        tv_meta._KINETICS400_CATEGORIES
    )
    _assert_same_top5(predictor(frames), want)


# ------------------------------------------------------------------ mistakes
@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["predict", "image", "x.png", "--checkpoint", "mvitv2_small_16x4.k400"],
            "mvitv2 predict image: error: mvitv2_small_16x4.k400 are video weights; use "
            "`mvitv2 predict video`",
        ),
        (
            ["export", "video", "--checkpoint", "mvitv2_tiny.in1k"],
            "mvitv2 export video: error: mvitv2_tiny.in1k are classification weights; use "
            "`mvitv2 export image`",
        ),
        (
            ["predict", "image", "x.png", "--checkpoint", "mvitv2_tiny.in1k", "--ema"],
            "mvitv2 predict image: error: --ema: mvitv2_tiny.in1k are released weights, which "
            "have no EMA copy; drop --ema",
        ),
        (
            ["predict", "video", "x.mp4", "--checkpoint", "w.pth", "--model", "mvitv2_tiny"],
            "mvitv2 predict video: error: mvitv2_tiny has no released video weights to take the "
            "preprocessing from; pass the weights tag of the file's variant as --checkpoint "
            "(`mvitv2 info --weights`)",
        ),
    ],
)
def test_released_weights_mistakes_in_predict_and_export_are_one_line(
    argv, line, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.mp4").write_bytes(b"")
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize(
    "weights, model, message",
    [
        (
            "w.pth",
            None,
            "w.pth is no weights tag (`mvitv2 info --weights`): a file of released weights "
            "needs its variant (model='mvitv2_tiny', ...)",
        ),
        (
            "mvitv2_tiny.coco_cascade",
            None,
            "mvitv2_tiny.coco_cascade are detection weights: predict with `mvitv2 predict "
            "detect` or mvitv2.tasks.detect.read_detector",
        ),
    ],
)
def test_predictor_from_weights_refuses_what_it_cannot_build_in_one_line(weights, model, message):
    from mvitv2.errors import UserValueError

    with pytest.raises(UserValueError) as e:
        Predictor.from_weights(weights, model=model)
    assert str(e.value) == message
