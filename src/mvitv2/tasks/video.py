"""Video classification: ``mvitv2 train|eval|predict|export video``.

A thin layer over the engine (:class:`~mvitv2.engine.trainer.Trainer`) and the video data layer
(:mod:`mvitv2.data.video`):

* ``mvitv2 train video [--data ROOT --train-list F --val-list F] [--model NAME] [--config RECIPE]
  [--init CKPT] [key=value ...]``: with no ``--data`` the embedded moving digits (real MP4 files,
  label = digit x direction of motion) and the ``moving_digits`` recipe; with ``--data`` a
  Kinetics-style video root and list files and (by default) the ``k400_small`` recipe.
  ``--init`` / ``data.init_from`` initialises the model from any checkpoint
  :func:`mvitv2.load_checkpoint` reads (official image checkpoints are inflated to video,
  SlowFast ``.pyth``, torchvision, timm, a previous run). Works under ``torchrun``.
* ``mvitv2 eval video --checkpoint CKPT``: multi-view testing, K uniform temporal clips x 1 or 3
  spatial crops per video, softmax averaged over the views, top-1 / top-5 per video.
* ``mvitv2 predict video FILES --checkpoint CKPT``: top-k classes per file
  (:class:`mvitv2.Predictor`).
* ``mvitv2 export video --checkpoint CKPT``: ONNX / ``torch.export`` (:mod:`mvitv2.export`).

The recipe's ``data`` section is a :class:`VideoDataConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mvitv2.data.common import config_from_dict, config_to_dict
from mvitv2.data.image import randaug_checks
from mvitv2.data.video import (
    KINETICS_MEAN,
    KINETICS_STD,
    SAMPLINGS,
    SHORT_SIDE_SAMPLINGS,
    TEST_PIPELINES,
    VIDEO_EXTENSIONS,
    VideoClipDataset,
    VideoTransform,
    read_class_names,
    split_class_names,
    video_collate,
)
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
)
from mvitv2.engine.cli import train_config as engine_train_config
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo, init_distributed
from mvitv2.engine.mixing import MixCriterion
from mvitv2.engine.trainer import Trainer
from mvitv2.errors import UserFileNotFoundError, UserValueError
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
    from mvitv2.weights.registry import Preprocessing

#: recipes shipped for this task (under ``recipes/``).
RECIPE_NAMES = ("moving_digits", "k400_small", "k400_base", "k400_large", "ssv2_small", "ssv2_base")
#: The data options of each test protocol a released checkpoint names
#: (``Preprocessing.video_protocol``, ``mvitv2 eval video --protocol``).
PROTOCOLS: dict[str, dict[str, str]] = {
    "slowfast": {"sampling": "clip", "test_pipeline": "slowfast"},
    "torchvision": {"sampling": "resampled", "test_pipeline": "torchvision"},
}
_LIST_NAMES = {"train": ("train.csv", "train.txt"), "val": ("val.csv", "val.txt", "test.csv")}


@dataclass(frozen=True)
class VideoDataConfig:
    """The ``data`` section of a video recipe: sampling, augmentation, testing, initialisation.

    Args:
        num_frames: frames per clip T (the model's ``num_frames`` follows it).
        sampling_rate: step between the frames of a dense clip (Kinetics: 4 for 16x4, 3 for 32x3).
        sampling: ``clip`` (PySlowFast's dense clip: random in training, K uniform clips in
            testing), ``resampled`` (torchvision's: T consecutive frames of the video resampled
            to ``target_fps / sampling_rate``) or ``segment`` (SSv2: one frame from each of T
            equal segments); see :class:`mvitv2.data.video.ClipSampler`.
        crop_size: network input side (the model's ``img_size`` follows it; multiple of 4 and of
            the model's total stride for the rel-pos tables to match).
        train_crop: ``rrc`` (random resized crop, Kinetics recipe) or ``short_side`` (random short
            side in ``short_side_range`` then a random crop, SlowFast's SSv2 recipe).
        rrc_scale, rrc_ratio: area and aspect ranges of the random resized crop.
        short_side_range: inclusive range of the random short side for ``short_side``.
        short_side_sampling: ``uniform`` or ``inverse_uniform`` (smaller sides more often:
            SlowFast's ``DATA.INV_UNIFORM_SAMPLE``, its SSv2 recipe) draw of that side.
        hflip: random horizontal flips (False for SSv2: left/right is in the label).
        randaug_n, randaug_m: RandAugment ops and magnitude (``randaug_n=0``: off); the
            magnitude is a bin of torchvision's 0..30 scale, 3x timm's ``m`` (SlowFast's ``m7``: 21).
        randaug_mstd: std of the per-op magnitude noise, in the same bins (SlowFast's
            ``mstd0.5``: 1.5).
        randaug_prob: probability that each op is applied (SlowFast's timm RandAugment: 0.5).
        reprob: random erasing probability (one box for all frames).
        num_repeats: repeated augmentation: augmented copies of each decoded clip per step.
        test_clips: uniform temporal clips K per video at test time (segment sampling: 1).
        test_crops: spatial crops per clip at test time: 1 (centre) or 3 (left/centre/right).
        test_short_side: short side before the test crop (None: ``crop_size * 256 / 224``).
        test_pipeline: ``slowfast`` (resize the normalised frames, SlowFast's crop offsets) or
            ``torchvision`` (resize the uint8 frames, ``center_crop``); see
            :class:`mvitv2.data.video.VideoTransform`.
        mean, std: normalisation of [0, 1] RGB.
        pad: ``last`` or ``loop``: how videos shorter than a clip are padded.
        target_fps: frame rate ``sampling_rate`` counts frames at, so that a clip spans
            ``num_frames * sampling_rate / target_fps`` seconds whatever the file's rate
            (SlowFast's Kinetics recipes: 30; see :func:`mvitv2.data.video.clip_indices`). None:
            each file's own rate. Not used by segment sampling (must be None there).
        train_list, val_list: list files (``path label`` lines or ``path,label`` CSV); relative
            paths resolve against ``video_root``. CLI ``--train-list`` / ``--val-list``.
        video_root: folder the list paths are relative to (CLI ``--data``).
        classes_file: class names, one per line (default: the labels as strings).
        num_classes: classifier outputs (default: 1 + the largest label in the lists).
        init_from: checkpoint to initialise the model from (any format
            :func:`mvitv2.load_checkpoint` reads; image checkpoints are inflated); the classifier is
            re-initialised when its class count differs.
        init_inflation: ``centre`` (paper: centre frame, zeros elsewhere) or ``repeat``
            (SlowFast: copied over time / T) for image checkpoints.
        digits_*: generation options of the embedded moving digits
            (:func:`mvitv2.data.moving_digits.make_moving_digits`): clips per class and split,
            frames and side of each video, digit height range, speed range (pixels per frame),
            directions and seed.
    """

    num_frames: int = 16
    sampling_rate: int = 4
    sampling: str = "clip"
    crop_size: int = 224
    train_crop: str = "rrc"
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    short_side_range: tuple[int, int] = (256, 320)
    short_side_sampling: str = "uniform"
    hflip: bool = True
    randaug_n: int = 4
    randaug_m: int = 21
    randaug_mstd: float = 1.5
    randaug_prob: float = 0.5
    reprob: float = 0.25
    num_repeats: int = 2
    test_clips: int = 5
    test_crops: int = 1
    test_short_side: int | None = None
    test_pipeline: str = "slowfast"
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD
    pad: str = "last"
    target_fps: float | None = None
    train_list: str | None = None
    val_list: str | None = None
    video_root: str | None = None
    classes_file: str | None = None
    num_classes: int | None = None
    init_from: str | None = None
    init_inflation: str = "centre"
    digits_train_per_class: int = 40
    digits_val_per_class: int = 10
    digits_frames: int = 8
    digits_size: int = 32
    digits_digit_size: tuple[int, int] = (14, 18)
    digits_speed: tuple[int, int] = (1, 2)
    digits_directions: tuple[str, ...] = ("up", "down", "left", "right")
    digits_seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VideoDataConfig:
        """From a recipe's ``data`` mapping.

        Raises:
            UserValueError: an unknown key or a value out of range or of the wrong type.
        """
        try:
            out = config_from_dict(cls, values, "video data")
        except KeyError as e:
            raise UserValueError(e.args[0]) from None
        problems = out._problems()  # the types were checked by config_from_dict
        if problems:
            raise UserValueError(f"invalid video data config: {'; '.join(problems)}")
        return out

    def _problems(self) -> list[str]:
        """What is wrong with these options (empty when nothing)."""
        fps = self.target_fps
        checks = [
            (self.sampling in SAMPLINGS, f"sampling must be clip, resampled or segment, got {self.sampling!r}"),
            (self.test_pipeline in TEST_PIPELINES, f"test_pipeline must be slowfast or torchvision, got {self.test_pipeline!r}"),
            (self.train_crop in ("rrc", "short_side"), f"train_crop must be rrc or short_side, got {self.train_crop!r}"),
            (self.short_side_sampling in SHORT_SIDE_SAMPLINGS, f"short_side_sampling must be uniform or inverse_uniform, got {self.short_side_sampling!r}"),
            (self.test_crops in (1, 3), f"test_crops must be 1 or 3, got {self.test_crops}"),
            (self.test_clips >= 1, f"test_clips must be >= 1, got {self.test_clips}"),
            (self.num_repeats >= 1, f"num_repeats must be >= 1, got {self.num_repeats}"),
            *randaug_checks(self.randaug_n, self.randaug_m, self.randaug_mstd, self.randaug_prob),
            (self.num_frames >= 1, f"num_frames must be >= 1, got {self.num_frames}"),
            (self.sampling_rate >= 1, f"sampling_rate must be >= 1, got {self.sampling_rate}"),
            (self.crop_size % 4 == 0, f"crop_size must be a multiple of 4, got {self.crop_size}"),
            (self.pad in ("last", "loop"), f"pad must be last or loop, got {self.pad!r}"),
            (fps is None or fps > 0, f"target_fps must be > 0 or null, got {fps}"),
            (fps is None or self.sampling != "segment", "target_fps does not apply to segment sampling; set it to null"),
            (self.init_inflation in ("centre", "center", "repeat"), f"init_inflation must be centre or repeat, got {self.init_inflation!r}"),
        ]  # fmt: skip
        return [msg for ok, msg in checks if not ok]

    def to_dict(self) -> dict[str, Any]:
        """Plain types (lists for tuples): YAML and checkpoint safe."""
        return config_to_dict(self)

    @property
    def views(self) -> int:
        """Test views per video (clips x crops)."""
        return self.test_clips * self.test_crops

    def transform(self, train: bool) -> VideoTransform:
        """The clip transform of this config (training augmentation or test preprocessing)."""
        return VideoTransform(
            train,
            crop_size=self.crop_size,
            crop=self.train_crop,
            rrc_scale=self.rrc_scale,
            rrc_ratio=self.rrc_ratio,
            short_side_range=self.short_side_range,
            short_side_sampling=self.short_side_sampling,
            hflip=self.hflip,
            randaug=(
                (self.randaug_n, self.randaug_m, self.randaug_mstd, self.randaug_prob)
                if self.randaug_n
                else None
            ),
            erase_prob=self.reprob,
            mean=self.mean,
            std=self.std,
            test_short_side=self.test_short_side,
            test_pipeline=self.test_pipeline,
        )

    def dataset(
        self,
        list_file: str | Path,
        video_root: str | Path | None,
        train: bool,
        classes: list[str] | None = None,
    ) -> VideoClipDataset:
        """A :class:`VideoClipDataset` with this config's sampling and transform (an unreadable
        video is handled by the loader: ``build_loader(strict=...)``).

        Args:
            list_file: the list file.
            video_root: folder relative list paths resolve against (None: the list's folder).
            train: random clips with augmentation (and repeats) or the test views.
            classes: the label order of a split that names its classes (class folders, an
                annotation CSV; default: the sorted names).
        """
        return VideoClipDataset(
            list_file,
            video_root,
            train=train,
            num_frames=self.num_frames,
            sampling_rate=self.sampling_rate,
            sampling=self.sampling,
            num_clips=self.test_clips,
            num_crops=self.test_crops,
            transform=self.transform(train),
            num_repeats=self.num_repeats,
            pad=self.pad,
            target_fps=self.target_fps,
            classes=classes,
        )

    def preprocessing(self) -> dict[str, Any]:
        """Evaluation preprocessing stored with checkpoints (keys of :mod:`mvitv2.predict`)."""
        short = self.test_short_side or round(self.crop_size * 256 / 224)
        return {
            "input_size": [self.crop_size, self.crop_size],
            "resize_size": short,
            "interpolation": "bilinear",
            "mean": list(self.mean),
            "std": list(self.std),
            "num_frames": self.num_frames,
            "sampling_rate": self.sampling_rate,
            "sampling": self.sampling,
            "num_clips": self.test_clips,
            "num_crops": self.test_crops,
            "target_fps": self.target_fps,
            "pad": self.pad,
            "test_pipeline": self.test_pipeline,
        }


def moving_digits_lists(dc: VideoDataConfig) -> tuple[Path, Path, Path]:
    """Generate (once, cached) the embedded moving digits; returns (train list, val list, classes)."""
    from mvitv2.data.common import default_data_dir
    from mvitv2.data.moving_digits import make_moving_digits

    params = {
        "num_train_per_class": dc.digits_train_per_class,
        "num_val_per_class": dc.digits_val_per_class,
        "directions": list(dc.digits_directions),
        "num_frames": dc.digits_frames,
        "size": dc.digits_size,
        "digit_size": list(dc.digits_digit_size),
        "speed": list(dc.digits_speed),
        "seed": dc.digits_seed,
    }
    # One folder per parameter set: runs with other options never rebuild (and delete) the
    # videos another run is reading.
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    md = make_moving_digits(default_data_dir(f"moving_digits-{tag}"), **params)
    return md.train_list, md.val_list, md.classes_file


def find_list(root: Path, split: str) -> Path:
    """The samples of a split in a video root: its list file ``ROOT/train.csv`` /
    ``train.txt`` (or ``val.*``), else the official Kinetics annotations
    ``ROOT/annotations/train.csv`` (videos in ``ROOT/train/``), else its class folders
    ``ROOT/train/<class>/<video>`` (torchvision's Kinetics layout); see
    :func:`mvitv2.data.video.read_video_samples`."""
    for name in (*_LIST_NAMES[split], f"annotations/{split}.csv"):
        if (root / name).is_file():
            return root / name
    if (root / split).is_dir():
        return root / split
    raise UserFileNotFoundError(
        f"no {split} list in {root} (looked for {', '.join(_LIST_NAMES[split])}, "
        f"annotations/{split}.csv and class folders {split}/<class>/*.mp4); pass --{split}-list FILE"
    )


def named_labels(found: list[str], names: list[str] | None) -> list[str] | None:
    """The name a split uses for each of the weights' labels, when every class the split names
    (``found``: class folders, annotation labels) is one of the weights' classes (``names``),
    as it is (``air drumming``) or as torchvision's Kinetics download spells its folders
    (``air_drumming``: spaces to underscores, ``'``, ``(``, ``)`` dropped). None: they are not
    (the split's sorted names are then the labels)."""
    if not found or names is None:
        return None
    for spelled in (names, [_torchvision_folder(n) for n in names]):
        if set(found) <= set(spelled):
            return spelled
    return None


def _torchvision_folder(name: str) -> str:
    """torchvision's ``Kinetics`` folder name of a class (its ``_make_ds_structure``)."""
    return name.replace(" ", "_").replace("'", "").replace("(", "").replace(")", "")


def locate_file(given: str | Path, root: str | Path | None, flag: str) -> Path:
    """A list or class file (or a split's class folder) named on the command line: as given
    (absolute, or relative to the current folder), else relative to the video root ``root``.

    Args:
        given: the path the user passed.
        root: the video root (``--data``), or None.
        flag: the option that named it, for the error (``--train-list``).

    Raises:
        UserFileNotFoundError: found in neither place; the message names both.
    """
    path = Path(given)
    if path.exists():
        return path
    tried = [str(path.resolve())]
    if root is not None and not path.is_absolute():
        in_root = Path(root) / path
        if in_root.exists():
            return in_root
        tried.append(str(in_root.resolve()))
    raise UserFileNotFoundError(f"{flag} {given}: no such file (looked at {' and '.join(tried)})")


class VideoClassification(SpecTask):
    """The video classification task for :class:`~mvitv2.engine.trainer.Trainer`.

    Args:
        cfg: the run config; ``cfg.data`` holds :class:`VideoDataConfig` options. When
            ``data.train_list`` is unset and ``data.video_root`` is unset, the embedded moving
            digits are generated and used.
    """

    # Options added to the data config since runs were first saved: as those runs computed.
    added_data_options = {
        "randaug_mstd": 0.0,
        "randaug_prob": 1.0,
        "short_side_sampling": "uniform",
    }

    primary_metric = "top1"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.data_cfg = VideoDataConfig.from_dict(cfg.data)
        self.classes: list[str] = []
        self.mix: MixCriterion | None = None
        self.train_ds: VideoClipDataset | None = None
        self.val_ds: VideoClipDataset | None = None
        self.init_report: Any = None

    def resolve_lists(self) -> tuple[Path, Path | None, str | None, Path | None]:
        """(train list, val list or None, video root, classes file or None) of this run."""
        dc = self.data_cfg
        if dc.train_list is None and dc.video_root is None:
            train, val, classes = moving_digits_lists(dc)
            return train, val, None, classes
        root = Path(dc.video_root) if dc.video_root else None
        if dc.train_list:
            train = locate_file(dc.train_list, root, "--train-list")
        else:
            train = find_list(root, "train")  # type: ignore[arg-type]
        if dc.val_list:
            val: Path | None = locate_file(dc.val_list, root, "--val-list")
        else:
            try:
                val = find_list(root or train.parent, "val")
            except FileNotFoundError:
                val = None  # train without validation
        classes = locate_file(dc.classes_file, root, "--classes") if dc.classes_file else None
        return train, val, dc.video_root, classes

    def describe_data(self, ds: VideoClipDataset) -> str:
        """Videos, and the views they give where a test item is one view (clip x crop)."""
        if len(ds) == len(ds.samples):
            return f"{len(ds)} videos"
        return f"{len(ds.samples)} videos ({len(ds)} views)"

    def build_datasets(self) -> tuple[VideoClipDataset, VideoClipDataset | None]:
        train_list, val_list, root, classes_file = self.resolve_lists()
        self.train_ds = self.data_cfg.dataset(train_list, root, train=True)
        self.val_ds = None
        if val_list:  # class folders take the training split's label order
            self.val_ds = self.data_cfg.dataset(
                val_list, root, train=False, classes=self.train_ds.class_names
            )
        self.classes = class_names(self.data_cfg, classes_file, self.train_ds, self.val_ds)
        c = self.cfg
        self.mix = MixCriterion(
            len(self.classes),
            mixup=c.mixup,
            cutmix=c.cutmix,
            prob=c.mix_prob,
            switch_prob=c.switch_prob,
            label_smoothing=c.label_smoothing,
        )
        return self.train_ds, self.val_ds

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg, len(self.classes))
        if self.data_cfg.init_from:
            self.init_report = init_weights(
                model, self.data_cfg.init_from, self.data_cfg.init_inflation
            )
        return model

    def init_weights(self, model: nn.Module, source: str) -> Any:
        """``finetune=``: :func:`init_weights` with the recipe's ``data.init_inflation``."""
        return init_weights(model, source, self.data_cfg.init_inflation)

    def collate_fn(self):
        return video_collate

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        clips, labels, _ = batch
        assert self.mix is not None, "build_datasets() first"
        clips, targets = self.mix(clips, labels)
        return MixCriterion.loss(model(clips), targets), {}

    def evaluate(self, model: nn.Module, loader: DataLoader, dist: DistInfo) -> dict[str, float]:
        """Multi-view metrics of the validation set, with its unreadable / padded / truncated
        video counts as ``videos_<count>`` (the trainer logs them as ``val_videos_<count>``)."""
        assert self.val_ds is not None
        metrics = evaluate_views(model, loader, dist, self.val_ds)
        metrics.update({f"videos_{k}": v for k, v in self.skipped("val").items()})
        return metrics

    def skipped(self, split: str) -> dict[str, int]:
        """Unreadable / padded / truncated video counts of the ``train`` or ``val`` set (this
        process, its DataLoader workers included); zero counts left out."""
        ds = {"train": self.train_ds, "val": self.val_ds}[split]
        return {k: v for k, v in ds.skipped.as_dict().items() if v} if ds is not None else {}

    def checkpoint_meta(self) -> dict[str, Any]:
        return SPEC.checkpoint_meta(
            class_names=self.classes,
            model_name=self.cfg.model,
            model_kwargs=model_kwargs(self.cfg),
            data=self.data_cfg.to_dict(),
        )


def class_names(
    dc: VideoDataConfig,
    classes_file: Path | None,
    train: VideoClipDataset,
    val: VideoClipDataset | None,
) -> list[str]:
    """Class names: the classes file, else the classes the training split names (class folders,
    an annotation CSV), else the labels ``"0".."K-1"`` (K from the lists or
    ``dc.num_classes``). Raises :class:`UserValueError` when a list's label is out of range."""
    largest = max(train.num_classes, val.num_classes if val is not None else 0)
    names = read_class_names(classes_file) if classes_file else train.class_names
    n = dc.num_classes or (len(names) if names else largest)
    if names is not None and len(names) != n:
        where = classes_file or "the training split"
        raise UserValueError(f"{where}: {len(names)} class names, but num_classes={n}")
    if largest > n:
        raise UserValueError(
            f"the list files use label {largest - 1}, but there are only {n} classes "
            f"(num_classes / classes file)"
        )
    return names or [str(i) for i in range(n)]


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``create_model`` overrides of a run: clip size from ``data`` unless ``model_args`` sets it."""
    dc = VideoDataConfig.from_dict(cfg.data)
    return {"img_size": dc.crop_size, "num_frames": dc.num_frames, **cfg.model_args}


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``create_model(cfg.model, ...)`` for a video run (see :func:`model_kwargs`)."""
    from mvitv2 import create_model, get_config

    try:
        temporal = get_config(cfg.model).temporal
    except KeyError as e:  # an unknown model name
        raise UserValueError(e.args[0]) from None
    if not temporal:
        raise UserValueError(
            f"{cfg.model} is an image model; video runs need a video variant "
            f"(mvitv2_small_16x4, mvitv2_base_32x3, mvitv2_large_40x3, mvitv1_base_16x4)"
        )
    refuse_run_options(
        cfg.model_args,
        num_classes=f"its data ({num_classes} classes)",
        pretrained="the pretrained option (pretrained=TAG_OR_FILE)",
    )
    try:  # model_args: unknown options (TypeError) or values the config rejects (ValueError)
        get_config(cfg.model, **model_kwargs(cfg))
    except (TypeError, ValueError) as e:
        raise UserValueError(f"model_args of {cfg.model}: {e}") from None
    return create_model(
        cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **model_kwargs(cfg)
    )


class VideoSpec(ClassificationSpec):
    """Video classification for :mod:`mvitv2.predict` and :mod:`mvitv2.export`: inputs
    ``(3, T, H, W)``; a video is predicted from its ``num_clips x num_crops`` views, averaged."""

    name = "video"
    batched_ndim = 5
    input_name = "videos"

    def legacy_model_kwargs(
        self, model_args: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        # the run sized the model from its clips unless model_args did (see model_kwargs)
        sized = {"img_size": data.get("crop_size"), "num_frames": data.get("num_frames")}
        return {**{k: v for k, v in sized.items() if v is not None}, **model_args}

    def default_preprocessing(
        self, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        from mvitv2.models import get_config

        cfg = get_config(model_name, **model_kwargs)
        known = {f.name for f in dataclasses.fields(VideoDataConfig)}
        video = {k: v for k, v in data.items() if k in known}
        video.setdefault("crop_size", cfg.image_hw[0])  # the model's size unless the data set it
        video.setdefault("num_frames", cfg.num_frames)
        return VideoDataConfig.from_dict(video).preprocessing()

    def released_data(self, pre: Preprocessing) -> dict[str, Any]:
        # clip length, frame stride and rate, crop, short side, views, normalisation, and whose
        # test takes the clips (PySlowFast's or torchvision's, see PROTOCOLS)
        return {
            **PROTOCOLS[pre.video_protocol],
            "num_frames": pre.input_size[1],
            "sampling_rate": pre.sampling_rate,
            "target_fps": pre.target_fps,
            "crop_size": pre.input_size[-1],
            "test_short_side": pre.resize_size,
            "test_clips": pre.clips,
            "test_crops": pre.crops,
            "mean": list(pre.mean),
            "std": list(pre.std),
        }

    def transform(self, preprocessing: dict[str, Any]) -> Any:
        p = preprocessing
        return VideoTransform(
            False,
            crop_size=p["input_size"][0],
            mean=p["mean"],
            std=p["std"],
            test_short_side=p["resize_size"],
            test_pipeline=p.get("test_pipeline", "slowfast"),  # older checkpoints: SlowFast's
        )

    def views(self, item: Any, preprocessing: dict[str, Any], transform: Any) -> Tensor:
        """See :meth:`mvitv2.predict.Predictor.preprocess_video`."""
        from mvitv2.data.video import ClipSampler, VideoReader, read_sampled_frames
        from mvitv2.predict import video_frames

        p = preprocessing
        t = p["num_frames"]
        sampler = ClipSampler(
            p.get("sampling", "clip"),
            t,
            p["sampling_rate"],
            p["num_clips"],
            p.get("pad", "last"),
            p.get("target_fps"),
        )
        clip_ids = range(1 if sampler.sampling == "segment" else sampler.num_clips)

        def indices(n: int, fps: float | None) -> list[list[int]]:
            return [sampler.indices(n, fps, i) for i in clip_ids]

        if isinstance(item, str | os.PathLike):
            # a file that cannot be read raises VideoDecodeError, a BadSample naming it once
            with VideoReader(item) as reader:  # a truncated file: as evaluation samples it
                frames = read_sampled_frames(reader, lambda n, fps: sum(indices(n, fps), []))
            clips = frames.permute(0, 3, 1, 2).split(t)
        else:
            frames = video_frames(item)
            clips = [frames[i] for i in indices(len(frames), None)]
        crops = [None] if p.get("num_crops", 1) == 1 else [0, 1, 2]
        return torch.stack([transform(c, spatial_idx=s) for c in clips for s in crops])

    def example_shape(self, preprocessing: dict[str, Any], h: int, w: int) -> list[int]:
        return [3, preprocessing["num_frames"], h, w]


SPEC = VideoSpec()


def init_weights(model: nn.Module, source: str, inflation: str = "centre") -> Any:
    """Initialise ``model`` from a checkpoint of any supported format (:func:`mvitv2.load_checkpoint`).

    Image checkpoints are inflated to the video model (``inflation``), rel-pos tables resized, and
    a classifier with another class count re-initialised. An mvitv2 training checkpoint
    (``last.pt``/``best.pt`` of a run) is read through its ``model`` weights. Anything else that
    does not fit raises :class:`mvitv2.weights.CheckpointMismatchError` listing it.

    Returns:
        The :class:`mvitv2.weights.LoadReport`.
    Raises:
        UserValueError: the checkpoint cannot be read or does not fit the model.
    """
    from mvitv2.weights import load_checkpoint
    from mvitv2.weights.io import CheckpointError

    # The path itself, not a dict read from it: the loader takes a run's checkpoint through its
    # ``model`` weights and its report and errors then name the file, not "<state dict>".
    try:
        return load_checkpoint(model, source, strict=True, inflation=inflation)
    except CheckpointError as e:
        raise UserValueError(f"init_from {source}: {e}") from None


def read_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file written by the engine, as a dict.

    Raises:
        UserFileNotFoundError: no such file.
        UserValueError: the file cannot be read as a checkpoint.
    """
    from mvitv2.engine.checkpoint import read_training_checkpoint

    try:
        ckpt = read_training_checkpoint(path)
    except FileNotFoundError as e:
        raise UserFileNotFoundError(str(e)) from None
    except RuntimeError as e:  # corrupt or not a checkpoint
        raise UserValueError(str(e)) from None
    if not isinstance(ckpt, dict):
        raise UserValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint")
    return ckpt


@torch.no_grad()
def evaluate_views(
    model: nn.Module, loader: DataLoader, dist: DistInfo, dataset: VideoClipDataset
) -> dict[str, float]:
    """Multi-view accuracy: the softmax of every view of a video is averaged, then scored.

    Args:
        model: a video classifier returning logits.
        loader: yields ``(clips, labels, video_indices)`` (one item per view, see
            :class:`~mvitv2.data.video.VideoClipDataset`), or None for an all-skipped batch.
        dist: combines the shards of all processes.
        dataset: the test dataset (its ``samples`` give the label of every video).

    Returns:
        ``top1``, ``top5`` (%), ``loss`` (cross-entropy of the averaged softmax), ``count``
        (videos scored) and ``views`` (average views per video). Videos with no view (every
        attempt unreadable) are not scored.
    """
    model.eval()
    labels = torch.tensor([s.label for s in dataset.samples])
    num_classes = None
    probs: Tensor | None = None
    counts = torch.zeros(len(labels), dtype=torch.float64)
    for batch in loader:
        if batch is None:
            continue
        clips, _, vids = batch
        p = model(clips.to(dist.device, non_blocking=True)).float().softmax(-1).cpu().double()
        if probs is None:
            num_classes = p.shape[1]
            probs = torch.zeros(len(labels), num_classes, dtype=torch.float64)
        probs.index_add_(0, vids, p)
        counts.index_add_(0, vids, torch.ones(len(vids), dtype=torch.float64))
    # Every rank must join the reductions, even one that saw no batch.
    width = dist.all_gather_object(num_classes)
    num_classes = next((w for w in width if w is not None), 1)
    if probs is None:
        probs = torch.zeros(len(labels), num_classes, dtype=torch.float64)
    probs = dist.all_reduce_sum(probs).cpu()
    counts = dist.all_reduce_sum(counts).cpu()
    seen = counts > 0
    if not seen.any():
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "count": 0, "views": 0.0}
    avg = probs[seen] / counts[seen, None]
    y = labels[seen]
    top = avg.topk(min(5, num_classes), dim=1).indices
    hit = top == y[:, None]
    nll = -avg.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
    n = int(seen.sum())
    return {
        "top1": 100 * hit[:, 0].double().mean().item(),
        "top5": 100 * hit.any(1).double().mean().item(),
        "loss": nll.item(),
        "count": n,
        "views": counts[seen].mean().item(),
    }


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Options of ``mvitv2 <command> video``."""
    data_help = "video root the list paths are relative to (default: embedded moving digits)"
    if command == "train":
        add_train_arguments(
            parser,
            data_help=data_help,
            config_help="recipe YAML or shipped name (default: moving_digits, or k400_small with --data)",
            model_help="video model name (overrides the recipe)",
            overrides_example="epochs=10 data.num_frames=8 init_from=PATH",
        )
        parser.add_argument(
            "--train-list",
            help="training list file, Kinetics annotation CSV or class-folder split (default: "
            "ROOT/train.csv or train.txt, ROOT/annotations/train.csv, ROOT/train/<class>/)",
        )
        parser.add_argument(
            "--val-list",
            help="validation list file, Kinetics annotation CSV or class-folder split (default: "
            "ROOT/val.csv or val.txt, ROOT/annotations/val.csv, ROOT/val/<class>/)",
        )
        parser.add_argument("--classes", help="class names file, one per line")
        parser.add_argument(
            "--init",
            help="initialise from this checkpoint (image: inflated; SlowFast, torchvision, timm, a run)",
        )
    elif command == "eval":
        add_released_arguments(parser, "video", "mvitv2_small_16x4")
        parser.add_argument(
            "--data",
            help="video root (default: the one the checkpoint was trained on; for released "
            "weights, --data or --val-list)",
        )
        parser.add_argument(
            "--val-list",
            help="list file, Kinetics annotation CSV or class-folder split to evaluate (default: "
            "the checkpoint's validation list)",
        )
        parser.add_argument(
            "--clips", type=int, help="temporal clips per video (default: the recipe's test_clips)"
        )
        parser.add_argument(
            "--crops",
            type=int,
            choices=(1, 3),
            help="spatial crops per clip (default: the recipe's test_crops)",
        )
        _add_protocol_argument(parser)
        add_eval_arguments(parser, "videos", batch_size=16, batch_help="views per forward")
    elif command == "predict":
        # a video is several views: --batch-size videos are read at once, their views
        # (clips) go through the model --batch-size at a time
        add_predict_arguments(
            parser, "video", batch_help="videos read at once, and views (clips) per forward"
        )
        add_released_arguments(parser, "video", "mvitv2_small_16x4")
        parser.add_argument("--topk", type=int, default=5, help="classes to print per video")
        parser.add_argument(
            "--clips",
            type=int,
            help="temporal clips averaged per video (default: the recipe's test_clips)",
        )
        _add_protocol_argument(parser)
    elif command == "export":
        from mvitv2.export import add_export_arguments

        add_export_arguments(parser, "video")
        add_released_arguments(parser, "video", "mvitv2_small_16x4", checkpoint=False)


def run(command: str, args: argparse.Namespace) -> int:
    """Entry point of ``mvitv2 <command> video``; returns the exit status."""
    export = export_handler("video", classifier_export_reader("video"))
    handlers = {"train": _train, "eval": _eval, "predict": _predict, "export": export}
    return dispatch("video", command, args, handlers)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run config of ``mvitv2 train video`` from its arguments (recipe, flags, overrides)."""
    uses_data = bool(args.data or args.train_list)
    # ``init_from`` is a task option (data.init_from); accept the short spelling.
    overrides = ["data." + o if o.startswith("init_from=") else o for o in args.overrides]
    files = {  # recorded absolute, as found now: eval and --resume may run from another folder
        "data.train_list": (args.train_list, "--train-list"),
        "data.val_list": (args.val_list, "--val-list"),
        "data.classes_file": (args.classes, "--classes"),
    }
    flags = {
        "data.video_root": args.data and recorded_path(args.data),
        **{k: given and recorded_path(locate_file(given, args.data, flag))
           for k, (given, flag) in files.items()},
        "data.init_from": args.init,
    }  # fmt: skip
    return engine_train_config(
        argparse.Namespace(**{**vars(args), "overrides": overrides}),
        "k400_small" if uses_data else "moving_digits",
        [f"{k}={v}" for k, v in flags.items() if v],
    )


def _train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    t0 = time.perf_counter()
    task = VideoClassification(cfg)
    trainer = Trainer(task, cfg, resume=args.resume)
    if task.init_report is not None:
        trainer.log.info(f"initialised from {task.init_report}")
    metrics = fit(trainer)
    if metrics is None:
        return 3
    if trainer.dist.is_main:
        wall = time.perf_counter() - t0
        dc = task.data_cfg
        bad = {split: task.skipped(split) for split in ("train", "val")}
        print(
            f"val top-1 {metrics.get('top1', float('nan')):.2f}%  top-5 "
            f"{metrics.get('top5', float('nan')):.2f}%  ({dc.test_clips} clip(s) x "
            f"{dc.test_crops} crop(s) per video)  wall time {wall:.1f} s  checkpoint "
            f"{trainer.run_dir / 'last.pt'}"
            + "".join(f"  {split} videos skipped/padded: {b}" for split, b in bad.items() if b)
        )
    return 0


def _add_protocol_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="take and crop the clips as PySlowFast's test or torchvision's reference script "
        "(default: the checkpoint's; released weights: their source's)",
    )


def _protocol_option(args: argparse.Namespace, sampling: str | None) -> dict[str, str]:
    """The data options ``--protocol`` sets (none when not given).

    Raises:
        UserValueError: ``--protocol`` for a checkpoint that samples segments (SSv2).
    """
    if not args.protocol:
        return {}
    if sampling == "segment":
        raise UserValueError(
            f"--protocol chooses how Kinetics-style clips are taken, but {args.checkpoint} "
            "samples one frame per segment (SSv2): leave --protocol out"
        )
    return PROTOCOLS[args.protocol]


def _clips_option(args: argparse.Namespace) -> int | None:
    """``--clips`` of eval / predict, or None when not given.

    Raises:
        UserValueError: a count below 1 (``--clips 0`` is a mistake, not "the recipe's count").
    """
    if args.clips is not None and args.clips < 1:
        raise UserValueError(f"--clips must be >= 1, got {args.clips}")
    return args.clips


def _eval(args: argparse.Namespace) -> int:
    from mvitv2.predict import WrongTaskError, checkpoint_info
    from mvitv2.predict import build_model as build_from_info
    from mvitv2.weights.registry import is_weights_tag

    clips = _clips_option(args)
    released = bool(args.model) or is_weights_tag(args.checkpoint)
    if released:
        name, weights = released_weights(args.checkpoint, args.model, "video")
        if not (args.data or args.val_list):
            raise UserValueError(
                "released weights have no dataset of their own: pass --data (a video root with "
                "val.csv) or --val-list"
            )
        data = SPEC.released_data(weights.preprocessing)
    else:
        ckpt = read_run_checkpoint(args.checkpoint)
        try:
            info = checkpoint_info(ckpt, args.checkpoint, task="video", ema=args.ema)
        except WrongTaskError as e:
            raise UserValueError(
                f"{args.checkpoint} is not a video checkpoint written by `mvitv2 train video`: "
                f"use `mvitv2 eval {e.found}`"
            ) from None
        data = dict(info.meta["data"])
    if clips is not None:
        data["test_clips"] = clips
    if args.crops:
        data["test_crops"] = args.crops
    data.update(_protocol_option(args, data.get("sampling")))
    dc = VideoDataConfig.from_dict(data)
    if args.val_list or args.data:
        root = str(data_folder(args.data)) if args.data else None
        if args.val_list:
            val_list = locate_file(args.val_list, root, "--val-list")
        else:
            val_list = find_list(Path(args.data), "val")
    elif dc.train_list is None and dc.video_root is None:
        _, val_list, _ = moving_digits_lists(dc)
        root = None
    else:
        root = dc.video_root
        if dc.val_list:
            val_list = locate_file(dc.val_list, root, "the run's val_list")
        else:
            val_list = find_list(Path(dc.video_root), "val")
    dist = init_distributed()
    if released:  # class folders named by the weights' classes get those labels
        classes = named_labels(split_class_names(val_list) or [], weights.class_names)
    else:
        classes = info.class_names
    ds = dc.dataset(val_list, root, train=False, classes=classes)
    if released:
        where = f"evaluated on {val_list} (labels up to {ds.num_classes - 1})"
        model = released_classifier(args.checkpoint, name, weights, None, where)
        n_classes = model.cfg.num_classes
    else:
        model = build_from_info(info)
        n_classes = len(info.class_names)
    if ds.num_classes > n_classes:
        raise UserValueError(
            f"{val_list}: label {ds.num_classes - 1} but the model has {n_classes} classes"
        )
    loader = eval_loader(ds, args, dist, video_collate)
    if dist.is_main:
        print(describe_eval(args.checkpoint, len(ds.samples), "videos", val_list), file=sys.stderr)
    t0 = time.perf_counter()
    metrics = evaluate_views(model.to(dist.device), loader, dist, ds)
    skipped = report_skipped(loader, dist, "video")
    bad = {k: v for k, v in ds.skipped.as_dict().items() if v}
    if dist.is_main:
        if not args.json:
            print(
                f"{args.checkpoint}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                f"on {metrics['count']} videos of {val_list}, {dc.test_clips} clip(s) x "
                f"{dc.test_crops} crop(s) = {metrics['views']:g} views per video"
                + (f"  ({skipped} unreadable views skipped)" if skipped else "")
                + (f"  (videos skipped/padded: {bad})" if bad else "")
                + f"  [{time.perf_counter() - t0:.1f} s]"
            )
        path = eval_metrics_path(args.checkpoint, args.output)
        save_eval_metrics({**metrics, **bad, "skipped": skipped}, path, args.json)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mvitv2.predict import Predictor

    clips = _clips_option(args)
    files = expand_inputs(args.files, VIDEO_EXTENSIONS)
    info, model = classifier_checkpoint("video", args.checkpoint, args.model, "predict")
    predictor = Predictor.from_info(
        info,
        model,
        topk=args.topk,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
    )
    if clips is not None:
        predictor.preprocessing["num_clips"] = clips
    predictor.preprocessing.update(_protocol_option(args, predictor.preprocessing.get("sampling")))
    return print_topk(files, predictor, args.batch_size, args.json)
