"""COCO-format detection / instance-segmentation data: reader, transforms, collate, evaluation.

The reader returns targets in the format of torchvision's detection models (``boxes`` as
``tv_tensors.BoundingBoxes`` in XYXY, contiguous ``labels`` 1..K, ``masks`` as ``tv_tensors.Mask``),
so torchvision.transforms.v2 moves boxes and masks together with the image. Each annotation is
checked at load time on its own: a bad one is dropped (never its image), counted by reason in
:class:`DetectionDataStats` and named in a :class:`DataProblem`; the evaluation ground truth keeps
every annotation pycocotools can read, as the official protocol does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import query_size

from mvitv2.data.common import BadSample, SkipCounter
from mvitv2.data.image import load_image, stored_size
from mvitv2.errors import UserFileNotFoundError, UserValueError

__all__ = [
    "BoxesFromMasks",
    "CocoAnnotations",
    "CocoDetection",
    "DataProblem",
    "DetectionDataStats",
    "check_annotations",
    "coco_evaluate",
    "detection_collate",
    "detection_eval_transforms",
    "detection_train_transforms",
    "load_coco",
    "load_coco_json",
    "log_problems",
    "on_main_process",
    "predictions_to_coco",
    "rescale_prediction",
    "rle_counts",
]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


log = logging.getLogger(__name__)


def on_main_process() -> bool:
    """True unless this is a DDP process other than rank 0 (datasets are built on every rank;
    only rank 0 names the problems they found)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _int_id(value: Any) -> int | None:
    """``value`` as an integer id, or None when the JSON value is not an integer."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():  # also rejects inf and NaN
        return None
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and structurally check a COCO instances JSON file.

    Only the file's structure is checked here (a problem with it is the user's to fix); single
    annotations are checked by :func:`check_annotations`, which drops the bad ones.

    Args:
        path: the JSON file.
    Returns:
        The parsed dict (``annotations`` defaults to ``[]`` for image-info-only files).
    Raises:
        UserFileNotFoundError: the file does not exist.
        UserValueError: malformed JSON, missing/ill-typed top-level fields, an image entry without
            an integer ``id``, a ``file_name`` or a positive integer ``height``/``width``, repeated
            image or category ids; the message names the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserValueError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise UserValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    if not isinstance(data, dict):
        raise UserValueError(
            f"{path}: expected a JSON object at top level, got {type(data).__name__}"
        )
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserValueError(f"{path}: field {key!r} must be a list (COCO instances format)")
    seen: dict[int, int] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            raise UserValueError(
                f"{path}: images[{i}] needs 'id', 'file_name', 'height' and 'width', got {img!r}"
            )
        image_id, h, w = _int_id(img["id"]), _int_id(img["height"]), _int_id(img["width"])
        if image_id is None or not isinstance(img["file_name"], str):
            raise UserValueError(
                f"{path}: images[{i}] needs an integer 'id' and a string 'file_name', got {img!r}"
            )
        if h is None or w is None or h <= 0 or w <= 0:
            raise UserValueError(
                f"{path}: images[{i}] (id {image_id}) needs a positive integer 'height' and "
                f"'width', got {img['height']!r} x {img['width']!r}"
            )
        if image_id in seen:
            raise UserValueError(
                f"{path}: images[{i}] repeats the image id {image_id} of images[{seen[image_id]}]"
            )
        seen[image_id] = i
    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        cat_id = _int_id(cat.get("id")) if isinstance(cat, dict) else None
        if cat_id is None:
            raise UserValueError(f"{path}: categories[{i}] needs an integer 'id', got {cat!r}")
        if cat_id in cat_ids:
            raise UserValueError(f"{path}: categories[{i}] repeats the category id {cat_id}")
        cat_ids.add(cat_id)
    return data


def _coco_index(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(source: str | Path | dict[str, Any], *, masks: bool = True) -> COCO:
    """A pycocotools ``COCO`` ground truth with every annotation pycocotools can read.

    Args:
        source: path of an instances JSON file (checked by :func:`load_coco_json`) or its dict.
        masks: check segmentations too (needed for mask AP).
    Returns:
        The ``COCO`` object of :func:`check_annotations`: invalid annotations are left out (and
        logged), all others kept as they are.
    """
    data = load_coco_json(source) if not isinstance(source, dict) else source
    name = "<dict>" if isinstance(source, dict) else str(source)
    checked = check_annotations(data, name, masks=masks)
    log_problems(checked.problems)
    return checked.coco


@dataclass
class DetectionDataStats:
    """What the reader repaired or dropped when it loaded an annotation file.

    Invalid annotations (dropped everywhere, the evaluation ground truth included, because
    pycocotools cannot read them or they refer to nothing):

    Attributes:
        malformed_annotations: not an object, no integer ``id``, an ``id`` already used, an
            ``iscrowd`` other than 0/1.
        orphan_annotations: ``image_id`` not in ``images``.
        unknown_category: ``category_id`` not in ``categories``.
        malformed_boxes: ``bbox`` missing, not 4 numbers, or not finite.
        bad_segmentation: (with masks) missing or unreadable segmentation: not a polygon list or
            RLE, a NaN / null / non-numeric coordinate, a coordinate more than one image size
            outside the image, no polygon of at least 3 points, an RLE whose size differs from
            the image's or whose runs do not cover it exactly.

    Valid annotations that are no training target (kept in the ground truth, as COCOeval
    expects):

    Attributes:
        crowd: ``iscrowd=1`` regions (COCOeval ignores detections on them).
        degenerate_boxes: zero or negative width or height.
        outside_boxes: boxes entirely outside the image.
        empty_masks: (with masks) a segmentation with no pixel in the image (a polygon wholly
            outside it, an RLE with no foreground).

    Repairs (the annotation is kept):

    Attributes:
        clipped_boxes: boxes partly outside the image (the target is clipped to it).
        dropped_polygon_parts: polygon parts with an odd number of coordinates or fewer than 3
            points (left out, like detectron2; the other parts are kept).
        filled_areas: a missing or invalid ``area`` (COCOeval needs it) set to the mask's pixel
            count (with masks) or the box area.

    Images:

    Attributes:
        images: images listed in the JSON.
        images_used: images the dataset serves (listed minus missing files, and minus negatives
            when those are removed).
        missing_images: image files that do not exist (skipped).
        negative_images: images with no training target (kept as negatives unless removed).
        annotations: annotations listed in the JSON.
        instances: annotations kept as training targets.
    """

    images: int = 0
    images_used: int = 0
    missing_images: int = 0
    negative_images: int = 0
    annotations: int = 0
    instances: int = 0
    malformed_annotations: int = 0
    orphan_annotations: int = 0
    unknown_category: int = 0
    malformed_boxes: int = 0
    bad_segmentation: int = 0
    crowd: int = 0
    degenerate_boxes: int = 0
    outside_boxes: int = 0
    empty_masks: int = 0
    clipped_boxes: int = 0
    dropped_polygon_parts: int = 0
    filled_areas: int = 0

    def count(self, reason: str) -> None:
        """Add one to counter ``reason``."""
        setattr(self, reason, getattr(self, reason) + 1)

    def as_dict(self) -> dict[str, int]:
        """All counters as a plain dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line with every non-zero counter, for logs."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v)


@dataclass(frozen=True)
class DataProblem:
    """One annotation (or image) the reader dropped, kept for evaluation only, or repaired.

    Attributes:
        file: the annotation file.
        reason: the :class:`DetectionDataStats` counter it is counted under.
        detail: what is wrong and what was done.
        image_id: the image's id (None when the annotation has no usable one).
        ann_id: the annotation's ``id`` (None for an image, or an annotation without one).
        index: position in the file's ``annotations`` list (None for an image).
    """

    file: str
    reason: str
    detail: str
    image_id: Any = None
    ann_id: Any = None
    index: int | None = None

    def __str__(self) -> str:
        if self.index is None:
            what = f"image id {self.image_id}"
        else:
            ann = f"id {self.ann_id}" if self.ann_id is not None else f"[{self.index}]"
            what = f"annotation {ann} (image id {self.image_id})"
        return f"{self.file}: {what}: {self.reason}: {self.detail}"


def log_problems(problems: Sequence[DataProblem]) -> None:
    """Log each problem once, as a warning, on the main process only."""
    if on_main_process():
        for p in problems:
            log.warning("%s", p)


class _Invalid(Exception):
    """``_Invalid(reason, detail)``: an annotation pycocotools cannot read or that refers to
    nothing (dropped everywhere)."""


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``).

    Args:
        counts: the ``counts`` string of a compressed RLE.
    Raises:
        ValueError: a character outside the encoding's alphabet or a cut-off last run.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p == n:
                raise ValueError("the last run is cut off")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} at {p} is not RLE code")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
        if len(runs) > 2:
            x += runs[-2]  # runs after the first two are stored as differences
        runs.append(x)
    return runs


def _check_polygons(seg: list, h: int, w: int) -> tuple[list, bool, list[str]]:
    """``(kept parts, wholly outside the image, notes on dropped parts)``; raises _Invalid."""
    if not seg:
        raise _Invalid("bad_segmentation", "empty polygon list")
    kept, notes, inside = [], [], False
    for j, part in enumerate(seg):
        try:
            xy = np.asarray(part, dtype=np.float64)  # what pycocotools does (None -> NaN)
        except (TypeError, ValueError):
            xy = None
        if not isinstance(part, list) or xy is None or xy.ndim != 1:
            raise _Invalid("bad_segmentation", f"polygon {j} is not a flat list of numbers")
        bad = np.flatnonzero(~np.isfinite(xy))
        if len(bad):
            k = int(bad[0])
            raise _Invalid(
                "bad_segmentation", f"polygon {j} coordinate {k} is {json.dumps(part[k])}"
            )
        # pycocotools rasterises every edge pixel by pixel: a far-away vertex would hang or
        # exhaust memory (and beyond 4e8 overflow its int).
        limit = np.where(np.arange(len(xy)) % 2 == 0, w, h)
        far = np.flatnonzero((xy < -limit) | (xy > 2 * limit))
        if len(far):
            k = int(far[0])
            raise _Invalid(
                "bad_segmentation",
                f"polygon {j} coordinate {k} = {part[k]} lies more than one image size outside "
                f"the {w}x{h} image",
            )
        if len(xy) < 6 or len(xy) % 2:
            notes.append(
                f"polygon {j} of {len(seg)} has {len(xy)} coordinates (a polygon needs an even "
                "number, at least 6); left out"
            )
            continue
        kept.append(part)
        xs, ys = xy[0::2], xy[1::2]
        inside |= bool(xs.max() > 0 and xs.min() < w and ys.max() > 0 and ys.min() < h)
    if not kept:
        raise _Invalid("bad_segmentation", "no polygon of at least 3 points: " + "; ".join(notes))
    return kept, not inside, notes


def _rle_area(seg: dict, h: int, w: int) -> int:
    """Foreground pixels of an RLE segmentation; raises _Invalid when it does not fit the image."""
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and [_int_id(v) for v in size] == [h, w]):
        raise _Invalid("bad_segmentation", f"RLE size {size!r} differs from the image's [{h}, {w}]")
    if isinstance(counts, str):
        try:
            runs = rle_counts(counts)
        except ValueError as e:
            raise _Invalid("bad_segmentation", f"RLE counts: {e}") from None
    elif isinstance(counts, list) and all(type(c) is int for c in counts):
        runs = counts
    else:
        raise _Invalid("bad_segmentation", "RLE 'counts' must be a string or a list of integers")
    if min(runs, default=0) < 0 or sum(runs) != h * w:
        raise _Invalid(
            "bad_segmentation",
            f"RLE runs cover {sum(runs)} pixels (min run {min(runs, default=0)}), not the "
            f"{h}x{w} = {h * w} of the image",
        )
    return sum(runs[1::2])


@dataclass
class CocoAnnotations:
    """An annotation file after :func:`check_annotations`.

    Attributes:
        coco: the evaluation ground truth: every annotation but the invalid ones, unchanged
            except for dropped polygon parts, filled ``area`` and a default ``iscrowd`` of 0.
        targets: image id -> training targets ``{"box": (x0, y0, x1, y1) clipped, "label",
            "seg"}``.
        stats: the annotation counters (the image counters stay 0).
        problems: each dropped, evaluation-only (crowd excepted) or repaired annotation.
        label_to_cat_id: contiguous label 1..K -> category id (categories sorted by id).
        class_names: category names in label order.
    """

    coco: COCO
    targets: dict[int, list[dict[str, Any]]]
    stats: DetectionDataStats
    problems: list[DataProblem]
    label_to_cat_id: dict[int, int]
    class_names: list[str]


def _check_annotation(
    ann: Any, images: Mapping[int, dict], cat_to_label: Mapping[int, int], masks: bool
) -> tuple[dict[str, Any], dict[str, Any] | None, str | None, list[tuple[str, str]]]:
    """``(ground-truth entry, training target or None, why no target, repairs)``.

    Raises _Invalid for an annotation to drop everywhere.
    """
    if not isinstance(ann, dict):
        raise _Invalid("malformed_annotations", f"not a JSON object: {str(ann)[:60]}")
    if _int_id(ann.get("id")) is None:
        raise _Invalid("malformed_annotations", f"'id' must be an integer, got {ann.get('id')!r}")
    image_id = _int_id(ann.get("image_id"))
    if image_id not in images:
        raise _Invalid("orphan_annotations", f"image id {ann.get('image_id')!r} is not in 'images'")
    cat_id = _int_id(ann.get("category_id"))
    if cat_id not in cat_to_label:
        raise _Invalid(
            "unknown_category", f"category id {ann.get('category_id')!r} is not in 'categories'"
        )
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        raise _Invalid("malformed_boxes", f"'bbox' must be [x, y, width, height], got {bbox!r}")
    if not all(math.isfinite(v) for v in bbox):
        raise _Invalid("malformed_boxes", f"'bbox' {bbox} is not finite")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise _Invalid("malformed_annotations", f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
    img = images[image_id]
    h, w = int(img["height"]), int(img["width"])
    x, y, bw, bh = (float(v) for v in bbox)
    gt = {**ann, "iscrowd": int(iscrowd)}
    repairs: list[tuple[str, str]] = []
    seg, empty, area = ann.get("segmentation"), False, None
    if masks:
        if isinstance(seg, list):
            seg, empty, notes = _check_polygons(seg, h, w)
            repairs += [("dropped_polygon_parts", n) for n in notes]
        elif isinstance(seg, dict):
            area = _rle_area(seg, h, w)
            empty = area == 0
        else:
            raise _Invalid("bad_segmentation", f"no polygon list or RLE: {str(seg)[:60]}")
        gt["segmentation"] = seg
    old_area = ann.get("area")
    if not (_is_number(old_area) and math.isfinite(old_area) and old_area >= 0):
        if masks and area is None:
            area = int(mask_util.area(mask_util.merge(mask_util.frPyObjects(seg, h, w))))
        gt["area"] = float(area) if masks else max(bw, 0.0) * max(bh, 0.0)
        repairs.append(("filled_areas", f"'area' {old_area!r} set to {gt['area']}"))
    if iscrowd:
        return gt, None, "crowd", repairs
    if bw <= 0 or bh <= 0:
        return gt, None, "degenerate_boxes", repairs
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if x1 <= x0 or y1 <= y0:
        return gt, None, "outside_boxes", repairs
    if empty:
        return gt, None, "empty_masks", repairs
    if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
        repairs.append(("clipped_boxes", ""))
    target = {"box": (x0, y0, x1, y1), "label": cat_to_label[cat_id], "seg": seg}
    return gt, target, None, repairs


_NO_TARGET = {
    "degenerate_boxes": "the box has no area",
    "outside_boxes": "the box lies outside the image",
    "empty_masks": "the segmentation has no pixel inside the image",
}


def check_annotations(
    data: dict[str, Any], ann_file: str | Path, *, masks: bool = True
) -> CocoAnnotations:
    """Check every annotation of a COCO instances dict (from :func:`load_coco_json`) on its own.

    An invalid annotation (see :class:`DetectionDataStats`) is dropped from the training targets
    and the evaluation ground truth, a valid one that cannot be trained on (crowd, empty box or
    mask) is kept for evaluation only; nothing else is affected. Each case but crowd is recorded
    as a :class:`DataProblem` naming the file, the annotation and image ids and the reason.

    Args:
        data: the parsed file.
        ann_file: its name, for the messages.
        masks: check segmentations (they are training targets and mask-AP ground truth);
            without, they are neither read nor checked.
    """
    file = str(ann_file)
    images = {int(img["id"]): img for img in data["images"]}
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    cat_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    stats = DetectionDataStats(images=len(images), annotations=len(data["annotations"]))
    problems: list[DataProblem] = []
    targets: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    gt_anns: list[dict[str, Any]] = []
    used_ids: dict[int, int] = {}
    for index, ann in enumerate(data["annotations"]):
        image_id, ann_id = (
            (ann.get("image_id"), ann.get("id")) if isinstance(ann, dict) else (None, None)
        )
        notes: list[tuple[str, str]] = []
        try:
            if _int_id(ann_id) in used_ids:
                raise _Invalid(
                    "malformed_annotations",
                    f"id already used by annotations[{used_ids[_int_id(ann_id)]}]",
                )
            gt, target, no_target, notes = _check_annotation(ann, images, cat_to_label, masks)
        except _Invalid as e:
            reason, detail = e.args
            notes = [(reason, f"{detail}; dropped")]
            gt = target = no_target = None
        if gt is not None:
            used_ids[int(gt["id"])] = index
            gt_anns.append(gt)
            if no_target == "crowd":
                stats.count("crowd")  # by design, not a problem
            elif no_target is not None:
                notes.append(
                    (no_target, f"{_NO_TARGET[no_target]}; kept for evaluation, not trained on")
                )
            else:
                targets[int(gt["image_id"])].append(target)
        for reason, detail in notes:
            stats.count(reason)
            if detail:
                problems.append(DataProblem(file, reason, detail, image_id, ann_id, index))
    return CocoAnnotations(
        coco=_coco_index({**data, "annotations": gt_anns}),
        targets=targets,
        stats=stats,
        problems=problems,
        label_to_cat_id={i + 1: cid for i, cid in enumerate(cat_ids)},
        class_names=[names[c] for c in cat_ids],
    )


def _segmentation_to_mask(seg: Any, h: int, w: int) -> np.ndarray:
    # ``seg`` passed check_annotations: polygons, uncompressed or compressed RLE of size (h, w).
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)  # uncompressed RLE
    else:
        rle = seg
    return mask_util.decode(rle)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection / instance-segmentation dataset.

    Items are ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8 (3, H, W) before the
    transforms; :func:`detection_train_transforms` makes it float in [0, 1]) and ``target`` a dict
    with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, float32 (N, 4)), ``labels`` (int64 (N,),
    contiguous 1..K), ``masks`` (``tv_tensors.Mask``, uint8 (N, H, W); only when ``masks=True``),
    ``image_id`` (int, the COCO id) and ``orig_size`` (int64 tensor ``[H, W]`` of the file).

    Annotations are checked once, at construction, each on its own
    (:func:`check_annotations`): bad ones are dropped, the rest kept; ``self.stats`` counts
    every case by reason and ``self.problems`` names each one (logged on the main process).
    Missing image files are skipped (none found at all raises ``UserFileNotFoundError``: a wrong
    ``image_dir``), images without objects kept as negatives. An image that
    fails to decode, or whose size differs from the JSON's, raises
    :class:`~mvitv2.data.common.BadSample` (the loader skips it in evaluation and counts it)
    and is flagged in ``self.skipped`` by reason (``unreadable_image``, ``size_mismatch``;
    shared with DataLoader workers); it is never replaced by another image here.

    Args:
        image_dir: folder that ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        transforms: callable ``(image, target) -> (image, target)``, e.g. from
            :func:`detection_train_transforms`.
        masks: load instance masks (needed for Mask R-CNN); if False, segmentations are ignored.
        remove_images_without_annotations: drop negative images instead of keeping them (the
            detectron2 training default; keep them for evaluation).
    """

    SKIP_KEYS = ("unreadable_image", "size_mismatch")

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Any = None,
        *,
        masks: bool = True,
        remove_images_without_annotations: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = masks
        data = load_coco_json(self.ann_file)
        checked = check_annotations(data, self.ann_file, masks=masks)
        self.coco = checked.coco
        self.label_to_cat_id = checked.label_to_cat_id
        self.cat_id_to_label = {c: label for label, c in checked.label_to_cat_id.items()}
        self.class_names = checked.class_names
        self.stats = checked.stats
        self.problems = checked.problems
        self.records: list[dict[str, Any]] = []
        for img in data["images"]:
            image_id, path = int(img["id"]), self.image_dir / img["file_name"]
            if not path.is_file():
                self.stats.missing_images += 1
                self.problems.append(
                    DataProblem(
                        str(self.ann_file), "missing_images", f"{path} not found; skipped", image_id
                    )
                )
                continue
            anns = checked.targets[image_id]
            if not anns:
                self.stats.negative_images += 1
                if remove_images_without_annotations:
                    continue
            self.stats.instances += len(anns)
            self.records.append(
                {
                    "id": image_id,
                    "path": path,
                    "height": int(img["height"]),
                    "width": int(img["width"]),
                    "anns": anns,
                }
            )
        self.stats.images_used = len(self.records)
        if self.stats.images and self.stats.missing_images == self.stats.images:
            # A wrong image folder, not a few lost files: training would stop on an empty set
            # with a misleading message and evaluation would report AP 0 on no image.
            first = self.image_dir / data["images"][0]["file_name"]
            raise UserFileNotFoundError(
                f"none of the {self.stats.images} images {self.ann_file} lists is under "
                f"{self.image_dir} (looked for {first}): give the folder its file_name entries "
                "are relative to"
            )
        self.skipped = SkipCounter(self.SKIP_KEYS, len(self.records))
        log_problems(self.problems)

    def __len__(self) -> int:
        return len(self.records)

    def skipped_images(self) -> dict[int, str]:
        """COCO image id -> reason, for each image this process (and its loader workers) could
        not serve so far."""
        return {
            self.records[i]["id"]: key for key in self.SKIP_KEYS for i in self.skipped.flagged(key)
        }

    def load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Image and target of record ``index`` before transforms.

        Raises:
            BadSample: the file cannot be decoded, or its size differs from the JSON's (the
                record is flagged in ``self.skipped`` first).
        """
        rec = self.records[index]
        try:
            pil = load_image(rec["path"], upright=True)
        except BadSample as e:
            bad = BadSample(
                e.path, f"unreadable_image (image id {rec['id']}): {e.reason}", "unreadable_image"
            )
            self.skipped.flag(index, bad.kind)
            raise bad from e
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
        h, w = image.shape[-2:]
        if (h, w) != (rec["height"], rec["width"]):
            sw, sh = stored_size(rec["path"])
            turned = (
                ""
                if (sw, sh) == (w, h)
                else f" once turned upright by its EXIF orientation tag ({sw}x{sh} as stored; "
                "annotations are read on the upright image, as detectron2 reads them)"
            )
            bad = BadSample(
                rec["path"],
                f"size_mismatch: the image is {w}x{h}{turned} but {self.ann_file} says "
                f"{rec['width']}x{rec['height']} (image id {rec['id']})",
                "size_mismatch",
            )
            self.skipped.flag(index, bad.kind)
            raise bad
        anns = rec["anns"]
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": rec["id"],
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.with_masks:
            m = [_segmentation_to_mask(a["seg"], h, w) for a in anns]
            masks = torch.from_numpy(np.stack(m)) if m else torch.zeros(0, h, w, dtype=torch.uint8)
            target["masks"] = tv_tensors.Mask(masks)
        return tv_tensors.Image(image), target

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class BoxesFromMasks:
    """Replace each box by the tight box of its mask (after crops, a clipped box can be much
    larger than the visible part of its object; detectron2's ``recompute_boxes``). Objects whose
    mask was cropped away get an empty box, which ``SanitizeBoundingBoxes`` then removes.
    Targets without masks pass through unchanged."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        masks = target.get("masks")
        if masks is None:
            return image, target
        m = masks.as_subclass(torch.Tensor)
        boxes = masks_to_boxes(m)  # last pixel inclusive; [0, 0, 0, 0] for an empty mask
        boxes[:, 2:] += m.flatten(1).any(1)[:, None]  # pixel edges, as COCO boxes are
        old = target["boxes"]
        return image, {**target, "boxes": tv_tensors.wrap(boxes.to(old.dtype), like=old)}


class RandomRangeCrop(v2.Transform):
    """detectron2's ``RandomCrop("absolute_range", (lo, hi))``: a crop whose height and width
    are each drawn uniformly from ``[min(side, lo), min(side, hi)]``, at a random position."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)

        def draw(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, ()))

        ch, cw = draw(min(h, self.lo), min(h, self.hi)), draw(min(w, self.lo), min(w, self.hi))
        return {"top": draw(0, h - ch), "left": draw(0, w - cw), "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def detection_train_transforms(
    *,
    mode: str = "multiscale",
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
    crop_prob: float = 0.0,
    lsj_size: int | tuple[int, int] = 1024,
    lsj_scale: tuple[float, float] = (0.1, 2.0),
    hflip_prob: float = 0.5,
    recompute_boxes: bool = True,
) -> v2.Compose:
    """Training augmentation for ``(image, target)`` pairs from :class:`CocoDetection`.

    Args:
        mode: ``"multiscale"`` (short side drawn from ``min_sizes``, long side capped at
            ``max_size``; the Mask R-CNN recipe), ``"lsj"`` (large-scale jitter: rescale by a
            factor in ``lsj_scale`` of the ``lsj_size`` fit, then random crop / pad to
            ``lsj_size``) or ``"none"`` (flip only).
        min_sizes: candidate short sides for ``"multiscale"`` (COCO: 480..800 step 32).
        max_size: cap on the long side for ``"multiscale"``.
        crop_prob: for ``"multiscale"``, the probability of first resizing the short side to
            400, 500 or 600 and cropping a random 384-600 px box out of that, as detectron2's
            MViTv2 recipes (``projects/MViTv2/configs/common/coco_loader.py``: 0.5).
        lsj_size: output side (or (h, w)) for ``"lsj"``.
        lsj_scale: scale range for ``"lsj"``.
        hflip_prob: probability of a horizontal flip (0 disables it).
        recompute_boxes: after the ``"lsj"`` crop, set boxes to the tight boxes of the masks
            (when the targets have masks), as detectron2 does for LSJ.
    Returns:
        A ``v2.Compose``; images come out float32 in [0, 1] (not normalised: torchvision's
        detection models normalise inside), boxes/masks follow, degenerate boxes are removed.
    """
    if crop_prob and mode != "multiscale":
        raise UserValueError(f"data.crop_prob applies to aug: multiscale only, not {mode!r}")
    ops: list[Any] = [v2.RandomHorizontalFlip(hflip_prob)]
    if mode == "multiscale":
        if not 0 <= crop_prob <= 1:
            raise UserValueError(f"data.crop_prob must be in [0, 1], got {crop_prob}")
        if crop_prob > 0:
            crop = [v2.RandomShortestSize(min_size=[400, 500, 600]), RandomRangeCrop(384, 600)]
            ops.append(v2.RandomApply(crop, p=crop_prob))
        ops.append(v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size))
    elif mode == "lsj":
        h, w = (lsj_size, lsj_size) if isinstance(lsj_size, int) else lsj_size
        ops += [
            # ScaleJitter reads its target size as (width, height), unlike RandomCrop.
            v2.ScaleJitter(target_size=(w, h), scale_range=lsj_scale),
            # detectron2's FixedSizeCrop pads the image with grey 128 (near the pixel mean: ~0
            # once normalised), not black; masks with 0.
            v2.RandomCrop((h, w), pad_if_needed=True, fill={tv_tensors.Image: 128, "others": 0}),
        ]
        if recompute_boxes:
            ops.append(BoxesFromMasks())
    elif mode != "none":
        raise UserValueError(
            f"unknown augmentation mode {mode!r} (data.aug); expected multiscale, lsj or none"
        )
    # Crops and rescales can shrink boxes to nothing: SanitizeBoundingBoxes drops those smaller
    # than a pixel, with their labels and masks.
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()])


def detection_eval_transforms(*, min_size: int | None = 800, max_size: int = 1333) -> v2.Compose:
    """Evaluation preprocessing: resize the short side to ``min_size`` (long side at most
    ``max_size``), or keep the size when ``min_size`` is None; float32 images in [0, 1].

    Predictions are then in the resized frame; :func:`rescale_prediction` maps them back to the
    original image (``target["orig_size"]``) before :func:`predictions_to_coco`.
    """
    ops: list[Any] = [] if min_size is None else [v2.Resize(min_size, max_size=max_size)]
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True)])


def detection_collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Collate ``(image, target)`` pairs of different sizes into ``(images, targets)`` lists."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def rescale_prediction(
    prediction: Mapping[str, torch.Tensor],
    from_size: Sequence[int],
    to_size: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Map a torchvision-style prediction from the network's input frame to another image size.

    Args:
        prediction: dict with ``boxes`` (N, 4) XYXY, ``scores``, ``labels`` and optionally
            ``masks`` ((N, 1, H, W) or (N, H, W) probabilities or binary masks).
        from_size: (H, W) the prediction refers to (the transformed image's size).
        to_size: (H, W) wanted, usually ``target["orig_size"]``.
    Returns:
        A new dict; boxes scaled, masks resized bilinearly (as float), other keys copied.
    """
    fh, fw = (int(s) for s in from_size)
    th, tw = (int(s) for s in to_size)
    out = dict(prediction)
    boxes = prediction["boxes"]
    out["boxes"] = boxes * boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])
    if "masks" in prediction and (fh, fw) != (th, tw):
        m = prediction["masks"]
        squeeze = m.dim() == 3
        m = (m[:, None] if squeeze else m).float()
        m = torch.nn.functional.interpolate(m, size=(th, tw), mode="bilinear")
        out["masks"] = m[:, 0] if squeeze else m
    return out


def predictions_to_coco(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Convert per-image predictions into COCO results (the list ``COCO.loadRes`` takes).

    Args:
        predictions: torchvision-style dicts in original image coordinates (see
            :func:`rescale_prediction`): ``boxes`` XYXY, ``scores``, ``labels`` (contiguous) and
            optionally ``masks`` (probabilities or binary, (N, 1, H, W) or (N, H, W)).
        image_ids: COCO image id of each prediction.
        label_to_cat_id: contiguous label -> COCO category id (``CocoDetection.label_to_cat_id``).
        mask_threshold: probability above which a mask pixel is foreground.
    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and,
        with masks, ``segmentation`` as compressed RLE with ``counts`` as a str (JSON-ready).
    """
    results: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = pred["boxes"].detach().float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = pred["scores"].detach().float().cpu().tolist()
        labels = pred["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in pred:
            m = pred["masks"].detach().cpu()
            m = m[:, 0] if m.dim() == 4 else m
            binary = m > mask_threshold  # binary (bool / 0-1) masks pass unchanged
            arr = np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8))
            rles = mask_util.encode(arr)
        for k in range(len(scores)):
            r: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat_id[int(labels[k])]),
                "bbox": xywh[k],
                "score": float(scores[k]),
            }
            if rles is not None:
                r["segmentation"] = {
                    "size": [int(s) for s in rles[k]["size"]],
                    "counts": rles[k]["counts"].decode(),  # bytes -> str for JSON
                }
            results.append(r)
    return results


def coco_evaluate(
    coco_gt: COCO | str | Path,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox", "segm"),
    *,
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Run COCOeval and return the standard AP figures.

    Args:
        coco_gt: ground truth (``CocoDetection.coco``, a ``COCO`` object, or a JSON path).
        results: detections from :func:`predictions_to_coco`.
        iou_types: any of ``"bbox"`` and ``"segm"``.
        image_ids: restrict evaluation to these images (e.g. those actually run); default all.
        verbose: print COCOeval's summary table.
    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` with values in [0, 1]
        (COCOeval's -1 for "no ground truth of that size" is kept). With no detections every AP
        is 0.
    """
    gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt, masks="segm" in iou_types)
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unsupported iou type {iou_type!r}; expected 'bbox' or 'segm'")
        if not results:
            out[iou_type] = dict.fromkeys(COCO_METRICS, 0.0)
            continue
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            raise ValueError("segm evaluation needs 'segmentation' in every result (no masks?)")
        # loadRes writes into the dicts it gets (area, id): give it copies. With a 'bbox', it
        # takes the box area as a detection's area, which changes the small/medium/large split
        # of mask AP; like detectron2, give segm results no box.
        res = [{k: v for k, v in r.items() if iou_type == "bbox" or k != "bbox"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            dt = gt.loadRes(res)
            ev = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(buf.getvalue())
        out[iou_type] = {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}
    return out
