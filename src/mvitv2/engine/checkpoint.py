"""Crash-safe checkpoints: atomic writes, RNG capture/restore, ``--resume auto`` lookup.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(..., weights_only=True)``. Keys written by the trainer: ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``ema`` (optional), ``epoch`` (epochs completed), ``step`` (optimizer
steps done), ``step_in_epoch``, ``rng``, ``config`` (a :class:`TrainConfig` dict), ``meta`` (task
metadata such as class names), ``counters`` and ``metrics``.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvitv2.errors import CheckpointNotFoundError, UserCheckpointError, UserValueError

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    A crash leaves either the previous file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files that :func:`save_checkpoint` left in ``run_dir`` when it was killed
    before its ``os.replace`` (each as large as a checkpoint; nothing else removes them).

    Call it on the process that writes, before its first save, when resuming a run.

    Returns:
        the files removed.
    """
    stale = [p for name in (LAST, BEST) for p in Path(run_dir).glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class UnreadableCheckpointError(UserCheckpointError):
    """A file given as a checkpoint that ``torch.load(weights_only=True)`` cannot read."""


#: Files people pass as ``--checkpoint`` by mistake: what they are.
_NOT_CHECKPOINTS = {
    ".onnx": "an ONNX model written by `mvitv2 export`",
    ".pt2": "a torch.export program written by `mvitv2 export`",
    ".json": "a JSON file",
    ".yaml": "a YAML file",
}


def read_training_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict:
    """Read a training checkpoint (the dict :func:`save_checkpoint` wrote) with
    ``weights_only=True``. To load released or converted weights into a model, use
    :func:`mvitv2.load_checkpoint`.

    Args:
        path: the checkpoint file (a run's ``best.pt`` or ``last.pt``).
        map_location: device for the tensors.

    Raises:
        CheckpointNotFoundError: no such file (a folder is named as such).
        UnreadableCheckpointError: not a torch checkpoint (an ONNX export, a truncated file, a
            pickle of other objects); one line saying what the file is and what to pass.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointNotFoundError(
            f"checkpoint {path} is a folder; pass a checkpoint file such as {path / BEST}"
        )
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    kind = _NOT_CHECKPOINTS.get(path.suffix.lower())
    if kind is not None:
        raise UnreadableCheckpointError(
            f"checkpoint {path} is {kind}, not a training checkpoint; pass the run's "
            f"{BEST} or {LAST}"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects besides tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpointError(
            f"checkpoint {path} could not be read by torch.load(weights_only=True): {first}"
        ) from e


#: Config keys that may differ between an interrupted run and the command that resumes it: they
#: change where and how fast the run goes, not what it computes (``epochs`` extends or shortens
#: the schedule, which is rebuilt from the resuming config).
RESUME_MAY_CHANGE = frozenset(
    [
        "epochs",
        "output",
        "name",
        "workers",
        "threads",
        "device",
        "progress",
        "tensorboard",
        "log_every",
        "eval_every",
        "ckpt_every_steps",
        "strict_data",
        "max_nonfinite_consecutive",
        "max_nonfinite_total",
        "compile",
        "grad_checkpointing",
    ]
)

#: Config keys added since runs were first saved, with the value that computes as those runs did:
#: a saved config without one is read with it, so ``--resume auto`` still finds such a run.
ADDED_CONFIG_KEYS: Mapping[str, Any] = {
    "nesterov": False,
    "wd_exempt": ["norm", "bias", "pos"],
}


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint a run continues from.

    Args:
        path: the checkpoint file.
        differences: config / task keys where it differs from the resuming run (empty for
            ``--resume auto``, which only picks runs of the same experiment).
    """

    path: Path
    differences: list[str]


def experiment_differences(
    saved_config: Mapping[str, Any],
    saved_meta: Mapping[str, Any],
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> list[str]:
    """Keys where a checkpoint's experiment differs from this run's.

    Args:
        saved_config, saved_meta: the checkpoint's ``config`` and ``meta`` (task metadata:
            classes, data root, ...).
        config, meta: this run's ``TrainConfig.to_dict()`` and ``Task.checkpoint_meta()``.

    Returns:
        sorted names, dotted one level into mappings (``base_lr``, ``data.img_size``,
        ``meta.classes``); keys of :data:`RESUME_MAY_CHANGE` are ignored.
    """

    def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> list[str]:
        out = []
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if isinstance(x, Mapping) and isinstance(y, Mapping):
                out += [f"{prefix}{k}.{s}" for s in sorted(set(x) | set(y)) if x.get(s) != y.get(s)]
            elif x != y:
                out.append(f"{prefix}{k}")
        return out

    keep = {k: v for k, v in config.items() if k not in RESUME_MAY_CHANGE}
    added = {k: v for k, v in ADDED_CONFIG_KEYS.items() if k in config}
    saved_config = {**added, **saved_config}
    saved = {k: v for k, v in saved_config.items() if k not in RESUME_MAY_CHANGE}
    return diff(saved, keep, "") + diff(saved_meta, meta, "meta.")


#: a checkpoint dict -> its ``meta`` in the current schema (``Task.upgrade_meta``).
MetaUpgrade = Callable[[Mapping[str, Any]], Mapping[str, Any]]


_UNREADABLE = "unreadable checkpoint"


def _differences_of(
    path: Path,
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    upgrade_meta: MetaUpgrade | None = None,
) -> list[str]:
    try:  # mmap: reads the small config and meta, not the weights
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a torch file: not this experiment's
        return [f"{_UNREADABLE} ({type(e).__name__})"]
    saved_meta = upgrade_meta(state) if upgrade_meta is not None else state.get("meta") or {}
    return experiment_differences(state.get("config") or {}, saved_meta, config, meta)


def find_resume(
    resume: str | None,
    run_parent: str | os.PathLike,
    name: str = "",
    config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    upgrade_meta: MetaUpgrade | None = None,
) -> ResumeChoice | None:
    """The checkpoint to resume from.

    Args:
        resume: None (start fresh), a checkpoint path or run folder (resumed even when its
            experiment differs; the differences are returned), or ``auto``: the newest
            ``<run_parent>/*/last.pt`` of the same experiment (``<run_parent>/<name>/last.pt``
            when ``name`` is set); None when there is no run to resume.
        run_parent: the config's ``output`` folder.
        name: the config's run ``name``.
        config: this run's ``TrainConfig.to_dict()``.
        meta: this run's ``Task.checkpoint_meta()``.
        upgrade_meta: brings a saved checkpoint's ``meta`` to the schema of ``meta``
            (``Task.upgrade_meta``), so that a checkpoint written before a metadata schema change
            is still the same experiment; None compares the ``meta`` as saved.

    Raises:
        CheckpointNotFoundError: ``resume`` names no checkpoint.
        UserValueError: ``auto`` found runs, none of them of this experiment (the message names
            the newest and its differences, and how to resume it anyway or start fresh).
    """
    if not resume:
        return None
    config, meta = config or {}, meta or {}
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / LAST
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"--resume {resume}: no checkpoint at {path} (pass a last.pt/best.pt file, a run "
                "folder holding last.pt, or 'auto')"
            )
        return ResumeChoice(path, _differences_of(path, config, meta, upgrade_meta))
    parent = Path(run_parent)
    if name:
        candidates = [parent / name / LAST] if (parent / name / LAST).is_file() else []
    else:
        candidates = sorted(parent.glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime, reverse=True)
    newest: tuple[Path, list[str]] | None = None
    for path in candidates:
        differences = _differences_of(path, config, meta, upgrade_meta)
        if not differences:
            return ResumeChoice(path, [])
        newest = newest or (path, differences)
    if newest is None:
        return None
    path, differences = newest
    if differences[0].startswith(_UNREADABLE):
        # Resuming it "anyway" would fail the same way: say what is wrong and what else to use.
        best = path.parent / BEST
        other = f"resume from its {BEST} with --resume {best}, or " if best.is_file() else ""
        raise UserValueError(
            f"--resume auto: {path} cannot be read ({differences[0]}): the file is damaged "
            f"(our writes are atomic: it was cut short or changed afterwards); {other}start a "
            "fresh run" + (" with another name=" if name else " without --resume")
        )
    shown = ", ".join(differences[:8]) + (
        f" and {len(differences) - 8} more" if len(differences) > 8 else ""
    )
    where = (
        f"the run {path.parent}"
        if name
        else f"no run of this experiment in {parent}; the newest, {path.parent},"
    )
    raise UserValueError(
        f"--resume auto: {where} is another experiment (its config differs in {shown}); resume "
        f"it anyway with --resume {path}, or start a fresh run"
        + (" with another name=" if name else " without --resume")
    )


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA, as tensors and plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
