"""Detection evaluation bookkeeping against pycocotools' COCOeval run directly: perfect detections
score exactly 1.0, an unreadable image is skipped and counted (never replaced by another one),
image and category ids survive, masks are binarised at 0.5, predictions map back by hand."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from mvitv2.data.detection import (
    CocoDetection,
    coco_evaluate,
    predictions_to_coco,
    rescale_prediction,
)
from mvitv2.data.digit_scenes import make_digit_scenes
from mvitv2.engine.data import build_loader
from mvitv2.engine.distributed import DistInfo
from mvitv2.tasks.detect import build_eval_dataset, collate, evaluate_detector

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    return make_digit_scenes(
        tmp_path_factory.mktemp("scenes") / "ds",
        num_train=1,
        num_val=5,
        image_size=64,
        digit_size=(12, 30),
        seed=5,
    )


class Oracle(nn.Module):
    """A detector that returns the ground truth of each image it recognises (by its pixels)."""

    def __init__(self, dataset: CocoDetection) -> None:
        super().__init__()
        self.answers = {}
        for i in range(len(dataset)):
            image, t = dataset[i]
            n = len(t["labels"])
            self.answers[self._key(image)] = {
                "boxes": t["boxes"].as_subclass(torch.Tensor).clone(),
                "labels": t["labels"].clone(),
                "scores": torch.linspace(0.9, 0.5, n),
                "masks": t["masks"].as_subclass(torch.Tensor).float()[:, None],
            }

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        return (tuple(image.shape), round(float(image.double().sum()), 3))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.answers[self._key(im)] for im in images]


def test_perfect_detector_scores_one_and_an_unreadable_image_is_skipped_not_substituted(
    scenes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, ann = scenes.split("val")
    oracle = Oracle(build_eval_dataset(images, ann))
    ds = build_eval_dataset(images, ann)  # what `mvitv2 eval detect` and training evaluate
    loader = build_loader(ds, batch_size=2, train=False, collate_fn=collate)
    metrics, results = evaluate_detector(oracle, loader, DistInfo(), ds)
    assert metrics["bbox_AP"] == 1.0 and metrics["segm_AP"] == 1.0
    assert (metrics["images"], metrics["skipped_images"]) == (5, 0)

    broken = tmp_path / "val"
    shutil.copytree(images, broken)
    bad = ds.records[1]
    (broken / bad["path"].name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = build_eval_dataset(broken, ann)
    loader = build_loader(ds, batch_size=2, train=False, collate_fn=collate)
    with caplog.at_level(logging.WARNING, logger="mvitv2.tasks.detect"):
        metrics, results = evaluate_detector(oracle, loader, DistInfo(), ds)
    assert metrics["bbox_AP"] == 1.0 and metrics["segm_AP"] == 1.0  # no image scored twice
    assert (metrics["images"], metrics["skipped_images"]) == (4, 1)
    assert bad["id"] not in {r["image_id"] for r in results}
    named = [r.getMessage() for r in caplog.records if "skipped image" in r.getMessage()]
    assert named == [
        f"evaluation skipped image id {bad['id']} ({broken / bad['path'].name}): unreadable_image"
    ]
    # Each remaining image's detections appear exactly once.
    per_image = {
        i: sum(r["image_id"] == i for r in results) for i in {r["image_id"] for r in results}
    }
    assert per_image == {
        rec["id"]: len(rec["anns"]) for rec in ds.records if rec["id"] != bad["id"]
    }


def _cocoeval(
    gt: COCO, results: list[dict], iou_type: str, image_ids=None, boxes_in_segm: bool = False
) -> list[float]:
    """pycocotools used directly; segm results carry no box (detectron2 does the same: with a
    box, ``loadRes`` takes the box area as the detection's area)."""
    keep = {"image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation"}
    if boxes_in_segm:
        keep.add("bbox")
    res = [{k: v for k, v in r.items() if k in keep} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(res), iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


def _hand_made() -> tuple[dict, list[dict]]:
    """Two 100x100 images, non-contiguous category ids 3 and 12, small, medium and large objects
    (one an L-shaped stroke: a small mask in a medium box), and their perfect detections."""

    def ann(i: int, image_id: int, cat: int, mask: np.ndarray) -> dict:
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        x0, y0 = int(xs.min()), int(ys.min())
        return {
            "id": i,
            "image_id": image_id,
            "category_id": cat,
            "iscrowd": 0,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "area": float(mask.sum()),
            "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()},
        }

    def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        m = np.zeros((100, 100), bool)
        m[y0:y1, x0:x1] = True
        return m

    ell = np.zeros((100, 100), bool)
    ell[50:90, 50:52] = True
    ell[88:90, 50:90] = True
    masks = [
        (1, 3, rect(5, 5, 15, 15)),
        (1, 12, rect(20, 20, 60, 60)),
        (1, 3, ell),
        (2, 12, rect(0, 0, 100, 100)),
        (2, 3, rect(10, 10, 16, 19)),
    ]
    anns = [ann(i + 1, im, cat, m) for i, (im, cat, m) in enumerate(masks)]
    gt = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)],
        "categories": [{"id": 12, "name": "b"}, {"id": 3, "name": "a"}],
        "annotations": anns,
    }
    results = []
    for a, score in zip(anns, (0.9, 0.8, 0.7, 0.6, 0.5)):
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [float(v) for v in a["bbox"]],
                "score": score,
                "segmentation": a["segmentation"],
            }
        )
    return gt, results


def _coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_coco_evaluate_equals_cocoeval_and_keeps_image_ids(tmp_path: Path) -> None:
    data, results = _hand_made()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    ref_gt = _coco(data)
    untouched = json.loads(json.dumps(results))
    ap = coco_evaluate(path, results)
    assert results == untouched  # COCOeval's loadRes does not write into the caller's results
    for iou_type in ("bbox", "segm"):
        assert [ap[iou_type][k] for k in STATS] == _cocoeval(ref_gt, results, iou_type)
        assert [ap[iou_type][k] for k in STATS] == pytest.approx([1.0] * 6, abs=1e-12)
    # A confident false positive shaped like an L: a small mask in a medium box. Mask AP counts
    # it among the small objects (by its mask area), box AP among the medium ones.
    ell = np.zeros((100, 100), bool)
    ell[50:90, 50:52] = True
    ell[88:90, 50:90] = True
    rle = mask_util.encode(np.asfortranarray(ell.astype(np.uint8)))
    fp = {
        "image_id": 2,
        "category_id": 3,
        "bbox": [50.0, 50.0, 40.0, 40.0],
        "score": 0.95,
        "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()},
    }
    ap = coco_evaluate(path, [*results, fp])
    for iou_type in ("bbox", "segm"):
        assert [ap[iou_type][k] for k in STATS] == _cocoeval(ref_gt, [*results, fp], iou_type)
    one = pytest.approx(1.0, abs=1e-12)
    assert ap["segm"]["APs"] < 1.0 and ap["segm"]["APm"] == one
    assert ap["bbox"]["APs"] == one and ap["bbox"]["APm"] < 1.0
    with_box = _cocoeval(ref_gt, [*results, fp], "segm", boxes_in_segm=True)
    assert [ap["segm"][k] for k in STATS] != with_box
    # A detection put on the wrong image is a false positive there and a miss on its own.
    wrong = [dict(r) for r in results]
    wrong[1]["image_id"] = 2
    ap = coco_evaluate(path, wrong)
    for iou_type in ("bbox", "segm"):
        ref = _cocoeval(ref_gt, wrong, iou_type)
        assert [ap[iou_type][k] for k in STATS] == ref and ref[0] < 1.0
    # Restricted to image 1 (e.g. image 2 was unreadable): its results alone, scored there.
    ap = coco_evaluate(ref_gt, wrong, ("bbox",), image_ids=[1])
    assert [ap["bbox"][k] for k in STATS] == _cocoeval(ref_gt, wrong, "bbox", image_ids=[1])
    assert ap["bbox"]["AP"] < 1.0  # image 1 lost its detection to image 2
    assert coco_evaluate(ref_gt, [], ("bbox",)) == {"bbox": dict.fromkeys(STATS, 0.0)}
    with pytest.raises(ValueError, match="unsupported iou type"):
        coco_evaluate(ref_gt, results, ("keypoints",))
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    with pytest.raises(ValueError, match="segm evaluation needs 'segmentation' in every result"):
        coco_evaluate(ref_gt, boxes_only)
    # Right boxes, empty masks: box AP sees the boxes, mask AP the masks.
    empty = mask_util.encode(np.asfortranarray(np.zeros((100, 100), np.uint8)))["counts"].decode()
    no_mask = [{**r, "segmentation": {"size": [100, 100], "counts": empty}} for r in results]
    ap = coco_evaluate(ref_gt, no_mask)
    assert ap["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and ap["segm"]["AP"] == 0.0


def test_coco_evaluate_prints_cocoeval_table_only_when_verbose(capsys) -> None:
    data, results = _hand_made()
    coco_evaluate(_coco(data), results, ("bbox",))
    assert capsys.readouterr().out == ""
    coco_evaluate(_coco(data), results, ("bbox",), verbose=True)
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out


def _write_images(root: Path, data: dict) -> None:
    from PIL import Image

    for i, img in enumerate(data["images"]):
        Image.new("RGB", (img["width"], img["height"]), (50 * i, 0, 0)).save(
            root / img["file_name"]
        )


def test_noncontiguous_category_ids_round_trip_through_training_labels(tmp_path: Path) -> None:
    data, results = _hand_made()
    _write_images(tmp_path, data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    ds = build_eval_dataset(tmp_path, tmp_path / "gt.json")
    assert ds.label_to_cat_id == {1: 3, 2: 12} and ds.class_names == ["a", "b"]
    loader = build_loader(ds, batch_size=2, train=False, collate_fn=collate)
    metrics, res = evaluate_detector(Oracle(ds), loader, DistInfo(), ds)
    assert metrics["bbox_AP"] == 1.0 and metrics["segm_AP"] == 1.0
    by_box = {(r["image_id"], tuple(r["bbox"])): r["category_id"] for r in res}
    assert by_box == {(r["image_id"], tuple(r["bbox"])): r["category_id"] for r in results}
    # Labels mapped to the wrong category ids: nothing is found.
    swapped = predictions_to_coco(
        [Oracle(ds).answers[k] for k in Oracle(ds).answers], [1, 2], {1: 12, 2: 3}
    )
    assert coco_evaluate(ds.coco, swapped)["bbox"]["AP"] == 0.0


def test_masks_are_binarised_above_one_half_like_pycocotools_encode() -> None:
    rng = np.random.default_rng(0)
    probs = rng.choice([0.0, 0.2, 0.49, 0.5, 0.51, 0.8, 1.0], size=(3, 9, 7)).astype(np.float32)
    boxes = torch.tensor([[0.0, 0, 5, 5], [1, 1, 6, 8], [2, 0, 7, 9]])
    for masks in (torch.from_numpy(probs), torch.from_numpy(probs)[:, None]):
        pred = {
            "boxes": boxes,
            "labels": torch.tensor([1, 2, 1]),
            "scores": torch.tensor([0.9, 0.5, 0.1]),
            "masks": masks,
        }
        res = predictions_to_coco([pred], [7], {1: 5, 2: 9})
        for k, r in enumerate(res):
            ref = mask_util.encode(np.asfortranarray((probs[k] > 0.5).astype(np.uint8)))
            assert r["segmentation"] == {"size": [9, 7], "counts": ref["counts"].decode("ascii")}
    binary = torch.from_numpy(probs >= 0.5)  # bool masks are taken as they are
    pred = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.5, 0.1]),
        "masks": binary.to(torch.uint8),
    }
    res = predictions_to_coco([pred], [7], {1: 5, 2: 9})
    ref = mask_util.encode(np.asfortranarray((probs[1] >= 0.5).astype(np.uint8)))
    assert res[1]["segmentation"]["counts"] == ref["counts"].decode("ascii")
    json.dumps(res)  # JSON-ready


def test_rescale_prediction_and_coco_results_by_hand() -> None:
    pred = {
        "boxes": torch.tensor([[10.0, 20, 30, 60], [0, 0, 200, 100]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.75, 0.25]),
        "masks": torch.zeros(2, 1, 100, 200),
    }
    pred["masks"][0, 0, 20:60, 10:30] = 1.0
    # The network saw 100x200 (H x W); the original image is 50x400: x doubles, y halves.
    out = rescale_prediction(pred, (100, 200), torch.tensor([50, 400]))
    assert out["boxes"].tolist() == [[20.0, 10, 60, 30], [0, 0, 400, 50]]
    assert out["masks"].shape == (2, 1, 50, 400)
    ref = torch.nn.functional.interpolate(pred["masks"], size=(50, 400), mode="bilinear")
    assert torch.equal(out["masks"], ref)
    assert torch.equal(out["labels"], pred["labels"]) and torch.equal(out["scores"], pred["scores"])
    flat = rescale_prediction({**pred, "masks": pred["masks"][:, 0]}, (100, 200), (50, 400))
    assert torch.equal(flat["masks"], ref[:, 0])  # (N, H, W) masks keep their layout
    boxes_only = rescale_prediction(
        {k: pred[k] for k in ("boxes", "labels")}, (100, 200), (50, 400)
    )
    assert boxes_only.keys() == {"boxes", "labels"} and torch.equal(
        boxes_only["boxes"], out["boxes"]
    )
    same = rescale_prediction({**pred, "masks": pred["masks"][:, 0]}, (100, 200), (100, 200))
    assert torch.equal(same["masks"], pred["masks"][:, 0]) and torch.equal(
        same["boxes"], pred["boxes"]
    )
    res = predictions_to_coco([out], [42], {1: 7, 2: 9})
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in res] == [
        (42, 9, [20.0, 10.0, 40.0, 20.0], 0.75),
        (42, 7, [0.0, 0.0, 400.0, 50.0], 0.25),
    ]
    # The mask's box in the original frame: rows 10..30, columns 20..60.
    assert mask_util.toBbox(res[0]["segmentation"]).tolist() == [20.0, 10.0, 40.0, 20.0]
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    one = {k: v[1:] for k, v in out.items() if k != "masks"}  # one detection, boxes only
    res = predictions_to_coco([empty, one], [1, 2], {1: 7, 2: 9})
    assert res == [
        {"image_id": 2, "category_id": 7, "bbox": [0.0, 0.0, 400.0, 50.0], "score": 0.25}
    ]
    with pytest.raises(ValueError):  # one image id per prediction
        predictions_to_coco([one, one], [2], {1: 7, 2: 9})
