"""Inference for all three tasks from a training checkpoint: one path for Python, CLI and export.

``Predictor.from_checkpoint(path)`` reads a checkpoint written by the engine, rebuilds the model
of the task the checkpoint names, and applies the evaluation preprocessing stored with it::

    predictor = mvitv2.Predictor.from_checkpoint("runs/digits/best.pt", topk=3)
    predictor("cat.jpg")                 # [("cat", 0.91), ("dog", 0.05), ...]
    predictor(["a.jpg", pil_image, array])  # one top-k list per input

:func:`read_checkpoint` and :func:`build_model` are the adapter between the engine's checkpoint
dict and a ready model; :mod:`mvitv2.export` uses them too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mvitv2.errors import UserCheckpointError, UserValueError

TASKS = ("image", "video", "detect")


class CheckpointError(UserCheckpointError):
    """A checkpoint that cannot be used: missing, unreadable, of another task, incomplete."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What inference and export need from a training checkpoint.

    Args:
        path: the checkpoint file.
        task: ``image``, ``video`` or ``detect``.
        model_name: registered model (or detector) name.
        model_kwargs: keyword arguments of ``create_model`` / ``create_detector`` besides
            ``num_classes`` (architecture overrides such as ``depths`` or ``img_size``).
        state_dict: the model weights.
        class_names: one name per output class (detection: object classes, background excluded).
        preprocessing: evaluation preprocessing, see :func:`default_preprocessing`.
    """

    path: Path
    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, Tensor]
    class_names: list[str]
    preprocessing: dict[str, Any]


def _size2(value: Any) -> list[int]:
    return [int(value), int(value)] if isinstance(value, int | float) else [int(v) for v in value]


def default_preprocessing(
    task: str, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluation preprocessing of a task, from the run's ``data`` options and the model config.

    Keys (image and video): ``input_size`` ``[H, W]`` of the network input, ``resize_size``
    (short side before the centre crop), ``interpolation``, ``mean``, ``std`` (of ``[0, 1]`` RGB);
    image adds ``crop_pct``; video adds ``num_frames``, ``sampling_rate`` (frame step inside a
    clip), ``num_clips`` (uniform clips averaged per video), ``num_crops`` (1: centre crop,
    3: left/centre/right), ``sampling`` (``clip``, or ``segment``: one frame from each of
    ``num_frames`` equal segments, SSv2) and ``target_fps`` (the frame rate ``sampling_rate``
    counts frames at, None: each file's own rate; see :func:`mvitv2.data.video.clip_indices`),
    all from :meth:`mvitv2.tasks.video.VideoDataConfig.preprocessing`. Detection: ``mean``,
    ``std``, ``min_size``, ``max_size``, ``size_divisible`` (the detector resizes and normalises
    inside the model; its inputs are ``[0, 1]`` RGB images of any size).
    """
    data = dict(data or {})
    if task == "detect":
        from mvitv2.detection import get_detector_config

        det = get_detector_config(model_name, **model_kwargs)
        return {
            "mean": list(det.image_mean),
            "std": list(det.image_std),
            "min_size": det.min_size,
            "max_size": det.max_size,
            "size_divisible": 32,
        }
    from mvitv2.models import get_config

    cfg = get_config(model_name, **model_kwargs)
    if task == "image":
        from mvitv2.data.image import ImageDataConfig

        known = {f.name for f in dataclasses.fields(ImageDataConfig)}
        dc = ImageDataConfig.from_dict({k: v for k, v in data.items() if k in known})
        if "img_size" not in data:
            dc = dataclasses.replace(dc, img_size=cfg.image_hw[0])
        return {
            "input_size": [dc.img_size, dc.img_size],
            "resize_size": int(dc.img_size / dc.crop_pct),
            "crop_pct": dc.crop_pct,
            "interpolation": dc.interpolation,
            "mean": list(dc.mean),
            "std": list(dc.std),
        }
    from mvitv2.tasks.video import VideoDataConfig

    known = {f.name for f in dataclasses.fields(VideoDataConfig)}
    video = {k: v for k, v in data.items() if k in known}
    video.setdefault("crop_size", cfg.image_hw[0])  # the model's size unless the data set it
    video.setdefault("num_frames", cfg.num_frames)
    return VideoDataConfig.from_dict(video).preprocessing()


def _infer_task(state: dict[str, Any], model_name: str) -> str:
    """The task of a checkpoint that does not name it: detectors have a ``backbone.body``, video
    models are registered as temporal."""
    if any(k.startswith("backbone.body.") for k in state):
        return "detect"
    from mvitv2.models import MODEL_CONFIGS

    cfg = MODEL_CONFIGS.get(model_name)
    return "video" if cfg is not None and cfg.temporal else "image"


def read_checkpoint(
    path: str | os.PathLike, *, task: str | None = None, ema: bool = False
) -> CheckpointInfo:
    """Read a training checkpoint written by the engine into a :class:`CheckpointInfo`.

    Args:
        path: the ``.pt`` file (``best.pt`` / ``last.pt`` of a run).
        task: the task the caller expects; a checkpoint of another task raises
            :class:`CheckpointError` naming both.
        ema: take the EMA weights (the run must have trained with ``ema_decay > 0``).

    The checkpoint's ``model`` (or ``ema``) holds the weights, ``config`` the run config
    (``model``, ``model_args``, ``data``) and ``meta`` the task's metadata: ``task``,
    ``class_names`` (or ``classes``) and optionally ``model_name``, ``model_kwargs``,
    ``preprocessing`` and ``data`` (the task's data options, used for default preprocessing).
    """
    from mvitv2.engine.checkpoint import read_training_checkpoint

    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(path)
    try:
        ckpt = read_training_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise CheckpointError(str(e)) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} is not an mvitv2 training checkpoint (needs 'model' and 'config', "
            f"found {keys}); for released weights use mvitv2.create_model(..., pretrained=...)"
        )
    config, meta = ckpt["config"], dict(ckpt.get("meta") or {})
    data = dict(meta.get("data") or config.get("data") or {})
    model_name = meta.get("model_name", config.get("model"))
    state = ckpt["model"]
    found = meta.get("task") or _infer_task(state, model_name)
    if task is not None and found != task:
        raise CheckpointError(
            f"checkpoint {path} is a {found!r} checkpoint, not {task!r}: "
            f"use `mvitv2 <command> {found} --checkpoint {path}`"
        )
    if "model_kwargs" in meta:
        model_kwargs = dict(meta["model_kwargs"])
    else:  # the classification tasks size the model from the data: img_size unless overridden
        model_kwargs = dict(config.get("model_args") or {})
        if found != "detect" and "img_size" in data:
            model_kwargs.setdefault("img_size", data["img_size"])
    model_kwargs.pop("num_classes", None)
    if ema:
        if not ckpt.get("ema"):
            raise CheckpointError(
                f"checkpoint {path} has no EMA weights (trained with ema_decay=0)"
            )
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    class_names = meta.get("class_names") or meta.get("classes")
    if not class_names:
        raise CheckpointError(f"checkpoint {path} stores no class names (meta['class_names'])")
    pre = meta.get("preprocessing") or default_preprocessing(found, model_name, model_kwargs, data)
    return CheckpointInfo(
        path, found, model_name, model_kwargs, state, [str(c) for c in class_names], dict(pre)
    )


def build_model(info: CheckpointInfo) -> nn.Module:
    """The checkpoint's model with its weights loaded (strictly), in eval mode on the CPU."""
    n = len(info.class_names)
    if info.task == "detect":
        from mvitv2.detection import create_detector

        model = create_detector(info.model_name, num_classes=n, **info.model_kwargs)
    else:
        from mvitv2.models import create_model

        model = create_model(info.model_name, num_classes=n, **info.model_kwargs)
    try:
        model.load_state_dict(info.state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {info.path}: weights do not fit the model: {e}") from e
    return model.eval()


# ----------------------------------------------------------------------------- inputs
def _as_uint8_or_float(x: Tensor, what: str) -> Tensor:
    """uint8 stays; other integers in [0, 255] become uint8; floats must lie in [0, 1] and become
    float32. ``what`` names the input in the error (``image``, ``video frames``).

    Raises:
        UserValueError: a float input outside [0, 1] (e.g. [0, 255] pixel values, which would
            otherwise be normalised as if 255 times too bright) or an integer one outside
            [0, 255].
    """
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool or x.is_complex():
        raise UserValueError(f"{what} of dtype {x.dtype}: give uint8 (0-255) or float (0-1) pixels")
    lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0, 0)
    if not x.is_floating_point():
        if lo < 0 or hi > 255:
            raise UserValueError(
                f"integer {what} must hold 0-255 pixel values, got values in [{lo}, {hi}]"
            )
        return x.to(torch.uint8)
    if not (lo >= 0 and hi <= 1):  # also catches NaN
        raise UserValueError(
            f"float {what} must be in [0, 1], got values in [{lo:g}, {hi:g}]; convert "
            f"[0, 255] pixels to uint8 (x.astype(np.uint8) / x.to(torch.uint8)) or divide by 255"
        )
    return x.float()


def load_image(item: Any) -> Tensor:
    """One image as a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Args:
        item: a file path, a PIL image, a numpy array ``(H, W, 3)`` / ``(H, W)`` (uint8 or float
            in [0, 1]), or a tensor ``(3, H, W)`` / ``(1, H, W)`` (uint8 or float in [0, 1]).

    Raises:
        mvitv2.engine.data.BadSample: a file that is missing or cannot be decoded.
        UserValueError: an array of another shape, or a float one outside [0, 1].
    """
    from PIL import Image

    from mvitv2.data.image import load_image as read_file

    if isinstance(item, str | os.PathLike):
        item = read_file(item)
    if isinstance(item, Image.Image):
        return TF.pil_to_tensor(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        arr = item[..., None] if item.ndim == 2 else item
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise UserValueError(
                f"image arrays must be (H, W, 3) or (H, W), got shape {item.shape}"
            )
        item = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if isinstance(item, Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise UserValueError(f"image tensors must be (3, H, W), got shape {tuple(item.shape)}")
        return _as_uint8_or_float(item.detach().cpu(), "image").expand(3, -1, -1)
    raise TypeError(f"cannot read an image from {type(item).__name__}")


def _frames_tchw(item: np.ndarray | Tensor) -> Tensor:
    """A clip array ``(T, H, W, 3)`` or ``(3, T, H, W)`` as ``(T, 3, H, W)``.

    When both the first and last dims are 3, numpy arrays are read as ``(T, H, W, 3)`` (the
    decoders' layout) and tensors as ``(3, T, H, W)`` (the models' layout).
    """
    is_array = isinstance(item, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(item)) if is_array else item.detach().cpu()
    if t.ndim != 4 or 3 not in (t.shape[0], t.shape[-1]):
        raise UserValueError(
            f"video arrays must be (T, H, W, 3) or (3, T, H, W), got {tuple(t.shape)}"
        )
    channels_last = t.shape[-1] == 3 and (t.shape[0] != 3 or is_array)
    t = t.permute(0, 3, 1, 2) if channels_last else t.permute(1, 0, 2, 3)
    return _as_uint8_or_float(t, "video frames")


# ----------------------------------------------------------------------------- predictor
class Predictor:
    """Batched inference for an image classifier, a video classifier or a detector.

    Args:
        model: the network (eval mode); moved to ``device``.
        task: ``image``, ``video`` or ``detect``.
        class_names: one name per class.
        preprocessing: see :func:`default_preprocessing`.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: autocast dtype (e.g. ``torch.bfloat16``); None runs in float32.
        topk: classes returned per input (classification).
        batch_size: inputs (video: clips) per forward.
        score_thresh: detections below this score are dropped.
        mask_thresh: detection mask probability above which a pixel belongs to the object.

    Calling it with one input returns one result; with a list, a list of results. Results are a
    list of ``(class_name, probability)`` (classification) or a dict with ``boxes`` ``(N, 4)``
    (x1, y1, x2, y2 pixels of the input), ``scores`` ``(N,)``, ``labels`` ``(N,)`` (indices into
    ``class_names``), ``label_names`` and ``masks`` ``(N, H, W)`` bool (detection).

    A file that is missing or cannot be decoded raises :class:`mvitv2.engine.data.BadSample`
    (naming the file); an array of the wrong shape, or a float one outside [0, 1], raises
    :class:`mvitv2.errors.UserValueError`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str,
        class_names: Sequence[str],
        preprocessing: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        topk: int = 5,
        batch_size: int = 16,
        score_thresh: float = 0.0,
        mask_thresh: float = 0.5,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.task = task
        self.class_names = list(class_names)
        self.preprocessing = dict(preprocessing)
        self.dtype = dtype
        self.topk = max(1, min(topk, len(self.class_names)))
        self.batch_size = batch_size
        self.score_thresh = score_thresh
        self.mask_thresh = mask_thresh

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        task: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        topk: int = 5,
        ema: bool = False,
        **kwargs: Any,
    ) -> Predictor:
        """A predictor for a training checkpoint (its task, classes and preprocessing).

        Args:
            path: the checkpoint file.
            task: expected task; a checkpoint of another task raises :class:`CheckpointError`.
            ema: use the checkpoint's EMA weights.
            device, dtype, topk, **kwargs: as for :class:`Predictor`.
        """
        info = read_checkpoint(path, task=task, ema=ema)
        return cls(
            build_model(info),
            task=info.task,
            class_names=info.class_names,
            preprocessing=info.preprocessing,
            device=device,
            dtype=dtype,
            topk=topk,
            **kwargs,
        )

    # -------------------------------------------------------------- preprocessing
    @functools.cached_property
    def _transform(self) -> Any:
        """The data layer's evaluation transform for this task and preprocessing."""
        p = self.preprocessing
        if self.task == "image":
            from mvitv2.data.image import ImageDataConfig, build_transform

            dc = ImageDataConfig(
                img_size=p["input_size"][0], crop_pct=p["crop_pct"],
                interpolation=p["interpolation"], mean=tuple(p["mean"]), std=tuple(p["std"]),
            )  # fmt: skip
            return build_transform(dc, train=False)
        from mvitv2.data.video import VideoTransform

        return VideoTransform(
            False, crop_size=p["input_size"][0], mean=p["mean"], std=p["std"],
            test_short_side=p["resize_size"],
        )  # fmt: skip

    def preprocess_image(self, item: Any) -> Tensor:
        """One classification input -> normalised ``(3, H, W)``."""
        return self._transform(load_image(item))

    def preprocess_video(self, item: Any) -> Tensor:
        """One video (file path or array) -> its ``num_clips x num_crops`` views
        ``(K, 3, T, H, W)``: uniform clips of ``num_frames`` frames ``sampling_rate`` apart
        (frames counted at ``target_fps`` for a file, see
        :func:`mvitv2.data.video.clip_indices`; an array is taken as frames already at that
        rate), or one clip of ``num_frames`` segments with ``sampling: segment`` (SSv2); each
        clip resized (short side ``resize_size``) and cropped (centre, or left/centre/right)."""
        from mvitv2.data.video import VideoDecodeError, VideoReader, clip_indices, segment_indices
        from mvitv2.engine.data import BadSample

        p = self.preprocessing
        t, k = p["num_frames"], p["num_clips"]

        def views(n: int, fps: float | None) -> list[list[int]]:
            if p.get("sampling", "clip") == "segment":
                return [segment_indices(n, t, train=False)]
            return [
                clip_indices(
                    n,
                    t,
                    p["sampling_rate"],
                    clip_idx=i,
                    num_clips=k,
                    fps=fps,
                    target_fps=p.get("target_fps"),
                )  # fmt: skip
                for i in range(k)
            ]

        if isinstance(item, str | os.PathLike):
            try:
                with VideoReader(item) as reader:
                    idx = views(reader.num_frames, reader.fps)
                    clips = reader.get_frames(sum(idx, [])).permute(0, 3, 1, 2).split(t)
            except VideoDecodeError as e:
                raise BadSample(str(item), str(e)) from e
        else:
            frames = _frames_tchw(item)
            clips = [frames[i] for i in views(len(frames), None)]
        crops = [None] if p.get("num_crops", 1) == 1 else [0, 1, 2]
        return torch.stack([self._transform(c, spatial_idx=s) for c in clips for s in crops])

    # -------------------------------------------------------------- running
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @torch.inference_mode()
    def _logits(self, x: Tensor) -> Tensor:
        outs = []
        for chunk in x.split(self.batch_size):
            with self._autocast():
                outs.append(self.model(chunk.to(self.device)).float().cpu())
        return torch.cat(outs)

    def _topk(self, probs: Tensor) -> list[tuple[str, float]]:
        p, i = probs.topk(self.topk)
        return [(self.class_names[j], float(v)) for v, j in zip(p.tolist(), i.tolist())]

    def _classify(self, items: list[Any]) -> list[list[tuple[str, float]]]:
        if self.task == "image":
            x = torch.stack([self.preprocess_image(it) for it in items])
            return [self._topk(p) for p in self._logits(x).softmax(-1)]
        clips = [self.preprocess_video(it) for it in items]
        probs = self._logits(torch.cat(clips)).softmax(-1).split([len(c) for c in clips])
        return [self._topk(p.mean(0)) for p in probs]

    @torch.inference_mode()
    def _detect(self, items: list[Any]) -> list[dict[str, Any]]:
        images = [load_image(it) for it in items]
        if self.preprocessing.get("input_dtype") != "uint8":  # uint8: detectron2's detectors
            images = [x.float() / 255 if x.dtype == torch.uint8 else x for x in images]
        results = []
        for start in range(0, len(images), self.batch_size):
            batch = [x.to(self.device) for x in images[start : start + self.batch_size]]
            with self._autocast():
                outs = self.model(batch)
            for out in outs:
                keep = out["scores"] >= self.score_thresh
                labels = out["labels"][keep].cpu() - 1  # detector labels are 1..K
                res = {
                    "boxes": out["boxes"][keep].float().cpu(),
                    "scores": out["scores"][keep].float().cpu(),
                    "labels": labels,
                    "label_names": [self.class_names[i] for i in labels.tolist()],
                }
                if "masks" in out:
                    res["masks"] = out["masks"][keep][:, 0].float().cpu() > self.mask_thresh
                results.append(res)
        return results

    def _split_batch(self, inputs: Any) -> tuple[list[Any], bool]:
        """The inputs as a list and whether a single input was given."""
        if isinstance(inputs, list | tuple):
            return list(inputs), False
        batched_dims = {"image": 4, "detect": 4, "video": 5}[self.task]
        if isinstance(inputs, Tensor | np.ndarray) and inputs.ndim == batched_dims:
            return list(inputs), False
        return [inputs], True

    def __call__(self, inputs: Any) -> Any:
        """Predict for one input or a list (see the class docstring for the accepted inputs)."""
        items, single = self._split_batch(inputs)
        if not items:
            return []
        out = self._detect(items) if self.task == "detect" else self._classify(items)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (
            f"Predictor(task={self.task!r}, classes={len(self.class_names)}, device={self.device}, "
            f"dtype={self.dtype}, topk={self.topk})"
        )
