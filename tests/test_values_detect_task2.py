"""More detection task values against independent references: the lines ``train``/``eval
detect`` print (written out by hand), the COCO results ``eval detect`` writes (written by hand
from a scripted detector's outputs, masks as pycocotools RLE) and their AP (pycocotools' COCOeval
on the same file), which ``--checkpoint`` files are refused with which one-line message, what a
detectron2 file reads as (the class names and COCO ids detectron2 recorded), the data report's
counts (a file with each problem made on purpose) and the export inputs (feature names from the
feature strides)."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torch import Tensor, nn

from detectron2_files import three_class_cascade
from mvitv2 import cli
from mvitv2.engine.distributed import DistInfo
from mvitv2.predict import CheckpointInfo
from mvitv2.tasks import detect
from mvitv2.tasks.detect import DetectorFile, DetectorFileError, build_eval_dataset, read_detector
from test_detection_data_eval import STATS, _coco, _cocoeval, _hand_made, _write_images
from test_detection_task import _coco_tree
from test_detectron2_cli import NAMES, coco_category, detectron2_files, model_options, reference


@pytest.fixture(autouse=True)
def restore_threads():
    """``--threads`` of a command sets torch's thread count for the process: restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _clock(monkeypatch: pytest.MonkeyPatch, *times: float) -> None:
    """``detect``'s clock reads ``times`` in turn (wall times in the printed lines)."""
    ticks = iter(times)
    monkeypatch.setattr(detect, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


# ---------------------------------------------------------------------- a scripted detector
SMALL = (5, 5, 15, 15)  # image 1's object 1 of _hand_made: category 3 "a"
WHOLE = (0, 0, 100, 100)  # image 2's object 1: category 12 "b"


def _square(box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((100, 100), bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


class TwoBoxes(nn.Module):
    """On every image: label 1 on SMALL (score 0.75) and label ``second`` on WHOLE (score 0.5),
    masks the boxes filled; records the images it is given."""

    def __init__(self, second: int = 2) -> None:
        super().__init__()
        self.seen: list[Tensor] = []
        self.second = second
        # A mask detector, to has_mask_branch (torchvision's RoIHeads.has_mask()).
        self.roi_heads = SimpleNamespace(has_mask=lambda: True)

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.seen += images
        masks = torch.from_numpy(np.stack([_square(SMALL), _square(WHOLE)])).float()[:, None]
        out = {
            "boxes": torch.tensor([SMALL, WHOLE], dtype=torch.float32),
            "labels": torch.tensor([1, self.second]),
            "scores": torch.tensor([0.75, 0.5]),
            "masks": masks,
        }
        return [dict(out) for _ in images]


def _two_boxes_results(image_ids: list[int], cat_of_label: dict[int, int], masks: bool = True):
    """TwoBoxes' detections as COCO results, by hand."""
    out = []
    for i in image_ids:
        for label, (x0, y0, x1, y1), score in ((1, SMALL, 0.75), (2, WHOLE, 0.5)):
            r = {
                "image_id": i,
                "category_id": cat_of_label[label],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": score,
            }
            if masks:
                r["segmentation"] = _rle(_square((x0, y0, x1, y1)))
            out.append(r)
    return out


def _info(path: Path, names: list[str]) -> CheckpointInfo:
    return CheckpointInfo(path, "detect", "maskrcnn_mvitv2_tiny", {}, {}, names, {})


@pytest.fixture()
def gt(tmp_path: Path) -> tuple[dict, Path]:
    """_hand_made's two 100x100 images and JSON (categories 3 "a" and 12 "b")."""
    data, _ = _hand_made()
    _write_images(tmp_path, data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    return data, tmp_path / "gt.json"


def _use(monkeypatch: pytest.MonkeyPatch, det: DetectorFile) -> list[argparse.Namespace]:
    """``--checkpoint`` reads as ``det``; returns the parsed arguments it was read with."""
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(detect, "detector_from_args", lambda args: calls.append(args) or det)
    return calls


# ---------------------------------------------------------------------- eval detect
def test_eval_detect_prints_the_data_report_the_ap_line_and_where_the_detections_went(
    gt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    data, ann = gt
    model = TwoBoxes()
    ckpt = tmp_path / "runs" / "det.pt"
    ckpt.parent.mkdir()
    _use(monkeypatch, DetectorFile(_info(ckpt, ["a", "b"]), loaded=model))
    _clock(monkeypatch, 100.0, 103.5)
    argv = ["eval", "detect", "--checkpoint", str(ckpt), "--images", str(tmp_path)]
    argv += ["--annotations", str(ann), "--workers", "0", "--batch-size", "2"]
    assert cli.main([*argv, "--metrics", str(tmp_path / "m.json")]) == 0
    out, err = capsys.readouterr()
    want = _two_boxes_results([1, 2], {1: 3, 2: 12})  # the dataset's sorted category ids
    written = ckpt.with_name("coco_results.json")  # next to the checkpoint by default
    assert json.loads(written.read_text()) == want
    ref = {t: _cocoeval(_coco(data), want, t) for t in ("bbox", "segm")}
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == {
        **{f"{t}_{k}": v for t, values in ref.items() for k, v in zip(STATS, values)},
        "images": 2,
        "skipped_images": 0,
    }
    box, mask = ref["bbox"], ref["segm"]
    assert 0 < box[0] < 1 and 0 < mask[0] < 1  # two of the five objects found
    *lines, last = out.splitlines()
    assert json.loads(last) == metrics
    assert lines == [
        f"data: {ann} -> 2/2 images, 5/5 instances kept; no problems",
        f"{ckpt}: box AP {box[0]:.3f} (AP50 {box[1]:.3f}, AP75 {box[2]:.3f})  mask AP "
        f"{mask[0]:.3f} (AP50 {mask[1]:.3f}, AP75 {mask[2]:.3f}) on 2 images of {tmp_path} "
        "(0 skipped)  [3.5 s]",
        f"detections (4) written to {written}",
    ]
    assert err == f"metrics saved to {tmp_path / 'm.json'}\n"  # the categories agree: no warning
    # float images in [0, 1] for a detector of this package, batched two by two
    assert [(im.dtype, tuple(im.shape)) for im in model.seen] == [
        (torch.float32, (3, 100, 100))
    ] * 2
    assert float(model.seen[1].max()) == pytest.approx(50 / 255)  # image 2 is (50, 0, 0)


def test_eval_detect_of_a_detectron2_detector_gives_it_uint8_images_and_writes_its_coco_ids(
    gt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    data, ann = gt
    # --no-masks: the segmentations are not read, an unreadable one drops nothing
    data["annotations"][3]["segmentation"] = "not a mask"
    ann.write_text(json.dumps(data))
    model = TwoBoxes()
    ckpt = tmp_path / "model_final.pth"
    # label 1 is COCO category 12 for this detector, label 2 category 3: the JSON's "b" and "a"
    det = DetectorFile(
        _info(ckpt, ["b", "a"]), label_to_cat_id={1: 12, 2: 3}, detectron2=True, loaded=model
    )
    _use(monkeypatch, det)
    _clock(monkeypatch, 0.0, 2.0)
    out_file = tmp_path / "res.json"
    argv = ["eval", "detect", "--checkpoint", str(ckpt), "--images", str(tmp_path)]
    argv += ["--annotations", str(ann), "--workers", "0", "--output", str(out_file), "--no-masks"]
    assert cli.main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    want = _two_boxes_results([1, 2], {1: 12, 2: 3}, masks=False)
    assert json.loads(out_file.read_text()) == want
    metrics = json.loads(out)  # --json: the metrics alone on stdout
    ref = _cocoeval(_coco(data), want, "bbox")
    assert metrics == {
        **{f"bbox_{k}": v for k, v in zip(STATS, ref)},
        "images": 2,
        "skipped_images": 0,
    }
    assert ref[0] == 0.0  # every detection on the other category
    assert err.splitlines() == [  # the reports on stderr; the metrics file is not announced
        f"data: {ann} -> 2/2 images, 5/5 instances kept; no problems",
        f"{ckpt}: box AP {ref[0]:.3f} (AP50 {ref[1]:.3f}, AP75 {ref[2]:.3f}) on 2 images of "
        f"{tmp_path} (0 skipped)  [2.0 s]",
        f"detections (4) written to {out_file}",
    ]
    assert not ckpt.with_name("coco_results.json").exists()
    images = [im.as_subclass(Tensor) for im in model.seen]
    assert [im.dtype for im in images] == [torch.uint8] * 2  # as detectron2 reads them
    assert int(images[1][0].max()) == 50 and int(images[0].max()) == 0
    # A detectron2 detector records no data: --data or --images/--annotations are needed,
    # said before any data is looked for.
    monkeypatch.setattr(detect, "resolve_splits", lambda *a: pytest.fail("looked for data"))
    assert cli.main(["eval", "detect", "--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mvitv2 eval detect: error: {ckpt} is a detectron2 detector, which records no data: "
        "pass --data (a COCO folder) or --images and --annotations"
    )
    assert cli.main(["eval", "detect", "--checkpoint", str(ckpt), "--images", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 eval detect: error: --images and --annotations go together"
    )


def test_eval_detect_sizes_an_object_without_an_area_by_its_segmentation(
    gt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """COCO's ``area`` puts each object in a size range (APs, APm, APl); one the JSON lacks is
    the pixel count of its segmentation, as COCO records it: the L-shaped stroke (156 pixels in a
    40x40 box) stays a small object, for box AP and mask AP alike."""
    data, ann = gt
    ell = data["annotations"][2]
    assert ell["bbox"][2:] == [40, 40] and ell["area"] == 156.0
    missing = json.loads(json.dumps(data))
    del missing["annotations"][2]["area"]
    ann.write_text(json.dumps(missing))
    _use(monkeypatch, DetectorFile(_info(tmp_path / "det.pt", ["a", "b"]), loaded=TwoBoxes()))
    argv = ["eval", "detect", "--checkpoint", str(tmp_path / "det.pt"), "--images", str(tmp_path)]
    argv += ["--annotations", str(ann), "--workers", "0", "--json"]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    want = _two_boxes_results([1, 2], {1: 3, 2: 12})
    ref = {t: _cocoeval(_coco(data), want, t) for t in ("bbox", "segm")}
    assert {k: v for k, v in metrics.items() if k.startswith(("bbox", "segm"))} == {
        f"{t}_{k}": v for t, values in ref.items() for k, v in zip(STATS, values)
    }
    # sized by its box instead (1600 pixels, a medium object), small and medium APs differ
    missing["annotations"][2]["area"] = 1600.0
    for t in ("bbox", "segm"):
        by_box = _cocoeval(_coco(missing), want, t)
        assert by_box[3:5] != ref[t][3:5] and by_box[:3] == ref[t][:3]


def test_eval_detect_evaluates_the_validation_split_the_run_recorded_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    recorded, other = tmp_path / "recorded", tmp_path / "other"
    _coco_tree(recorded, ("train", "val"))  # one 8x6 image per split, category 4 "four"
    _coco_tree(other, ("train", "val"))
    ckpt = tmp_path / "det.pt"
    # the embedded digit scenes, should they be made, tiny and in tmp_path
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "cache"))
    scenes = {"num_train": 1, "num_val": 1, "image_size": 32, "digit_size": [10, 14]}
    meta: dict[str, Any] = {"data": {"digit_scenes": scenes}, "data_root": str(recorded)}
    _use(monkeypatch, DetectorFile(_info(ckpt, ["four"]), meta=meta, loaded=TwoBoxes(second=1)))
    argv = ["eval", "detect", "--checkpoint", str(ckpt), "--workers", "0", "--no-masks"]

    def evaluated(*extra: str) -> tuple[str, str]:
        """The JSON the data report names and the images folder the AP line names."""
        assert cli.main([*argv, *extra]) == 0
        report, ap_line = capsys.readouterr().out.splitlines()[:2]
        json_file = report.split(" -> ")[0].removeprefix("data: ")
        return json_file, ap_line.split(" images of ")[1].split(" (")[0]

    val = ("annotations", "instances_val.json")
    assert evaluated() == (str(recorded.joinpath(*val)), str(recorded / "val"))
    assert evaluated("--data", str(other)) == (str(other.joinpath(*val)), str(other / "val"))
    # the run's explicit validation files win over its data root
    meta["data"] = {"val_images": str(other / "val"), "val_json": str(other.joinpath(*val))}
    assert evaluated() == (str(other.joinpath(*val)), str(other / "val"))
    # A run without a data root trained on the embedded digit scenes: generated with its options.
    meta.clear()
    meta["data"] = {"digit_scenes": scenes}
    root = tmp_path / "cache" / "digit_scenes"
    assert evaluated() == (str(root.joinpath(*val)), str(root / "val"))


def test_eval_detect_on_another_process_writes_and_prints_nothing(
    gt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _, ann = gt
    ckpt = tmp_path / "det.pt"
    _use(monkeypatch, DetectorFile(_info(ckpt, ["a", "b"]), loaded=TwoBoxes()))
    monkeypatch.setattr(detect, "init_distributed", lambda: DistInfo(rank=1))
    argv = ["eval", "detect", "--checkpoint", str(ckpt), "--images", str(tmp_path)]
    assert cli.main([*argv, "--annotations", str(ann), "--workers", "0"]) == 0
    assert capsys.readouterr().out == ""
    assert not ckpt.with_name("coco_results.json").exists()
    assert not ckpt.with_name("det_eval.json").exists()  # the metrics are rank 0's to save


# ---------------------------------------------------------------------- train detect
class FakeTrainer:
    """Stands in for the engine's Trainer: records what ``_train`` gives it."""

    made: list[FakeTrainer] = []
    rank = 0

    def __init__(self, task, cfg, resume=None) -> None:
        self.task, self.cfg, self.resume = task, cfg, resume
        self.run_dir = Path(cfg.output) / "run"
        self.dist = DistInfo(rank=self.rank)
        FakeTrainer.made.append(self)


def _fake_training(monkeypatch, metrics: dict[str, float] | None, rank: int = 0):
    FakeTrainer.made = []
    monkeypatch.setattr(FakeTrainer, "rank", rank)
    monkeypatch.setattr(detect, "Trainer", FakeTrainer)

    def fit(trainer: FakeTrainer) -> dict[str, float] | None:
        if rank == 0:
            trainer.task.build_datasets()
        return metrics

    monkeypatch.setattr(detect, "fit", fit)


def test_train_detect_prints_the_data_reports_the_ap_and_where_results_and_checkpoint_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _coco_tree(tmp_path / "coco", ("train", "val"))
    metrics = {f"bbox_{k}": v for k, v in (("AP", 0.5), ("AP50", 0.25), ("AP75", 0.125))}
    _fake_training(monkeypatch, {**metrics, "images": 3, "skipped_images": 1})
    _clock(monkeypatch, 10.0, 12.5)
    out = tmp_path / "runs"
    argv = ["train", "detect", "--data", str(tmp_path / "coco"), "--output", str(out)]
    assert cli.main([*argv, "--resume", "auto", "workers=0"]) == 0
    (trainer,) = FakeTrainer.made
    task, run = trainer.task, out / "run"
    assert trainer.resume == "auto" and task.data_root == str(tmp_path / "coco")
    assert (trainer.cfg.epochs, trainer.cfg.data["aug"]) == (36, "multiscale")  # the COCO recipe
    assert task.results_path == run / "coco_results_val.json"
    ann = tmp_path / "coco" / "annotations"
    train = f"train data: {ann / 'instances_train.json'} -> 1/1 images, 1/1 instances kept; "
    val = f"val data: {ann / 'instances_val.json'} -> 1/1 images, 1/1 instances kept; "
    assert capsys.readouterr().out.splitlines() == [
        train + "no problems",  # said when the data is read
        val + "no problems",
        train + "no problems",  # and again at the end
        val + "no problems",
        "val (3 images evaluated, 1 skipped): box AP 0.500 (AP50 0.250, AP75 0.125)",
        f"detections: {run / 'coco_results_val.json'}",
        f"wall time 2.5 s  checkpoint {run / 'last.pt'}",
    ]


def test_train_detect_defaults_to_the_digit_scenes_recipe_and_counts_nothing_it_was_not_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _coco_tree(tmp_path / "coco", ("train", "val"))
    _fake_training(monkeypatch, {})  # no evaluation figures at all
    _clock(monkeypatch, 1.0, 1.25)
    coco = tmp_path / "coco"
    data = [f"data.{split}_images={coco / split}" for split in ("train", "val")]
    data += [
        f"data.{s}_json={coco / 'annotations' / f'instances_{s}.json'}" for s in ("train", "val")
    ]
    assert cli.main(["train", "detect", "--output", str(tmp_path / "runs"), *data]) == 0
    (trainer,) = FakeTrainer.made
    assert trainer.resume is None and trainer.task.data_root == "digit_scenes"
    assert (trainer.cfg.epochs, trainer.cfg.data["aug"]) == (2, "none")  # digit_scenes.yaml
    lines = capsys.readouterr().out.splitlines()
    assert lines[4:] == [
        "val (0 images evaluated, 0 skipped): ",
        f"detections: {tmp_path / 'runs' / 'run' / 'coco_results_val.json'}",
        f"wall time 0.2 s  checkpoint {tmp_path / 'runs' / 'run' / 'last.pt'}",
    ]


def test_train_detect_without_a_validation_split_reports_the_training_data_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _coco_tree(tmp_path / "coco", ("train",))
    _fake_training(monkeypatch, {"bbox_AP": 0.5})
    _clock(monkeypatch, 0.0, 4.0)
    argv = ["train", "detect", "--data", str(tmp_path / "coco"), "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    train = tmp_path / "coco" / "annotations" / "instances_train.json"
    line = f"train data: {train} -> 1/1 images, 1/1 instances kept; no problems"
    assert capsys.readouterr().out.splitlines() == [
        line,
        line,
        f"wall time 4.0 s  checkpoint {tmp_path / 'run' / 'last.pt'}",
    ]


def test_train_detect_stopped_for_non_finite_losses_exits_3_and_other_ranks_print_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    _coco_tree(tmp_path / "coco", ("train", "val"))
    argv = ["train", "detect", "--data", str(tmp_path / "coco"), "--output", str(tmp_path)]
    _fake_training(monkeypatch, None)  # fit says why on stderr and returns None
    assert cli.main(argv) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train data: ")  # the data reports only
    _fake_training(monkeypatch, {"bbox_AP": 0.5}, rank=1)
    _clock(monkeypatch, 0.0, 1.0)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------- the command entry
def test_each_command_reaches_its_handler_threads_set_and_export_reads_the_detector_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``train detect --threads N``: torch's thread count from the start of the command (the
    data is read, or the digit scenes made, before the trainer applies the run's ``threads``);
    0 leaves torch's own. Each command runs its handler. ``export detect`` hands the export
    module this task's reader, which gives the checkpoint's info and its detector, read from
    ``--checkpoint`` once."""
    import mvitv2.export

    seen: list[int] = []
    monkeypatch.setattr(detect, "_train", lambda args: seen.append(torch.get_num_threads()) or 0)
    start = torch.get_num_threads()
    wanted = 1 if start != 1 else 2
    argv = ["train", "detect"]
    assert cli.main([*argv, "--threads", str(wanted)]) == 0
    torch.set_num_threads(start)
    assert cli.main([*argv, "--threads", "0"]) == 0  # the default: left as it is
    assert cli.main(argv) == 0
    assert seen == [wanted, start, start]
    torch.set_num_threads(2)
    assert detect.run("train", argparse.Namespace()) == 0  # called without the option
    assert seen[-1] == torch.get_num_threads() == 2
    ran = []
    for name in ("_eval", "_predict"):
        monkeypatch.setattr(detect, name, lambda args, name=name: ran.append(name) or 0)
    assert cli.main(["eval", "detect", "--checkpoint", "c.pt"]) == 0
    assert cli.main(["predict", "detect", "x.png", "--checkpoint", "c.pt"]) == 0
    assert ran == ["_eval", "_predict"]
    with pytest.raises(NotImplementedError, match="^`mvitv2 info detect` does not exist$"):
        detect.run("info", argparse.Namespace())

    exported = []
    monkeypatch.setattr(
        mvitv2.export, "run_export", lambda task, args, read: exported.append((task, read(args)))
    )
    model = TwoBoxes()
    info = _info(tmp_path / "det.pt", ["a", "b"])
    calls = _use(monkeypatch, DetectorFile(info, loaded=model))
    argv = ["export", "detect", "--checkpoint", str(tmp_path / "det.pt")]
    assert cli.main([*argv, "--output", str(tmp_path / "d.onnx")]) == 0
    assert exported == [("detect", (info, model))]
    assert len(calls) == 1 and calls[0].checkpoint == str(tmp_path / "det.pt")


def test_the_detectron2_options_parse_as_a_flag_a_name_and_a_growing_list():
    """``--allow-pickle`` takes no value (off unless given), ``--model`` a name (None unless
    given), ``--model-args`` one or more KEY=VALUE items, repeatable; on eval, predict, export."""
    base = {
        "eval": ["eval", "detect", "--checkpoint", "c.pt"],
        "predict": ["predict", "detect", "x.png", "--checkpoint", "c.pt"],
        "export": ["export", "detect", "--checkpoint", "c.pt"],
    }
    for command, argv in base.items():
        args = cli.parse(argv).args
        assert (args.allow_pickle, args.model, args.model_args) == (False, None, []), command
        args = cli.parse(
            [*argv, "--allow-pickle", "--model", "m", "--model-args", "a=1", "b=2"]
            + ["--model-args", "c=3"]
        ).args
        assert (args.allow_pickle, args.model) == (True, "m"), command
        assert args.model_args == ["a=1", "b=2", "c=3"], command


def test_collate_gives_plain_tensors_with_the_values_and_other_fields_as_they_are():
    """torchvision's tv_tensors (what the transforms return) become plain tensors, so that the
    R-CNN's arithmetic on boxes and masks does not re-wrap them; the values are unchanged."""
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.rand(3, 6, 8))
    boxes = tv_tensors.BoundingBoxes([[1.0, 1, 4, 3]], format="XYXY", canvas_size=(6, 8))
    masks = tv_tensors.Mask(torch.ones(1, 6, 8, dtype=torch.uint8))
    target = {"boxes": boxes, "masks": masks, "labels": torch.tensor([2]), "image_id": 7}
    images, targets = detect.collate([(image, target)])
    ((im,), (t,)) = images, targets
    assert type(im) is Tensor and torch.equal(im, image.as_subclass(Tensor))
    assert type(t["boxes"]) is Tensor and t["boxes"].tolist() == [[1.0, 1.0, 4.0, 3.0]]
    assert type(t["masks"]) is Tensor and torch.equal(t["masks"], masks.as_subclass(Tensor))
    assert type(t["labels"]) is Tensor and t["labels"].tolist() == [2]
    assert t["image_id"] == 7


# ---------------------------------------------------------------------- the task
def test_a_new_task_has_no_data_and_writes_no_results_until_told():
    """Before ``build_datasets()`` there is no data, no class and no category mapping; the COCO
    results are kept, not written, until ``results_path`` is set; no data root: digit scenes."""
    from mvitv2.engine.config import TrainConfig

    task = detect.DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny"))
    assert task.train_ds is None and task.val_ds is None and task.results_path is None
    assert (task.class_names, task.label_to_cat_id, task.last_results) == ([], {}, [])
    assert task.data_root == detect.DIGIT_SCENES == "digit_scenes"


def test_task_evaluation_on_another_process_keeps_its_results_without_writing_them(
    gt, tmp_path: Path
):
    from mvitv2.engine.config import TrainConfig
    from mvitv2.engine.data import build_loader

    _, ann = gt
    task = detect.DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny"))
    with pytest.raises(AssertionError, match=r"^build_datasets\(\) first$"):
        task.evaluate(TwoBoxes(), [], DistInfo())
    task.val_ds = build_eval_dataset(tmp_path, ann)
    task.results_path = tmp_path / "r.json"
    loader = build_loader(task.val_ds, batch_size=2, train=False, collate_fn=detect.collate)
    # not the main process: its detections are kept (gathered), the main process writes them
    metrics = task.evaluate(TwoBoxes(), loader, DistInfo(rank=1))
    assert metrics == {} and not task.results_path.exists()
    assert task.last_results == _two_boxes_results([1, 2], {1: 3, 2: 12})


def test_the_data_reports_are_flushed_as_soon_as_each_split_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under torchrun or into a log file stdout is block-buffered: each split's report must
    reach it when the split is read, not when training ends."""
    import io

    from mvitv2.engine.config import TrainConfig

    class Stdout(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    _coco_tree(tmp_path, ("train", "val"))
    stdout = Stdout()
    monkeypatch.setattr("sys.stdout", stdout)
    detect.DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny"), tmp_path).build_datasets()
    train, val = (tmp_path / "annotations" / f"instances_{s}.json" for s in ("train", "val"))
    train_line = f"train data: {train} -> 1/1 images, 1/1 instances kept; no problems\n"
    val_line = f"val data: {val} -> 1/1 images, 1/1 instances kept; no problems\n"
    assert stdout.flushed == [train_line, train_line + val_line]


# ---------------------------------------------------------------------- data report
def test_the_data_report_counts_every_problem_and_each_image_that_could_not_be_read(tmp_path):
    from PIL import Image

    from mvitv2.data.common import BadSample

    for name, size in (("ok.png", (20, 10)), ("small.png", (8, 8))):
        Image.new("RGB", size).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def image(i: int, name: str) -> dict:
        return {"id": i, "file_name": name, "width": 20, "height": 10}

    def box(i: int, image_id: int, bbox: list[float], crowd: int = 0) -> dict:
        x, y, w, h = bbox
        poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        return {"id": i, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": crowd,
                "area": w * h, "segmentation": poly}  # fmt: skip

    data = {
        "images": [image(1, "ok.png"), image(2, "broken.png"), image(3, "small.png"),
                   image(4, "absent.png"), image(5, "ok.png"), image(6, "broken.png")],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [box(1, 1, [1, 1, 4, 4]), box(2, 1, [2, 2, 0, 3]),
                        box(3, 1, [22, 2, 3, 3]), box(4, 1, [5, 5, 3, 3], crowd=1),
                        box(5, 2, [1, 1, 4, 4]), box(6, 3, [1, 1, 4, 4]), box(7, 4, [1, 1, 4, 4])],
    }  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(data))
    ds = build_eval_dataset(tmp_path, tmp_path / "gt.json")
    head = f"val: {tmp_path / 'gt.json'} -> 5/6 images, 3/7 instances kept; "
    # By hand: image 4's file is missing, images 5 and 6 have no object; a zero-wide box, a box outside
    # the 20x10 image and a crowd region are no training targets (image 4's object is not
    # counted as one either: its image is gone).
    counts = "missing_images 1, negative_images 2, crowd 1, degenerate_boxes 1, outside_boxes 1"
    assert detect.report_data("val", ds) == head + counts
    for index in (1, 2, 4):  # broken.png cannot be decoded, small.png is 8x8, not 20x10
        with pytest.raises(BadSample):
            ds[index]
    ds[0]
    assert detect.report_data("val", ds) == head + counts + ", unreadable_image 2, size_mismatch 1"


# ---------------------------------------------------------------------- export inputs
def test_export_inputs_name_each_fpn_level_by_its_stride_at_a_multiple_of_32(tmp_path):
    from mvitv2.detection import create_detector
    from test_values_detect_task import _TINY_DETECTOR

    model = create_detector("maskrcnn_mvitv2_tiny", num_classes=2, **_TINY_DETECTOR).train()
    got = detect.SPEC.export_inputs(model, {"min_size": 40}, batch=2)  # 40 -> 64
    assert tuple(got.example.shape) == (2, 3, 64, 64) and got.input_names == ["images"]
    assert got.metadata == {"exported_part": "backbone+fpn"}
    assert not got.module.training and got.module.backbone is model.backbone
    with torch.no_grad():
        maps = got.module(got.example)
    # level p_i has stride 2**i: P2 (64 / 4 = 16 px) to P6 (64 / 64 = 1 px)
    assert got.output_names == [f"p{int(np.log2(64 // m.shape[-1]))}" for m in maps]
    assert got.output_names == ["p2", "p3", "p4", "p5", "p6"]
    assert tuple(detect.SPEC.export_inputs(model, {}, input_size=(96, 128)).example.shape) == (
        1,
        3,
        96,
        128,
    )
    for size in ((96, 100), (100, 96)):
        with pytest.raises(ValueError) as e:
            detect.SPEC.export_inputs(model, {}, input_size=size)
        assert str(e.value) == f"detection export size must be multiples of 32, got {size}"


# ---------------------------------------------------------------------- --checkpoint files
def _model_args(kind: str) -> dict[str, Any]:
    """The fixture's --model-args as read_detector takes them."""
    options = model_options(kind)
    items = options[options.index("--model-args") + 1 :]
    return {k: json.loads(v) for k, v in (item.split("=", 1) for item in items)}


def test_a_detectron2_coco_file_reads_with_the_names_and_category_ids_detectron2_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mvitv2.predict

    pth, _ = detectron2_files("maskrcnn", tmp_path)
    ref = reference("maskrcnn")
    det = read_detector(str(pth), model=NAMES["maskrcnn"], model_args=_model_args("maskrcnn"))
    assert det.detectron2 and det.meta == {}
    assert det.info.class_names == ref["coco_class_names"]
    assert det.label_to_cat_id == {c + 1: cat for c, cat in coco_category(ref).items()}
    info = det.info
    assert (info.path, info.task, info.model_name) == (pth, "detect", NAMES["maskrcnn"])
    assert info.preprocessing["input_dtype"] == "uint8"  # detectron2's pixels
    resize = ref["config"]["test_resize"]
    assert (info.preprocessing["min_size"], info.preprocessing["max_size"]) == (
        resize["short_edge_length"],
        resize["max_size"],
    )
    # The detector is built while reading (once), and the info alone rebuilds it (export).
    monkeypatch.setattr(mvitv2.predict, "build_model", lambda info: pytest.fail("rebuilt"))
    loaded = det.model()
    monkeypatch.undo()
    rebuilt = mvitv2.predict.build_model(info)
    assert rebuilt.config == loaded.config and type(rebuilt) is type(loaded)
    got, want = rebuilt.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_detectron2_file_of_another_class_count_has_numbered_classes_and_no_coco_ids(tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(Path(__file__).parent / "data" / "detectron2_cascade.safetensors"))
    three = three_class_cascade(sd)  # three classes (detectron2 keeps background last)
    path = tmp_path / "three.pth"
    torch.save({"model": three}, path)
    det = read_detector(path, model=NAMES["cascade"], model_args=_model_args("cascade"))
    assert det.info.class_names == ["class_0", "class_1", "class_2"]
    assert det.label_to_cat_id is None and det.detectron2
    assert det.model().roi_heads.box_predictors[0].cls_score.out_features == 4


def test_a_detectron2_file_that_does_not_load_is_one_line_naming_the_file_and_what_to_pass(
    tmp_path: Path,
):
    from safetensors.torch import load_file

    from mvitv2.detection import load_detectron2_detector
    from mvitv2.weights import CheckpointError

    pth, _ = detectron2_files("maskrcnn", tmp_path)
    sd = load_file(str(Path(__file__).parent / "data" / "detectron2_maskrcnn.safetensors"))
    backbone, partial = tmp_path / "bb.pth", tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in sd.items() if "bottom_up" in k}}, backbone)
    gone = next(k for k in sd if k.startswith("roi_heads.box_head."))
    torch.save({"model": {k: v for k, v in sd.items() if k != gone}}, partial)
    tail = (
        ". --checkpoint takes a checkpoint of `mvitv2 train detect` or a detectron2 MViTv2 "
        "(Cascade) Mask R-CNN; one whose backbone is no released variant needs --model and "
        "--model-args"
    )
    # no detector at all: one line; a missing tensor: the load report, several lines
    for path, several in ((backbone, False), (partial, True)):
        name, args = NAMES["maskrcnn"], _model_args("maskrcnn")
        with pytest.raises(CheckpointError) as e:  # what the loader itself says
            raw = torch.load(path, weights_only=True)
            load_detectron2_detector(raw, name, source_name=str(path), **args)
        first, *rest = str(e.value).splitlines()
        assert str(path) in first  # the file is named, not "<state dict>"
        more = f" (and {len(rest)} more lines)" if rest else ""
        assert bool(rest) == several
        with pytest.raises(DetectorFileError) as e:
            read_detector(path, model=name, model_args=args)
        assert str(e.value) == first + more + tail
    with pytest.raises(DetectorFileError) as e:
        read_detector(pth, model="maskrcnn_mvitv2_tiniest")
    assert str(e.value) == (
        "--model maskrcnn_mvitv2_tiniest: unknown detector; choose one of "
        f"{', '.join(detect.list_detectors())}"
    )
    with pytest.raises(DetectorFileError) as e:
        read_detector(pth, model_args={"embed_dim": 8, "zeta": 1, "alpha": 2})
    assert str(e.value) == (
        "--model-args alpha, zeta: not a detector or backbone option (DetectorConfig / MViTConfig "
        "fields)"
    )


def test_checkpoint_files_that_are_no_detector_are_refused_in_one_line_saying_what_to_do(
    tmp_path: Path,
):
    from mvitv2.weights import get_weights, list_weights

    png = (Path(__file__).parent / "data" / "detectron2_image.png").read_bytes()
    for name in ("image.pt", "image.PKL"):
        (tmp_path / name).write_bytes(png)
    with pytest.raises(DetectorFileError) as e:
        read_detector(tmp_path / "image.pt")
    assert str(e.value) == (
        f"{tmp_path / 'image.pt'} is not a checkpoint (UserCheckpointError): expected a checkpoint of "
        "`mvitv2 train detect` or a detectron2 detector (.pth, .safetensors, .pkl)"
    )
    with pytest.raises(DetectorFileError) as e:  # the suffix in any case
        read_detector(tmp_path / "image.PKL")
    assert str(e.value) == (
        f"{tmp_path / 'image.PKL'} is a Python pickle (detectron2 model zoo .pkl), which can run "
        "code when loaded: add --allow-pickle if you trust it"
    )
    with pytest.raises(DetectorFileError) as e:  # allowed, but no pickle
        read_detector(tmp_path / "image.PKL", allow_pickle=True)
    assert str(e.value).startswith(f"{tmp_path / 'image.PKL'} is not a checkpoint (Unpickling")
    detectors = [t for t in list_weights() if get_weights(t).detector]
    assert "mvitv2_tiny.coco_cascade" in detectors and "mvitv2_tiny.in1k" not in detectors
    with pytest.raises(detect.UserFileNotFoundError) as e:
        read_detector(tmp_path / "absent.pth")
    assert str(e.value) == (
        f"checkpoint {tmp_path / 'absent.pth'} does not exist: give a checkpoint of `mvitv2 train "
        "detect`, a detectron2 detector file (.pth, .pkl) or a detector weights tag "
        f"({', '.join(detectors)})"
    )
    with pytest.raises(DetectorFileError) as e:
        read_detector("mvitv2_tiny.in1k")
    assert str(e.value) == (
        "weights mvitv2_tiny.in1k are not a whole detector (backbone weights start training: "
        "`mvitv2 train detect pretrained=mvitv2_tiny.in1k`)"
    )
    url = get_weights("mvitv2_tiny.coco_cascade").url
    assert url.startswith("https://dl.fbaipublicfiles.com/detectron2/MViTv2/")
    with pytest.raises(DetectorFileError) as e:
        read_detector("mvitv2_tiny.coco_cascade")
    assert str(e.value) == (
        f"weights mvitv2_tiny.coco_cascade ({url}) are a detectron2 pickle, which can run code "
        "when loaded: add --allow-pickle if you trust the source"
    )


def test_a_training_checkpoint_reads_with_its_meta_and_refuses_detectron2_options(tmp_path):
    from mvitv2.predict import WrongTaskError
    from test_predictor import make_detect_checkpoint, make_image_checkpoint

    ckpt = make_detect_checkpoint(tmp_path / "det.pt")
    saved = torch.load(ckpt, weights_only=True)
    det = read_detector(ckpt)
    assert det.meta is det.info.meta  # the run's meta (data, data_root, ...), upgraded
    assert {k: det.meta[k] for k in saved["meta"]} == saved["meta"]
    assert (det.detectron2, det.label_to_cat_id, det.loaded) == (False, None, None)
    assert det.info.class_names == saved["meta"]["class_names"]
    for options in ({"model": "maskrcnn_mvitv2_tiny"}, {"model_args": {"min_size": 64}}):
        with pytest.raises(DetectorFileError) as e:
            read_detector(ckpt, **options)
        assert str(e.value) == (
            f"{ckpt} is a training checkpoint, which names its detector: --model and "
            "--model-args are for detectron2 detectors"
        )
    image_run = make_image_checkpoint(tmp_path / "cls.pt")  # another task's run
    with pytest.raises(WrongTaskError) as e:
        read_detector(image_run)
    assert str(e.value) == (
        f"checkpoint {image_run} is a 'image' checkpoint, not 'detect': give it to the image "
        "commands (`mvitv2 predict|eval|export image`)"
    )


def test_a_detector_weights_tag_is_read_from_its_download_as_its_registered_detector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import mvitv2.weights.registry as registry
    from mvitv2.weights import CheckpointError, get_weights

    _, pkl = detectron2_files("maskrcnn", tmp_path)
    monkeypatch.setattr(registry, "download_weights", lambda tag: pkl)
    calls = []
    monkeypatch.setattr(detect, "_read_detectron2", lambda *a: calls.append(a) or "detector")
    tag = "mvitv2_tiny.coco_cascade"
    assert read_detector(tag, allow_pickle=True) == "detector"
    assert read_detector(tag, allow_pickle=True, model="x", model_args={"a": 1}) == "detector"
    (source, raw, model, model_args), second = calls
    assert (source, model, model_args) == (tag, get_weights(tag).detector, {})
    assert set(raw) == {"model", "__author__"}  # the downloaded file's content
    assert (second[0], second[2], second[3]) == (tag, "x", {"a": 1})

    def offline(tag: str):
        raise CheckpointError(f"could not download {tag}: no network")

    monkeypatch.setattr(registry, "download_weights", offline)
    with pytest.raises(DetectorFileError) as e:
        read_detector(tag, allow_pickle=True)
    assert str(e.value) == f"could not download {tag}: no network"


def test_a_corrupt_safetensors_checkpoint_is_one_line_not_a_traceback(tmp_path: Path):
    path = tmp_path / "model_final.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DetectorFileError) as e:
        read_detector(path)
    assert str(e.value) == (
        f"{path} is not a checkpoint (UserCheckpointError): expected a checkpoint of `mvitv2 train "
        "detect` or a detectron2 detector (.pth, .safetensors, .pkl)"
    )


# ---------------------------------------------------------------------- the task's datasets
def test_lsj_training_data_follows_the_recipes_scale_and_validation_keeps_the_first_n_images(
    tmp_path: Path,
):
    from PIL import Image

    from mvitv2.engine.config import TrainConfig

    _coco_tree(tmp_path, ("train", "val"))  # 8x6 images, one object: xywh [1, 1, 3, 2]
    val_json = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(val_json.read_text())
    for i in (2, 3):
        Image.new("RGB", (8, 6)).save(tmp_path / "val" / f"{i}.png")
        data["images"].append({"id": i, "file_name": f"{i}.png", "width": 8, "height": 6})
    val_json.write_text(json.dumps(data))
    options = {"aug": "lsj", "lsj_size": 20, "lsj_scale": [1.0, 1.0], "hflip_prob": 0.0}
    task = detect.DetectionTask(
        TrainConfig(data={**options, "masks": False, "eval_max_images": 2}), tmp_path
    )
    train, val = task.build_datasets()
    image, target = train[0]
    # By hand: 8x6 fitted into 20x20 at scale 1 is x2.5 (20x15), then padded to 20x20 (the 5
    # rows of padding split at random between top and bottom).
    assert tuple(image.shape) == (3, 20, 20)
    for _ in range(8):  # hflip_prob 0: never mirrored (each draw would be a coin toss at 0.5)
        (x0, y0, x1, y1), *_ = train[0][1]["boxes"].tolist()
        assert (x0, x1, y1 - y0) == (2.5, 10.0, 5.0) and 2.5 <= y0 <= 7.5
    assert [rec["id"] for rec in val.records] == [1, 2]  # the first two of three
    # the data report says so (images 2 and 3, without objects, are kept for evaluation)
    assert detect.report_data("val data", val) == (
        f"val data: {val_json} -> 3/3 images, 1/1 instances kept; negative_images 2; "
        "evaluating the first 2 (data.eval_max_images)"
    )
    # Multi-scale: the short side 6 -> 12 (long side 16 <= 100): x2.
    multiscale = {"aug": "multiscale", "min_sizes": [12], "max_size": 100, "hflip_prob": 0.0}
    task = detect.DetectionTask(TrainConfig(data=multiscale), tmp_path)
    image, target = task.build_datasets()[0][0]
    assert tuple(image.shape) == (3, 12, 16) and target["boxes"].tolist() == [[2.0, 2.0, 8.0, 6.0]]
    everything = detect.DetectionTask(TrainConfig(data=options), tmp_path).build_datasets()[1]
    assert [rec["id"] for rec in everything.records] == [1, 2, 3]
    assert detect.report_data("val data", everything) == (
        f"val data: {val_json} -> 3/3 images, 1/1 instances kept; negative_images 2"
    )
    data["categories"][0]["name"] = "other"
    val_json.write_text(json.dumps(data))
    with pytest.raises(detect.UserValueError) as e:
        detect.DetectionTask(TrainConfig(data=options), tmp_path).build_datasets()
    assert str(e.value) == (
        f"{val_json}: categories differ from the training set's (['other'] vs ['four'])"
    )


class _TargetLoss(nn.Module):
    def forward(self, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
        return {"loss_boxes": sum(t["boxes"].sum() for t in targets), "loss_one": torch.ones(())}


def test_training_loss_gives_the_detector_the_batchs_targets():
    from mvitv2.engine.config import TrainConfig

    task = detect.DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny"))
    targets = [
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]])},
        {"boxes": torch.tensor([[0.5] * 4])},
    ]
    total, parts = task.training_loss(_TargetLoss(), ([torch.zeros(3, 2, 2)] * 2, targets))
    assert parts == {"loss_boxes": 12.0, "loss_one": 1.0} and float(total) == 13.0


def test_detection_records_refuse_columns_of_different_lengths():
    """A detection without its name, box or mask is an internal bug: never dropped silently."""
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]]),
        "scores": torch.tensor([0.5, 0.25]),
        "labels": torch.tensor([0, 1]),
        "label_names": ["one"],  # one name short
    }
    with pytest.raises(ValueError):
        detect.detection_records(det, None)
    assert len(detect.detection_records({**det, "label_names": ["one", "two"]}, None)) == 2
