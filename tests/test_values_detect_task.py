"""Detection task values against independent references: what ``predict detect`` keeps and
writes (threshold at equality, labels from 0, masks as RLE that pycocotools decodes back, COCO
category ids), COCO results and AP of ``evaluate_detector`` against COCOeval run directly, the
category checks of ``eval detect``, and the lines the commands print."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torch import Tensor, nn

from mvitv2.engine.data import build_loader
from mvitv2.engine.distributed import DistInfo
from mvitv2.predict import CheckpointInfo, Predictor
from mvitv2.tasks.detect import (
    SPEC,
    DetectorFile,
    build_eval_dataset,
    collate,
    describe_detections,
    detection_records,
    evaluate_detector,
    warn_category_mismatch,
)
from test_detection_data_eval import STATS, Oracle, _coco, _cocoeval, _hand_made, _write_images


class Scripted(nn.Module):
    """A detector that returns the given outputs in turn, one per image, and records the
    images of each call."""

    def __init__(self, outputs: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.outputs, self.calls = list(outputs), []

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.calls.append([im.clone() for im in images])
        return [self.outputs.pop(0) for _ in images]


def _out(scores: list[float], labels: list[int], masks: Tensor) -> dict[str, Tensor]:
    n = len(scores)
    boxes = torch.tensor([[i, i + 0.5, i + 2.0, i + 3.25] for i in range(n)]).reshape(n, 4)
    return {
        "boxes": boxes,
        "scores": torch.tensor(scores).reshape(n),
        "labels": torch.tensor(labels, dtype=torch.int64).reshape(n),
        "masks": masks,
    }


def _predictor(outputs: list[dict[str, Tensor]], **kw: Any) -> tuple[Predictor, Scripted]:
    model = Scripted(outputs)
    pre = kw.pop("preprocessing", {})
    names = ["one", "two", "three"]
    return Predictor(model, task="detect", class_names=names, preprocessing=pre, **kw), model


def test_predict_keeps_scores_from_the_threshold_on_and_names_labels_from_zero():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.choice([0.1, 0.59, 0.6, 0.61, 0.9], (3, 1, 6, 5))).float()
    empty = torch.zeros(0, 1, 6, 5)
    outputs = [
        _out([0.9, 0.5, 0.49], [2, 1, 3], probs),
        _out([], [], empty),  # the detector found nothing at all
        _out([0.3], [1], probs[:1]),  # found something, all below the threshold
    ]
    pred, model = _predictor(outputs, batch_size=2, score_thresh=0.5, mask_thresh=0.6)
    want = [outputs[0]["boxes"][:2].clone(), probs[:2, 0] > 0.6]
    images = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    first, nothing, below = pred(images)
    assert [len(c) for c in model.calls] == [2, 1]  # batch_size 2
    for call, im in zip([*model.calls[0], *model.calls[1]], images, strict=True):
        want_im = torch.from_numpy(im).permute(2, 0, 1).float() / 255
        assert call.dtype == torch.float32 and torch.equal(call, want_im)
    assert first["scores"].tolist() == pytest.approx([0.9, 0.5])  # 0.5 >= 0.5 is kept
    assert first["labels"].tolist() == [1, 0] and first["label_names"] == ["two", "one"]
    assert torch.equal(first["boxes"], want[0]) and torch.equal(first["masks"], want[1])
    assert first["best_score"] == pytest.approx(0.9)
    assert nothing["best_score"] is None and len(nothing["scores"]) == 0
    assert below["best_score"] == pytest.approx(0.3) and below["label_names"] == []
    assert below["masks"].shape == (0, 6, 5)


def test_predict_gives_uint8_images_to_a_detector_that_takes_them():
    image = np.random.default_rng(1).integers(0, 256, (4, 7, 3), dtype=np.uint8)
    pred, model = _predictor(
        [_out([0.7], [3], torch.ones(1, 1, 4, 7))], preprocessing={"input_dtype": "uint8"}
    )
    (res,) = pred([image])
    assert torch.equal(model.calls[0][0], torch.from_numpy(image).permute(2, 0, 1))
    assert res["label_names"] == ["three"] and res["masks"].all()  # mask_thresh 0.5 default
    assert res["scores"].tolist() == pytest.approx([0.7])  # score_thresh 0 default


def _det(masks: bool = True) -> dict[str, Any]:
    m = torch.zeros(3, 5, 7, dtype=torch.bool)
    m[0, 1:3, 2:6] = True
    m[1, 4, 0] = True
    m[2, :, 6] = True
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 3.5, 4.0], [0.0, 4.0, 1.0, 5.0], [6.0, 0.0, 7.0, 5.0]]),
        "scores": torch.tensor([0.875, 0.5, 0.25]),
        "labels": torch.tensor([0, 2, 1]),
        "label_names": ["one", "three", "two"],
    }
    return {**det, "masks": m} if masks else det


def test_detection_records_carry_coco_category_ids_and_rle_masks_that_decode_back():
    det = _det()
    records = detection_records(det, {1: 7, 2: 9, 3: 11})
    assert json.loads(json.dumps(records)) == records  # JSON-ready
    assert [(r["label"], r["category_id"], r["score"], r["box"]) for r in records] == [
        ("one", 7, 0.875, [1.0, 2.0, 3.5, 4.0]),
        ("three", 11, 0.5, [0.0, 4.0, 1.0, 5.0]),
        ("two", 9, 0.25, [6.0, 0.0, 7.0, 5.0]),
    ]
    for r, mask in zip(records, det["masks"], strict=True):
        assert r["segmentation"]["size"] == [5, 7]
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]), mask.numpy())
    no_ids = detection_records(det, None)
    assert [r["category_id"] for r in no_ids] == [None] * 3
    boxes_only = detection_records(_det(masks=False), {1: 7, 2: 9, 3: 11})
    assert [set(r) for r in boxes_only] == [{"label", "category_id", "score", "box"}] * 3
    none = {k: v[:0] for k, v in _det().items()}
    assert detection_records(none, {1: 7}) == []


def test_describe_detections_names_each_or_says_why_there_is_none():
    det = _det()
    assert describe_detections(det, 0.5) == "one 0.88, three 0.50, two 0.25"
    empty = {"scores": torch.zeros(0), "label_names": [], "best_score": None}
    assert describe_detections(empty, 0.5) == "no detection (the detector found no object at all)"
    below = {**empty, "best_score": 0.4321}
    assert describe_detections(below, 0.5) == (
        "no detection above score 0.50 (best 0.43); lower it with --score-thresh"
    )


def test_export_size_is_min_size_rounded_up_to_32():
    for min_size, side in ((1, 32), (32, 32), (33, 64), (800, 800), (801, 832)):
        assert SPEC.export_size({"min_size": min_size}) == (side, side)


# ---------------------------------------------------------------------- evaluation
@pytest.fixture()
def hand_made(tmp_path: Path):
    data, _ = _hand_made()  # categories 3 ("a") and 12 ("b"): labels 1 and 2
    _write_images(tmp_path, data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    return build_eval_dataset(tmp_path, tmp_path / "gt.json")


class Shifted(Oracle):
    """The ground truth with the first object's box moved 4 px right: an imperfect detector."""

    def __init__(self, dataset) -> None:
        super().__init__(dataset)
        first = next(iter(self.answers.values()))
        first["boxes"][0] += torch.tensor([4.0, 0.0, 4.0, 0.0])


def _evaluate(model: nn.Module, ds, **kw: Any):
    loader = build_loader(ds, batch_size=1, train=False, collate_fn=collate)
    return evaluate_detector(model, loader, DistInfo(), ds, **kw)


def test_evaluate_detector_results_are_coco_xywh_with_dataset_ids_and_ap_is_cocoevals(hand_made):
    ds = hand_made
    model = Shifted(ds)
    metrics, results = _evaluate(model, ds)
    want = []  # what the detector said, written as COCO results by hand
    for rec in ds.records:
        image, _ = ds[ds.records.index(rec)]
        out = model.answers[Oracle._key(image)]
        for box, label, score in zip(out["boxes"].tolist(), out["labels"], out["scores"]):
            x0, y0, x1, y1 = box
            want.append((rec["id"], {1: 3, 2: 12}[int(label)], [x0, y0, x1 - x0, y1 - y0], score))
    got = [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in results]
    assert got == [(i, c, pytest.approx(b), pytest.approx(float(s))) for i, c, b, s in want]
    for iou_type in ("bbox", "segm"):
        ref = _cocoeval(ds.coco, results, iou_type)
        assert [metrics[f"{iou_type}_{k}"] for k in STATS] == ref
    assert metrics["bbox_AP"] < 1.0 and metrics["segm_AP"] == 1.0  # only the box moved
    assert (metrics["images"], metrics["skipped_images"]) == (2, 0)


def test_evaluate_detector_takes_a_detectors_own_category_ids_and_can_skip_masks(hand_made):
    ds = hand_made
    metrics, results = _evaluate(Oracle(ds), ds, label_to_cat_id={1: 12, 2: 3})
    own = _evaluate(Oracle(ds), ds)[1]
    swap = {3: 12, 12: 3}
    assert [r["category_id"] for r in results] == [swap[r["category_id"]] for r in own]
    assert metrics["bbox_AP"] == 0.0  # every label on the other category
    metrics, results = _evaluate(Oracle(ds), ds, with_masks=False)
    assert set(metrics) == {f"bbox_{k}" for k in STATS} | {"images", "skipped_images"}
    assert all("segmentation" not in r for r in results) and metrics["bbox_AP"] == 1.0


# ---------------------------------------------------------------------- category checks
def _detector(names: list[str], label_to_cat_id: dict[int, int] | None) -> DetectorFile:
    info = CheckpointInfo(Path("ckpt.pt"), "detect", "maskrcnn_mvitv2_tiny", {}, {}, names, {})
    return DetectorFile(info, label_to_cat_id=label_to_cat_id)


def test_category_mismatch_warns_by_position_for_a_run_and_by_id_for_coco_ids(hand_made, capsys):
    ds, ann = hand_made, Path("gt.json")
    warn_category_mismatch(ds, _detector(["a", "b"], None), ann)
    assert capsys.readouterr().err == ""
    warn_category_mismatch(ds, _detector(["b", "a"], None), ann)
    assert capsys.readouterr().err == (
        "warning: gt.json categories ['a', 'b'] differ from the checkpoint's ['b', 'a']; "
        "labels are mapped by position\n"
    )
    # COCO ids: the JSON's categories 3 "a" and 12 "b" must be the detector's, in any order.
    warn_category_mismatch(ds, _detector(["x", "b", "a"], {1: 1, 2: 12, 3: 3}), ann)
    assert capsys.readouterr().err == ""
    warn_category_mismatch(ds, _detector(["a", "c"], {1: 3, 2: 12}), ann)
    assert capsys.readouterr().err == (
        "warning: gt.json categories 12 'b' are not the detector's COCO categories (id and "
        "name); the detector predicts COCO category ids\n"
    )
    warn_category_mismatch(ds, _detector(["a"], {1: 3}), ann)
    assert "categories 12 'b' are not" in capsys.readouterr().err
    warn_category_mismatch(ds, _detector(["x"], {1: 1}), ann)
    assert "categories 3 'a', 12 'b' are not" in capsys.readouterr().err


# ---------------------------------------------------------------------- predict detect
def test_predict_detect_writes_a_training_runs_dataset_category_ids(tmp_path, capsys):
    from PIL import Image

    from mvitv2.cli import main
    from test_task_spec import _task, _write

    task, model = _task("detect")  # classes "one", "two" from categories 7 and 9
    ckpt = _write(tmp_path / "det.pt", task, model)
    image = np.random.default_rng(0).integers(0, 256, (96, 112, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    argv = ["predict", "detect", str(tmp_path / "x.png"), "--checkpoint", str(ckpt)]
    argv += ["--score-thresh", "0", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    (record,) = [json.loads(line) for line in out.strip().splitlines()]
    assert (record["file"], record["height"], record["width"]) == (str(tmp_path / "x.png"), 96, 112)
    dets = record["detections"]
    assert dets and [d["category_id"] for d in dets] == [
        {"one": 7, "two": 9}[d["label"]] for d in dets
    ]
    saved = tmp_path / "out" / "detections.json"
    assert json.loads(saved.read_text()) == [record]
    assert err.strip() == f"detections written to {saved}"
    # Without --json: one line per image (what was found, where it was drawn), then the file.
    assert main(argv) == 0
    line, last = capsys.readouterr().out.strip().splitlines()
    listed = ", ".join(f"{d['label']} {d['score']:.2f}" for d in dets)
    assert line == f"{tmp_path / 'x.png'}: {listed} -> {tmp_path / 'out' / 'x_pred.png'}"
    assert last == f"detections written to {saved}"
    drawn = np.asarray(Image.open(tmp_path / "out" / "x_pred.png"))
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)


def test_predict_detect_never_draws_two_inputs_of_the_same_stem_over_each_other(tmp_path, capsys):
    """``a/x.png``, ``b/x.png`` and ``x.jpg`` (three sizes): three drawings, ``x_pred.png``,
    ``x_pred_2.png``, ``x_pred_3.png`` in input order, each of its own input's size, and each
    record of ``detections.json`` names its drawing."""
    from PIL import Image

    from mvitv2.cli import main
    from mvitv2.tasks.detect import drawing_names
    from test_task_spec import _task, _write

    task, model = _task("detect")
    ckpt = _write(tmp_path / "det.pt", task, model)
    rng = np.random.default_rng(0)
    inputs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "x.jpg"]
    sizes = [(64, 80), (72, 56), (48, 96)]
    for path, (h, w) in zip(inputs, sizes):
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    argv = ["predict", "detect", *map(str, inputs), "--checkpoint", str(ckpt), "--json"]
    argv += ["--score-thresh", "0", "--device", "cpu", "--output-dir", str(out)]
    argv += ["--batch-size", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    names = ["x_pred.png", "x_pred_2.png", "x_pred_3.png"]
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == [str(p) for p in inputs]
    assert [r["drawing"] for r in records] == [str(out / n) for n in names]
    assert sorted(p.name for p in out.glob("*.png")) == names
    for name, (h, w) in zip(names, sizes):
        assert Image.open(out / name).size == (w, h)
    assert drawing_names(["p/q.png", "q.png", "r.png", "s/q.jpg", "r.jpg", "t.png"]) == [
        "q_pred.png",
        "q_pred_2.png",
        "r_pred.png",
        "q_pred_3.png",
        "r_pred_2.png",
        "t_pred.png",
    ]


# ---------------------------------------------------------------------- eval detect
@pytest.fixture(scope="module")
def detect_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_predictor import make_detect_checkpoint

    return make_detect_checkpoint(tmp_path_factory.mktemp("eval") / "det.pt")


def test_eval_detect_without_masks_writes_coco_results_next_to_the_checkpoint(
    detect_ckpt: Path, tmp_path: Path, capsys
):
    from mvitv2.cli import main

    data, _ = _hand_made()  # 2 images, categories 3 "a" and 12 "b"
    _write_images(tmp_path, data)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(data))
    argv = ["eval", "detect", "--checkpoint", str(detect_ckpt), "--images", str(tmp_path)]
    argv += ["--annotations", str(gt), "--workers", "0", "--no-masks"]
    metrics_file = tmp_path / "m.json"
    assert main([*argv, "--metrics", str(metrics_file)]) == 0
    out, err = capsys.readouterr()
    results_file = detect_ckpt.with_name("coco_results.json")
    results = json.loads(results_file.read_text())
    assert results and all("segmentation" not in r for r in results)
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) == {f"bbox_{k}" for k in STATS} | {"images", "skipped_images"}
    ref = _cocoeval(_coco(data), results, "bbox")
    assert [metrics[f"bbox_{k}"] for k in STATS] == pytest.approx(ref, abs=1e-12)
    report, result_line, written, last = out.strip().splitlines()
    assert report == f"data: {gt} -> 2/2 images, 5/5 instances kept; no problems"
    assert result_line.startswith(
        f"{detect_ckpt}: box AP {ref[0]:.3f} (AP50 {ref[1]:.3f}, AP75 {ref[2]:.3f}) on 2 images "
        f"of {tmp_path} (0 skipped)  ["
    )
    assert written == f"detections ({len(results)}) written to {results_file}"
    assert json.loads(last) == metrics
    assert f"warning: {gt} categories ['a', 'b'] differ from the checkpoint's ['one', 'two']" in err
    # --json: the metrics alone on stdout, the reports on stderr
    assert main([*argv, "--metrics", str(metrics_file), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == metrics and f"written to {results_file}" in err


def test_eval_detect_names_what_is_missing_in_one_line(detect_ckpt: Path, tmp_path: Path, capsys):
    from mvitv2.cli import main

    argv = ["eval", "detect", "--checkpoint", str(detect_ckpt), "--workers", "0"]
    assert main([*argv, "--annotations", "gt.json"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 eval detect: error: --images and --annotations go together"
    )
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mvitv2 eval detect: error: no validation split under {tmp_path}: expected "
        "annotations/instances_val2017.json (or instances_val.json), or pass --images and "
        "--annotations"
    )


# ---------------------------------------------------------------------- task
class _Losses(nn.Module):
    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return {
            "loss_a": torch.tensor(0.25),
            "loss_b": torch.tensor(1.5),
            "loss_c": images[0].sum(),
        }


def test_training_loss_is_the_sum_of_the_detectors_losses_each_reported():
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionTask

    task = DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny"))
    total, parts = task.training_loss(_Losses(), ([torch.full((1, 2, 2), 0.5)], [{}]))
    assert float(total) == 0.25 + 1.5 + 2.0
    assert parts == {"loss_a": 0.25, "loss_b": 1.5, "loss_c": 2.0}
    assert all(type(v) is float for v in parts.values())


def test_task_evaluation_writes_its_coco_results_where_asked(hand_made, tmp_path):
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionTask

    ds = hand_made
    task = DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny", data={"masks": False}))
    task.val_ds = ds
    loader = build_loader(ds, batch_size=2, train=False, collate_fn=collate)
    assert (
        task.evaluate(Shifted(ds), loader, DistInfo())
        == _evaluate(Shifted(ds), ds, with_masks=False)[0]
    )
    assert not any("segmentation" in r for r in task.last_results)  # data.masks false
    task.results_path = tmp_path / "r.json"
    task.evaluate(Shifted(ds), loader, DistInfo())
    assert json.loads(task.results_path.read_text()) == task.last_results != []


def test_default_preprocessing_is_the_detectors_normalisation_and_sizes():
    got = SPEC.default_preprocessing("maskrcnn_mvitv2_tiny", {"min_size": 96, "max_size": 160}, {})
    assert got == {
        "mean": [0.485, 0.456, 0.406],  # ImageNet's, on [0, 1] RGB
        "std": [0.229, 0.224, 0.225],
        "min_size": 96,
        "max_size": 160,
        "size_divisible": 32,
    }
    default = SPEC.default_preprocessing("maskrcnn_mvitv2_tiny", {}, {})
    assert (default["min_size"], default["max_size"]) == (800, 1333)  # detectron2's test sizes


# ---------------------------------------------------------------------- data options and splits
TINY_SCENES = {"num_train": 1, "num_val": 1, "image_size": 32, "digit_size": [10, 14]}


def test_data_options_merge_dotted_keys_into_the_nested_mapping_and_round_trip():
    from mvitv2.tasks.detect import DetectionDataConfig

    dc = DetectionDataConfig.from_dict(
        {"digit_scenes": {"seed": 3}, "digit_scenes.num_train": 5, "min_sizes": [480, 512]}
    )
    assert dc.digit_scenes == {"seed": 3, "num_train": 5}  # merged, not replaced
    assert dc.min_sizes == (480, 512)
    assert DetectionDataConfig.from_dict({"digit_scenes.seed": 1}).digit_scenes == {"seed": 1}
    saved = dc.to_dict()  # YAML / checkpoint form: lists, every option named
    assert saved["min_sizes"] == [480, 512] and saved["lsj_scale"] == [0.1, 2.0]
    assert saved["digit_scenes"] == {"seed": 3, "num_train": 5} and saved["aug"] == "multiscale"
    assert len(saved) == len(dataclasses.fields(DetectionDataConfig))
    assert DetectionDataConfig.from_dict(saved) == dc


def test_unknown_data_options_are_named_in_one_user_error():
    from mvitv2.errors import UnknownKeyError
    from mvitv2.tasks.detect import DetectionDataConfig

    with pytest.raises(UnknownKeyError) as e:
        DetectionDataConfig.from_dict({"augg": "lsj"})
    assert str(e.value) == "unknown detection data option 'augg' (did you mean 'aug'?)"
    # digit_scenes options are make_digit_scenes's keywords (a typo used to reach it as a
    # TypeError traceback once training started)
    with pytest.raises(UnknownKeyError) as e:
        DetectionDataConfig.from_dict({"digit_scenes.num_trian": 5, "digit_scenes.seed": 1})
    assert str(e.value) == (
        "unknown data.digit_scenes option 'num_trian' (did you mean 'num_train' or 'num_val'?)"
    )
    with pytest.raises(UnknownKeyError, match="^unknown data.digit_scenes option 'seed.x'"):
        DetectionDataConfig.from_dict({"digit_scenes.seed.x": 1})  # split at the first dot


def test_train_detect_refuses_an_unknown_digit_scenes_option_in_one_line(
    tmp_path, capsys, monkeypatch
):
    from mvitv2.cli import main

    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "cache"))
    argv = ["train", "detect", "data.digit_scenes.colour=1", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 train detect: error: unknown data.digit_scenes option 'colour'; valid: "
        "digit_size, digits_per_image, image_size, noise, num_train, num_val, root, seed"
    )
    assert not (tmp_path / "cache").exists()  # refused before any data is made


def test_default_data_root_generates_the_digit_scenes_with_the_recipes_options(
    tmp_path, monkeypatch
):
    from mvitv2.tasks.detect import DetectionDataConfig, resolve_splits

    monkeypatch.setenv("MVITV2_DATA", str(tmp_path))
    root = tmp_path / "digit_scenes"
    want = {
        "train": (root / "train", root / "annotations" / "instances_train.json"),
        "val": (root / "val", root / "annotations" / "instances_val.json"),
    }
    dc = DetectionDataConfig.from_dict({"digit_scenes": TINY_SCENES})
    for data_root in (None, "digit_scenes"):
        assert resolve_splits(data_root, dc) == want
    train = json.loads(want["train"][1].read_text())
    assert len(train["images"]) == 1 and train["images"][0]["width"] == 32
    assert len(json.loads(want["val"][1].read_text())["images"]) == 1
    # An explicit validation split replaces the generated one; training stays generated.
    only_val = DetectionDataConfig.from_dict(
        {"digit_scenes": TINY_SCENES, "val_images": "/v", "val_json": "/v.json"}
    )
    assert resolve_splits(None, only_val) == {**want, "val": (Path("/v"), Path("/v.json"))}


def test_a_half_given_split_is_refused_before_any_data_is_generated(tmp_path, monkeypatch):
    from mvitv2.errors import UserValueError
    from mvitv2.tasks.detect import DetectionDataConfig, resolve_splits

    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "cache"))
    dc = DetectionDataConfig(train_images="/t", val_images="/v", val_json="/v.json")
    with pytest.raises(UserValueError, match="^data.train_images and data.train_json go together$"):
        resolve_splits(None, dc)
    assert not (tmp_path / "cache").exists()


def test_a_coco_folder_with_one_split_gives_that_split_and_none_names_what_is_expected(tmp_path):
    from mvitv2.errors import UserFileNotFoundError
    from mvitv2.tasks.detect import DetectionDataConfig, resolve_splits

    (tmp_path / "annotations").mkdir()
    with pytest.raises(UserFileNotFoundError) as e:
        resolve_splits(tmp_path, DetectionDataConfig())
    assert str(e.value) == (
        f"no COCO annotations under {tmp_path}: expected annotations/instances_train2017.json "
        "(or instances_train.json), or set data.train_images/data.train_json"
    )
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert resolve_splits(tmp_path, DetectionDataConfig()) == {
        "val": (tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")
    }
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    assert resolve_splits(tmp_path, DetectionDataConfig())["train"] == (
        tmp_path / "train",
        tmp_path / "annotations" / "instances_train.json",
    )


# ---------------------------------------------------------------------- finetune= a detection run
_TINY_DETECTOR = {
    "depths": [1, 1, 1, 1],
    "embed_dim": 8,
    "num_heads": 1,
    "img_size": 64,
    "window_size": None,
    "fpn_channels": 8,
    "min_size": 64,
    "max_size": 64,
    "box_fc_dim": 16,
    "mask_head_dim": 8,
    "mask_head_convs": 1,
}


def _save_run(path: Path, model: dict[str, Tensor]) -> Path:
    torch.save({"model": model, "meta": {"task": "detect"}, "config": {}}, path)
    return path


def test_finetune_from_a_detection_run_resets_only_the_class_heads_of_another_class_count(
    tmp_path,
):
    from mvitv2.detection import create_detector
    from mvitv2.tasks.detect import init_detector

    trained = create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **_TINY_DETECTOR)
    saved = trained.state_dict()
    run = _save_run(tmp_path / "det.pt", saved)
    model = create_detector("maskrcnn_mvitv2_tiny", num_classes=7, **_TINY_DETECTOR)
    report = init_detector(model, run)
    # By hand: 3 classes + background -> 7 + background; 4 box deltas per class.
    pred = "roi_heads.box_predictor."
    mask = "roi_heads.mask_predictor.mask_fcn_logits."
    sizes = {f"{pred}cls_score.": (4, 8), f"{pred}bbox_pred.": (16, 32), mask: (4, 8)}
    want = {
        f"{head}{p}": f"head reset: {old} outputs, model {new}"
        for head, (old, new) in sizes.items()
        for p in ("weight", "bias")
    }
    assert report.initialized == want
    assert report.notes == ["head reset: another class count; the class-specific layers are new"]
    assert (report.source, report.format) == (str(run), "mvitv2 detection run")
    assert report.loaded == sorted(set(saved) - set(want))
    assert report.missing == report.unexpected == report.shape_conflicts == []
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in report.loaded)
    same = create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **_TINY_DETECTOR)
    report = init_detector(same, run)
    assert report.initialized == {} and report.notes == [] and report.loaded == sorted(saved)


def test_finetune_from_a_weights_tag_or_image_checkpoint_initialises_the_backbone(
    tmp_path, monkeypatch
):
    import mvitv2.detection.model as detection_model
    from mvitv2.tasks.detect import init_detector

    calls = []
    monkeypatch.setattr(
        detection_model, "load_backbone_weights", lambda m, s: calls.append((m, s)) or "report"
    )
    model = nn.Linear(1, 1)  # never touched: the backbone loader is stubbed
    image_run = tmp_path / "cls.pt"  # an image run's checkpoint (another task's meta)
    torch.save({"model": {}, "meta": {"task": "image"}, "config": {}}, image_run)
    for source in ("mvitv2_tiny.in1k", image_run, tmp_path / "absent.pt"):
        assert init_detector(model, source) == "report"
    assert calls == [
        (model, "mvitv2_tiny.in1k"),
        (model, str(image_run)),
        (model, str(tmp_path / "absent.pt")),
    ]


def test_finetune_from_a_detection_run_names_missing_and_unexpected_tensors(tmp_path):
    from mvitv2.detection import create_detector
    from mvitv2.tasks.detect import init_detector
    from mvitv2.weights import CheckpointMismatchError

    model = create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **_TINY_DETECTOR)
    saved = model.state_dict()
    gone = "backbone.fpn.inner_blocks.1.0.weight"
    assert gone in saved
    changed = {k: v for k, v in saved.items() if k != gone}
    changed["roi_heads.extra.weight"] = torch.zeros(2)
    wide = "backbone.fpn.inner_blocks.0.0.bias"  # not class-specific: a conflict, no reset
    changed[wide] = torch.zeros(9)
    run = _save_run(tmp_path / "det.pt", changed)
    with pytest.raises(CheckpointMismatchError) as e:
        init_detector(model, run)
    assert str(e.value).startswith(f"checkpoint {run} does not fit the detector:\n")
    assert gone in str(e.value) and "roi_heads.extra.weight" in str(e.value)
    report = e.value.report
    assert (report.missing, report.unexpected) == ([gone], ["roi_heads.extra.weight"])
    assert report.shape_conflicts == [(wide, (9,), (8,))] and report.initialized == {}


# ---------------------------------------------------------------------- --checkpoint options
def test_detectron2_options_reach_read_detector_with_model_args_parsed(monkeypatch):
    import argparse

    from mvitv2.errors import UserValueError
    from mvitv2.tasks import detect

    calls = []
    monkeypatch.setattr(detect, "read_detector", lambda *a, **kw: calls.append((a, kw)) or "det")
    args = argparse.Namespace(
        checkpoint="model_final.pkl",
        allow_pickle=True,
        model="cascade_maskrcnn_mvitv2_tiny",
        model_args=["depths=[1, 2, 1, 1]", "min_size=256", "note=a=b", "eps=1e-3", "empty="],
    )
    assert detect.detector_from_args(args) == "det"
    assert calls == [
        (
            ("model_final.pkl",),
            {
                "allow_pickle": True,
                "model": "cascade_maskrcnn_mvitv2_tiny",
                # the value runs from the first '=' on; YAML scalars and lists
                "model_args": {
                    "depths": [1, 2, 1, 1],
                    "min_size": 256,
                    "note": "a=b",
                    "eps": 0.001,
                    "empty": "",
                },
            },
        )
    ]
    for item in ("embed_dim", "=8"):
        with pytest.raises(UserValueError) as e:
            detect.detector_from_args(argparse.Namespace(**{**vars(args), "model_args": [item]}))
        assert str(e.value) == f"--model-args {item!r}: expected KEY=VALUE"
    with pytest.raises(UserValueError, match=r"^--model-args 'depths=\[1, 2': not valid YAML"):
        detect.detector_from_args(
            argparse.Namespace(**{**vars(args), "model_args": ["depths=[1, 2"]})
        )


# ---------------------------------------------------------------------- the task's data and model
def test_checkpoint_meta_records_the_data_and_category_ids_that_eval_reads_back(tmp_path):
    from mvitv2.engine.cli import RECIPES_DIR
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionDataConfig, DetectionTask
    from test_detection_task import _coco_tree

    _coco_tree(tmp_path, ("train", "val"))  # one category: id 4, "four"
    cfg = TrainConfig.load(
        RECIPES_DIR / "digit_scenes.yaml", ["data.eval_max_images=1", "model_args.embed_dim=8"]
    )
    task = DetectionTask(cfg, tmp_path)
    task.build_datasets()
    meta = task.checkpoint_meta()
    assert meta["task"] == "detect" and meta["class_names"] == ["four"]
    assert (meta["data_root"], meta["label_to_cat_id"]) == (str(tmp_path), {1: 4})
    assert meta["model_name"] == cfg.model and meta["model_kwargs"]["embed_dim"] == 8
    assert meta["data"]["eval_max_images"] == 1 and meta["data"]["hflip_prob"] == 0.0
    assert DetectionDataConfig.from_dict(meta["data"]) == task.data_cfg
    assert DetectionTask(cfg).checkpoint_meta()["data_root"] == "digit_scenes"  # no --data


def test_eval_dataset_keeps_images_without_objects_and_the_pixels_as_read(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    pixels = {i: rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for i in (1, 2)}
    for i, im in pixels.items():
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 6} for i in (1, 2)],
        "categories": [{"id": 5, "name": "x"}],
        "annotations": [  # image 2 has no object: still evaluated (a false positive counts)
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 3], "iscrowd": 0,
             "area": 12, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}
        ],
    }  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(data))
    for uint8 in (False, True):
        options = {"uint8": True} if uint8 else {}  # float by default
        ds = build_eval_dataset(tmp_path, tmp_path / "gt.json", **options)
        assert [rec["id"] for rec in ds.records] == [1, 2]
        for i in (0, 1):
            image, target = ds[i]
            want = torch.from_numpy(pixels[i + 1]).permute(2, 0, 1)
            if uint8:  # detectron2 detectors: uint8 as read
                assert image.dtype == torch.uint8 and torch.equal(image, want)
            else:
                assert image.dtype == torch.float32
                torch.testing.assert_close(image, want.float() / 255, rtol=0, atol=1e-7)
            assert target["masks"].shape == (1 - i, 6, 8)  # masks by default
    boxes_only = build_eval_dataset(tmp_path, tmp_path / "gt.json", masks=False)
    assert "masks" not in boxes_only[0][1]


def test_the_tasks_model_has_one_output_per_class_and_the_pretrained_backbone(tmp_path):
    from mvitv2 import create_model
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionTask

    arch = {k: _TINY_DETECTOR[k] for k in ("depths", "embed_dim", "num_heads", "img_size")}
    classifier = create_model("mvitv2_tiny", num_classes=7, **arch).state_dict()
    torch.save(classifier, tmp_path / "cls.pt")
    cfg = TrainConfig(
        model="maskrcnn_mvitv2_tiny", model_args=_TINY_DETECTOR, pretrained=str(tmp_path / "cls.pt")
    )
    task = DetectionTask(cfg)
    task.class_names = ["a", "b"]
    model = task.build_model()
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # 2 classes + background
    body = model.backbone.body.state_dict()
    assert torch.equal(body["blocks.0.attn.qkv.weight"], classifier["blocks.0.attn.qkv.weight"])


def test_evaluation_of_real_world_coco_quirks_equals_cocoeval_on_the_raw_json(tmp_path):
    """Crowd regions as uncompressed RLE, an object with a zero-width box, an image without
    objects, polygon and compressed-RLE masks, category ids 7 and 90 listed out of order: a
    detector answering the training targets scores what COCOeval gives on the file itself."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    crowd = np.zeros((40, 50), np.uint8)
    crowd[20:30, 30:45] = 1
    counts, value, run = [], 0, 0  # uncompressed RLE: column-major runs, background first
    for v in crowd.flatten(order="F"):
        if v != value:
            counts, value, run = [*counts, run], v, 0
        run += 1
    counts.append(run)
    square = np.zeros((40, 50), np.uint8)
    square[10:30, 20:40] = 1
    rle = mask_util.encode(np.asfortranarray(square))["counts"].decode()
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 50, "height": 40} for i in (1, 2, 3)],
        "categories": [{"id": 90, "name": "z"}, {"id": 7, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [2, 3, 10, 8],
             "area": 80, "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 2, "image_id": 1, "category_id": 90, "iscrowd": 1, "bbox": [30, 20, 15, 10],
             "area": 150, "segmentation": {"size": [40, 50], "counts": counts}},
            {"id": 3, "image_id": 2, "category_id": 90, "iscrowd": 0, "bbox": [5, 5, 0, 10],
             "area": 0, "segmentation": [[5, 5, 5, 5, 5, 15, 5, 15]]},
            {"id": 4, "image_id": 2, "category_id": 90, "iscrowd": 0, "bbox": [20, 10, 20, 20],
             "area": 400, "segmentation": {"size": [40, 50], "counts": rle}},
        ],
    }  # fmt: skip
    assert (
        mask_util.decode(
            mask_util.frPyObjects(data["annotations"][1]["segmentation"], 40, 50)
        ).sum()
        == 150
    )
    (tmp_path / "gt.json").write_text(json.dumps(data))
    ds = build_eval_dataset(tmp_path, tmp_path / "gt.json")
    assert ds.label_to_cat_id == {1: 7, 2: 90} and ds.class_names == ["a", "z"]
    metrics, results = _evaluate(Oracle(ds), ds)
    # the trained-on objects only: the crowd region and the zero-width box are not answered
    assert sorted((r["image_id"], r["category_id"]) for r in results) == [(1, 7), (2, 90)]
    assert (metrics["images"], metrics["skipped_images"]) == (3, 0)
    for iou_type in ("bbox", "segm"):
        ref = _cocoeval(_coco(data), results, iou_type)
        assert [metrics[f"{iou_type}_{k}"] for k in STATS] == ref
    # By hand: category 7 found (AP 1); category 90 one of two (precision 1 up to recall 0.5:
    # 51 of COCO's 101 recall points).
    assert metrics["bbox_AP"] == metrics["segm_AP"] == pytest.approx((1 + 51 / 101) / 2)


def test_training_data_follows_the_recipes_augmentation_mask_and_negative_options(tmp_path):
    from PIL import Image

    from mvitv2.engine.config import TrainConfig
    from mvitv2.errors import UserFileNotFoundError
    from mvitv2.tasks.detect import DetectionTask
    from test_detection_task import _coco_tree

    _coco_tree(tmp_path, ("train", "val"))  # 8x6 images, one object: xywh [1, 1, 3, 2]
    pixels = np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "train" / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "train" / "b.png")
    ann = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["images"].append({"id": 2, "file_name": "b.png", "width": 8, "height": 6})  # negative
    ann.write_text(json.dumps(data))

    def datasets(**options: Any):
        task = DetectionTask(TrainConfig(data=options), tmp_path)
        return task.build_datasets()

    # No resize, always flipped, no masks, negatives kept.
    train, val = datasets(aug="none", hflip_prob=1.0, masks=False, remove_empty=False)
    assert len(train) == 2
    image, target = train[0]
    want = torch.from_numpy(pixels).permute(2, 0, 1).flip(-1).float() / 255
    torch.testing.assert_close(image.as_subclass(Tensor), want, rtol=0, atol=1e-7)
    assert target["boxes"].tolist() == [[4.0, 1.0, 7.0, 3.0]]  # x -> 8 - x, by hand
    assert "masks" not in target and "masks" not in val[0][1]
    # Multi-scale: short side 60 wanted, long side capped at 40 -> 40x30; masks; no negatives.
    train, val = datasets(aug="multiscale", min_sizes=[60], max_size=40, hflip_prob=0.0)
    image, target = train[0]
    assert len(train) == 1 and tuple(image.shape) == (3, 30, 40)
    assert target["boxes"].tolist() == [[5.0, 5.0, 20.0, 15.0]]  # xyxy [1, 1, 4, 3] * 5
    assert tuple(target["masks"].shape) == (1, 30, 40) and "masks" in val[0][1]
    # Large-scale jitter: scaled and padded / cropped to lsj_size.
    train, _ = datasets(aug="lsj", lsj_size=20, lsj_scale=[1.0, 1.0], hflip_prob=0.0)
    assert tuple(train[0][0].shape) == (3, 20, 20)
    # Without a validation split: nothing to evaluate, no results yet.
    val_json = tmp_path / "annotations" / "instances_val.json"
    val_json.rename(tmp_path / "val.json")
    task = DetectionTask(TrainConfig(data={"aug": "none"}), tmp_path)
    assert task.build_datasets()[1] is None and task.val_ds is None and task.last_results == []
    (tmp_path / "val.json").rename(val_json)
    # Without a training split.
    (tmp_path / "annotations" / "instances_train.json").unlink()
    with pytest.raises(UserFileNotFoundError) as e:
        datasets()
    assert str(e.value) == (
        f"no training split under {tmp_path}: expected annotations/instances_train2017.json (or "
        "instances_train.json), or set data.train_images and data.train_json"
    )
