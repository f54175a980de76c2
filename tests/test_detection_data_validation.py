"""COCO annotation checks: each bad annotation is dropped on its own (never its image) with a
named reason, each valid one is kept exactly as pycocotools / detectron2 read it, and the
evaluation ground truth stays readable by COCOeval."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from mvitv2.data.detection import (
    CocoDetection,
    coco_evaluate,
    load_coco,
    load_coco_json,
    predictions_to_coco,
    rle_counts,
)
from mvitv2.errors import UserFileNotFoundError, UserValueError

W, H = 40, 30  # image width, height
GOOD = {
    "category_id": 1,
    "bbox": [2, 3, 10, 5],
    "iscrowd": 0,
    "area": 50.0,
    "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
}


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of ``mask``; the uncompressed runs written independently of pycocotools: run
    lengths over the column-major pixels, starting with a (possibly empty) background run."""
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    runs, value, count = [], 0, 0
    for v in mask.astype(np.uint8).flatten(order="F").tolist():
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


SAME_AS_GOOD = object()  # the id of the GOOD annotation just before the case

BLOB = np.zeros((H, W), bool)
BLOB[10:20, 5:15] = True
BLOB[12:15, 20:30] = True

# case name -> (annotation fields replacing GOOD's, reason or None, in ground truth, is target)
CASES = {
    "valid_polygon": ({}, None, True, True),
    "valid_polygon_partly_outside": (
        {"segmentation": [[-5, 3, 12, 3, 12, 8, -5, 8]], "bbox": [-5, 3, 17, 5]},
        "clipped_boxes", True, True,
    ),
    "nan_coordinate": ({"segmentation": [[2, 3, 12, math.nan, 12, 8, 2, 8]]},
                       "bad_segmentation", False, False),
    "null_coordinate": ({"segmentation": [[2, 3, 12, None, 12, 8, 2, 8]]},
                        "bad_segmentation", False, False),
    "huge_coordinate": ({"segmentation": [[2, 3, 1e12, 3, 12, 8, 2, 8]]},
                        "bad_segmentation", False, False),
    "negative_huge_coordinate": ({"segmentation": [[2, 3, 12, 3, 12, 8, 2, -1e9]]},
                                 "bad_segmentation", False, False),
    "string_coordinate": ({"segmentation": [[2, 3, "x", 3, 12, 8, 2, 8]]},
                          "bad_segmentation", False, False),
    "nested_coordinate": ({"segmentation": [[2, 3, [12], 3, 12, 8, 2, 8]]},
                          "bad_segmentation", False, False),
    "two_points": ({"segmentation": [[2, 3, 12, 8]]}, "bad_segmentation", False, False),
    "odd_coordinates": ({"segmentation": [[2, 3, 12, 3, 12, 8, 2]]},
                        "bad_segmentation", False, False),
    "empty_polygon_list": ({"segmentation": []}, "bad_segmentation", False, False),
    "no_segmentation": ({"segmentation": None}, "bad_segmentation", False, False),
    "short_part_among_good_ones": (
        {"segmentation": [[2, 3, 12, 3, 12, 8, 2, 8], [20, 20, 25, 25]]},
        "dropped_polygon_parts", True, True,
    ),
    "polygon_wholly_outside": ({"segmentation": [[45, 3, 55, 3, 55, 8, 45, 8]]},
                               "empty_masks", True, False),
    "zero_width_box": ({"bbox": [5, 5, 0, 4]}, "degenerate_boxes", True, False),
    "negative_height_box": ({"bbox": [5, 5, 4, -2]}, "degenerate_boxes", True, False),
    "box_outside_image": ({"bbox": [50, 40, 5, 5]}, "outside_boxes", True, False),
    "nan_box": ({"bbox": [2, 3, math.nan, 5]}, "malformed_boxes", False, False),
    "null_box": ({"bbox": [2, None, 10, 5]}, "malformed_boxes", False, False),
    "three_number_box": ({"bbox": [2, 3, 10]}, "malformed_boxes", False, False),
    "crowd_uncompressed_rle": (
        {"iscrowd": 1, "segmentation": _rle(BLOB, compressed=False), "bbox": [5, 10, 25, 10]},
        "crowd", True, False,
    ),
    "compressed_rle": ({"segmentation": _rle(BLOB), "bbox": [5, 10, 25, 10]}, None, True, True),
    "uncompressed_rle": ({"segmentation": _rle(BLOB, compressed=False), "bbox": [5, 10, 25, 10]},
                         None, True, True),
    "rle_of_other_size": ({"segmentation": {**_rle(BLOB[:, :30]), "size": [H, 30]}},
                          "bad_segmentation", False, False),
    "rle_runs_too_short": (
        {"segmentation": {"size": [H, W], "counts": _rle(BLOB, False)["counts"][:-1]}},
        "bad_segmentation", False, False,
    ),
    "rle_negative_run": ({"segmentation": {"size": [H, W], "counts": [-5, 5 + H * W]}},
                         "bad_segmentation", False, False),
    "rle_corrupt_string": ({"segmentation": {"size": [H, W], "counts": "0~~~"}},
                           "bad_segmentation", False, False),
    "rle_empty": ({"segmentation": _rle(np.zeros((H, W), bool))}, "empty_masks", True, False),
    "missing_area": ({"area": None}, "filled_areas", True, True),
    "missing_iscrowd": ({"iscrowd": None}, None, True, True),
    "bad_iscrowd": ({"iscrowd": 2}, "malformed_annotations", False, False),
    "missing_id": ({"id": None}, "malformed_annotations", False, False),
    "duplicate_id": ({"id": SAME_AS_GOOD}, "malformed_annotations", False, False),
    "unknown_category": ({"category_id": 99}, "unknown_category", False, False),
    "no_such_image": ({"image_id": 404}, "orphan_annotations", False, False),
}  # fmt: skip


def _case_file(tmp_path: Path, names: list[str]) -> tuple[Path, dict, dict[str, int]]:
    """One image per case of ``names``, holding GOOD (annotation id 1000 + image id) and then
    the case (id = image id)."""
    images, anns, image_of = [], [], {}
    for i, name in enumerate(names, start=1):
        fields = CASES[name][0]
        Image.new("RGB", (W, H), (i, 0, 0)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        anns.append({**GOOD, "id": 1000 + i, "image_id": i})
        case = {**GOOD, "id": i, "image_id": i, **fields}
        for key in ("iscrowd", "area", "id", "segmentation"):
            if key in fields and fields[key] is None:
                del case[key]
        if fields.get("id") is SAME_AS_GOOD:
            case["id"] = 1000 + i
        anns.append(case)
        image_of[name] = i
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # NaN is written as the (non-standard) NaN literal
    return path, data, image_of


def _details() -> dict[str, str]:
    """What each case's problem says (after ``<file>: annotation ... (image id ...): reason: ``)."""
    short = _rle(BLOB, False)["counts"][:-1]
    kept = "; kept for evaluation, not trained on"
    return {
        "nan_coordinate": "polygon 0 coordinate 3 is NaN; dropped",
        "null_coordinate": "polygon 0 coordinate 3 is null; dropped",
        "huge_coordinate": "polygon 0 coordinate 2 = 1000000000000.0 lies more than one image "
        "size outside the 40x30 image; dropped",
        "negative_huge_coordinate": "polygon 0 coordinate 7 = -1000000000.0 lies more than one "
        "image size outside the 40x30 image; dropped",
        "string_coordinate": "polygon 0 is not a flat list of numbers; dropped",
        "nested_coordinate": "polygon 0 is not a flat list of numbers; dropped",
        "two_points": "no polygon of at least 3 points: polygon 0 of 1 has 4 coordinates (a "
        "polygon needs an even number, at least 6); left out; dropped",
        "odd_coordinates": "no polygon of at least 3 points: polygon 0 of 1 has 7 coordinates "
        "(a polygon needs an even number, at least 6); left out; dropped",
        "empty_polygon_list": "empty polygon list; dropped",
        "no_segmentation": "no polygon list or RLE: None; dropped",
        "short_part_among_good_ones": "polygon 1 of 2 has 4 coordinates (a polygon needs an even "
        "number, at least 6); left out",
        "polygon_wholly_outside": "the segmentation has no pixel inside the image" + kept,
        "zero_width_box": "the box has no area" + kept,
        "negative_height_box": "the box has no area" + kept,
        "box_outside_image": "the box lies outside the image" + kept,
        "nan_box": "'bbox' [2, 3, nan, 5] is not finite; dropped",
        "null_box": "'bbox' must be [x, y, width, height], got [2, None, 10, 5]; dropped",
        "three_number_box": "'bbox' must be [x, y, width, height], got [2, 3, 10]; dropped",
        "rle_of_other_size": "RLE size [30, 30] differs from the image's [30, 40]; dropped",
        "rle_runs_too_short": f"RLE runs cover {sum(short)} pixels (min run {min(short)}), not "
        "the 30x40 = 1200 of the image; dropped",
        "rle_negative_run": "RLE runs cover 1200 pixels (min run -5), not the 30x40 = 1200 of "
        "the image; dropped",
        "rle_corrupt_string": "RLE counts: character '~' at 1 is not RLE code; dropped",
        "rle_empty": "the segmentation has no pixel inside the image" + kept,
        "missing_area": f"'area' None set to {float(_area(GOOD['segmentation']))}",
        "bad_iscrowd": "'iscrowd' must be 0 or 1, got 2; dropped",
        "missing_id": "'id' must be an integer, got None; dropped",
        "duplicate_id": "id already used by annotations[0]; dropped",
        "unknown_category": "category id 99 is not in 'categories'; dropped",
        "no_such_image": "image id 404 is not in 'images'; dropped",
    }


@pytest.fixture
def checked(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Every case in one file."""
    path, data, image_of = _case_file(tmp_path, list(CASES))
    with caplog.at_level(logging.WARNING, logger="mvitv2.data.detection"):
        ds = CocoDetection(tmp_path, path)
    return ds, path, data, image_of, [r.getMessage() for r in caplog.records]


def _reference_mask(ann_id: int, data: dict) -> np.ndarray:
    """The mask pycocotools' own COCO API gives for a valid case (detectron2's rule for short
    polygon parts: parts with fewer than 6 or an odd number of coordinates are left out)."""
    ann = copy.deepcopy(next(a for a in data["annotations"] if a["id"] == ann_id))
    if isinstance(ann["segmentation"], list):
        ann["segmentation"] = [p for p in ann["segmentation"] if len(p) >= 6 and len(p) % 2 == 0]
    raw = {**data, "annotations": [ann]}
    coco = COCO()
    coco.dataset = raw
    coco.createIndex()
    return coco.annToMask(coco.anns[ann_id])


def _area(seg: list | dict) -> int:
    if isinstance(seg, list):
        return int(mask_util.area(mask_util.merge(mask_util.frPyObjects(seg, H, W))))
    return int(mask_util.area(seg))  # a compressed RLE


@pytest.mark.parametrize("name", list(CASES))
def test_each_annotation_problem_is_dropped_alone_with_a_named_reason(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, data, _ = _case_file(tmp_path, [name])
    with caplog.at_level(logging.WARNING, logger="mvitv2.data.detection"):
        ds = CocoDetection(tmp_path, path)
    _, reason, in_gt, is_target = CASES[name]
    good, case = data["annotations"]
    assert [r["id"] for r in ds.records] == [1]  # the image itself is never dropped
    # Ground truth: valid annotations are kept for COCOeval, unchanged; invalid ones are not.
    assert [a["id"] for a in ds.coco.imgToAnns[1]] == [1001] + ([case["id"]] if in_gt else [])
    assert ds.coco.anns[1001] == good
    if in_gt:
        gt = ds.coco.anns[case["id"]]
        fixed = {"area", "iscrowd", "segmentation"}  # filled / defaulted / short parts dropped
        assert {k: v for k, v in gt.items() if k not in fixed} == {
            k: v for k, v in case.items() if k not in fixed
        }
    if reason == "empty_masks":  # pycocotools agrees that nothing of it is inside the image
        assert _area(case["segmentation"]) == 0
    # Training targets: GOOD, plus the case when it can be trained on.
    _, target = ds[0]
    assert target["labels"].tolist() == [1] * (1 + is_target)
    np.testing.assert_array_equal(target["masks"][0].numpy(), _reference_mask(1001, data))
    if is_target:
        np.testing.assert_array_equal(target["masks"][1].numpy(), _reference_mask(case["id"], data))
        x, y, bw, bh = case["bbox"]
        assert target["boxes"][1].tolist() == [max(x, 0), max(y, 0), min(x + bw, W), min(y + bh, H)]
    # The problem is named once, as it is counted: file, annotation id, image id, reason, detail.
    counts = {k: v for k, v in ds.stats.as_dict().items() if v}
    assert counts == {
        "images": 1,
        "images_used": 1,
        "annotations": 2,
        "instances": 1 + is_target,
        **({reason: 1} if reason else {}),
    }
    logged = [r.getMessage() for r in caplog.records]
    if reason in (None, "crowd", "clipped_boxes"):
        assert ds.problems == [] and logged == []  # crowd regions and clipped boxes: counted only
    else:
        ann = "[1]" if name == "missing_id" else f"id {case['id']}"
        text = f"{path}: annotation {ann} (image id {case['image_id']}): {reason}: "
        assert [str(p) for p in ds.problems] == logged == [text + _details()[name]]
        assert [(p.reason, p.index, p.image_id, p.ann_id) for p in ds.problems] == [
            (reason, 1, case["image_id"], case.get("id"))
        ]


def test_counters_count_each_case_under_its_reason(checked) -> None:
    ds, _, data, image_of, logged = checked
    expected: dict[str, int] = {}
    for _, reason, _, _ in CASES.values():
        if reason is not None:
            expected[reason] = expected.get(reason, 0) + 1
    counts = {k: v for k, v in ds.stats.as_dict().items() if v}
    targets = sum(1 + c[3] for c in CASES.values())
    assert counts == {
        "images": len(CASES),
        "images_used": len(CASES),
        "annotations": 2 * len(CASES),
        "instances": targets,
        **expected,
    }
    # Everything named but crowd and clipped boxes, each once.
    assert len(logged) == len(ds.problems) == sum(expected.values()) - 2
    # Filled area is the mask's pixel count (pycocotools), as COCOeval needs an area.
    assert ds.coco.anns[image_of["missing_area"]]["area"] == _area(GOOD["segmentation"])
    assert ds.coco.anns[image_of["missing_iscrowd"]]["iscrowd"] == 0


def test_checked_ground_truth_evaluates_with_cocoeval(checked) -> None:
    """The ground truth is COCOeval-readable (a NaN or 1e12 vertex would hang pycocotools), and
    detections on crowd regions are ignored, not false positives."""
    ds, *_ = checked
    preds, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        preds.append(
            {
                "boxes": t["boxes"].as_subclass(torch.Tensor),
                "labels": t["labels"],
                "scores": torch.full((n,), 0.5),
                "masks": t["masks"].float(),
            }
        )
        ids.append(t["image_id"])
    crowd_image = list(CASES).index("crowd_uncompressed_rle") + 1
    k = ids.index(crowd_image)
    preds[k] = {  # a confident detection on the crowd region
        "boxes": torch.cat([preds[k]["boxes"], torch.tensor([[5.0, 10, 30, 20]])]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.5, 0.99]),
        "masks": torch.cat([preds[k]["masks"], torch.from_numpy(BLOB).float()[None]]),
    }
    res = predictions_to_coco(preds, ids, ds.label_to_cat_id)
    only_trained = [i for i in ids if i in (crowd_image, list(CASES).index("valid_polygon") + 1)]
    ap = coco_evaluate(
        ds.coco, [r for r in res if r["image_id"] in only_trained], image_ids=only_trained
    )
    assert ap["bbox"]["AP"] == 1.0 and ap["segm"]["AP"] == 1.0
    full = coco_evaluate(ds.coco, res)  # every checked annotation, without hanging
    assert 0.0 < full["segm"]["AP"] < 1.0  # GT kept for evaluation only is not detected


def test_without_masks_segmentations_are_not_read(tmp_path: Path) -> None:
    path, data, image_of = _case_file(tmp_path, list(CASES))
    ds = CocoDetection(tmp_path, path, masks=False)
    # Only box and id problems remain; every segmentation case is a plain target.
    box_or_id = {
        n
        for n, c in CASES.items()
        if c[1]
        in {
            "degenerate_boxes",
            "outside_boxes",
            "malformed_boxes",
            "malformed_annotations",
            "unknown_category",
            "orphan_annotations",
            "crowd",
        }
    }
    for name in CASES:
        rec = next(r for r in ds.records if r["id"] == image_of[name])
        assert len(rec["anns"]) == 1 + (name not in box_or_id), name
    _, t = ds[0]
    assert "masks" not in t


def test_rle_counts_decode_the_compressed_string() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.uniform(0, 1)
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_counts(rle["counts"].decode("ascii")) == _rle(m, compressed=False)["counts"]
    with pytest.raises(ValueError, match="cut off"):
        rle_counts("0n")  # 'n' = 62 has the continuation bit and nothing follows
    with pytest.raises(ValueError, match="not RLE code"):
        rle_counts("0 1")


def test_malformed_files_are_user_errors_naming_the_file(tmp_path: Path) -> None:
    def write(name: str, data: object) -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(data))
        return p

    img = {"id": 1, "file_name": "a.png", "width": 4, "height": 3}
    cases = {
        "nofile.json": (None, UserFileNotFoundError, "nofile.json"),
        "list.json": ([], UserValueError, "expected a JSON object"),
        "noimages.json": ({"images": {}, "categories": []}, UserValueError, "'images' must be"),
        "noid.json": ({"images": [{"file_name": "a"}], "categories": []}, UserValueError,
                      r"images\[0\] needs"),
        "strid.json": ({"images": [{**img, "id": "1"}], "categories": []}, UserValueError,
                       "integer 'id'"),
        "zero.json": ({"images": [{**img, "height": 0}], "categories": []}, UserValueError,
                      "positive integer"),
        "dupimg.json": ({"images": [img, img], "categories": []}, UserValueError,
                        r"images\[1\] repeats the image id 1"),
        "dupcat.json": ({"images": [img], "categories": [{"id": 2}, {"id": 2}]}, UserValueError,
                        r"categories\[1\] repeats"),
        "nocat.json": ({"images": [img], "categories": [{"name": "x"}]}, UserValueError,
                       r"categories\[0\] needs"),
    }  # fmt: skip
    for name, (data, error, match) in cases.items():
        path = tmp_path / name if data is None else write(name, data)
        with pytest.raises(error, match=match) as e:
            load_coco_json(path)
        assert name in str(e.value)
    (tmp_path / "broken.json").write_text('{"images": [}')
    with pytest.raises(UserValueError, match=r"broken\.json: malformed JSON at line 1"):
        load_coco_json(tmp_path / "broken.json")
    ok = load_coco_json(write("ok.json", {"images": [img], "categories": [{"id": 1}]}))
    assert ok["annotations"] == []


def test_load_coco_checks_the_ground_truth_it_is_given(tmp_path: Path, caplog) -> None:
    """A ground-truth file passed to coco_evaluate is checked like a dataset's: an annotation
    without a segmentation is left out of mask AP (pycocotools would fail on it), not box AP."""
    img = {"id": 1, "file_name": "a.png", "width": W, "height": H}
    bad = {**GOOD, "id": 2, "image_id": 1, "bbox": [20, 10, 10, 10]}
    del bad["segmentation"]
    data = {
        "images": [img],
        "categories": [{"id": 1}],
        "annotations": [{**GOOD, "id": 1, "image_id": 1}, bad],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="mvitv2.data.detection"):
        assert sorted(load_coco(path).anns) == [1]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: annotation id 2 (image id 1): bad_segmentation: no polygon list or RLE: None; "
        "dropped"
    ]
    assert sorted(load_coco(path, masks=False).anns) == [1, 2]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mvitv2.data.detection"):
        assert sorted(load_coco(data).anns) == [1]
    assert caplog.records[0].getMessage().startswith("<dict>: annotation id 2 (image id 1): ")
    # Box AP: annotation 2 is there, found by the best-scored detection.
    boxes = [
        {"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": s}
        for a, s in zip(data["annotations"], (0.5, 0.9))
    ]
    assert coco_evaluate(path, boxes, ("bbox",))["bbox"]["AP"] == 1.0
    # Mask AP: annotation 2 is not; a detection there scored below the true one changes nothing.
    rle = mask_util.merge(mask_util.frPyObjects(GOOD["segmentation"], H, W))
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    seg = [{**r, "score": s, "segmentation": rle} for r, s in zip(boxes, (0.5, 0.4))]
    assert coco_evaluate(path, seg, ("segm",))["segm"]["AP"] == pytest.approx(1.0, abs=1e-12)
