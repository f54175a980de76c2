"""`mvitv2 train|eval|predict detect` end to end on tiny digit scenes, bad annotations, backbone init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mvitv2 import cli
from mvitv2.data.digit_scenes import make_digit_scenes
from mvitv2.detection import create_detector
from mvitv2.engine.cli import RECIPES_DIR

# A tiny detector on 64-px scenes: a few seconds per step on 2 CPU cores.
MODEL_ARGS = {
    "depths": [1, 1, 1, 1],
    "embed_dim": 16,
    "img_size": 64,
    "window_size": None,
    "fpn_channels": 32,
    "box_fc_dim": 64,
    "mask_head_dim": 32,
    "mask_head_convs": 1,
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_post_nms_top_n_train": 64,
    "rpn_post_nms_top_n_test": 32,
    "box_batch_size_per_image": 32,
}


def _overrides() -> list[str]:
    out = [f"model_args.{k}={json.dumps(v)}" for k, v in MODEL_ARGS.items()]
    return out + [
        "data.digit_scenes.num_train=8",
        "data.digit_scenes.num_val=3",
        "data.digit_scenes.image_size=64",
        "data.digit_scenes.digit_size=[16,28]",
        "epochs=1",
        "batch_size=4",
        "workers=0",
        "tensorboard=false",
        "progress=false",
        "name=tiny",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step training run on the embedded digit scenes; returns its run folder."""
    base = tmp_path_factory.mktemp("detect")
    mp = pytest.MonkeyPatch()
    mp.setenv("MVITV2_DATA", str(base / "data"))
    try:
        assert cli.main(["train", "detect", "--output", str(base / "runs"), *_overrides()]) == 0
    finally:
        mp.undo()
    return base


def test_train_writes_checkpoint_and_results(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """The default recipe (digit_scenes) trains and evaluates through the CLI."""
    run = trained / "runs" / "tiny"
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    recipe = yaml.safe_load((RECIPES_DIR / "digit_scenes.yaml").read_text())
    assert state["config"]["model"] == recipe["model"] and state["step"] == 2
    results = json.loads((run / "coco_results_val.json").read_text())
    assert isinstance(results, list)
    for r in results:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r)
        assert 1 <= r["category_id"] <= 10


def test_eval_and_predict(trained: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("MVITV2_DATA", str(trained / "data"))
    ckpt = trained / "runs" / "tiny" / "last.pt"
    out_json = trained / "eval.json"
    assert (
        cli.main(
            [
                "eval",
                "detect",
                "--checkpoint",
                str(ckpt),
                "--output",
                str(out_json),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads(printed.strip().splitlines()[-1])
    assert {"bbox_AP", "segm_AP", "images"} <= set(metrics) and metrics["images"] == 3
    assert 0.0 <= metrics["bbox_AP"] <= 1.0
    assert isinstance(json.loads(out_json.read_text()), list)

    image = next((trained / "data" / "digit_scenes" / "val").glob("*.png"))
    out_dir = trained / "pred"
    args = [
        "predict",
        "detect",
        str(image),
        str(trained / "missing.png"),
        "--checkpoint",
        str(ckpt),
    ]
    status = cli.main([*args, "--output-dir", str(out_dir), "--score-thresh", "0.0"])
    assert status == 1  # the missing file is reported, the real one still drawn
    drawn = out_dir / f"{image.stem}_pred.png"
    assert Image.open(drawn).size == Image.open(image).size
    assert "missing.png: error" in capsys.readouterr().err


def test_eval_counts_bad_annotations(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """Degenerate / outside boxes and missing files are dropped and reported, not fatal."""
    root = trained / "data" / "digit_scenes"
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    first = data["annotations"][0]
    data["annotations"] += [
        {**first, "id": 10_001, "bbox": [5, 5, 0, 10]},  # zero width
        {**first, "id": 10_002, "bbox": [500, 500, 10, 10]},  # outside the image
    ]
    data["images"].append({"id": 999, "file_name": "nope.png", "height": 64, "width": 64})
    bad = trained / "bad.json"
    bad.write_text(json.dumps(data))
    ckpt = trained / "runs" / "tiny" / "last.pt"
    args = ["eval", "detect", "--checkpoint", str(ckpt), "--images", str(root / "val")]
    assert (
        cli.main(
            [
                *args,
                "--annotations",
                str(bad),
                "--workers",
                "0",
                "--output",
                str(trained / "b.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "degenerate_boxes 1" in out and "outside_boxes 1" in out and "missing_images 1" in out

    bad.write_text("{not json")
    assert cli.main([*args, "--annotations", str(bad), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("mvitv2 eval detect: error: ") and "bad.json: malformed JSON" in err[-1]
    )
    assert cli.main([*args, "--workers", "0"]) == 2  # --images without --annotations
    assert "--images and --annotations go together" in capsys.readouterr().err


def test_backbone_initialised_from_image_checkpoint(tmp_path: Path) -> None:
    """A classification checkpoint initialises the detector's backbone (head/norm skipped)."""
    from mvitv2 import create_model

    arch = {"depths": (1, 1, 1, 1), "embed_dim": 16, "img_size": 64}
    classifier = create_model("mvitv2_tiny", num_classes=7, **arch)
    path = tmp_path / "cls.pt"
    torch.save(classifier.state_dict(), path)
    small = {k: v for k, v in MODEL_ARGS.items() if k not in arch}
    det = create_detector(
        "maskrcnn_mvitv2_tiny", num_classes=3, backbone_weights=str(path), **arch, **small
    )
    body = det.backbone.body.state_dict()
    src = classifier.state_dict()
    shared = [k for k in body if k in src]
    assert (
        len(shared) == len(src) - 4
    )  # all but head.projection.{weight,bias} and norm.{weight,bias}
    assert all(torch.equal(body[k], src[k]) for k in shared)


COCO_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("coco_*.yaml"))


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO folder (annotations/instances_{train,val}.json, train/, val/) of 2 digit scenes."""
    root = tmp_path_factory.mktemp("coco") / "scenes"
    make_digit_scenes(root, num_train=1, num_val=1, image_size=64, digit_size=(16, 28), seed=1)
    return root


@pytest.mark.parametrize("recipe", COCO_RECIPES)
def test_every_coco_recipe_trains_a_step_through_the_cli(
    recipe: str, coco_folder: Path, tmp_path: Path
) -> None:
    """Each shipped COCO recipe, with a tiny backbone and 64-px images, runs one optimizer step
    and its evaluation the way `mvitv2 train detect --data COCO --config RECIPE` does."""
    tiny = {
        **MODEL_ARGS,
        "num_heads": 1,
        "box_conv_dim": 16,
        "rpn_pre_nms_top_n_train": 64,
        "rpn_pre_nms_top_n_test": 64,
    }
    overrides = [f"model_args.{k}={json.dumps(v)}" for k, v in tiny.items()]
    overrides += [
        "data.min_sizes=[64]",
        "data.max_size=64",
        "data.lsj_size=64",
        "epochs=1",
        "batch_size=1",
        "workers=0",
        "tensorboard=false",
        "progress=false",
        "name=r",
    ]
    args = ["train", "detect", "--data", str(coco_folder), "--config", recipe]
    assert cli.main([*args, "--output", str(tmp_path), *overrides]) == 0
    state = torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 1
    # The run used the recipe: every setting it names that the test did not override.
    recipe_cfg = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    overridden = {"model_args", "epochs", "batch_size", "workers", "output"}
    for key, value in recipe_cfg.items():
        if key == "data":
            for k, v in value.items():
                if k not in ("min_sizes", "max_size", "lsj_size"):
                    assert state["config"]["data"][k] == v, (key, k)
        elif key not in overridden:
            assert state["config"][key] == value, key
    assert state["meta"]["model_name"] == recipe_cfg["model"]
    results = json.loads((tmp_path / "r" / "coco_results_val.json").read_text())
    assert all(1 <= r["category_id"] <= 10 and r["image_id"] == 1 for r in results)


def _coco_tree(root: Path, names: tuple[str, str]) -> None:
    """A COCO-layout folder with one 8x6 image per split, named as ``names`` say."""
    (root / "annotations").mkdir(parents=True)
    for name in names:
        (root / name).mkdir()
        Image.new("RGB", (8, 6)).save(root / name / "a.png")
        data = {
            "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}],
            "categories": [{"id": 4, "name": "four"}],
            "annotations": [
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 4,
                    "bbox": [1, 1, 3, 2],
                    "iscrowd": 0,
                    "area": 6,
                    "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
                }
            ],
        }
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(data))


def test_resolve_splits_finds_coco_layouts_and_explicit_files(tmp_path: Path, monkeypatch) -> None:
    from mvitv2.errors import UserFileNotFoundError, UserValueError
    from mvitv2.tasks.detect import DetectionDataConfig, resolve_splits

    plain = DetectionDataConfig()
    _coco_tree(tmp_path / "c2017", ("train2017", "val2017"))
    _coco_tree(tmp_path / "c", ("train", "val"))
    for root, suffix in ((tmp_path / "c2017", "2017"), (tmp_path / "c", "")):
        assert resolve_splits(root, plain) == {
            s: (root / f"{s}{suffix}", root / "annotations" / f"instances_{s}{suffix}.json")
            for s in ("train", "val")
        }
    explicit = DetectionDataConfig.from_dict(
        {"val_images": "/v", "val_json": "/v.json", "train_images": "/t", "train_json": "/t.json"}
    )
    # Both splits given: the embedded digit scenes are not generated.
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "cache"))
    assert resolve_splits(None, explicit) == {
        "train": (Path("/t"), Path("/t.json")),
        "val": (Path("/v"), Path("/v.json")),
    }
    assert not (tmp_path / "cache").exists()
    only_val = DetectionDataConfig(val_images="/v", val_json="/v.json")
    assert resolve_splits(tmp_path / "c", only_val)["val"] == (Path("/v"), Path("/v.json"))
    with pytest.raises(UserValueError, match="data.train_images and data.train_json go together"):
        resolve_splits(tmp_path / "c", DetectionDataConfig(train_json="/t.json"))
    with pytest.raises(UserFileNotFoundError, match="no COCO annotations under"):
        resolve_splits(tmp_path, plain)
    nested = DetectionDataConfig.from_dict({"digit_scenes.num_train": 5, "aug": "lsj"})
    assert nested.digit_scenes == {"num_train": 5} and nested.aug == "lsj"


def test_build_datasets_reports_and_checks_categories(tmp_path: Path, capsys) -> None:
    from mvitv2.engine.config import TrainConfig
    from mvitv2.errors import UserValueError
    from mvitv2.tasks.detect import DetectionTask, format_ap, report_data

    _coco_tree(tmp_path, ("train", "val"))
    cfg = TrainConfig.load(RECIPES_DIR / "digit_scenes.yaml", ["data.eval_max_images=1"])
    task = DetectionTask(cfg, tmp_path)
    train, val = task.build_datasets()
    assert task.class_names == ["four"] and task.label_to_cat_id == {1: 4}
    assert len(val.records) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"train data: {tmp_path / 'annotations' / 'instances_train.json'} -> 1/1 images, "
        "1/1 instances kept; no problems",
        f"val data: {tmp_path / 'annotations' / 'instances_val.json'} -> 1/1 images, "
        "1/1 instances kept; no problems",
    ]
    (tmp_path / "val" / "a.png").write_bytes(b"broken")
    with pytest.raises(Exception, match="unreadable_image"):
        val[0]
    assert report_data("v", val).endswith("1/1 instances kept; unreadable_image 1")
    ann = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({**data["annotations"][0], "id": 2, "bbox": [1, 1, 0, 2]})
    # a second image, without objects: a folder holding none of the listed images is an error
    data["images"].append({**data["images"][0], "id": 2, "file_name": "b.png"})
    Image.new("RGB", (8, 6)).save(tmp_path / "val" / "b.png")
    ann.write_text(json.dumps(data))
    (tmp_path / "val" / "a.png").unlink()
    DetectionTask(cfg, tmp_path).build_datasets()
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith(
            "-> 1/2 images, 0/2 instances kept; missing_images 1, negative_images 1, "
            "degenerate_boxes 1"
        )
    )
    data["categories"][0]["name"] = "other"
    ann.write_text(json.dumps(data))
    with pytest.raises(UserValueError, match="categories differ from the training set's"):
        DetectionTask(cfg, tmp_path).build_datasets()
    metrics = {
        "bbox_AP": 0.5,
        "bbox_AP50": 0.25,
        "bbox_AP75": 0.125,
        "segm_AP": 1.0,
        "segm_AP50": 0.75,
        "segm_AP75": 0.0625,
    }
    assert format_ap(metrics) == (
        "box AP 0.500 (AP50 0.250, AP75 0.125)  mask AP 1.000 (AP50 0.750, AP75 0.062)"
    )
    assert format_ap({k: v for k, v in metrics.items() if k.startswith("bbox")}) == (
        "box AP 0.500 (AP50 0.250, AP75 0.125)"
    )
