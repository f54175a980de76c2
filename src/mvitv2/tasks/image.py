"""Image classification: ``mvitv2 train|eval|predict image``.

* ``mvitv2 train image [--data DIR] [--model NAME] [--config RECIPE] [key=value ...]``: with no
  ``--data`` the embedded digits (scikit-learn's real 8x8 scans, upscaled) and the ``digits``
  recipe; with ``--data`` an ImageNet-style folder and (by default) the paper's ``in1k_tiny``
  recipe. ``--resume PATH|auto`` continues a run. Works under ``torchrun``.
* ``mvitv2 eval image --checkpoint CKPT [--data DIR]``: top-1 / top-5 on ``DIR/val`` (default:
  the data the checkpoint was trained on), with the checkpoint's preprocessing. Released weights
  too: ``--checkpoint TAG --data DIR``, or ``--checkpoint FILE --model VARIANT --data DIR`` for a
  file in another project's format (:func:`released_weights_eval`).
* ``mvitv2 predict image FILES... --checkpoint CKPT [--topk 5]``: top-k classes with probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mvitv2.data.image import (
    ImageDataConfig,
    ImageFolder,
    build_transform,
    digits_folder,
)
from mvitv2.engine.checkpoint import read_training_checkpoint
from mvitv2.engine.cli import (
    add_eval_arguments,
    add_predict_arguments,
    add_released_arguments,
    add_train_arguments,
    data_folder,
    describe_eval,
    dispatch,
    eval_loader,
    eval_metrics_path,
    expand_inputs,
    export_handler,
    fit,
    print_topk,
    recorded_path,
    report_skipped,
    resolve_device,
    save_eval_metrics,
    train_config,
)
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo, init_distributed
from mvitv2.engine.metrics import evaluate_classifier
from mvitv2.engine.mixing import MixCriterion
from mvitv2.engine.trainer import Trainer
from mvitv2.errors import UserValueError
from mvitv2.tasks.spec import (
    ClassificationSpec,
    SpecTask,
    classifier_checkpoint,
    classifier_export_reader,
    refuse_run_options,
    released_classifier,
    released_weights,
)

if TYPE_CHECKING:
    from mvitv2.predict import CheckpointInfo
    from mvitv2.weights.registry import Preprocessing

DIGITS = "digits"  # data_root value meaning "the embedded digits"


class ImageClassification(SpecTask):
    """The image classification task for :class:`~mvitv2.engine.trainer.Trainer`.

    Args:
        cfg: the run config; ``cfg.data`` holds :class:`ImageDataConfig` options.
        data_root: an ImageNet-style folder, or None for the embedded digits.
    """

    # Options added to the data config since runs were first saved: as those runs computed.
    added_data_options = {"randaug_prob": 1.0}

    primary_metric = "top1"

    def __init__(self, cfg: TrainConfig, data_root: str | Path | None = None) -> None:
        super().__init__(cfg)
        self.data_cfg = ImageDataConfig.from_dict(cfg.data)
        self.data_root = recorded_path(data_root) if data_root else DIGITS
        self.classes: list[str] = []
        self.mix: MixCriterion | None = None

    def resolve_root(self) -> Path:
        if self.data_root == DIGITS:
            return digits_folder(size=max(32, self.data_cfg.img_size))
        return Path(self.data_root)

    def build_datasets(self) -> tuple[ImageFolder, ImageFolder]:
        root = self.resolve_root()
        train = ImageFolder(root, "train", build_transform(self.data_cfg, train=True))
        val = ImageFolder(root, "val", build_transform(self.data_cfg, train=False), train.classes)
        self.classes = train.classes
        c = self.cfg
        self.mix = MixCriterion(
            len(self.classes),
            mixup=c.mixup,
            cutmix=c.cutmix,
            prob=c.mix_prob,
            switch_prob=c.switch_prob,
            label_smoothing=c.label_smoothing,
        )
        return train, val

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, len(self.classes), self.data_cfg.img_size)

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        assert self.mix is not None, "build_datasets() first"
        images, targets = self.mix(images, labels)
        return MixCriterion.loss(model(images), targets), {}

    def evaluate(self, model: nn.Module, loader: DataLoader, dist: DistInfo) -> dict[str, float]:
        return evaluate_classifier(model, loader, dist)

    def checkpoint_meta(self) -> dict[str, Any]:
        return SPEC.checkpoint_meta(
            class_names=self.classes,
            model_name=self.cfg.model,
            model_kwargs=model_kwargs(self.cfg, self.data_cfg.img_size),
            data=self.data_cfg.to_dict(),
            data_root=self.data_root,
        )


def model_kwargs(cfg: TrainConfig, img_size: int) -> dict[str, Any]:
    """``create_model`` overrides of a run: ``img_size`` unless ``cfg.model_args`` sets it."""
    return {"img_size": img_size, **cfg.model_args}


def build_model(cfg: TrainConfig, num_classes: int, img_size: int) -> nn.Module:
    """``create_model(cfg.model, ...)`` with the recipe's overrides; ``img_size`` unless overridden."""
    from mvitv2 import create_model

    refuse_run_options(
        cfg.model_args,
        num_classes=f"its data ({num_classes} classes)",
        pretrained="the pretrained option (pretrained=TAG_OR_FILE)",
    )
    kwargs = model_kwargs(cfg, img_size)
    return create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)


class ImageSpec(ClassificationSpec):
    """Image classification for :mod:`mvitv2.predict` and :mod:`mvitv2.export`: inputs
    ``(3, H, W)``, resized (short side ``resize_size``) and centre-cropped to ``input_size``."""

    name = "image"
    batched_ndim = 4
    input_name = "images"

    def legacy_model_kwargs(
        self, model_args: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        # the run sized the model from its data unless model_args did
        extra = {"img_size": data["img_size"]} if "img_size" in data else {}
        return {**extra, **model_args}

    def default_preprocessing(
        self, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        from mvitv2.models import get_config

        known = {f.name for f in dataclasses.fields(ImageDataConfig)}
        dc = ImageDataConfig.from_dict({k: v for k, v in data.items() if k in known})
        if "img_size" not in data:
            dc = dataclasses.replace(
                dc, img_size=get_config(model_name, **model_kwargs).image_hw[0]
            )
        return {
            "input_size": [dc.img_size, dc.img_size],
            "resize_size": int(dc.img_size / dc.crop_pct),
            "crop_pct": dc.crop_pct,
            "interpolation": dc.interpolation,
            "mean": list(dc.mean),
            "std": list(dc.std),
        }

    def preprocessing_at(
        self, preprocessing: dict[str, Any], size: Sequence[int]
    ) -> dict[str, Any]:
        out = super().preprocessing_at(preprocessing, size)
        # the short side the eval transform resizes to for that crop (build_transform's)
        return {**out, "resize_size": int(min(out["input_size"]) / out["crop_pct"])}

    def released_data(self, pre: Preprocessing) -> dict[str, Any]:
        return {
            "img_size": pre.input_size[-1],
            "crop_pct": pre.crop_pct,
            "interpolation": pre.interpolation,
            "mean": list(pre.mean),
            "std": list(pre.std),
        }

    def transform(self, preprocessing: dict[str, Any]) -> Any:
        p = preprocessing
        dc = ImageDataConfig(
            img_size=p["input_size"][0],
            crop_pct=p["crop_pct"],
            interpolation=p["interpolation"],
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
        )
        return build_transform(dc, train=False)

    def views(self, item: Any, preprocessing: dict[str, Any], transform: Any) -> Tensor:
        from PIL import Image

        from mvitv2.data.image import load_image as read_file
        from mvitv2.predict import load_image

        # Files and PIL images go through the PIL path of the eval transform, as in eval.
        if isinstance(item, str | os.PathLike):
            item = read_file(item)
        image = item.convert("RGB") if isinstance(item, Image.Image) else load_image(item)
        return transform(image)[None]


SPEC = ImageSpec()


def read_image_checkpoint(
    ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint", ema: bool = False
) -> CheckpointInfo:
    """:func:`mvitv2.predict.checkpoint_info` of an image checkpoint (``ckpt`` read from
    ``path``); one of another task is named as such, with the command that takes it."""
    from mvitv2.predict import WrongTaskError, checkpoint_info

    try:
        return checkpoint_info(ckpt, path, task="image", ema=ema)
    except WrongTaskError as e:
        raise UserValueError(
            f"{path}: a {e.found!r} checkpoint, not an image classification checkpoint written "
            f"by `mvitv2 train image`: use `mvitv2 eval {e.found}`"
        ) from None


def model_from_checkpoint(ckpt: dict[str, Any], ema: bool = False) -> tuple[nn.Module, list[str]]:
    """The trained classifier (eval mode) and its class names from a checkpoint of this task.

    Args:
        ckpt: a dict from :func:`mvitv2.engine.checkpoint.read_training_checkpoint`.
        ema: load the EMA weights (the checkpoint must have them).
    """
    from mvitv2.predict import build_model as build_from_info

    info = read_image_checkpoint(ckpt, ema=ema)
    return build_from_info(info), info.class_names


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of ``mvitv2 <command> image``."""
    if command == "train":
        add_train_arguments(
            parser,
            data_help="ImageNet-style folder (train/<class>/*, val/<class>/*); default: embedded digits",
            config_help="recipe YAML or shipped name (default: digits, or in1k_tiny with --data)",
        )
    elif command == "eval":
        add_released_arguments(parser, "image", "mvitv2_tiny")
        parser.add_argument(
            "--data",
            help="dataset folder (default: the one the checkpoint was trained on; needed for "
            "released weights)",
        )
        add_eval_arguments(parser, "images", batch_size=64)
    elif command == "predict":
        add_predict_arguments(parser, "image")
        add_released_arguments(parser, "image", "mvitv2_tiny")
        parser.add_argument("--topk", type=int, default=5, help="classes to print per image")
        parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    elif command == "export":
        from mvitv2.export import add_export_arguments

        add_export_arguments(parser, "image")
        add_released_arguments(parser, "image", "mvitv2_tiny", checkpoint=False)


def run(command: str, args: argparse.Namespace) -> int:
    """Entry point of ``mvitv2 <command> image``; returns the exit status."""
    handlers = {
        "train": _train,
        "eval": _eval,
        "predict": _predict,
        "export": export_handler("image", classifier_export_reader("image")),
    }
    return dispatch("image", command, args, handlers)


def _train(args: argparse.Namespace) -> int:
    cfg = train_config(args, "in1k_tiny" if args.data else "digits")
    t0 = time.perf_counter()
    trainer = Trainer(ImageClassification(cfg, args.data), cfg, resume=args.resume)
    metrics = fit(trainer)
    if metrics is None:
        return 3
    if trainer.dist.is_main:
        wall = time.perf_counter() - t0
        print(
            f"val top-1 {metrics.get('top1', float('nan')):.2f}%  top-5 "
            f"{metrics.get('top5', float('nan')):.2f}%  wall time {wall:.1f} s  "
            f"checkpoint {trainer.run_dir / 'last.pt'}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mvitv2.predict import build_model as build_from_info
    from mvitv2.weights.registry import is_weights_tag

    if args.model or is_weights_tag(args.checkpoint):
        model, classes, dc, root = released_weights_eval(args.checkpoint, args.model, args.data)
    else:
        info = read_image_checkpoint(
            read_training_checkpoint(args.checkpoint), args.checkpoint, args.ema
        )
        model, classes, meta = build_from_info(info), info.class_names, info.meta
        dc = ImageDataConfig.from_dict(meta["data"])
        root = data_folder(args.data) if args.data else meta.get("data_root", DIGITS)
        root = digits_folder(size=max(32, dc.img_size)) if root == DIGITS else Path(root)
    metrics_path = eval_metrics_path(args.checkpoint, args.output)  # its mistakes first
    dist = init_distributed()
    val = ImageFolder(root, "val", build_transform(dc, train=False), classes)
    loader = eval_loader(val, args, dist)
    if dist.is_main:
        print(describe_eval(args.checkpoint, len(val), "images", root / "val"), file=sys.stderr)
    t0 = time.perf_counter()
    metrics = evaluate_classifier(model.to(dist.device), loader, dist)
    skipped = report_skipped(loader, dist, "image")
    if metrics["count"] == 0:  # the same on every process: the counts are summed over all
        # evaluate_classifier's 0 % of nothing would read as a measured accuracy
        raise UserValueError(
            f"none of the {skipped} images of {root / 'val'} could be read (each is named "
            "above); there is no accuracy to report"
        )
    if dist.is_main:
        if not args.json:
            print(
                f"{args.checkpoint}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                f"loss {metrics['loss']:.4f}  on {metrics['count']} images of {root / 'val'}"
                + (f" ({skipped} unreadable skipped)" if skipped else "")
                + f"  [{time.perf_counter() - t0:.1f} s]"
            )
        result = {**metrics, "skipped": skipped}
        save_eval_metrics(result, metrics_path, args.json)
    return 0


def released_weights_eval(
    checkpoint: str, model_name: str | None, data: str | None
) -> tuple[nn.Module, list[str], ImageDataConfig, Path]:
    """The classifier, class names, preprocessing and dataset folder to evaluate released
    weights with (:func:`mvitv2.tasks.spec.released_classifier`). Each ``val/`` class folder
    gets the weights' label of its name (:func:`label_order`); folders named otherwise are the
    labels in sorted order, and the weights' classifier must have as many."""
    from mvitv2.data.image import find_classes

    name, w = released_weights(checkpoint, model_name, "image")
    if not data:
        raise UserValueError(
            "released weights have no dataset of their own: pass --data, an ImageNet-style "
            "folder with val/<class>/*.jpg"
        )
    root = data_folder(data)
    found = find_classes(root / "val")
    classes = label_order(found, w.num_classes, w.classes)
    n = None if classes is not None else len(found)
    where = f"evaluated on {root / 'val'} ({len(found)} class folders)"
    model = released_classifier(checkpoint, name, w, n, where)
    dc = ImageDataConfig.from_dict(SPEC.released_data(w.preprocessing))
    return model, classes or found, dc, root


def label_order(folders: Sequence[str], num_classes: int, dataset: str) -> list[str] | None:
    """The class folder name of each of the weights' ``num_classes`` labels (unused labels get
    a name no folder has), when the folder names say the labels: ImageNet WordNet ids
    (``n01440764``) for ImageNet-1k weights, any subset of them; or the label numbers
    themselves (``0`` .. ``999``, as ImageNet-V2 names its folders, which sorted as text would
    put ``10`` before ``2``). None: the names say neither.

    Args:
        folders: the class folder names.
        num_classes: the weights' classifier outputs.
        dataset: the weights' ``classes`` (``imagenet-1k``, ...).
    """
    from mvitv2.weights.classes import imagenet_wnids

    if dataset == "imagenet-1k" and set(folders) <= set(imagenet_wnids()):
        return imagenet_wnids()
    if all(f.isascii() and f.isdigit() for f in folders):
        labels = {int(f): f for f in folders}
        if len(labels) == len(folders) and max(labels) < num_classes:
            return [labels.get(i, f"<label {i}: no folder>") for i in range(num_classes)]
    return None


@torch.no_grad()
def _predict(args: argparse.Namespace) -> int:
    from mvitv2.data.image import IMG_EXTENSIONS
    from mvitv2.predict import Predictor

    files = expand_inputs(args.files, IMG_EXTENSIONS)
    info, model = classifier_checkpoint(
        "image", args.checkpoint, args.model, "predict", ema=args.ema
    )
    predictor = Predictor.from_info(
        info,
        model,
        topk=args.topk,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
    )
    return print_topk(files, predictor, args.batch_size, args.json)
