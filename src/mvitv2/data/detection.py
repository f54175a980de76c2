"""COCO-format detection / instance-segmentation data: reader, transforms, collate, evaluation.

The reader returns targets in the format of torchvision's detection models (``boxes`` as
``tv_tensors.BoundingBoxes`` in XYXY, contiguous ``labels`` 1..K, ``masks`` as ``tv_tensors.Mask``),
so torchvision.transforms.v2 moves boxes and masks together with the image. Bad annotations are
repaired or dropped at load time and counted in :class:`DetectionDataStats`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.transforms import v2

from mvitv2.data.common import SkipCounter

__all__ = [
    "BoxesFromMasks",
    "CocoDetection",
    "DetectionDataStats",
    "coco_evaluate",
    "detection_collate",
    "detection_eval_transforms",
    "detection_train_transforms",
    "load_coco",
    "load_coco_json",
    "predictions_to_coco",
    "rescale_prediction",
]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and structurally check a COCO instances JSON file.

    Args:
        path: the JSON file.
    Returns:
        The parsed dict (``annotations`` defaults to ``[]`` for image-info-only files).
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON or missing/ill-typed top-level fields, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: field {key!r} must be a list (COCO instances format)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= img.keys():
            raise ValueError(
                f"{path}: images[{i}] needs 'id', 'file_name', 'height' and 'width', got {img!r}"
            )
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise ValueError(f"{path}: categories[{i}] needs an 'id', got {cat!r}")
    return data


def load_coco(source: str | Path | dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` object from a file or an already parsed dict, without its prints.

    Args:
        source: path of an instances JSON file (checked by :func:`load_coco_json`) or its dict.
    """
    data = load_coco_json(source) if not isinstance(source, dict) else source
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class DetectionDataStats:
    """What the reader repaired or dropped when it loaded an annotation file.

    Attributes:
        images: images listed in the JSON.
        images_used: images the dataset serves (listed minus missing files, and minus negatives
            when those are removed).
        missing_images: image files that do not exist (skipped).
        negative_images: images with no usable object (kept as negatives unless removed).
        annotations: annotations listed in the JSON.
        instances: annotations kept as training targets.
        degenerate_boxes: boxes with zero/negative width or height or non-finite values (dropped).
        clipped_boxes: boxes partly outside the image (clipped to it).
        outside_boxes: boxes entirely outside the image (dropped).
        crowd: ``iscrowd=1`` regions (not training targets; COCOeval still ignores them).
        bad_segmentation: missing or unreadable segmentations, when masks are needed (dropped).
        unknown_category: annotations whose category id is not in ``categories`` (dropped).
        orphan_annotations: annotations whose image id is not in ``images`` (dropped).
    """

    images: int = 0
    images_used: int = 0
    missing_images: int = 0
    negative_images: int = 0
    annotations: int = 0
    instances: int = 0
    degenerate_boxes: int = 0
    clipped_boxes: int = 0
    outside_boxes: int = 0
    crowd: int = 0
    bad_segmentation: int = 0
    unknown_category: int = 0
    orphan_annotations: int = 0

    def as_dict(self) -> dict[str, int]:
        """All counters as a plain dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line with every non-zero counter, for logs."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items() if v)


def _valid_segmentation(seg: Any) -> bool:
    if isinstance(seg, list):
        return len(seg) > 0 and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg
        )
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


def _segmentation_to_mask(seg: Any, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)  # uncompressed RLE
    else:
        rle = seg
    m = mask_util.decode(rle)
    if m.shape != (h, w):
        raise ValueError(f"RLE size {m.shape} differs from image size {(h, w)}")
    return m


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection / instance-segmentation dataset.

    Items are ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8 (3, H, W) before the
    transforms; :func:`detection_train_transforms` makes it float in [0, 1]) and ``target`` a dict
    with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, float32 (N, 4)), ``labels`` (int64 (N,),
    contiguous 1..K), ``masks`` (``tv_tensors.Mask``, uint8 (N, H, W); only when ``masks=True``),
    ``image_id`` (int, the COCO id) and ``orig_size`` (int64 tensor ``[H, W]`` of the file).

    Annotation problems are handled once, at construction, and counted in ``self.stats``:
    degenerate boxes dropped, partly-outside boxes clipped, fully-outside boxes dropped, crowd
    regions left out of the targets, missing image files skipped, images without objects kept as
    negatives. Images that fail to decode later are replaced by the next image and counted in
    ``self.skipped`` (shared with DataLoader workers).

    Args:
        image_dir: folder that ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        transforms: callable ``(image, target) -> (image, target)``, e.g. from
            :func:`detection_train_transforms`.
        masks: load instance masks (needed for Mask R-CNN); if False, segmentations are ignored.
        remove_images_without_annotations: drop negative images instead of keeping them (the
            detectron2 training default; keep them for evaluation).
    """

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
        self.coco = load_coco(data)
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
        self.label_to_cat_id = {i + 1: cid for i, cid in enumerate(cat_ids)}
        self.class_names = [names[c] for c in cat_ids]
        self.stats = DetectionDataStats(
            images=len(data["images"]), annotations=len(data["annotations"])
        )
        self.skipped = SkipCounter(["unreadable_image", "size_mismatch"], len(data["images"]))

        images = {int(img["id"]): img for img in data["images"]}
        per_image: dict[int, list[dict]] = {i: [] for i in images}
        for ann in data["annotations"]:
            kept = self._sanitize(ann, images)
            if kept is not None:
                per_image[int(ann["image_id"])].append(kept)
        self.records: list[dict[str, Any]] = []
        for image_id, img in images.items():
            path = self.image_dir / img["file_name"]
            if not path.is_file():
                self.stats.missing_images += 1
                continue
            anns = per_image[image_id]
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

    def _sanitize(self, ann: Any, images: Mapping[int, dict]) -> dict | None:
        st = self.stats
        try:
            image_id, cat_id = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            st.degenerate_boxes += 1  # no usable box at all
            return None
        if image_id not in images:
            st.orphan_annotations += 1
            return None
        if cat_id not in self.cat_id_to_label:
            st.unknown_category += 1
            return None
        if ann.get("iscrowd", 0):
            st.crowd += 1
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            st.degenerate_boxes += 1
            return None
        img = images[image_id]
        iw, ih = float(img["width"]), float(img["height"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, iw), min(y + h, ih)
        if x1 <= x0 or y1 <= y0:
            st.outside_boxes += 1
            return None
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            st.clipped_boxes += 1
        seg = ann.get("segmentation")
        if self.with_masks and not _valid_segmentation(seg):
            st.bad_segmentation += 1
            return None
        return {"box": (x0, y0, x1, y1), "label": self.cat_id_to_label[cat_id], "seg": seg}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Image and target of record ``index`` before transforms; raises on unreadable files."""
        rec = self.records[index]
        # PIL rather than torchvision.io, whose image decoders are deprecated since 0.29.
        with Image.open(rec["path"]) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        h, w = image.shape[-2:]
        if (h, w) != (rec["height"], rec["width"]):
            raise ValueError(
                f"{rec['path']}: image is {w}x{h} but {self.ann_file} says "
                f"{rec['width']}x{rec['height']}"
            )
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
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            if self.skipped.is_flagged(i):
                continue
            try:
                image, target = self.load(i)
            except OSError:  # includes PIL.UnidentifiedImageError and truncated files
                self.skipped.flag(i, "unreadable_image")
                continue
            except ValueError:
                self.skipped.flag(i, "size_mismatch")
                continue
            if self.transforms is not None:
                image, target = self.transforms(image, target)
            return image, target
        raise RuntimeError(f"no readable image in {self.image_dir} (annotations {self.ann_file})")


class BoxesFromMasks:
    """Replace each box by the tight box of its mask (after crops, a clipped box can be much
    larger than the visible part of its object; detectron2's ``recompute_boxes``). Objects whose
    mask was cropped away get an empty box, which ``SanitizeBoundingBoxes`` then removes.
    Targets without masks pass through unchanged."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        masks = target.get("masks")
        if masks is None or len(masks) == 0:
            return image, target
        m = masks.as_subclass(torch.Tensor).bool()
        rows, cols = m.any(dim=2), m.any(dim=1)  # (N, H), (N, W)
        h, w = m.shape[-2:]
        ar_w, ar_h = torch.arange(w), torch.arange(h)
        x0 = torch.where(cols, ar_w, w).amin(1)
        x1 = torch.where(cols, ar_w + 1, 0).amax(1)
        y0 = torch.where(rows, ar_h, h).amin(1)
        y1 = torch.where(rows, ar_h + 1, 0).amax(1)
        empty = ~cols.any(1)
        boxes = torch.stack([x0, y0, x1, y1], 1).float()
        boxes[empty] = 0.0
        old = target["boxes"]
        target = dict(target)
        target["boxes"] = tv_tensors.wrap(boxes.to(old.dtype), like=old)
        return image, target


def _finish(train: bool) -> list[Any]:
    out: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if train:
        # Crops and rescales can shrink boxes to nothing; drop them with their labels and masks.
        out.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return out


def detection_train_transforms(
    *,
    mode: str = "multiscale",
    min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    max_size: int = 1333,
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
        lsj_size: output side (or (h, w)) for ``"lsj"``.
        lsj_scale: scale range for ``"lsj"``.
        hflip_prob: probability of a horizontal flip (0 disables it).
        recompute_boxes: after the ``"lsj"`` crop, set boxes to the tight boxes of the masks
            (when the targets have masks), as detectron2 does for LSJ.
    Returns:
        A ``v2.Compose``; images come out float32 in [0, 1] (not normalised: torchvision's
        detection models normalise inside), boxes/masks follow, degenerate boxes are removed.
    """
    ops: list[Any] = []
    if hflip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(hflip_prob))
    if mode == "multiscale":
        ops.append(v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size))
    elif mode == "lsj":
        size = (lsj_size, lsj_size) if isinstance(lsj_size, int) else tuple(lsj_size)
        ops += [
            v2.ScaleJitter(target_size=size, scale_range=lsj_scale, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill=0),
        ]
        if recompute_boxes:
            ops.append(BoxesFromMasks())
    elif mode != "none":
        raise ValueError(f"unknown augmentation mode {mode!r}; expected multiscale, lsj or none")
    return v2.Compose(ops + _finish(train=True))


def detection_eval_transforms(*, min_size: int | None = 800, max_size: int = 1333) -> v2.Compose:
    """Evaluation preprocessing: resize the short side to ``min_size`` (long side at most
    ``max_size``), or keep the size when ``min_size`` is None; float32 images in [0, 1].

    Predictions are then in the resized frame; :func:`rescale_prediction` maps them back to the
    original image (``target["orig_size"]``) before :func:`predictions_to_coco`.
    """
    ops: list[Any] = []
    if min_size is not None:
        ops.append(v2.Resize(min_size, max_size=max_size, antialias=True))
    return v2.Compose(ops + _finish(train=False))


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
    scale = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], device=prediction["boxes"].device)
    out["boxes"] = prediction["boxes"] * scale
    if "masks" in prediction and (fh, fw) != (th, tw):
        m = prediction["masks"]
        squeeze = m.dim() == 3
        m = (m[:, None] if squeeze else m).float()
        m = torch.nn.functional.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)
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
            binary = (m > mask_threshold) if m.is_floating_point() else m.bool()
            arr = np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8))
            rles = mask_util.encode(arr)
        for k in range(len(scores)):
            r: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat_id[int(labels[k])]),
                "bbox": [round(v, 2) for v in xywh[k]],
                "score": round(float(scores[k]), 5),
            }
            if rles is not None:
                counts = rles[k]["counts"]
                r["segmentation"] = {
                    "size": [int(s) for s in rles[k]["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
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
    gt = coco_gt if isinstance(coco_gt, COCO) else load_coco(coco_gt)
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unsupported iou type {iou_type!r}; expected 'bbox' or 'segm'")
        if not results:
            out[iou_type] = dict.fromkeys(COCO_METRICS, 0.0)
            continue
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            raise ValueError("segm evaluation needs 'segmentation' in every result (no masks?)")
        # With a 'bbox' present, loadRes takes the box area as the instance area, which changes
        # the small/medium/large split of mask AP; like detectron2, give segm results no box.
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        res = [{k: v for k, v in r.items() if k != drop} for r in results]
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
        out[iou_type] = {k: float(v) for k, v in zip(COCO_METRICS, ev.stats[:6])}
    return out
