"""Detection values a user relies on, from an audit with awkward COCO data: a box-only detector
(``model_args.mask=false``) is evaluated on boxes alone by ``train detect`` and ``eval detect``
(its COCO AP against pycocotools' COCOeval on the results it wrote); ``data.masks=false`` for a
detector with a mask head is one error line before training; its whole-detector ONNX export
gives PyTorch's boxes, labels and scores in onnxruntime; a count option out of range (a 0 batch
size, -1 workers or threads) is argparse's error line, exit 2; an image folder holding none of
the listed images is one error line, not AP 0 on no image; a training set left without any
object (a box-only JSON read with masks) says so, not "lower batch_size"; eval detect runs one
image per forward by default, so an image's detections are detectron2's whatever follows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mvitv2 import cli
from mvitv2.detection import create_detector
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.data import build_loader
from mvitv2.engine.distributed import DistInfo
from mvitv2.tasks import detect
from mvitv2.tasks.detect import DetectionTask, DetectorFile, build_eval_dataset, collate
from test_detection_data_eval import STATS, _coco, _cocoeval
from test_detection_task import _coco_tree
from test_values_detect_task import _TINY_DETECTOR
from test_values_detect_task2 import _info, _use, gt  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _box_only() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_detector(
        "maskrcnn_mvitv2_tiny", num_classes=2, **{**_TINY_DETECTOR, "mask": False}
    ).eval()


def _box_metrics(data: dict, results: list[dict]) -> dict[str, float]:
    assert results and all("segmentation" not in r for r in results)
    return {f"bbox_{k}": v for k, v in zip(STATS, _cocoeval(_coco(data), results, "bbox"))}


def test_eval_detect_of_a_box_only_detector_scores_its_boxes_on_a_json_with_masks(
    gt,  # noqa: F811 (the fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    data, ann = gt
    ckpt = tmp_path / "det.pt"
    _use(monkeypatch, DetectorFile(_info(ckpt, ["a", "b"]), loaded=_box_only()))
    out, metrics = tmp_path / "res.json", tmp_path / "m.json"
    argv = ["eval", "detect", "--checkpoint", str(ckpt), "--images", str(tmp_path)]
    argv += ["--annotations", str(ann), "--workers", "0", "--threads", "1"]
    assert cli.main([*argv, "--output", str(out), "--metrics", str(metrics)]) == 0
    results = json.loads(out.read_text())
    want = {**_box_metrics(data, results), "images": 2, "skipped_images": 0}
    assert json.loads(metrics.read_text()) == want


def test_training_evaluation_of_a_box_only_detector_scores_its_boxes(
    gt,  # noqa: F811 (the fixture)
    tmp_path: Path,
):
    data, ann = gt
    model = _box_only()
    cfg = TrainConfig(
        model="maskrcnn_mvitv2_tiny", model_args={**_TINY_DETECTOR, "mask": False}, data={}
    )
    task = DetectionTask(cfg)  # data.masks stays true: the JSON's masks are read
    task.val_ds = build_eval_dataset(tmp_path, ann)
    loader = build_loader(task.val_ds, batch_size=2, train=False, collate_fn=collate)
    with torch.no_grad():
        metrics = task.evaluate(model, loader, DistInfo())
    want = {**_box_metrics(data, task.last_results), "images": 2, "skipped_images": 0}
    assert metrics == want
    assert detect.has_mask_branch(
        create_detector("maskrcnn_mvitv2_tiny", num_classes=2, **_TINY_DETECTOR)
    )


def _tiny_overrides(**extra: object) -> list[str]:
    args = {**_TINY_DETECTOR, **extra}
    return [f"model_args.{k}={json.dumps(v)}" for k, v in args.items()]


def test_train_detect_without_masks_for_a_mask_head_is_one_error_line_before_training(
    tmp_path: Path, capsys
):
    _coco_tree(tmp_path / "coco", ("train", "val"))
    out = tmp_path / "runs"
    argv = ["train", "detect", "--data", str(tmp_path / "coco"), "--output", str(out)]
    argv += ["--config", "digit_scenes", "--threads", "1", "workers=0", "batch_size=1"]
    assert cli.main([*argv, "data.masks=false", *_tiny_overrides()]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mvitv2 train detect: error: data.masks=false leaves the mask head of "
        "maskrcnn_mvitv2_tiny without targets: add model_args.mask=false (a box-only detector) "
        "or keep data.masks=true"
    ]
    assert not out.exists()  # no run folder for a run that never started


def test_whole_detector_onnx_of_a_box_only_detector_matches_pytorch(tmp_path: Path):
    from mvitv2.export import export_detector_onnx, onnx_session

    torch.set_num_threads(1)
    model = _box_only()
    path = export_detector_onnx(model, tmp_path / "boxes.onnx", image_size=(64, 64))
    torch.manual_seed(1)
    image = torch.rand(3, 48, 80)  # another size than traced: the resize follows it
    with torch.no_grad():
        ref = model([image])[0]
    assert len(ref["boxes"]) > 0 and "masks" not in ref  # random weights still detect
    session = onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "labels", "scores"]
    for name, value in zip(names, session.run(None, {"image": image.numpy()}), strict=True):
        np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-4, err_msg=name)


def test_an_image_folder_without_any_listed_image_is_one_error_line_not_ap_zero(
    gt,  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
):
    data, ann = gt
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = ["eval", "detect", "--checkpoint", str(tmp_path / "c.pt"), "--images", str(elsewhere)]
    want = (
        f"none of the 2 images {ann} lists is under {elsewhere} (looked for {elsewhere / '1.png'})"
        ": give the folder its file_name entries are relative to"
    )
    ckpt = DetectorFile(_info(tmp_path / "c.pt", ["a", "b"]), loaded=_box_only())
    with pytest.MonkeyPatch.context() as m:
        _use(m, ckpt)
        assert cli.main([*argv, "--annotations", str(ann), "--workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"mvitv2 eval detect: error: {want}"]
    assert not (tmp_path / "coco_results.json").exists()
    # one listed image present: the other is skipped and counted, as before
    (elsewhere / "2.png").write_bytes((tmp_path / "2.png").read_bytes())
    ds = build_eval_dataset(elsewhere, ann)
    assert (len(ds), ds.stats.missing_images) == (1, 1)


def test_train_detect_on_a_box_only_json_with_masks_on_says_why_nothing_is_left(
    tmp_path: Path, capsys
):
    _coco_tree(tmp_path / "coco", ("train", "val"))
    ann = tmp_path / "coco" / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    del data["annotations"][0]["segmentation"]  # a box-only file, as many detection sets are
    ann.write_text(json.dumps(data))
    argv = ["train", "detect", "--data", str(tmp_path / "coco"), "--output", str(tmp_path / "r")]
    argv += ["--config", "digit_scenes", "--threads", "1", "workers=0", "batch_size=1"]
    assert cli.main([*argv, *_tiny_overrides()]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mvitv2 train detect: error: {ann}: no image has an object to train on (images=1, "
        "negative_images=1, annotations=1, bad_segmentation=1); for boxes alone: "
        "data.masks=false model_args.mask=false"
    )


def test_eval_detect_gives_each_image_detectron2s_own_detections_beside_a_portrait_image(
    tmp_path: Path,
):
    """detectron2 evaluates one image per forward: the landscape fixture image's results are
    the detections detectron2 recorded for it alone, even when a portrait image follows it (a
    batch of both would pad it to a square and move its detections)."""
    from PIL import Image

    from test_detectron2_cli import DATA, detectron2_files, model_options, reference

    ref = reference("maskrcnn")
    images = tmp_path / "images"
    images.mkdir()
    landscape = Image.open(DATA / "detectron2_image.png").convert("RGB")
    landscape.save(images / "a.png")
    landscape.transpose(Image.Transpose.TRANSPOSE).save(images / "b.png")
    h, w = ref["image_hw"]
    truth = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "b.png", "height": w, "width": h},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    pth, _ = detectron2_files("maskrcnn", tmp_path)
    out = tmp_path / "results.json"
    argv = ["eval", "detect", "--checkpoint", str(pth), "--images", str(images), "--no-masks"]
    argv += ["--annotations", str(tmp_path / "gt.json"), "--output", str(out), "--workers", "0"]
    assert cli.main([*argv, "--metrics", str(tmp_path / "m.json"), *model_options("maskrcnn")]) == 0
    got = [r for r in json.loads(out.read_text()) if r["image_id"] == 1]
    want = ref["detections"]
    assert len(got) == len(want["boxes"])
    boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in got)]
    np.testing.assert_allclose(boxes, want["boxes"], atol=0.01)
    np.testing.assert_allclose([r["score"] for r in got], want["scores"], atol=1e-4)


def test_the_evaluation_during_detection_training_runs_one_image_per_forward(tmp_path: Path):
    """The val loader of a detection run takes one image per forward, as ``eval detect`` and
    detectron2 do (a padded batch moves each image's detections); its training batches and a
    classification run's val batches keep ``batch_size``."""
    from engine_toy import ToyTask, toy_config
    from mvitv2.engine import Trainer
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionTask
    from test_distributed import DETECT

    cfg = TrainConfig.load(
        None, [*DETECT, "data.digit_scenes.num_train=2", "batch_size=2", f"output={tmp_path}"]
    )
    trainer = Trainer(DetectionTask(cfg), cfg)
    assert (trainer.train_loader.batch_size, trainer.val_loader.batch_size) == (2, 1)
    toy = Trainer(ToyTask(c := toy_config(str(tmp_path), "toy", "batch_size=8")), c)
    assert (toy.train_loader.batch_size, toy.val_loader.batch_size) == (8, 8)
