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
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a clear error when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise RuntimeError(f"checkpoint {path} could not be read: {e}") from e


def find_resume(resume: str | None, run_parent: str | os.PathLike, name: str = "") -> Path | None:
    """The checkpoint to resume from.

    Args:
        resume: None (start fresh), a checkpoint path, or ``auto``: ``<run_parent>/<name>/last.pt``
            when ``name`` is set, else the newest ``<run_parent>/*/last.pt``; None if there is none.
        run_parent: the config's ``output`` folder.
        name: the config's run ``name``.
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / LAST
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
        return path
    parent = Path(run_parent)
    if name:
        path = parent / name / LAST
        return path if path.is_file() else None
    found = sorted(parent.glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


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
