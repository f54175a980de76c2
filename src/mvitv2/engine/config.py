"""Training configuration: one frozen dataclass, loaded from a YAML recipe plus ``key=value`` overrides.

The engine reads the top-level fields; ``model_args`` goes to :func:`mvitv2.create_model` and
``data`` is free-form, interpreted (and validated) by the task. Overrides use dotted keys for
those two dicts (``data.img_size=64``, ``model_args.depths=[1,1,1,1]``); values are parsed as YAML
(``3``, ``1e-3``, ``true``, ``[1, 2]``, ``null``).

A config never changes after it is built: :meth:`TrainConfig.replace` returns a new one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mvitv2.errors import (
    UnknownKeyError,
    UserFileNotFoundError,
    UserValueError,
    unknown_names_message,
)
from mvitv2.utils.fields import TYPE_WORDS, checked_fields

AMP_CHOICES = ("none", "bf16", "bf16_force", "fp16")  # see mvitv2.utils.precision
#: kinds of parameters ``wd_exempt`` can spare from weight decay (mvitv2.engine.optim).
WD_EXEMPT = ("norm", "bias", "pos")

__all__ = ["TrainConfig", "UnknownKeyError", "apply_overrides", "parse_value", "short_run_warmup"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data location.

    Args:
        model: a registered variant name (:func:`mvitv2.list_models`).
        model_args: overrides for ``create_model`` (``depths``, ``embed_dim``, ``img_size``,
            ``drop_path_rate``, ...). ``num_classes`` comes from the data.
        pretrained: False, True or a weights tag for ``create_model(pretrained=...)``.
        finetune: path of a checkpoint whose weights initialise the model, in any format
            :func:`mvitv2.load_checkpoint` reads (official ``.pyth``, timm, torchvision,
            detectron2, safetensors, mvitv2 runs), through the task's ``init_weights``: strict
            (a checkpoint that does not fit fails, naming the tensors), the head reset for
            another class count, position tables resized; the optimizer starts fresh.
        data: task-specific data and augmentation options (see the task's documentation).
        epochs: training epochs.
        batch_size: images per process per forward (micro-batch).
        accum_steps: micro-batches per optimizer step (gradient accumulation).
        base_lr: learning rate for a global batch of ``lr_ref_batch``; the used lr is
            ``base_lr * batch_size * world_size * accum_steps / lr_ref_batch``.
        lr_ref_batch: reference batch of ``base_lr`` (256 for the paper's "2.5e-4 per 256").
        min_lr: lr at the end of the cosine decay (absolute, not scaled).
        lr_schedule: ``cosine`` (warmup then cosine to ``min_lr``) or ``step`` (warmup then the
            peak lr multiplied by ``lr_gamma`` at each epoch in ``lr_steps``, detectron2-style).
        lr_steps: epochs (fractions allowed) where the ``step`` schedule decays.
        lr_gamma: decay factor of the ``step`` schedule.
        warmup_lr: lr at step 0 (absolute).
        warmup_epochs: linear warmup length in epochs (fractions allowed), applied per step.
        weight_decay: decay of the weights (AdamW's decoupled decay, or SGD's L2).
        wd_exempt: parameters without weight decay, any of ``norm`` (normalisation layers),
            ``bias`` (other 1-D parameters) and ``pos`` (the model's ``no_weight_decay()``:
            rel-pos tables, position embeddings, cls token); see
            :func:`mvitv2.engine.optim.param_groups`. Default all three, as timm.
        optimizer: ``adamw`` or ``sgd`` (SGD with ``momentum``; SSv2 recipes).
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD (SlowFast's default, its SSv2 recipes).
        betas: AdamW betas.
        clip_grad: max global grad norm (None or 0: no clipping).
        label_smoothing: label smoothing of the classification targets.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        mix_prob: probability to apply mixup or cutmix to a batch.
        switch_prob: probability of cutmix instead of mixup when both are on.
        amp: ``none``, ``bf16``, ``bf16_force`` or ``fp16`` (fp16 uses a GradScaler). On a CPU,
            ``bf16`` first times one of the model's GEMMs in bf16 and fp32 and runs in fp32 when
            bf16 is not faster there (said in a ``note:`` line); ``bf16_force`` keeps bf16
            without measuring. See :mod:`mvitv2.utils.precision`.
        grad_checkpointing: activation checkpointing (``model.set_grad_checkpointing``).
        compile: run the training forward through ``torch.compile``.
        ema_decay: EMA of the weights with this decay per step (0: off).
        seed: seed of data order, augmentation and initialisation.
        workers: data loader worker processes per training process.
        threads: intra-op CPU threads per process (0: torch's default). On a small shared CPU, 1
            thread for compute plus data workers on the other cores avoids spin-wait slowdowns.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        output: parent folder of run folders; the shipped recipes use ``runs/<task>/<recipe>``.
        name: run folder name under ``output`` (empty: a timestamp).
        eval_every: evaluate every N epochs (the last epoch is always evaluated; 0: only then).
        ckpt_every_steps: also checkpoint every N optimizer steps (0: only at epoch ends).
        log_every: TensorBoard scalars every N optimizer steps.
        max_nonfinite_consecutive: stop after this many non-finite steps in a row.
        max_nonfinite_total: stop after this many non-finite steps in total.
        tensorboard: write TensorBoard event files.
        strict_data: fail on the first unreadable sample instead of skipping and counting it.
        progress: show a progress bar (rank 0).
    """

    model: str = "mvitv2_tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool | str = False
    finetune: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    epochs: int = 300
    batch_size: int = 64
    accum_steps: int = 1
    base_lr: float = 2.5e-4
    lr_ref_batch: int = 256
    min_lr: float = 1e-6
    lr_schedule: str = "cosine"
    lr_steps: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    warmup_lr: float = 1e-8
    warmup_epochs: float = 70.0
    weight_decay: float = 0.05
    wd_exempt: tuple[str, ...] = WD_EXEMPT
    optimizer: str = "adamw"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    amp: str = "none"
    grad_checkpointing: bool = False
    compile: bool = False
    ema_decay: float = 0.0
    seed: int = 0
    workers: int = 4
    threads: int = 0
    device: str = "auto"
    output: str = "runs"
    name: str = ""
    eval_every: int = 1
    ckpt_every_steps: int = 0
    log_every: int = 20
    max_nonfinite_consecutive: int = 20
    max_nonfinite_total: int = 200
    tensorboard: bool = True
    strict_data: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (
                self.amp in AMP_CHOICES,
                f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}",
            ),
            (self.epochs >= 1, "epochs must be >= 1"),
            (
                self.optimizer in ("adamw", "sgd"),
                f"optimizer must be adamw or sgd, got {self.optimizer!r}",
            ),
            (
                self.lr_schedule in ("cosine", "step"),
                f"lr_schedule must be cosine or step, got {self.lr_schedule!r}",
            ),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.accum_steps >= 1, "accum_steps must be >= 1"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.threads >= 0, "threads must be >= 0 (0: torch's default)"),
            (self.base_lr > 0 and math.isfinite(self.base_lr), "base_lr must be > 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            # A negative max norm would flip every gradient (torch clamps the clip factor at 1 only).
            (self.clip_grad is None or self.clip_grad >= 0, "clip_grad must be >= 0 or null"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0: off)"),
            (len(self.betas) == 2, f"betas must be two numbers, got {list(self.betas)}"),
            (self.lr_ref_batch >= 1, "lr_ref_batch must be >= 1"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "min_lr and warmup_lr must be >= 0"),
            (self.lr_gamma > 0, "lr_gamma must be > 0"),
            (all(s >= 0 for s in self.lr_steps), "lr_steps must be epochs >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                set(self.wd_exempt) <= set(WD_EXEMPT),
                f"wd_exempt takes {', '.join(WD_EXEMPT)}, got {list(self.wd_exempt)}",
            ),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0 (0: off)"),
            (0 <= self.mix_prob <= 1, "mix_prob must be in [0, 1]"),
            (0 <= self.switch_prob <= 1, "switch_prob must be in [0, 1]"),
            (self.eval_every >= 0, "eval_every must be >= 0 (0: the last epoch only)"),
            (self.ckpt_every_steps >= 0, "ckpt_every_steps must be >= 0 (0: epoch ends only)"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserValueError(f"invalid training config: {msg}")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping of field names (unknown names raise :class:`UnknownKeyError`,
        values of the wrong type or range :class:`~mvitv2.errors.UserValueError`)."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UnknownKeyError(unknown_names_message("config key", unknown, names))
        kwargs = {k: _coerce(names[k], v) for k, v in values.items()}
        return cls(**kwargs)

    @classmethod
    def load(
        cls, recipe: str | os.PathLike | None = None, overrides: Iterable[str] = ()
    ) -> TrainConfig:
        """Defaults, then the YAML ``recipe`` (if any), then ``key=value`` ``overrides``.

        Args:
            recipe: path of a YAML mapping of config keys.
            overrides: strings ``key=value``; ``data.x=v`` / ``model_args.x=v`` set one entry.
        """
        values: dict[str, Any] = {}
        if recipe is not None:
            path = Path(recipe)
            if not path.is_file():
                raise UserFileNotFoundError(f"recipe {path} does not exist")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise UserValueError(
                    f"recipe {path}: not valid YAML, {_yaml_problem(e)}; fix the file"
                ) from None
            if not isinstance(loaded, dict):
                raise UserValueError(
                    f"recipe {path}: expected a YAML mapping, got {type(loaded).__name__}"
                )
            values.update(loaded)
        return cls.from_dict(apply_overrides(values, overrides))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated like :meth:`from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_overrides(self, overrides: Iterable[str]) -> TrainConfig:
        """A copy with ``key=value`` strings applied."""
        return type(self).from_dict(apply_overrides(self.to_dict(), overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (lists, dicts, numbers, strings): YAML and checkpoint safe."""
        return _plain(dataclasses.asdict(self))

    # ------------------------------------------------------------------ derived
    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.accum_steps * world_size

    def lr(self, world_size: int) -> float:
        """Peak learning rate after linear scaling with the global batch."""
        return self.base_lr * self.global_batch(world_size) / self.lr_ref_batch


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_value(text: str, where: str = "") -> Any:
    """A ``key=value`` value: YAML scalars/lists, plus numbers YAML 1.1 misses (``1e-3``).

    Malformed YAML (``[1, 2``) raises :class:`~mvitv2.errors.UserValueError` naming ``where``
    (e.g. ``override 'k=[1, 2'``; default: the value).
    """
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise UserValueError(
            f"{where or f'value {text!r}'}: not valid YAML, {_yaml_problem(e)}; quote a value "
            "meant as text"
        ) from None
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: where (line and column, from 1) and what."""
    mark = getattr(e, "problem_mark", None)  # a MarkedYAMLError (scanner, parser) has one
    if mark is None:  # no position (e.g. a control character): its own words, on one line
        return " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    if e.context and e.context_mark is not None:
        start = e.context_mark
        text += f" ({e.context} from line {start.line + 1}, column {start.column + 1})"
    return text


def apply_overrides(values: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``values`` with each ``key=value`` (dotted keys go into nested dicts) applied."""
    out = dict(values)  # nested dicts are copied below, before an entry is set
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserValueError(f"override {item!r} is not of the form key=value")
        head, _, rest = key.strip().partition(".")
        if rest:
            sub = out.get(head)
            sub = dict(sub) if isinstance(sub, dict) else {}
            sub[rest] = parse_value(text, f"override {item!r}")
            out[head] = sub
        else:
            out[head] = parse_value(text, f"override {item!r}")
    return out


def short_run_warmup(
    recipe: Mapping[str, Any], overrides: Iterable[str]
) -> tuple[str | None, str | None]:
    """Keep a recipe trainable when ``epochs=`` shortens it to within its warmup.

    A paper recipe run for a few epochs (``epochs=2`` with ``warmup_epochs: 70``) would spend the
    whole run in the linear warmup and never reach its learning rate. When ``overrides`` set
    ``epochs`` to at most the recipe's ``warmup_epochs`` (and below its ``epochs``) without
    setting ``warmup_epochs``, the warmup keeps the recipe's fraction of the run.

    Args:
        recipe: the recipe's values (missing keys take the :class:`TrainConfig` defaults).
        overrides: the ``key=value`` strings of the command line.

    Returns:
        ``(override, message)``: a ``warmup_epochs=...`` override and one line saying what was
        changed and how to choose otherwise; ``(None, None)`` when nothing needs changing.
    """
    given = apply_overrides({}, overrides)
    if "epochs" not in given or "warmup_epochs" in given:
        return None, None
    defaults = TrainConfig()
    epochs = _coerce(_FIELDS["epochs"], given["epochs"])
    recipe_epochs = _coerce(_FIELDS["epochs"], recipe.get("epochs", defaults.epochs))
    warmup = _coerce(_FIELDS["warmup_epochs"], recipe.get("warmup_epochs", defaults.warmup_epochs))
    if not (0 < epochs <= warmup and epochs < recipe_epochs):
        return None, None
    fitted = warmup * epochs / recipe_epochs
    message = (
        f"epochs={epochs} ends within the recipe's {warmup:g}-epoch warmup (of {recipe_epochs} "
        f"epochs), where the lr would never reach its peak: warmup_epochs set to {fitted:.4g} "
        f"(the recipe's {100 * warmup / recipe_epochs:.3g}% of the run); pass warmup_epochs=N to "
        f"choose another"
    )
    return f"warmup_epochs={fitted!r}", message


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check/convert one value against a field's default type."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    name = f.name
    if isinstance(default, dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserValueError(f"config {name}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(default, tuple):  # its items checked too (lr_steps=[a])
        return checked_fields(TrainConfig, {name: value}, "config")[name]
    if value is None:
        # Only the fields typed ``... | None`` (and ``name``: a timestamp, as "") take null;
        # elsewhere it is the user's mistake, not a None that fails later with a TypeError.
        if "None" in str(f.type) or name == "name":
            return None
        what = "true/false or a weights tag" if name == "pretrained" else TYPE_WORDS[type(default)]
        raise UserValueError(f"config {name}: null is not allowed; give {what}")
    if name == "finetune":  # a checkpoint path
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise UserValueError(
                f"config {name}: expected a checkpoint path or null, got {value!r}"
            )
        return value
    if name == "pretrained":  # true/false or a weights tag
        if not isinstance(value, bool | str):
            raise UserValueError(
                f"config {name}: expected true/false or a weights tag, got {value!r}"
            )
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserValueError(f"config {name}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserValueError(f"config {name}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserValueError(f"config {name}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        if isinstance(value, dict | list | bool):
            raise UserValueError(f"config {name}: expected a string, got {value!r}")
        return str(value)  # e.g. name=2024
    return value


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
