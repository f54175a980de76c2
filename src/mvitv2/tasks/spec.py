"""One spec per task: what inference, export and checkpoint metadata need to know about a task.

A :class:`TaskSpec` is the one place that knows, for its task, how the model is rebuilt from a
checkpoint, how one input is preprocessed for prediction and how outputs become results
(classification top-k, detections), and what is exported. :mod:`mvitv2.predict` and
:mod:`mvitv2.export` are generic over it. Each task module defines its spec as ``SPEC``
(:mod:`mvitv2.tasks.image`, ``video``, ``detect``); :func:`get_spec` finds it.

Every task writes the same checkpoint metadata (:meth:`TaskSpec.checkpoint_meta`, version
:data:`META_VERSION`): ``task``, ``class_names``, ``model_name``, ``model_kwargs``,
``preprocessing``, ``data`` and task extras (``data_root``, detection's ``label_to_cat_id``).
:func:`upgrade_meta` reads the older per-task schemas (``classes`` for class names, no
``model_kwargs`` or ``preprocessing``) into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mvitv2.engine.task import Task

if TYPE_CHECKING:
    from mvitv2.predict import CheckpointInfo, Predictor
    from mvitv2.weights.registry import Preprocessing, Weights

#: the tasks, and the module whose ``SPEC`` describes each.
TASK_MODULES = {
    "image": "mvitv2.tasks.image",
    "video": "mvitv2.tasks.video",
    "detect": "mvitv2.tasks.detect",
}
TASKS = tuple(TASK_MODULES)
#: version of the checkpoint metadata schema written by :meth:`TaskSpec.checkpoint_meta`.
META_VERSION = 2


def get_spec(task: str) -> TaskSpec:
    """The spec of ``task`` (``image``, ``video`` or ``detect``).

    Raises:
        ValueError: an unknown task name.
    """
    if task not in TASK_MODULES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASK_MODULES[task]).SPEC


@dataclasses.dataclass(frozen=True)
class ExportInputs:
    """What :mod:`mvitv2.export` exports for a checkpoint.

    Args:
        module: the module to export (taking one tensor).
        example: an example input of the deployed shape.
        input_names, output_names: graph input and output names.
        metadata: extra sidecar entries (e.g. which part of a detector is exported).
    """

    module: nn.Module
    example: Tensor
    input_names: list[str]
    output_names: list[str]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class TaskSpec:
    """What differs between tasks; subclasses implement the methods that raise here.

    Attributes:
        name: the task name (``image``, ``video``, ``detect``).
        batched_ndim: a tensor or array input with this many dimensions is a batch of inputs.
        exports_whole_model: whether ``export --whole-detector`` applies (ONNX with the
            data-dependent post-processing inside the graph).
    """

    name: str = ""
    batched_ndim: int = 4
    exports_whole_model: bool = False

    # ------------------------------------------------------------ the model
    def build_model(
        self, model_name: str, num_classes: int, model_kwargs: dict[str, Any]
    ) -> nn.Module:
        """The untrained model of a checkpoint (``num_classes`` outputs, background excluded)."""
        raise NotImplementedError

    def default_preprocessing(
        self, model_name: str, model_kwargs: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """Evaluation preprocessing from the run's ``data`` options and the model config (keys:
        see :func:`mvitv2.predict.default_preprocessing`)."""
        raise NotImplementedError

    def released_data(self, pre: Preprocessing) -> dict[str, Any]:
        """The evaluation part of this task's ``data`` options from released weights'
        preprocessing (what :meth:`default_preprocessing` reads)."""
        raise NotImplementedError

    def legacy_model_kwargs(
        self, model_args: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """``model_kwargs`` of a checkpoint that stores none (older schema): the run config's
        ``model_args`` plus what the task took from its data options."""
        return dict(model_args)

    # ------------------------------------------------------------ checkpoint metadata
    def checkpoint_meta(
        self,
        *,
        class_names: Sequence[str],
        model_name: str,
        model_kwargs: dict[str, Any],
        data: dict[str, Any],
        **extra: Any,
    ) -> dict[str, Any]:
        """The metadata a training run stores with its checkpoints, the same schema for all
        tasks.

        Args:
            class_names: one name per class (detection: background excluded).
            model_name: the registered model (or detector) name.
            model_kwargs: keyword arguments of the model factory besides ``num_classes``.
            data: the task's data options (plain types).
            **extra: task extras (``data_root``, ``label_to_cat_id``, ...).
        """
        kwargs = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
        return {
            "meta_version": META_VERSION,
            "task": self.name,
            "class_names": [str(c) for c in class_names],
            "model_name": model_name,
            "model_kwargs": kwargs,
            "preprocessing": self.default_preprocessing(model_name, kwargs, dict(data)),
            "data": dict(data),
            **extra,
        }

    # ------------------------------------------------------------ prediction
    def transform(self, preprocessing: dict[str, Any]) -> Any:
        """The evaluation transform of one input (None: the model preprocesses itself)."""
        return None

    def views(self, item: Any, preprocessing: dict[str, Any], transform: Any) -> Tensor:
        """One input as the batch of model inputs averaged into its prediction ``(K, ...)``."""
        raise NotImplementedError

    def predict(self, predictor: Predictor, items: list[Any]) -> list[Any]:
        """One result per input (see :class:`mvitv2.predict.Predictor`)."""
        raise NotImplementedError

    # ------------------------------------------------------------ export
    def export_size(self, preprocessing: dict[str, Any]) -> tuple[int, int]:
        """``(H, W)`` exported at by default."""
        h, w = preprocessing["input_size"]
        return int(h), int(w)

    def preprocessing_at(
        self, preprocessing: dict[str, Any], size: Sequence[int]
    ) -> dict[str, Any]:
        """``preprocessing`` for inputs of ``size`` ``(H, W)``, an export's ``--input-size``
        (default: unchanged, as a detector's, which resizes inside the model)."""
        return dict(preprocessing)

    def export_inputs(
        self,
        model: nn.Module,
        preprocessing: dict[str, Any],
        input_size: Sequence[int] | None = None,
        batch: int = 1,
    ) -> ExportInputs:
        """The module to export, an example input of ``batch`` inputs of ``input_size``
        (default :meth:`export_size`) and the input/output names."""
        raise NotImplementedError


class ClassificationSpec(TaskSpec):
    """Image and video classification: one class distribution per input, averaged over the
    input's views (video: clips x crops), reported as the top-k classes."""

    #: the graph input's name in an export.
    input_name: str = "images"

    def build_model(
        self, model_name: str, num_classes: int, model_kwargs: dict[str, Any]
    ) -> nn.Module:
        from mvitv2.models import create_model

        return create_model(model_name, num_classes=num_classes, **model_kwargs)

    def predict(self, predictor: Predictor, items: list[Any]) -> list[list[tuple[str, float]]]:
        views = [predictor.preprocess(it) for it in items]
        probs = predictor.forward(torch.cat(views)).softmax(-1).split([len(v) for v in views])
        return [predictor.top_classes(p.mean(0)) for p in probs]

    def preprocessing_at(
        self, preprocessing: dict[str, Any], size: Sequence[int]
    ) -> dict[str, Any]:
        """The crop of ``size`` out of a short side scaled with it (each view's preprocessing
        as the checkpoint's, at another size)."""
        h, w = (int(v) for v in size)
        scale = min(h, w) / min(preprocessing["input_size"][-2:])
        resize = round(preprocessing["resize_size"] * scale)
        return {**preprocessing, "input_size": [h, w], "resize_size": resize}

    def example_shape(self, preprocessing: dict[str, Any], h: int, w: int) -> list[int]:
        """Shape of one model input (without the batch) at ``h x w``."""
        return [3, h, w]

    def export_inputs(
        self,
        model: nn.Module,
        preprocessing: dict[str, Any],
        input_size: Sequence[int] | None = None,
        batch: int = 1,
    ) -> ExportInputs:
        h, w = input_size or self.export_size(preprocessing)
        example = torch.randn(batch, *self.example_shape(preprocessing, h, w))
        return ExportInputs(model, example, [self.input_name], ["logits"])


def upgrade_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint's metadata in the current schema (:data:`META_VERSION`), also for
    checkpoints written before it.

    Older checkpoints name their classes ``classes`` (image) or ``class_names``, may store no
    ``task`` (inferred: detectors have ``backbone.body`` weights, video models are registered
    as temporal), no ``model_name``/``model_kwargs`` (taken from the run config's ``model`` and
    ``model_args``, plus what the task took from its data options, see
    :meth:`TaskSpec.legacy_model_kwargs`) and no ``preprocessing`` (the task's default for its
    data options). A checkpoint without class names gets an empty ``class_names``.

    Args:
        ckpt: the checkpoint dict (``model``, ``config``, ``meta``).
    """
    meta = dict(ckpt.get("meta") or {})
    if meta.get("meta_version") == META_VERSION:
        return meta
    config = ckpt.get("config") or {}
    model_name = meta.get("model_name", config.get("model"))
    task = checkpoint_task(ckpt)
    spec = get_spec(task)
    data = dict(meta.get("data") or config.get("data") or {})
    if "model_kwargs" in meta:
        kwargs = dict(meta["model_kwargs"])
    else:
        kwargs = spec.legacy_model_kwargs(dict(config.get("model_args") or {}), data)
    kwargs.pop("num_classes", None)
    names = meta.pop("classes", None) or meta.get("class_names") or []
    meta.update(
        meta_version=META_VERSION,
        task=task,
        class_names=[str(c) for c in names],
        model_name=model_name,
        model_kwargs=kwargs,
        data=data,
    )
    if not meta.get("preprocessing"):
        meta["preprocessing"] = spec.default_preprocessing(model_name, kwargs, data)
    return meta


def checkpoint_task(ckpt: dict[str, Any]) -> str:
    """The task of a training checkpoint: its ``meta['task']``, or for an old checkpoint that
    does not name it, ``detect`` when it has ``backbone.body`` weights, ``video`` when its model
    is registered as temporal, else ``image``."""
    meta = ckpt.get("meta") or {}
    if meta.get("task"):
        return str(meta["task"])
    if any(k.startswith("backbone.body.") for k in ckpt.get("model") or {}):
        return "detect"
    from mvitv2.models import MODEL_CONFIGS

    config = ckpt.get("config") or {}
    cfg = MODEL_CONFIGS.get(meta.get("model_name", config.get("model")))
    return "video" if cfg is not None and cfg.temporal else "image"


class SpecTask(Task):
    """The training :class:`~mvitv2.engine.task.Task` of one of this package's tasks: it reads
    a checkpoint's metadata in today's schema, also one written before it (:func:`upgrade_meta`),
    so that ``--resume auto`` compares like with like."""

    #: data options added since runs were first saved, with the value that computes as those
    #: runs did: a saved ``meta.data`` without one is read with it.
    added_data_options: Mapping[str, Any] = {}

    def upgrade_meta(self, checkpoint: Any) -> dict[str, Any]:  # noqa: D102
        meta = upgrade_meta(dict(checkpoint))
        if isinstance(meta.get("data"), Mapping):
            meta["data"] = {**self.added_data_options, **meta["data"]}
        return meta


def refuse_run_options(model_args: dict[str, Any], **set_by_run: str) -> None:
    """Refuse a ``model_args`` option that the run passes to the model constructor itself (the
    class count from its data, the weights from ``pretrained``): it would reach the constructor
    twice, a ``TypeError`` traceback. ``set_by_run``: option -> where the run takes it from.

    Raises:
        UserValueError: ``model_args.<option>: the run sets it from <where>; remove it``.
    """
    from mvitv2.errors import UserValueError

    for name, source in set_by_run.items():
        if name in model_args:
            raise UserValueError(f"model_args.{name}: the run sets it from {source}; remove it")


#: The command-line task of each registry task of released weights.
_CLI_TASK = {"classification": "image", "video": "video", "detection": "detect"}


def released_weights(
    checkpoint: str, model_name: str | None, task: str, command: str = "eval"
) -> tuple[str, Weights]:
    """The variant and registered weights (the tag's, or for a file those of its variant's
    default weights: their preprocessing and classes) of released weights that ``mvitv2
    <command> <task>`` (``image`` or ``video``) uses, as timm's ``validate.py --pretrained`` and
    SlowFast's ``TEST.CHECKPOINT_FILE_PATH`` evaluate them.

    Args:
        checkpoint: a weights tag or a file in any format :func:`mvitv2.load_checkpoint` reads.
        model_name: the variant (None only for a tag, which names its own).
        command: ``eval``, ``predict`` or ``export``, for messages.

    Raises:
        UserValueError: weights of another task, a variant unknown or without released weights
            of this task (one line each).
    """
    from mvitv2.errors import UserValueError
    from mvitv2.models import get_config
    from mvitv2.weights.registry import DEFAULT_WEIGHTS, WEIGHTS, is_weights_tag

    tag = WEIGHTS[checkpoint] if is_weights_tag(checkpoint) else None
    if tag is not None and _CLI_TASK[tag.task] != task:
        raise UserValueError(
            f"{checkpoint} are {tag.task} weights; use `mvitv2 {command} {_CLI_TASK[tag.task]}`"
        )
    name = model_name or WEIGHTS[checkpoint].model
    get_config(name)  # an unknown variant: one line naming the known ones
    w = tag or WEIGHTS.get(DEFAULT_WEIGHTS.get(name, ""))
    if w is None or _CLI_TASK[w.task] != task:
        raise UserValueError(
            f"{name} has no released {task} weights to take the preprocessing from; pass the "
            "weights tag of the file's variant as --checkpoint (`mvitv2 info --weights`)"
        )
    return name, w


def released_task(checkpoint: str, model_name: str | None) -> str:
    """The command-line task (``image`` or ``video``) of released classifier weights: a tag's
    own, or for a file that of its variant ``model_name``.

    Raises:
        UserValueError: a file without its variant, or detection weights.
    """
    from mvitv2.errors import UserValueError
    from mvitv2.models import get_config
    from mvitv2.weights.registry import WEIGHTS, is_weights_tag

    if is_weights_tag(checkpoint):
        task = _CLI_TASK[WEIGHTS[checkpoint].task]
    elif model_name:
        task = "video" if get_config(model_name).temporal else "image"
    else:
        raise UserValueError(
            f"{checkpoint} is no weights tag (`mvitv2 info --weights`): a file of released "
            "weights needs its variant (model='mvitv2_tiny', ...)"
        )
    if task == "detect":
        raise UserValueError(
            f"{checkpoint} are detection weights: predict with `mvitv2 predict detect` or "
            "mvitv2.tasks.detect.read_detector"
        )
    return task


def released_classifier(
    checkpoint: str, name: str, weights: Weights, num_classes: int | None, purpose: str
) -> nn.Module:
    """Variant ``name`` (with ``weights``' model options) loaded from ``checkpoint`` (a tag is
    downloaded into torch.hub's cache and checked), in eval mode.

    Args:
        num_classes: the classifier's size the data needs (None: the weights').
        purpose: what the weights are for, in messages (``"evaluated on DIR (6 class
            folders)"``, ``"used by mvitv2 predict"``).

    Raises:
        UserValueError: weights of another variant, or any model tensor the weights do not fill
            (a classifier of another size is the user's mistake here, not a reset).
    """
    from mvitv2.errors import UserValueError
    from mvitv2.models import create_model
    from mvitv2.weights import load_checkpoint
    from mvitv2.weights.load import CheckpointMismatchError

    n = num_classes if num_classes is not None else weights.num_classes
    model = create_model(name, num_classes=n, **weights.model_kwargs)
    try:
        report = load_checkpoint(model, checkpoint)
    except CheckpointMismatchError as e:  # weights of another variant: the user's --model
        r = e.report
        raise UserValueError(
            f"{checkpoint} ({r.format} layout) does not fit {name}: {len(r.missing)} of its "
            f"tensors missing, {len(r.unexpected)} unexpected, {len(r.shape_conflicts)} of "
            "another shape; pass the variant the weights are for as --model"
        ) from None
    if report.initialized:
        why = "; ".join(sorted(set(report.initialized.values())))
        raise UserValueError(f"{checkpoint} cannot be {purpose} with {name}: {why}")
    return model.eval()


def released_info(
    checkpoint: str, model_name: str | None, task: str, command: str
) -> tuple[CheckpointInfo, nn.Module]:
    """Released weights as a checkpoint of ``task`` for ``mvitv2 predict`` and ``export``: the
    classifier loaded from them (all of it, see :func:`released_classifier`), their classes
    (``class_<i>`` where the label order is not published) and their preprocessing.

    Args:
        checkpoint, model_name: see :func:`released_weights`.
        task: ``image`` or ``video``.
        command: ``predict`` or ``export``, for messages.
    """
    from pathlib import Path

    from mvitv2.predict import CheckpointInfo

    name, w = released_weights(checkpoint, model_name, task, command)
    model = released_classifier(checkpoint, name, w, None, f"used by mvitv2 {command}")
    kwargs = dict(w.model_kwargs)
    spec = get_spec(task)
    info = CheckpointInfo(
        path=Path(checkpoint),
        task=task,
        model_name=name,
        model_kwargs=kwargs,
        state_dict=model.state_dict(),
        class_names=w.class_names or [f"class_{i}" for i in range(w.num_classes)],
        preprocessing=spec.default_preprocessing(name, kwargs, spec.released_data(w.preprocessing)),
        meta={"weights": w.tag},
    )
    return info, model


def classifier_export_reader(
    task: str,
) -> Callable[[argparse.Namespace], tuple[CheckpointInfo, nn.Module | None]]:
    """The ``--checkpoint`` / ``--model`` reader of ``mvitv2 export image|video``
    (:func:`classifier_checkpoint`), for :func:`mvitv2.engine.cli.export_handler`."""
    return lambda args: classifier_checkpoint(task, args.checkpoint, args.model, "export")


def classifier_checkpoint(
    task: str, checkpoint: str, model_name: str | None, command: str, *, ema: bool = False
) -> tuple[CheckpointInfo, nn.Module | None]:
    """The ``--checkpoint`` of ``mvitv2 predict|export image|video``, read: released weights (a
    tag, or a file with ``--model``: :func:`released_info`, with the model they were loaded
    into) or a checkpoint of ``mvitv2 train <task>`` (its EMA weights with ``ema``; model None:
    :func:`mvitv2.predict.build_model` builds it).

    Raises:
        UserValueError: ``ema`` with released weights, which have none.
    """
    from mvitv2.errors import UserValueError
    from mvitv2.predict import read_checkpoint
    from mvitv2.weights.registry import is_weights_tag

    if model_name or is_weights_tag(checkpoint):
        if ema:
            raise UserValueError(
                f"--ema: {checkpoint} are released weights, which have no EMA copy; drop --ema"
            )
        return released_info(checkpoint, model_name, task, command)
    return read_checkpoint(checkpoint, task=task, ema=ema), None
