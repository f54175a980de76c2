"""Detection and instance segmentation: ``mvitv2 train|eval|predict detect``.

* ``mvitv2 train detect [--data DIR] [--config RECIPE] [--model NAME] [key=value ...]``: with no
  ``--data`` the embedded digit scenes (a real COCO dataset generated from scikit-learn's digits)
  and the ``digit_scenes`` recipe; with ``--data`` a COCO folder (``annotations/instances_
  {train,val}2017.json`` + ``train2017/``, ``val2017/``) and by default ``coco_maskrcnn_mvitv2_t``.
  DDP (``torchrun``), ``--resume``, checkpoints and logging come from the engine. Prints the
  annotation problems the reader repaired or dropped, and the final box / mask AP.
* ``mvitv2 eval detect --checkpoint CKPT [--data DIR | --images DIR --annotations JSON]``: COCO box
  and mask AP through COCOeval; writes the detections as a COCO results JSON.
* ``mvitv2 predict detect IMAGES... --checkpoint CKPT [--output-dir DIR]``: writes one PNG per
  image with masks, boxes and ``label score`` drawn (:func:`drawing_names`).

``--checkpoint`` of eval, predict and export is a training checkpoint or a released detectron2
MViTv2 detector (``model_final.pth``, a model-zoo ``.pkl`` with ``--allow-pickle``, or a weights tag
such as ``mvitv2_tiny.coco_cascade``): see :func:`read_detector`.

The model is :func:`mvitv2.detection.create_detector` (``cfg.model`` a detector name,
``cfg.model_args`` its overrides, ``cfg.pretrained`` an image checkpoint or weights tag for the
backbone). ``cfg.data`` holds :class:`DetectionDataConfig` options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import pickle
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mvitv2.data.common import config_from_dict, config_to_dict
from mvitv2.data.detection import (
    CocoDetection,
    coco_evaluate,
    detection_collate,
    detection_eval_transforms,
    detection_train_transforms,
    on_main_process,
    predictions_to_coco,
)
from mvitv2.detection import create_detector, list_detectors
from mvitv2.detection.model import has_mask_branch
from mvitv2.engine.cli import (
    add_predict_arguments,
    add_train_arguments,
    dispatch,
    error_reason,
    eval_loader,
    eval_metrics_path,
    expand_inputs,
    export_handler,
    fit,
    predict_batches,
    recorded_path,
    resolve_device,
    save_eval_metrics,
    train_config,
)
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo, init_distributed
from mvitv2.engine.trainer import Trainer, to_device
from mvitv2.errors import (
    UnknownKeyError,
    UserFileNotFoundError,
    UserValueError,
    check_writable_folder,
    unknown_names_message,
)
from mvitv2.predict import CheckpointInfo
from mvitv2.tasks.spec import ExportInputs, SpecTask, TaskSpec, refuse_run_options
from mvitv2.utils.fields import at_least

if TYPE_CHECKING:
    from mvitv2.predict import Predictor

__all__ = [
    "DetectionDataConfig",
    "DetectionTask",
    "DetectorFile",
    "DetectorFileError",
    "add_arguments",
    "create_detector",
    "evaluate_detector",
    "list_detectors",
    "read_detector",
    "run",
]

log = logging.getLogger(__name__)

DIGIT_SCENES = "digit_scenes"  # data root value meaning "the embedded digit scenes"


@dataclass(frozen=True)
class DetectionDataConfig:
    """The ``data:`` section of a detection recipe.

    Args:
        train_images, train_json, val_images, val_json: explicit split locations (override what
            ``--data`` resolves to).
        aug: training augmentation, ``multiscale`` (short side from ``min_sizes``, long side
            <= ``max_size``), ``lsj`` (large-scale jitter, crop/pad to ``lsj_size``) or ``none``.
        min_sizes, max_size: multi-scale sizes. lsj_size, lsj_scale: large-scale jitter.
        crop_prob: multi-scale only: probability of a random 384-600 px crop of the image
            resized to a short side of 400-600 first (detectron2's MViTv2 recipes: 0.5).
        hflip_prob: horizontal flip probability (0 for digits: a mirrored digit is no digit).
        remove_empty: leave images without objects out of training (detectron2 default).
        masks: load instance masks (needed by the mask head).
        digit_scenes: options of :func:`mvitv2.data.digit_scenes.make_digit_scenes` for the
            embedded data (``num_train``, ``num_val``, ``image_size``, ``digit_size``, ...).
        eval_max_images: evaluate on the first N validation images only (None: all).
    """

    train_images: str | None = None
    train_json: str | None = None
    val_images: str | None = None
    val_json: str | None = None
    aug: str = "multiscale"
    min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_prob: float = 0.0
    lsj_size: int = 1024
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    hflip_prob: float = 0.5
    remove_empty: bool = True
    masks: bool = True
    digit_scenes: dict[str, Any] = field(default_factory=dict)
    eval_max_images: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectionDataConfig:
        """Build from a recipe's ``data`` mapping; unknown keys raise ``KeyError``.

        Dotted keys (``digit_scenes.num_train``, from ``data.digit_scenes.num_train=500`` on the
        command line) set one entry of a nested mapping.
        """
        values = dict(values)
        for key in [k for k in values if "." in k]:
            head, _, rest = key.partition(".")
            values[head] = {**dict(values.get(head) or {}), rest: values.pop(key)}
        # An unknown digit_scenes option would otherwise surface as make_digit_scenes's
        # TypeError traceback once training starts.
        from mvitv2.data.digit_scenes import make_digit_scenes

        options = inspect.signature(make_digit_scenes).parameters
        unknown = sorted(set(values.get("digit_scenes") or {}) - set(options))
        if unknown:
            raise UnknownKeyError(
                unknown_names_message("data.digit_scenes option", unknown, options)
            )
        return config_from_dict(cls, values, "detection data")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def resolve_splits(
    data_root: str | Path | None, dc: DetectionDataConfig
) -> dict[str, tuple[Path, Path]]:
    """``{"train": (images, json), "val": (images, json)}`` for a data root.

    ``None`` or ``"digit_scenes"`` generates (once, cached) the embedded digit scenes, unless
    both splits are given explicitly. A folder is
    read as COCO 2017 (``annotations/instances_train2017.json``, ``train2017/``, ...) or, failing
    that, as ``annotations/instances_{train,val}.json`` with ``train/`` and ``val/``. Explicit
    ``train_images``/``train_json``/... options take precedence.
    """
    explicit = {
        "train": (dc.train_images, dc.train_json),
        "val": (dc.val_images, dc.val_json),
    }
    splits: dict[str, tuple[Path, Path]] = {}
    if data_root in (None, DIGIT_SCENES):
        if not all(images or ann for images, ann in explicit.values()):
            from mvitv2.data.digit_scenes import make_digit_scenes

            ds = make_digit_scenes(**dc.digit_scenes)
            splits = {"train": ds.split("train"), "val": ds.split("val")}
    else:
        root = Path(data_root)
        for split in ("train", "val"):
            for suffix in ("2017", ""):
                ann = root / "annotations" / f"instances_{split}{suffix}.json"
                if ann.is_file():
                    splits[split] = (root / f"{split}{suffix}", ann)
                    break
    for split, (images, ann) in explicit.items():
        if images or ann:
            if not (images and ann):
                raise UserValueError(f"data.{split}_images and data.{split}_json go together")
            splits[split] = (Path(images), Path(ann))
    if "train" not in splits and "val" not in splits:
        raise UserFileNotFoundError(
            f"no COCO annotations under {data_root}: expected annotations/instances_train2017.json"
            " (or instances_train.json), or set data.train_images/data.train_json"
        )
    return splits


def _plain_target(t: dict[str, Any]) -> dict[str, Any]:
    # tv_tensors -> plain tensors: the R-CNN code does arithmetic that should not re-wrap.
    return {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in t.items()}


def collate(batch: list[tuple[Any, Any]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``(images, targets)`` lists of plain tensors (images differ in size)."""
    images, targets = detection_collate(batch)
    return [im.as_subclass(Tensor) for im in images], [_plain_target(t) for t in targets]


def report_data(name: str, ds: CocoDetection) -> str:
    """One line: images/instances used, then every non-zero count of what the reader dropped,
    kept for evaluation only or repaired, and of the images this process could not read, by
    reason (each case is named in the log); and how many are evaluated where
    ``data.eval_max_images`` cut the set."""
    s = ds.stats
    totals = ("images", "images_used", "annotations", "instances")
    counts = {k: v for k, v in s.as_dict().items() if k not in totals and v}
    for reason in ds.skipped_images().values():
        counts[reason] = counts.get(reason, 0) + 1
    problems = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no problems"
    line = (
        f"{name}: {ds.ann_file} -> {s.images_used}/{s.images} images, "
        f"{s.instances}/{s.annotations} instances kept; {problems}"
    )
    if len(ds.records) < s.images_used:  # cut by data.eval_max_images
        line += f"; evaluating the first {len(ds.records)} (data.eval_max_images)"
    return line


class DetectionTask(SpecTask):
    """The detection task for :class:`~mvitv2.engine.trainer.Trainer`.

    Args:
        cfg: the run config; ``cfg.model`` a detector name, ``cfg.model_args`` its overrides.
        data_root: a COCO folder, or None for the embedded digit scenes.
    """

    # Options added to the data config since runs were first saved: as those runs computed.
    added_data_options = {"crop_prob": 0.0}

    primary_metric = "bbox_AP"
    # One image per forward, as detectron2's test loader and ``eval detect``: a batch is padded
    # to its largest image, which changes each image's detections.
    eval_batch_size = 1

    def __init__(self, cfg: TrainConfig, data_root: str | Path | None = None) -> None:
        super().__init__(cfg)
        self.data_cfg = DetectionDataConfig.from_dict(cfg.data)
        self.data_root = recorded_path(data_root) if data_root else DIGIT_SCENES
        self.train_ds: CocoDetection | None = None
        self.val_ds: CocoDetection | None = None
        self.class_names: list[str] = []
        self.label_to_cat_id: dict[int, int] = {}
        #: where :meth:`evaluate` writes the COCO results JSON (None: not written).
        self.results_path: Path | None = None
        self.last_results: list[dict[str, Any]] = []

    def build_datasets(self) -> tuple[CocoDetection, CocoDetection | None]:
        dc = self.data_cfg
        splits = resolve_splits(self.data_root, dc)
        if "train" not in splits:
            raise UserFileNotFoundError(
                f"no training split under {self.data_root}: expected "
                "annotations/instances_train2017.json (or instances_train.json), or set "
                "data.train_images and data.train_json"
            )
        aug = detection_train_transforms(
            mode=dc.aug,
            min_sizes=dc.min_sizes,
            max_size=dc.max_size,
            crop_prob=dc.crop_prob,
            lsj_size=dc.lsj_size,
            lsj_scale=dc.lsj_scale,
            hflip_prob=dc.hflip_prob,
        )
        images, ann = splits["train"]
        self.train_ds = CocoDetection(
            images, ann, aug, masks=dc.masks, remove_images_without_annotations=dc.remove_empty
        )
        self.class_names = list(self.train_ds.class_names)
        self.label_to_cat_id = dict(self.train_ds.label_to_cat_id)
        if on_main_process():
            print(report_data("train data", self.train_ds), flush=True)
        if not len(self.train_ds):
            # Else the engine's "smaller than one step ...; lower batch_size", which cannot help.
            masks = "; for boxes alone: data.masks=false model_args.mask=false" if dc.masks else ""
            raise UserValueError(
                f"{ann}: no image has an object to train on ({self.train_ds.stats.summary()})"
                f"{masks}"
            )
        if "val" in splits:
            self.val_ds = build_eval_dataset(*splits["val"], masks=dc.masks)
            if self.val_ds.class_names != self.class_names:
                raise UserValueError(
                    f"{splits['val'][1]}: categories differ from the training set's "
                    f"({self.val_ds.class_names} vs {self.class_names})"
                )
            if dc.eval_max_images:
                self.val_ds.records = self.val_ds.records[: dc.eval_max_images]
            if on_main_process():
                print(report_data("val data", self.val_ds), flush=True)
        return self.train_ds, self.val_ds

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg, len(self.class_names))
        if not self.data_cfg.masks and has_mask_branch(model):
            # torchvision's mask loss needs a mask per target: it would fail at the first step.
            raise UserValueError(
                f"data.masks=false leaves the mask head of {self.cfg.model} without targets: add "
                "model_args.mask=false (a box-only detector) or keep data.masks=true"
            )
        return model

    def init_weights(self, model: nn.Module, source: str) -> Any:
        """``finetune=``: see :func:`init_detector`."""
        return init_detector(model, source)

    def collate_fn(self):  # noqa: ANN201 - the engine's signature
        return collate

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, targets = batch
        losses = model(images, targets)
        total = sum(losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}

    def evaluate(self, model: nn.Module, loader: DataLoader, dist: DistInfo) -> dict[str, float]:
        assert self.val_ds is not None, "build_datasets() first"
        with_masks = self.data_cfg.masks and has_mask_branch(model)
        metrics, results = evaluate_detector(
            model, loader, dist, self.val_ds, with_masks=with_masks
        )
        self.last_results = results
        if self.results_path is not None and dist.is_main:
            self.results_path.write_text(json.dumps(results))
        return metrics

    def checkpoint_meta(self) -> dict[str, Any]:
        return SPEC.checkpoint_meta(
            class_names=self.class_names,
            model_name=self.cfg.model,
            model_kwargs=dict(self.cfg.model_args),
            data=self.data_cfg.to_dict(),
            data_root=self.data_root,
            label_to_cat_id={int(k): int(v) for k, v in self.label_to_cat_id.items()},
        )


class DetectSpec(TaskSpec):
    """Detection for :mod:`mvitv2.predict` and :mod:`mvitv2.export`: the detector takes RGB
    images of any size (it resizes and normalises them itself) and returns detections; export
    takes its backbone + FPN, or with ``--whole-detector`` all of it."""

    name = "detect"
    batched_ndim = 4
    exports_whole_model = True

    def build_model(
        self, model_name: str, num_classes: int, model_kwargs: dict[str, Any]
    ) -> nn.Module:
        return create_detector(model_name, num_classes=num_classes, **model_kwargs)

    def default_preprocessing(
        self, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        from mvitv2.detection import get_detector_config

        det = get_detector_config(model_name, **model_kwargs)
        return {
            "mean": list(det.image_mean),
            "std": list(det.image_std),
            "min_size": det.min_size,
            "max_size": det.max_size,
            "size_divisible": 32,
        }

    @torch.inference_mode()
    def predict(self, predictor: Predictor, items: list[Any]) -> list[dict[str, Any]]:
        from mvitv2.predict import load_image

        images = [load_image(it, upright=True) for it in items]
        if predictor.preprocessing.get("input_dtype") != "uint8":  # uint8: detectron2's
            images = [x.float() / 255 if x.dtype == torch.uint8 else x for x in images]
        results = []
        for start in range(0, len(images), predictor.batch_size):
            batch = [x.to(predictor.device) for x in images[start : start + predictor.batch_size]]
            with predictor.autocast():
                outs = predictor.model(batch)
            for out in outs:
                keep = out["scores"] >= predictor.score_thresh
                labels = out["labels"][keep].cpu() - 1  # detector labels are 1..K
                res = {
                    "boxes": out["boxes"][keep].float().cpu(),
                    "scores": out["scores"][keep].float().cpu(),
                    "labels": labels,
                    "label_names": [predictor.class_names[i] for i in labels.tolist()],
                    "best_score": float(out["scores"].max()) if len(out["scores"]) else None,
                }
                if "masks" in out:
                    res["masks"] = out["masks"][keep][:, 0].float().cpu() > predictor.mask_thresh
                results.append(res)
        return results

    def export_size(self, preprocessing: dict[str, Any]) -> tuple[int, int]:
        side = -(-int(preprocessing["min_size"]) // 32) * 32  # min_size rounded up
        return side, side

    def export_inputs(
        self,
        model: nn.Module,
        preprocessing: dict[str, Any],
        input_size: Sequence[int] | None = None,
        batch: int = 1,
    ) -> ExportInputs:
        from mvitv2.export import DetectorFeatures

        h, w = input_size or self.export_size(preprocessing)
        if h % 32 or w % 32:
            raise ValueError(f"detection export size must be multiples of 32, got {(h, w)}")
        names = [f"p{i}" for i in range(2, 2 + len(model.backbone.strides))]
        example = torch.randn(batch, 3, h, w)
        features = DetectorFeatures(model).eval()
        return ExportInputs(features, example, ["images"], names, {"exported_part": "backbone+fpn"})


SPEC = DetectSpec()


def build_eval_dataset(
    images: str | Path, ann: str | Path, *, masks: bool = True, uint8: bool = False
) -> CocoDetection:
    """A dataset for evaluation: every image (negatives included), no resizing (the model
    resizes to its test size and maps predictions back to the original image).

    Args:
        images, ann: image folder and COCO instances JSON.
        masks: load instance masks.
        uint8: keep the images uint8 (detectron2 detectors) instead of float in [0, 1].
    """
    transforms = None if uint8 else detection_eval_transforms(min_size=None)
    return CocoDetection(
        images, ann, transforms, masks=masks, remove_images_without_annotations=False
    )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``create_detector(cfg.model, ...)`` with the recipe's overrides; ``cfg.pretrained`` (an
    image checkpoint path/URL, a weights tag, or True for the backbone's default weights)
    initialises the backbone."""
    refuse_run_options(
        cfg.model_args,
        num_classes=f"its data ({num_classes} classes)",
        backbone_weights="the pretrained option (pretrained=TAG_OR_FILE)",
    )
    weights = cfg.pretrained if cfg.pretrained else None
    return create_detector(
        cfg.model, num_classes=num_classes, backbone_weights=weights, **cfg.model_args
    )


_CLASS_SPECIFIC = re.compile(r"box_predictors?\.(\d+\.)?(cls_score|bbox_pred)\.|mask_fcn_logits\.")


def init_detector(model: nn.Module, source: str | Path) -> Any:
    """Initialise a detector for fine-tuning (the config's ``finetune``).

    A checkpoint of a detection run (``mvitv2 train detect``) initialises the whole detector; its
    class-specific predictor layers are reset when the class count differs. Any other checkpoint
    (an image classifier, an official ``.pyth``, ...) initialises the backbone
    (:func:`~mvitv2.detection.model.load_backbone_weights`). Both are strict: anything else that
    does not fit raises :class:`~mvitv2.weights.CheckpointMismatchError` naming the tensors.

    Returns:
        the :class:`~mvitv2.weights.LoadReport`.
    """
    from mvitv2.detection.model import load_backbone_weights
    from mvitv2.engine.checkpoint import read_training_checkpoint as read_run
    from mvitv2.weights import CheckpointMismatchError, LoadReport

    path = Path(source)
    run = read_run(path) if path.suffix == ".pt" and path.is_file() else {}
    if (run.get("meta") or {}).get("task") != "detect":
        return load_backbone_weights(model, str(source))
    report = LoadReport(source=str(source), format="mvitv2 detection run")
    own, saved = model.state_dict(), run["model"]
    fitting = {}
    for key, value in saved.items():
        if key not in own:
            report.unexpected.append(key)
        elif value.shape == own[key].shape:
            fitting[key] = value
        elif _CLASS_SPECIFIC.search(key):
            report.initialized[key] = (
                f"head reset: {value.shape[0]} outputs, model {own[key].shape[0]}"
            )
        else:
            report.shape_conflicts.append((key, tuple(value.shape), tuple(own[key].shape)))
    report.missing = [k for k in own if k not in saved]
    if not report.ok:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit the detector:\n{report.problems()}", report
        )
    model.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting)
    if report.initialized:
        report.notes.append("head reset: another class count; the class-specific layers are new")
    return report


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    loader: DataLoader,
    dist: DistInfo,
    dataset: CocoDetection,
    *,
    with_masks: bool = True,
    label_to_cat_id: dict[int, int] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO box (and mask) AP of ``model`` over the shards of all processes.

    Only the images actually run are evaluated: an image the loader skipped (unreadable, or
    its size differs from the JSON's) is left out of COCOeval, counted in ``skipped_images`` and
    named in the log on the main process.

    Args:
        model: a detector (eval mode is set here).
        loader: yields ``(images, targets)`` from ``dataset`` (or None for all-skipped batches),
            e.g. ``mvitv2.engine.data.build_loader(dataset, train=False, ...)``.
        dist: for gathering the shards' detections.
        dataset: the evaluated dataset (its ``coco`` ground truth and category mapping).
        with_masks: also compute mask AP.
        label_to_cat_id: model label -> COCO category id (a detectron2 COCO detector's fixed
            ids); default: the dataset's (its sorted category ids).

    Returns:
        ``({"bbox_AP", "bbox_AP50", ..., "segm_AP", ..., "images", "skipped_images"},
        coco_results)``; the same metrics on every process, the results list complete on rank 0.
    """
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    for batch in loader:
        if batch is None:
            continue
        images, targets = to_device(batch, dist.device, non_blocking=True)
        outputs = model(images)
        ids = [int(t["image_id"]) for t in targets]
        outputs = [{k: v.float().cpu() for k, v in o.items()} for o in outputs]
        if not with_masks:
            for o in outputs:
                o.pop("masks", None)
        results += predictions_to_coco(outputs, ids, label_to_cat_id or dataset.label_to_cat_id)
        image_ids += ids
    gathered = dist.all_gather_object((results, image_ids, dataset.skipped_images()))
    metrics: dict[str, float] = {}
    if dist.is_main:
        results = [r for res, _, _ in gathered for r in res]
        image_ids = sorted({i for _, ids, _ in gathered for i in ids})
        skipped = {i: why for _, _, sk in gathered for i, why in sk.items() if i not in image_ids}
        paths = {rec["id"]: rec["path"] for rec in dataset.records}
        for image_id, why in sorted(skipped.items()):
            log.warning(f"evaluation skipped image id {image_id} ({paths[image_id]}): {why}")
        iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        ap = coco_evaluate(dataset.coco, results, iou_types, image_ids=image_ids)
        metrics = {f"{t}_{k}": v for t, table in ap.items() for k, v in table.items()}
        metrics["images"] = len(image_ids)
        metrics["skipped_images"] = len(skipped)
    metrics = dist.broadcast_object(metrics)
    return metrics, results


class DetectorFileError(UserValueError):
    """A ``--checkpoint`` that is neither a detection training checkpoint nor a detectron2
    detector this package can build, or a pickle given without ``--allow-pickle``."""


@dataclass
class DetectorFile:
    """A detector read from a ``--checkpoint`` (see :func:`read_detector`).

    Attributes:
        info: model name, config overrides, weights, class names and preprocessing (what
            :func:`mvitv2.predict.build_model` and :mod:`mvitv2.export` take).
        meta: the training run's ``meta`` (``data``, ``data_root``, ...); empty for detectron2.
        label_to_cat_id: detector label (1..K) -> COCO category id, for the COCO results; None:
            the evaluated JSON's own order (its sorted category ids, as for a training run).
        detectron2: whether the file is a detectron2 detector.
    """

    info: CheckpointInfo
    meta: dict[str, Any] = field(default_factory=dict)
    label_to_cat_id: dict[int, int] | None = None
    detectron2: bool = False
    loaded: nn.Module | None = field(default=None, repr=False)

    def model(self) -> nn.Module:
        """The detector with its weights, in eval mode (built once)."""
        from mvitv2.predict import build_model as build_from_info

        if self.loaded is None:
            self.loaded = build_from_info(self.info)
        return self.loaded


def read_detector(
    source: str | Path,
    *,
    allow_pickle: bool = False,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> DetectorFile:
    """Read the ``--checkpoint`` of ``eval``/``predict``/``export detect``.

    Args:
        source: a checkpoint of ``mvitv2 train detect``; or a detectron2 MViTv2 detector: a
            ``.pth`` (``{"model": state_dict}``), ``.safetensors``, a model-zoo ``.pkl`` or a
            weights tag of a whole detector (``mvitv2_tiny.coco_cascade``; downloaded once).
        allow_pickle: read ``.pkl`` files (pickles can run code: only for files you trust).
        model, model_args: detectron2 only: the registered detector to build and its overrides,
            for a backbone that is not a released variant (released ones are recognised from
            the tensor shapes).

    Raises:
        DetectorFileError / UserFileNotFoundError: what the user can fix, in one line.
    """
    from mvitv2.weights import get_weights, list_weights

    source = str(source)
    path = Path(source)
    tag = source in list_weights()
    if tag:
        w = get_weights(source)
        if not w.detector:
            raise DetectorFileError(
                f"weights {source} are not a whole detector (backbone weights start training: "
                f"`mvitv2 train detect pretrained={source}`)"
            )
        if w.needs_pickle and not allow_pickle:
            raise DetectorFileError(
                f"weights {source} ({w.url}) are a detectron2 pickle, which can run code when "
                "loaded: add --allow-pickle if you trust the source"
            )
    elif not path.is_file():
        raise UserFileNotFoundError(
            f"checkpoint {path} does not exist: give a checkpoint of `mvitv2 train detect`, a "
            "detectron2 detector file (.pth, .pkl) or a detector weights tag "
            f"({', '.join(t for t in list_weights() if get_weights(t).detector)})"
        )
    elif path.suffix.lower() == ".pkl" and not allow_pickle:
        raise DetectorFileError(
            f"{path} is a Python pickle (detectron2 model zoo .pkl), which can run code when "
            "loaded: add --allow-pickle if you trust it"
        )
    from mvitv2.weights import CheckpointError
    from mvitv2.weights.io import read_checkpoint as read_file

    if tag:
        from mvitv2.weights.registry import download_weights

        try:
            path = download_weights(source)  # the cached file, or a one-line "fetch it" error
        except CheckpointError as e:
            raise DetectorFileError(str(e)) from e
    try:
        raw = read_file(path, allow_pickle=allow_pickle)
    except (CheckpointError, RuntimeError, pickle.UnpicklingError) as e:
        raise DetectorFileError(
            f"{path} is not a checkpoint ({type(e).__name__}): expected a checkpoint of `mvitv2 "
            "train detect` or a detectron2 detector (.pth, .safetensors, .pkl)"
        ) from e
    if isinstance(raw, dict) and "config" in raw and "model" in raw:  # a training run
        if model or model_args:
            raise DetectorFileError(
                f"{path} is a training checkpoint, which names its detector: --model and "
                "--model-args are for detectron2 detectors"
            )
        from mvitv2.predict import checkpoint_info

        info = checkpoint_info(raw, path, task="detect")
        return DetectorFile(info, meta=info.meta)
    if tag:
        model = model or get_weights(source).detector
    return _read_detectron2(source, raw, model, model_args or {})


def _read_detectron2(
    source: str, raw: Any, model: str | None, model_args: dict[str, Any]
) -> DetectorFile:
    """:func:`read_detector` for a detectron2 detector (``raw``: the file's content)."""
    from mvitv2.detection import load_detectron2_detector
    from mvitv2.detection.model import DetectorConfig
    from mvitv2.models import MViTConfig
    from mvitv2.weights import CheckpointError

    if model is not None and model not in list_detectors():
        raise DetectorFileError(
            f"--model {model}: unknown detector; choose one of {', '.join(list_detectors())}"
        )
    known = {f.name for f in (*dataclasses.fields(DetectorConfig), *dataclasses.fields(MViTConfig))}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise DetectorFileError(
            f"--model-args {', '.join(unknown)}: not a detector or backbone option "
            "(DetectorConfig / MViTConfig fields)"
        )
    try:
        d2 = load_detectron2_detector(raw, model, source_name=source, **model_args)
    except CheckpointError as e:
        first, *rest = str(e).splitlines()
        more = f" (and {len(rest)} more lines)" if rest else ""
        raise DetectorFileError(
            f"{first}{more}. --checkpoint takes a checkpoint of `mvitv2 train detect` or a "
            "detectron2 MViTv2 (Cascade) Mask R-CNN; one whose backbone is no released variant "
            "needs --model and --model-args"
        ) from e
    n = d2.num_classes
    names = d2.class_names or [f"class_{i}" for i in range(n)]
    cat_ids = dict(enumerate(d2.category_ids, start=1)) if d2.category_ids else None
    info = CheckpointInfo(
        path=Path(source),
        task="detect",
        model_name=d2.name,
        model_kwargs=dict(d2.model_kwargs),
        state_dict=d2.model.state_dict(),
        class_names=names,
        preprocessing=d2.preprocessing,
    )
    return DetectorFile(info, label_to_cat_id=cat_ids, detectron2=True, loaded=d2.model)


def format_ap(metrics: dict[str, float]) -> str:
    """``box AP 0.612 (AP50 ..., AP75 ...)  mask AP ...`` from :func:`evaluate_detector` metrics."""
    parts = []
    for key, name in (("bbox", "box"), ("segm", "mask")):
        if f"{key}_AP" in metrics:
            parts.append(
                f"{name} AP {metrics[f'{key}_AP']:.3f} (AP50 {metrics[f'{key}_AP50']:.3f}, "
                f"AP75 {metrics[f'{key}_AP75']:.3f})"
            )
    return "  ".join(parts)


# ---------------------------------------------------------------------- CLI
CHECKPOINT_HELP = (
    "checkpoint from `mvitv2 train detect`, or a detectron2 MViTv2 detector: model_final.pth, a "
    "model-zoo .pkl (with --allow-pickle) or a weights tag such as mvitv2_tiny.coco_cascade"
)


def add_detectron2_arguments(parser: argparse.ArgumentParser) -> None:
    """Options for a detectron2 ``--checkpoint`` (see :func:`read_detector`)."""
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a detectron2 model-zoo .pkl (a pickle can run code: only files you trust)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="detectron2 detector whose backbone is no released variant: the registered "
        f"detector to build ({', '.join(list_detectors())})",
    )
    parser.add_argument(
        "--model-args",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="with --model: its overrides, e.g. embed_dim=8 depths=[1,2,1,1] min_size=256",
    )


def detector_from_args(args: argparse.Namespace) -> DetectorFile:
    """:func:`read_detector` for the ``--checkpoint`` and detectron2 options of ``args``."""
    from mvitv2.engine.config import parse_value

    model_args = {}
    for item in args.model_args:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserValueError(f"--model-args {item!r}: expected KEY=VALUE")
        model_args[key] = parse_value(text, f"--model-args {item!r}")
    return read_detector(
        args.checkpoint, allow_pickle=args.allow_pickle, model=args.model, model_args=model_args
    )


def _export_reader(args: argparse.Namespace) -> tuple[CheckpointInfo, nn.Module]:
    """``mvitv2 export detect``'s checkpoint and its detector, loaded once."""
    detector = detector_from_args(args)
    return detector.info, detector.model()


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of ``mvitv2 <command> detect``."""
    parser.add_argument(
        "--threads",
        type=at_least(0),
        default=0,
        help="CPU threads for torch (0: torch's default); 1 is much faster on a CPU shared with "
        "other jobs, where a descheduled OpenMP thread stalls every op",
    )
    if command == "train":
        add_train_arguments(
            parser,
            data_help="COCO folder (annotations/instances_{train,val}2017.json, train2017/, "
            "val2017/); default: embedded digit scenes",
            config_help="recipe YAML or shipped name (default: digit_scenes, or "
            "coco_maskrcnn_mvitv2_t with --data)",
            model_help=f"detector name (overrides the recipe): {', '.join(list_detectors())}",
            overrides_example="epochs=2 model_args.fpn_channels=64 data.aug=lsj",
        )
    elif command == "eval":
        parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        add_detectron2_arguments(parser)
        parser.add_argument(
            "--data",
            help="COCO folder (default: the data the checkpoint was trained on; required for a "
            "detectron2 detector unless --images/--annotations are given)",
        )
        parser.add_argument("--images", help="image folder (with --annotations; overrides --data)")
        parser.add_argument("--annotations", help="COCO instances JSON of --images")
        parser.add_argument(
            "--output",
            help="COCO results JSON to write (default: coco_results.json next to the checkpoint)",
        )
        parser.add_argument(
            "--metrics",
            help="metrics JSON to write (default: <checkpoint stem>_eval.json next to the "
            "checkpoint)",
        )
        parser.add_argument(
            "--json", action="store_true", help="print only the metrics as one JSON line"
        )
        # One image per forward unless asked, as detectron2's test loader: a batch pads its
        # images to one size, which changes an image's detections with its batch-mates' sizes.
        parser.add_argument(
            "--batch-size",
            type=at_least(1),
            default=1,
            help="images per forward (default 1, as detectron2 evaluates: a batch pads its "
            "images to one size, which moves the detections)",
        )
        parser.add_argument("--workers", type=at_least(0), default=2)
        parser.add_argument("--no-masks", action="store_true", help="box AP only")
        parser.add_argument("--strict-data", action="store_true", help="fail on unreadable images")
    elif command == "predict":
        add_predict_arguments(parser, "image")
        # One image per forward unless asked: a batch pads its images to one size (as
        # detectron2 does), which moves the detections slightly, and full-size images are large.
        parser.set_defaults(batch_size=1)
        parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
        add_detectron2_arguments(parser)
        parser.add_argument(
            "--output-dir",
            default="predictions",
            help="folder for the annotated PNGs and detections.json (per image: its PNG, and per "
            "detection: label name, COCO category id, score, box x1 y1 x2 y2 in pixels, mask as "
            "COCO RLE)",
        )
        parser.add_argument(
            "--score-thresh", type=float, default=0.5, help="keep detections scoring at least this"
        )
        parser.add_argument(
            "--mask-thresh", type=float, default=0.5, help="mask probability threshold"
        )
    elif command == "export":
        from mvitv2.export import add_export_arguments

        add_export_arguments(parser)
        add_detectron2_arguments(parser)


def run(command: str, args: argparse.Namespace) -> int:
    """Entry point of ``mvitv2 <command> detect``; returns the exit status."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    export = export_handler("detect", _export_reader)
    handlers = {"train": _train, "eval": _eval, "predict": _predict, "export": export}
    return dispatch("detect", command, args, handlers)


def _train(args: argparse.Namespace) -> int:
    cfg = train_config(args, "coco_maskrcnn_mvitv2_t" if args.data else DIGIT_SCENES)
    t0 = time.perf_counter()
    task = DetectionTask(cfg, args.data)
    trainer = Trainer(task, cfg, resume=args.resume)
    task.results_path = trainer.run_dir / "coco_results_val.json"
    metrics = fit(trainer)
    if metrics is None:
        return 3
    if trainer.dist.is_main:
        wall = time.perf_counter() - t0
        assert task.train_ds is not None
        print(report_data("train data", task.train_ds))
        if task.val_ds is not None:
            print(report_data("val data", task.val_ds))
            print(
                f"val ({metrics.get('images', 0)} images evaluated, "
                f"{metrics.get('skipped_images', 0)} skipped): {format_ap(metrics)}"
            )
            print(f"detections: {task.results_path}")
        print(f"wall time {wall:.1f} s  checkpoint {trainer.run_dir / 'last.pt'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    # --json: the metrics line alone on stdout; the reports and pycocotools' output on stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        metrics = _evaluate(args)
    if metrics is not None:
        path = eval_metrics_path(args.checkpoint, args.metrics, "--metrics")
        save_eval_metrics(metrics, path, args.json, "--metrics")
    return 0


def _evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """``mvitv2 eval detect`` without saving the metrics: writes the COCO results and prints
    the reports; returns the metrics on the main process (None on the others)."""

    det = detector_from_args(args)
    dist = init_distributed()
    if args.images or args.annotations:
        if not (args.images and args.annotations):
            raise UserValueError("--images and --annotations go together")
        images, ann = Path(args.images), Path(args.annotations)
    else:
        if det.detectron2 and not args.data:
            raise UserValueError(
                f"{args.checkpoint} is a detectron2 detector, which records no data: pass --data "
                "(a COCO folder) or --images and --annotations"
            )
        dc = DetectionDataConfig.from_dict(det.meta.get("data") or {})
        root = args.data or det.meta.get("data_root", DIGIT_SCENES)
        splits = resolve_splits(root, dc)
        if "val" not in splits:
            raise UserFileNotFoundError(
                f"no validation split under {root}: expected annotations/instances_val2017.json "
                "(or instances_val.json), or pass --images and --annotations"
            )
        images, ann = splits["val"]
    with_masks = not args.no_masks and has_mask_branch(det.model())
    # detectron2 detectors get uint8 images, resized by PIL inside the model as in detectron2.
    ds = build_eval_dataset(images, ann, masks=with_masks, uint8=det.detectron2)
    warn_category_mismatch(ds, det, ann)
    loader = eval_loader(ds, args, dist, collate)
    t0 = time.perf_counter()
    metrics, results = evaluate_detector(
        det.model().to(dist.device),
        loader,
        dist,
        ds,
        with_masks=with_masks,
        label_to_cat_id=det.label_to_cat_id,
    )
    if dist.is_main:
        out = (
            Path(args.output)
            if args.output
            else Path(args.checkpoint).with_name("coco_results.json")
        )
        out.write_text(json.dumps(results))
        print(report_data("data", ds))
        print(
            f"{args.checkpoint}: {format_ap(metrics)} on {metrics['images']} images of "
            f"{images} ({metrics['skipped_images']} skipped)"
            f"  [{time.perf_counter() - t0:.1f} s]"
        )
        print(f"detections ({len(results)}) written to {out}")
        return metrics
    return None


def warn_category_mismatch(ds: CocoDetection, det: DetectorFile, ann: Path) -> None:
    """Warn (stderr) when the evaluated JSON's categories are not the detector's.

    A training run's labels follow the JSON's sorted categories: the names must agree position
    by position. A detectron2 COCO detector's labels are COCO category ids: every category of
    the JSON must be one of them, with the same name.
    """
    if det.label_to_cat_id is None:
        if [str(c) for c in ds.class_names] != det.info.class_names:
            print(
                f"warning: {ann} categories {ds.class_names} differ from the checkpoint's "
                f"{det.info.class_names}; labels are mapped by position",
                file=sys.stderr,
            )
        return
    ours = {cat: det.info.class_names[label - 1] for label, cat in det.label_to_cat_id.items()}
    theirs = {cat: ds.class_names[label - 1] for label, cat in ds.label_to_cat_id.items()}
    differ = [f"{c} {n!r}" for c, n in theirs.items() if ours.get(c) != n]
    if differ:
        print(
            f"warning: {ann} categories {', '.join(differ)} are not the detector's COCO "
            "categories (id and name); the detector predicts COCO category ids",
            file=sys.stderr,
        )


def detection_records(
    det: dict[str, Any], label_to_cat_id: dict[int, int] | None
) -> list[dict[str, Any]]:
    """One image's :class:`~mvitv2.predict.Predictor` detections as JSON-ready dicts: ``label``
    (class name), ``category_id`` (COCO id; None when the detector has none), ``score``,
    ``box`` ``[x1, y1, x2, y2]`` (pixels) and ``segmentation`` (compressed COCO RLE) with masks."""
    from pycocotools import mask as mask_util

    rles: list[Any] = [None] * len(det["boxes"])
    if "masks" in det and len(det["masks"]):
        arr = np.asfortranarray(det["masks"].permute(1, 2, 0).numpy().astype(np.uint8))
        rles = [{"size": r["size"], "counts": r["counts"].decode()} for r in mask_util.encode(arr)]
    records = []
    columns = (det["label_names"], det["labels"].tolist(), det["scores"].tolist())
    for name, label, score, box, rle in zip(*columns, det["boxes"].tolist(), rles, strict=True):
        cat = label_to_cat_id.get(label + 1) if label_to_cat_id else None
        record = {"label": name, "category_id": cat, "score": score, "box": box}
        if rle is not None:
            record["segmentation"] = rle
        records.append(record)
    return records


def describe_detections(det: dict[str, Any], score_thresh: float) -> str:
    """What :func:`_predict` prints for one image: ``label score`` of each detection, or that
    there is none, with the threshold in force and the best score the detector gave."""
    if len(det["scores"]):
        return ", ".join(f"{n} {s:.2f}" for n, s in zip(det["label_names"], det["scores"].tolist()))
    if det["best_score"] is None:
        return "no detection (the detector found no object at all)"
    return (
        f"no detection above score {score_thresh:.2f} (best {det['best_score']:.2f}); lower it "
        "with --score-thresh"
    )


def drawing_names(files: Sequence[str | Path]) -> list[str]:
    """The file name of each input's drawing in the output folder: ``<stem>_pred.png``, and for
    an input whose stem an earlier one had (``a/x.jpg``, ``b/x.jpg``, ``x.png``)
    ``<stem>_pred_<n>.png``, n counting from 2 in input order, so that no drawing overwrites
    another (``detections.json`` names each input's drawing)."""
    seen: Counter[str] = Counter()
    names = []
    for f in files:
        stem = Path(f).stem
        seen[stem] += 1
        names.append(f"{stem}_pred.png" if seen[stem] == 1 else f"{stem}_pred_{seen[stem]}.png")
    return names


@torch.no_grad()
def _predict(args: argparse.Namespace) -> int:
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from mvitv2.data.image import IMG_EXTENSIONS
    from mvitv2.predict import Predictor, load_image

    device = resolve_device(args.device)  # the user's mistakes first, before the model loads
    files = expand_inputs(args.files, IMG_EXTENSIONS)
    out_dir = Path(args.output_dir)
    check_writable_folder(out_dir, f"--output-dir {out_dir}")
    detector = detector_from_args(args)
    predictor = Predictor.from_info(
        detector.info,
        detector.model(),
        device=device,
        batch_size=args.batch_size,
        score_thresh=args.score_thresh,
        mask_thresh=args.mask_thresh,
    )
    # label -> COCO category id: detectron2's COCO ids, or a training run's dataset ids (meta)
    run_ids = detector.meta.get("label_to_cat_id") or {}
    cat_ids = detector.label_to_cat_id or {int(k): int(v) for k, v in run_ids.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    saved = []
    results = predict_batches(predictor, files, args.batch_size)  # in the order of files
    for (f, det), name in zip(results, drawing_names(files), strict=True):
        if isinstance(det, Exception):
            print(f"{f}: error: {error_reason(f, det)}", file=sys.stderr)
            status = 1
            continue
        image = load_image(f, upright=True)  # uint8 (3, H, W), for drawing
        h, w = image.shape[1:]
        target = out_dir / name
        record = {"file": str(f), "height": h, "width": w, "drawing": str(target)}
        record["detections"] = detection_records(det, cat_ids)
        saved.append(record)
        drawn = image
        if "masks" in det and len(det["masks"]):
            drawn = draw_segmentation_masks(drawn, det["masks"], alpha=0.5)
        if len(det["boxes"]):
            captions = [f"{n} {s:.2f}" for n, s in zip(det["label_names"], det["scores"].tolist())]
            drawn = draw_bounding_boxes(
                drawn, det["boxes"], labels=captions, colors="yellow", width=1
            )
        write_png(drawn, str(target))
        if args.json:
            print(json.dumps(record))
        else:
            print(f"{f}: {describe_detections(det, args.score_thresh)} -> {target}")
    (out_dir / "detections.json").write_text(json.dumps(saved))
    print(
        f"detections written to {out_dir / 'detections.json'}",
        file=sys.stderr if args.json else sys.stdout,
    )
    return status
