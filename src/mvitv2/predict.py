"""Inference for all three tasks from a training checkpoint: one path for Python, CLI and export.

``Predictor.from_checkpoint(path)`` reads a checkpoint written by the engine, rebuilds the model
of the task the checkpoint names, and applies the evaluation preprocessing stored with it::

    predictor = mvitv2.Predictor.from_checkpoint("runs/digits/best.pt", topk=3)
    predictor("cat.jpg")                 # [("cat", 0.91), ("dog", 0.05), ...]
    predictor(["a.jpg", pil_image, array])  # one top-k list per input

:func:`read_checkpoint` and :func:`build_model` are the adapter between the engine's checkpoint
dict and a ready model; :mod:`mvitv2.export` uses them too. Everything that differs between the
tasks (the model factory, preprocessing, how outputs become results) is the task's
:class:`~mvitv2.tasks.spec.TaskSpec`; this module is generic over it.
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
from mvitv2.tasks.spec import TaskSpec, checkpoint_task, get_spec, upgrade_meta

# a checkpoint the user cannot use here (missing, unreadable, of another task, incomplete): the
# one-line member of the mvitv2.CheckpointError family
CheckpointError = UserCheckpointError


class WrongTaskError(CheckpointError):
    """A checkpoint of another task than the one asked for.

    Attributes:
        found: the checkpoint's task.
        expected: the task asked for.
    """

    def __init__(self, path: Path, found: str, expected: str) -> None:
        self.found, self.expected = found, expected
        super().__init__(
            f"checkpoint {path} is a {found!r} checkpoint, not {expected!r}: "
            f"give it to the {found} commands (`mvitv2 predict|eval|export {found}`)"
        )


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
        meta: the checkpoint's whole metadata in the current schema
            (:func:`mvitv2.tasks.spec.upgrade_meta`): also ``data``, ``data_root``, ...
    """

    path: Path
    task: str
    model_name: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, Tensor]
    class_names: list[str]
    preprocessing: dict[str, Any]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def spec(self) -> TaskSpec:
        """The spec of this checkpoint's task."""
        return get_spec(self.task)


def default_preprocessing(
    task: str, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluation preprocessing of a task, from the run's ``data`` options and the model config.

    Keys (image and video): ``input_size`` ``[H, W]`` of the network input, ``resize_size``
    (short side before the centre crop), ``interpolation``, ``mean``, ``std`` (of ``[0, 1]`` RGB);
    image adds ``crop_pct``; video adds ``num_frames``, ``sampling_rate`` (frame step inside a
    clip), ``num_clips`` (uniform clips averaged per video), ``num_crops`` (1: centre crop,
    3: left/centre/right), ``sampling`` (``clip``, PySlowFast's clips; ``resampled``,
    torchvision's; or ``segment``: one frame from each of ``num_frames`` equal segments, SSv2;
    see :class:`mvitv2.data.video.ClipSampler`), ``target_fps`` (the frame rate
    ``sampling_rate`` counts frames at, None: each file's own rate), ``pad`` and
    ``test_pipeline`` (``slowfast`` or ``torchvision``: how clips are resized and cropped),
    all from :meth:`mvitv2.tasks.video.VideoDataConfig.preprocessing`. Detection: ``mean``,
    ``std``, ``min_size``, ``max_size``, ``size_divisible`` (the detector resizes and normalises
    inside the model; its inputs are ``[0, 1]`` RGB images of any size).
    """
    return get_spec(task).default_preprocessing(model_name, model_kwargs, dict(data or {}))


def read_checkpoint(
    path: str | os.PathLike, *, task: str | None = None, ema: bool = False
) -> CheckpointInfo:
    """Read a training checkpoint written by the engine into a :class:`CheckpointInfo`.

    Args:
        path: the ``.pt`` file (``best.pt`` / ``last.pt`` of a run).
        task: the task the caller expects; a checkpoint of another task raises
            :class:`WrongTaskError` naming both.
        ema: take the EMA weights (the run must have trained with ``ema_decay > 0``).

    The checkpoint's ``model`` (or ``ema``) holds the weights, ``config`` the run config and
    ``meta`` the task's metadata (read in any schema version, see
    :func:`mvitv2.tasks.spec.upgrade_meta`).
    """
    from mvitv2.engine.checkpoint import read_training_checkpoint

    if task is not None:
        get_spec(task)  # an unknown task name is the caller's bug: ValueError
    path = Path(path)
    # its errors are already the CheckpointError family (a missing file also FileNotFoundError)
    return checkpoint_info(read_training_checkpoint(path), path, task=task, ema=ema)


def checkpoint_info(
    ckpt: Any, path: str | os.PathLike, *, task: str | None = None, ema: bool = False
) -> CheckpointInfo:
    """:func:`read_checkpoint` for a checkpoint already loaded (``ckpt``, read from ``path``)."""
    path = Path(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} is not an mvitv2 training checkpoint (needs 'model' and 'config', "
            f"found {keys}); for released weights use mvitv2.create_model(..., pretrained=...)"
        )
    found = checkpoint_task(ckpt)
    if task is not None and found != task:
        raise WrongTaskError(path, found, task)
    state = ckpt["model"]
    if ema:  # torch.optim.swa_utils.AveragedModel's state: module.<name> and n_averaged
        if not ckpt.get("ema"):
            raise CheckpointError(
                f"checkpoint {path} has no EMA weights (trained with ema_decay=0)"
            )
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    meta = upgrade_meta(ckpt)
    if not meta["class_names"]:
        raise CheckpointError(f"checkpoint {path} stores no class names (meta['class_names'])")
    return CheckpointInfo(
        path,
        found,
        meta["model_name"],
        dict(meta["model_kwargs"]),
        state,
        list(meta["class_names"]),
        dict(meta["preprocessing"]),
        meta,
    )


def build_model(info: CheckpointInfo) -> nn.Module:
    """The checkpoint's model with its weights loaded (strictly), in eval mode on the CPU."""
    model = info.spec.build_model(info.model_name, len(info.class_names), info.model_kwargs)
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


def load_image(item: Any, *, upright: bool = False) -> Tensor:
    """One image as a ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Args:
        item: a file path, a PIL image, a numpy array ``(H, W, 3)`` / ``(H, W)`` (uint8 or float
            in [0, 1]), or a tensor ``(3, H, W)`` / ``(1, H, W)`` (uint8 or float in [0, 1]).
        upright: read a file turned by its EXIF orientation tag (detection, as detectron2
            reads it; see :func:`mvitv2.data.image.load_image`). Images passed as objects are
            taken as they are.

    Raises:
        mvitv2.engine.data.BadSample: a file that is missing or cannot be decoded.
        UserValueError: an array of another shape, or a float one outside [0, 1].
    """
    from PIL import Image

    from mvitv2.data.image import load_image as read_file

    if isinstance(item, str | os.PathLike):
        item = read_file(item, upright=upright)
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


def video_frames(item: np.ndarray | Tensor) -> Tensor:
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
    ``class_names``), ``label_names``, ``masks`` ``(N, H, W)`` bool, and ``best_score``: the
    highest score the detector gave, kept or not (None: it found nothing at all) (detection).

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
        self.spec = get_spec(task)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.task = task
        self.class_names = list(class_names)
        self.preprocessing = dict(preprocessing)
        self.dtype = dtype
        if topk < 1:
            raise UserValueError(f"topk={topk}: give at least 1 class per input")
        self.topk = min(topk, len(self.class_names))
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
        return cls.from_info(info, device=device, dtype=dtype, topk=topk, **kwargs)

    @classmethod
    def from_weights(cls, weights: str, *, model: str | None = None, **kwargs: Any) -> Predictor:
        """A predictor for released classifier weights, with their classes and preprocessing,
        as torchvision's ``weights.meta["categories"]`` and ``weights.transforms()``.

        Args:
            weights: a weights tag (``mvitv2_tiny.in1k``, ``mvitv2_small_16x4.k400``; downloaded
                once), or a file of released weights in any format
                :func:`mvitv2.load_checkpoint` reads, with ``model``.
            model: the variant of a file (a tag names its own).
            **kwargs: as for :class:`Predictor`.

        Raises:
            UserValueError: a file without ``model``, detection weights (see
                :func:`mvitv2.tasks.detect.read_detector`), weights that do not fit.
        """
        from mvitv2.tasks.spec import released_info, released_task

        task = released_task(weights, model)
        info, net = released_info(weights, model, task, "predict")
        return cls.from_info(info, net, **kwargs)

    @classmethod
    def from_info(
        cls, info: CheckpointInfo, model: nn.Module | None = None, **kwargs: Any
    ) -> Predictor:
        """A predictor for a checkpoint already read; ``model``: ``build_model(info)`` when
        already built; ``**kwargs``: as for :class:`Predictor`."""
        return cls(
            model if model is not None else build_model(info),
            task=info.task,
            class_names=info.class_names,
            preprocessing=info.preprocessing,
            **kwargs,
        )

    # -------------------------------------------------------------- preprocessing
    @functools.cached_property
    def _transform(self) -> Any:
        """The data layer's evaluation transform for this task and preprocessing."""
        return self.spec.transform(self.preprocessing)

    def preprocess(self, item: Any) -> Tensor:
        """One input -> the model inputs whose predictions are averaged into its result
        ``(K, ...)``: ``(1, 3, H, W)`` for an image; for a video its ``num_clips x num_crops``
        views ``(K, 3, T, H, W)``, see :meth:`preprocess_video`."""
        return self.spec.views(item, self.preprocessing, self._transform)

    def preprocess_image(self, item: Any) -> Tensor:
        """One classification input -> normalised ``(3, H, W)``."""
        return self.preprocess(item)[0]

    def preprocess_video(self, item: Any) -> Tensor:
        """One video (file path or array) -> its ``num_clips x num_crops`` views
        ``(K, 3, T, H, W)``: K clips of ``num_frames`` frames as the preprocessing's
        ``sampling`` takes them (:class:`mvitv2.data.video.ClipSampler`: PySlowFast's uniform
        clips spread over ``num_frames * sampling_rate`` frames at ``target_fps``, torchvision's
        consecutive frames of the video resampled, or one clip of ``num_frames`` segments,
        SSv2; an array is taken as frames already at ``target_fps``; a short video padded as the
        run's ``pad`` says); each clip resized (short side ``resize_size``) and cropped (centre,
        or left/centre/right) as its ``test_pipeline`` says."""
        return self.preprocess(item)

    # -------------------------------------------------------------- running
    def autocast(self) -> torch.autocast:
        """Autocast to ``dtype`` on this predictor's device (disabled when ``dtype`` is None)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        """The model's float32 outputs (on the CPU) for a batch, ``batch_size`` at a time."""
        outs = []
        for chunk in x.split(self.batch_size):
            with self.autocast():
                outs.append(self.model(chunk.to(self.device)).float().cpu())
        return torch.cat(outs)

    def top_classes(self, probs: Tensor) -> list[tuple[str, float]]:
        """The ``topk`` most probable classes of one distribution, as ``(name, probability)``."""
        p, i = probs.topk(self.topk)
        return [(self.class_names[j], float(v)) for v, j in zip(p.tolist(), i.tolist())]

    def _split_batch(self, inputs: Any) -> tuple[list[Any], bool]:
        """The inputs as a list and whether a single input was given."""
        if isinstance(inputs, list | tuple):
            return list(inputs), False
        if isinstance(inputs, Tensor | np.ndarray) and inputs.ndim == self.spec.batched_ndim:
            return list(inputs), False
        return [inputs], True

    def __call__(self, inputs: Any) -> Any:
        """Predict for one input or a list (see the class docstring for the accepted inputs)."""
        items, single = self._split_batch(inputs)
        if not items:
            return []
        out = self.spec.predict(self, items)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (
            f"Predictor(task={self.task!r}, classes={len(self.class_names)}, device={self.device}, "
            f"dtype={self.dtype}, topk={self.topk})"
        )
