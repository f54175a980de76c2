"""Detection data helpers checked by value against rules written out here independently: the
compressed-RLE alphabet, how far outside the image a polygon vertex may lie (per axis), which
polygon parts are kept, when a segmentation counts as wholly outside the image (pycocotools'
rasterisation as the reference)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as mask_util

from mvitv2.data.detection import (
    CocoDetection,
    check_annotations,
    coco_evaluate,
    load_coco_json,
    log_problems,
    on_main_process,
    rle_counts,
)
from mvitv2.errors import UserValueError

W, H = 40, 30  # a non-square image, so that the x and y limits differ


def _data(*segmentations: list | dict, bbox=(2, 3, 10, 5)) -> dict:
    """One W x H image, one annotation per segmentation (ids 1, 2, ...)."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {
                "id": i,
                "image_id": 1,
                "category_id": 1,
                "bbox": list(bbox),
                "area": 1.0,
                "iscrowd": 0,
                "segmentation": seg,
            }
            for i, seg in enumerate(segmentations, start=1)
        ],
    }


def _reasons(checked) -> dict:
    """Annotation id -> the reasons it was named under (empty for a plain target)."""
    out: dict = {}
    for p in checked.problems:
        out.setdefault(p.ann_id, []).append(p.reason)
    return out


# ------------------------------------------------------------------ compressed RLE strings


def test_rle_counts_accepts_exactly_the_64_characters_from_0_to_o():
    """Each character codes 6 bits as ``chr(48 + c)``: '0'..'o' are code, the neighbours not."""
    for c in range(64):
        assert rle_counts("0" + chr(48 + c) + "0")[0] == 0  # every code character decodes
    for bad in ("/", "p", "~", " "):
        with pytest.raises(ValueError) as e:
            rle_counts("00" + bad)
        assert str(e.value) == f"character {bad!r} at 2 is not RLE code"


def test_rle_counts_cut_off_run_is_named():
    # '`' = 48 + 48 has the continuation bit (32) set and nothing follows it.
    with pytest.raises(ValueError) as e:
        rle_counts("0`")
    assert str(e.value) == "the last run is cut off"


# ------------------------------------------------------------------ polygon checks


def _too_far(xy: list[float]) -> int | None:
    """First coordinate more than one image size outside the image, the rule written as a loop:
    x (even positions) must lie in [-W, 2W], y (odd positions) in [-H, 2H]."""
    for k, v in enumerate(xy):
        size = W if k % 2 == 0 else H
        if v < -size or v > 2 * size:
            return k
    return None


@pytest.mark.parametrize(
    "poly",
    [
        [-40, 3, 12, 3, 12, 8],  # x exactly one width left of the image: allowed
        [2, 3, 80, 3, 12, 8],  # x exactly two widths: allowed
        [2, 3, 12, -30, 12, 8],  # y exactly one height above: allowed
        [2, 3, 12, 3, 12, 60],  # y exactly two heights: allowed
        [2, 3, 12, 3, 70, 8],  # x = 70 lies beyond 2H but within 2W: allowed
        [2, 3, 12, 3, -35, 8],  # x = -35 lies beyond -H but within -W: allowed
        [2, 3, 12, 3, 12, 70],  # y = 70 lies within 2W but beyond 2H: too far
        [2, 3, 12, -35, 12, 8],  # y = -35 lies within -W but beyond -H: too far
        [2, 3, 12, 3, 12, 8, 81, 8],  # x just beyond 2W at position 6
        [2, 3, 12, 3, 12, 8, 5, 61],  # y just beyond 2H at position 7
        [-40.5, 3, 12, 3, 12, 8],  # x just beyond -W
        [2, 3, 12, 3, 12, 8, 2, -30.5],  # y just beyond -H
        [2, 3, 12, 3, 100, 8],  # x at 2.5 W
    ],
)
def test_polygon_vertex_limit_is_one_image_size_per_axis(poly):
    checked = check_annotations(_data([poly]), "f.json")
    k = _too_far(poly)
    if k is None:
        assert checked.stats.bad_segmentation == 0
        assert len(checked.coco.anns) == 1
    else:
        assert checked.stats.bad_segmentation == 1 and checked.coco.anns == {}
        size = f"the {W}x{H} image"
        assert checked.problems[0].detail == (
            f"polygon 0 coordinate {k} = {poly[k]} lies more than one image size outside {size}"
            "; dropped"
        )


def test_triangles_are_kept_and_short_parts_dropped_wherever_they_are():
    """A part needs an even number of coordinates, at least 6 (a triangle); shorter or odd parts
    are left out whether they come first or last, and the other parts are kept."""
    triangle = [2, 3, 12, 3, 12, 8]
    square = [20, 10, 30, 10, 30, 20, 20, 20]
    short, odd = [1, 1, 5, 5], [1, 1, 5, 5, 9]
    checked = check_annotations(
        _data([triangle], [short, square], [odd, triangle, short, square]), "f.json"
    )
    assert _reasons(checked) == {
        2: ["dropped_polygon_parts"],
        3: ["dropped_polygon_parts", "dropped_polygon_parts"],
    }
    assert [p.detail for p in checked.problems if p.ann_id == 3] == [
        "polygon 0 of 4 has 5 coordinates (a polygon needs an even number, at least 6); left out",
        "polygon 2 of 4 has 4 coordinates (a polygon needs an even number, at least 6); left out",
    ]
    segs = {i: checked.coco.anns[i]["segmentation"] for i in (1, 2, 3)}
    assert segs == {1: [triangle], 2: [square], 3: [triangle, square]}
    assert len(checked.targets[1]) == 3  # all three are training targets


def _side_polygons() -> list[list[float]]:
    """Rectangles outside the image touching each side, and the same pushed 0.6 px inside."""
    out = []
    for d in (0.0, 0.6):
        out += [
            [-10, 5, d, 5, d, 10, -10, 10],  # left
            [W - d, 5, W + 10, 5, W + 10, 10, W - d, 10],  # right
            [5, -10, 10, -10, 10, d, 5, d],  # top
            [5, H - d, 10, H - d, 10, H + 10, 5, H + 10],  # bottom
        ]
    out += [[5, H + 5, 10, H + 5, 10, H + 10], [-8, 3, -2, 3, -2, 9]]  # below, left, apart
    return out


def _area(seg: list) -> int:
    return int(mask_util.area(mask_util.merge(mask_util.frPyObjects(seg, H, W))))


def test_segmentation_is_empty_exactly_when_pycocotools_rasterises_no_pixel():
    """A polygon is no training target ('empty_masks', kept for evaluation) when it has no pixel
    in the image by pycocotools' rasterisation, a target otherwise."""
    polys = _side_polygons()
    inside, outside = [2, 3, 12, 3, 12, 8], polys[0]
    segs = [[p] for p in polys] + [[inside, outside], [outside, inside], [outside, polys[1]]]
    checked = check_annotations(_data(*segs), "f.json")
    areas = [_area(seg) for seg in segs]
    assert 0 in areas and min(a for a in areas if a) > 0  # both kinds occur
    empty = {i for i, a in enumerate(areas, start=1) if a == 0}
    assert {i for i, r in _reasons(checked).items() if r == ["empty_masks"]} == empty
    assert len(checked.targets[1]) == len(segs) - len(empty)
    assert sorted(checked.coco.anns) == list(range(1, len(segs) + 1))  # all kept for eval


def test_annotation_without_any_usable_polygon_names_every_dropped_part():
    checked = check_annotations(_data([[1, 1, 5, 5], [1, 1, 5, 5, 9]]), "f.json")
    assert checked.coco.anns == {} and checked.stats.bad_segmentation == 1
    assert [p.detail for p in checked.problems] == [
        "no polygon of at least 3 points: "
        "polygon 0 of 2 has 4 coordinates (a polygon needs an even number, at least 6); left out; "
        "polygon 1 of 2 has 5 coordinates (a polygon needs an even number, at least 6); left out"
        "; dropped"
    ]


# ------------------------------------------------------------------ RLE segmentations


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts written as a loop: alternating background / foreground run
    lengths over the column-major pixels, starting with background."""
    runs, value, count = [], 0, 0
    for v in mask.flatten(order="F").tolist():
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    return [*runs, count]


def test_missing_area_of_an_rle_is_its_foreground_pixel_count():
    """Three separate blobs (7 runs): the filled area is the number of mask pixels, counted here
    with numpy, as a compressed and as an uncompressed RLE."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:6] = 1  # 9 pixels
    mask[10:12, 20:27] = 1  # 14
    mask[25, 30:35] = 1  # 5
    runs = _runs(mask)
    assert len(runs) > 7 and sum(runs) == H * W
    enc = mask_util.encode(np.asfortranarray(mask))
    compressed = {"size": [H, W], "counts": enc["counts"].decode()}
    data = _data({"size": [H, W], "counts": runs}, compressed)
    for ann in data["annotations"]:
        del ann["area"]
    checked = check_annotations(data, "f.json")
    assert [checked.coco.anns[i]["area"] for i in (1, 2)] == [28.0, 28.0] == [float(mask.sum())] * 2
    assert [p.detail for p in checked.problems] == ["'area' None set to 28.0"] * 2


@pytest.mark.parametrize(
    ("counts", "detail"),
    [
        ([600.0, 600.0], "RLE 'counts' must be a string or a list of integers"),
        ([600, True, 599], "RLE 'counts' must be a string or a list of integers"),
        (None, "RLE 'counts' must be a string or a list of integers"),
        ([], "RLE runs cover 0 pixels (min run 0), not the 30x40 = 1200 of the image"),
        ("", "RLE runs cover 0 pixels (min run 0), not the 30x40 = 1200 of the image"),
        (
            [1300, -100],
            "RLE runs cover 1200 pixels (min run -100), not the 30x40 = 1200 of the image",
        ),
    ],
)
def test_unreadable_rle_counts_are_dropped_with_their_reason(counts, detail):
    checked = check_annotations(_data({"size": [H, W], "counts": counts}), "f.json")
    assert checked.coco.anns == {} and checked.targets == {1: []}
    assert checked.stats.bad_segmentation == 1
    assert [(p.reason, p.detail) for p in checked.problems] == [
        ("bad_segmentation", detail + "; dropped")
    ]


# ------------------------------------------------------------------ annotation entries


def test_annotation_that_is_not_an_object_is_malformed_and_named_by_index():
    data = _data([[2, 3, 12, 3, 12, 8]])
    data["annotations"].insert(0, ["id", 7] + list(range(40)))
    checked = check_annotations(data, "f.json")
    assert checked.stats.malformed_annotations == 1 and sorted(checked.coco.anns) == [1]
    text = str(["id", 7] + list(range(40)))[:60]
    assert [(p.reason, p.detail, p.index, p.ann_id) for p in checked.problems] == [
        ("malformed_annotations", f"not a JSON object: {text}; dropped", 0, None)
    ]
    assert str(checked.problems[0]).startswith("f.json: annotation [0] (image id None): ")


@pytest.mark.parametrize(
    ("ann_id", "kept"),
    [(5, True), (5.0, True), (5.5, False), ("5", False), (True, False), (None, False)],
)
def test_annotation_id_must_be_an_integer_value(ann_id, kept):
    """JSON has one number type: 5.0 is the integer 5; 5.5, a string or a boolean is no id."""
    data = _data([[2, 3, 12, 3, 12, 8]])
    data["annotations"][0]["id"] = ann_id
    checked = check_annotations(data, "f.json")
    assert sorted(checked.coco.anns) == ([5] if kept else [])
    if not kept:
        assert [(p.reason, p.detail) for p in checked.problems] == [
            ("malformed_annotations", f"'id' must be an integer, got {ann_id!r}; dropped")
        ]


def test_segmentation_that_is_neither_polygons_nor_rle_is_named_by_its_first_60_characters():
    seg = "x" * 50 + "y" * 20
    checked = check_annotations(_data(seg), "f.json")
    assert [p.detail for p in checked.problems] == [
        "no polygon list or RLE: " + "x" * 50 + "y" * 10 + "; dropped"
    ]


@pytest.mark.parametrize(
    ("area", "valid"),
    [
        (0, True),
        (0.5, True),
        (12, True),
        (-1, False),
        (float("nan"), False),
        (float("inf"), False),
        ("12", False),
        (True, False),
        (None, False),
    ],
)
def test_area_is_kept_when_a_finite_nonnegative_number_and_filled_otherwise(area, valid):
    """Filled with the mask's pixel count (here 28, unlike the 10 x 5 box) or, without masks,
    the box area."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:6] = 1
    mask[10:12, 20:27] = 1
    mask[25, 30:35] = 1
    data = _data({"size": [H, W], "counts": _runs(mask)})
    data["annotations"][0]["area"] = area
    for masks, filled in ((True, 28.0), (False, 50.0)):
        checked = check_annotations(data, "f.json", masks=masks)
        got = checked.coco.anns[1]["area"]
        if valid:
            assert got == area and checked.problems == []
        else:
            assert got == filled and checked.stats.filled_areas == 1
            assert [p.detail for p in checked.problems] == [f"'area' {area!r} set to {filled}"]


@pytest.mark.parametrize(
    ("bbox", "area"),
    [
        ([2, 3, 10, 5], 50.0),
        ([2, 3, 0.5, 4], 2.0),
        ([2, 3, 4, 0.5], 2.0),
        ([5, 5, -3, 4], 0.0),
        ([5, 5, 3, -4], 0.0),
    ],
)
def test_without_masks_a_missing_area_is_the_box_area_and_segmentations_are_not_read(bbox, area):
    data = _data(None, bbox=bbox)
    del data["annotations"][0]["area"]
    checked = check_annotations(data, "f.json", masks=False)
    assert checked.coco.anns[1]["area"] == area


@pytest.mark.parametrize(
    ("bbox", "target"),
    [
        ([2, 3, 0.5, 4], (2, 3, 2.5, 7)),  # thinner than a pixel: still a target
        ([2, 3, 4, 0.5], (2, 3, 6, 3.5)),
        ([2, 3, 0, 4], "degenerate_boxes"),
        ([2, 3, 4, 0], "degenerate_boxes"),
        ([38, 28, 5, 5], (38, 28, 40, 30)),  # clipped to the image
        ([-3, -2, 5, 5], (0, 0, 2, 3)),
        ([45, 5, 5, 5], "outside_boxes"),  # right of the image, at its height
        ([5, 35, 5, 5], "outside_boxes"),  # below it
        ([-9, 5, 5, 5], "outside_boxes"),  # left
        ([5, -9, 5, 5], "outside_boxes"),  # above
        ([40, 5, 5, 5], "outside_boxes"),  # touching the right edge from outside
        ([5, 30, 5, 5], "outside_boxes"),  # touching the bottom edge
        ([-5, 5, 5, 5], "outside_boxes"),  # touching the left edge
        ([5, -5, 5, 5], "outside_boxes"),  # touching the top edge
    ],
)
def test_box_targets_are_clipped_to_the_image_or_named_why_not(bbox, target):
    """The clipped box by hand: [max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)]; a target
    needs a positive width and height before and after clipping."""
    checked = check_annotations(_data(None, bbox=bbox), "f.json", masks=False)
    assert sorted(checked.coco.anns) == [1]  # kept for evaluation in every case
    if isinstance(target, str):
        assert checked.targets[1] == [] and _reasons(checked) == {1: [target]}
    else:
        assert [t["box"] for t in checked.targets[1]] == [target]
        clipped = target != (bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3])
        assert checked.stats.clipped_boxes == clipped and checked.problems == []


# ------------------------------------------------------------------ the dataset


def test_dataset_counts_every_missing_and_negative_image_and_keeps_order(tmp_path):
    """Images 1..6: 2 and 4 missing, 3 and 5 negative (no annotation), 1 and 6 with one object;
    dropping negatives keeps every later image. Labels follow the category ids' order."""
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(1, 7)]
    for i in (1, 3, 5, 6):
        Image.new("RGB", (W, H)).save(tmp_path / f"{i}.png")
    anns = [
        {
            "id": 10 + i,
            "image_id": i,
            "category_id": c,
            "bbox": [2, 3, 10, 5],
            "area": 50.0,
            "iscrowd": 0,
            "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
        }
        for i, c in ((1, 12), (6, 3))
    ]
    cats = [{"id": 12}, {"id": 3, "name": "dog"}]  # a category without a name is named by id
    data = {"images": images, "annotations": anns, "categories": cats}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    kept = CocoDetection(tmp_path, path)
    dropped = CocoDetection(tmp_path, path, remove_images_without_annotations=True)
    assert [r["id"] for r in kept.records] == [1, 3, 5, 6]
    assert [r["id"] for r in dropped.records] == [1, 6]
    for ds in (kept, dropped):
        s = ds.stats
        assert (s.images, s.missing_images, s.negative_images, s.instances) == (6, 2, 2, 2)
        assert s.images_used == len(ds.records)
        assert ds.cat_id_to_label == {3: 1, 12: 2}  # categories sorted by id
        assert ds.class_names == ["dog", "12"]
        assert [ds[i][1]["labels"].tolist() for i in range(len(ds))] == (
            [[2], [], [], [1]] if ds is kept else [[2], [1]]
        )


def test_negative_image_targets_have_the_documented_dtypes_under_any_default_dtype(tmp_path):
    """An image without objects still gives float32 (0, 4) boxes, int64 (0,) labels and uint8
    (0, H, W) masks (torch.tensor([]) alone would be float), also with float64 as default."""
    Image.new("RGB", (W, H)).save(tmp_path / "a.png")
    Image.new("RGB", (W, H)).save(tmp_path / "b.png")
    ann = {
        "id": 1,
        "image_id": 2,
        "category_id": 1,
        "bbox": [2, 3, 10, 5],
        "area": 50.0,
        "iscrowd": 0,
        "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
    }
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": [ann],
        "categories": [{"id": 1}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        targets = [ds[0][1], ds[1][1]]
    finally:
        torch.set_default_dtype(old)
    for t, n in zip(targets, (0, 1)):
        assert (t["boxes"].dtype, tuple(t["boxes"].shape)) == (torch.float32, (n, 4))
        assert (t["labels"].dtype, tuple(t["labels"].shape)) == (torch.int64, (n,))
        assert (t["masks"].dtype, tuple(t["masks"].shape)) == (torch.uint8, (n, H, W))
        assert t["orig_size"].tolist() == [H, W]
    assert targets[1]["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]


def test_problems_are_logged_on_rank_zero_of_a_process_group(tmp_path, caplog):
    """With torch.distributed initialised (one gloo process, rank 0), rank 0 is the main process
    and names the problems."""
    data = _data([[2, 3, 12, 3, 12, 8]], [])
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert on_main_process() is True
        with caplog.at_level(logging.WARNING, logger="mvitv2.data.detection"):
            checked = check_annotations(data, "f.json")
            log_problems(checked.problems)
    finally:
        dist.destroy_process_group()
    assert [r.getMessage() for r in caplog.records] == [
        "f.json: annotation id 2 (image id 1): bad_segmentation: empty polygon list; dropped"
    ]
    assert on_main_process() is True  # no process group: a single process


# ------------------------------------------------------------------ the file itself


def test_file_that_is_no_utf8_json_object_is_a_user_error_saying_what_it_is(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(UserValueError) as e:
        load_coco_json(latin1)
    # 0xe9 starts a 3-byte UTF-8 sequence; '"' cannot continue it.
    assert str(e.value) == f"{latin1}: not a UTF-8 text file (invalid continuation byte)"
    for name, value, kind in (("list.json", [], "list"), ("number.json", 3, "int")):
        (tmp_path / name).write_text(json.dumps(value))
        with pytest.raises(UserValueError) as e:
            load_coco_json(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: expected a JSON object at top level, got {kind}"


def test_coco_evaluate_refuses_segm_without_masks_and_unknown_iou_types_by_name():
    gt = check_annotations(_data([[2, 3, 12, 3, 12, 8]]), "f.json").coco
    box = {"image_id": 1, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 5.0], "score": 0.9}
    with pytest.raises(ValueError) as e:
        coco_evaluate(gt, [box])
    assert str(e.value) == "segm evaluation needs 'segmentation' in every result (no masks?)"
    with pytest.raises(ValueError) as e:
        coco_evaluate(gt, [box], ("keypoints",))
    assert str(e.value) == "unsupported iou type 'keypoints'; expected 'bbox' or 'segm'"


@pytest.mark.parametrize(
    ("images", "categories", "message"),
    [
        ([{"height": 1, "width": 1}], [{"id": 1}], None),  # a 1 x 1 image is an image
        (
            [{"height": "30"}],
            [],
            "images[0] (id 1) needs a positive integer 'height' and 'width', got '30' x 40",
        ),
        (
            [{"width": 0}],
            [],
            "images[0] (id 1) needs a positive integer 'height' and 'width', got 30 x 0",
        ),
        (
            [{"height": 0}],
            [],
            "images[0] (id 1) needs a positive integer 'height' and 'width', got 0 x 40",
        ),
        ([{}, {"id": 2}, {}], [], "images[2] repeats the image id 1 of images[0]"),
        ([{}], ["x"], "categories[0] needs an integer 'id', got 'x'"),
    ],
)
def test_image_sizes_ids_and_categories_are_checked_with_exact_messages(
    tmp_path, images, categories, message
):
    base = {"id": 1, "file_name": "a.png", "width": W, "height": H}
    path = tmp_path / "ann.json"
    data = {"images": [{**base, **i} for i in images], "categories": categories}
    path.write_text(json.dumps(data))
    if message is None:
        assert load_coco_json(path)["images"] == data["images"]
    else:
        with pytest.raises(UserValueError) as e:
            load_coco_json(path)
        assert str(e.value) == f"{path}: {message}"
