"""Helpers shared by the dataset modules: data directory, the scikit-learn digits, on-disk caching
of generated datasets, and the one bad-sample policy of every dataset.

Bad samples: a dataset raises :class:`BadSample` (path, reason, counter key) for a sample it
cannot read (a dataset may also flag it in its own :class:`SkipCounter` for per-reason
statistics); the engine's loader (``mvitv2.engine.data.SeededDataset``) decides what happens:
training substitutes another sample, evaluation drops it, each is counted and named once.
With ``strict_data`` the first one is a :class:`StrictDataError` (:func:`strict_data_error`): the
user's data, one error line. ``mvitv2.engine`` imports these; ``mvitv2.data`` never imports the
engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mvitv2.errors import (
    UnknownKeyError,
    UserFileNotFoundError,
    UserValueError,
    unknown_names_message,
)
from mvitv2.utils.fields import checked_fields

__all__ = [
    "BadSample",
    "SkipCounter",
    "StrictDataError",
    "build_cached",
    "default_data_dir",
    "find_files",
    "load_digits_arrays",
    "render_digit",
    "split_digit_indices",
    "strict_data_error",
]


_Config = TypeVar("_Config")


def config_from_dict(cls: type[_Config], values: Mapping[str, Any], what: str) -> _Config:
    """Build the dataclass ``cls`` from a recipe's mapping (lists become tuples).

    Args:
        cls: a dataclass type.
        values: option name -> value.
        what: how the options are named in the error, e.g. ``"video data"``.
    Raises:
        mvitv2.errors.UnknownKeyError: naming the unknown keys and the close valid ones (a
            ``KeyError``).
        mvitv2.errors.UserValueError: a value of another type than its field's.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UnknownKeyError(unknown_names_message(f"{what} option", unknown, names))
    return cls(**checked_fields(cls, values, f"{what} option"))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain types (lists for tuples): YAML and checkpoint safe."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def default_data_dir(name: str | None = None) -> Path:
    """Directory where generated (embedded) datasets are cached.

    Args:
        name: optional sub-directory (e.g. ``"digit_scenes"``) appended to the root.

    The root is ``$MVITV2_DATA`` if set, else ``~/.cache/mvitv2/data``.
    """
    root = Path(os.environ.get("MVITV2_DATA") or Path.home() / ".cache" / "mvitv2" / "data")
    return root / name if name else root


def find_files(folder: str | os.PathLike, extensions: Sequence[str]) -> list[Path]:
    """The files under ``folder`` (at any depth, links followed) whose names end in one of
    ``extensions`` (any case), in torchvision's ``ImageFolder`` order: folder by folder, sorted
    by path, each folder's names sorted.

    Hidden files and folders (``.``-prefixed) are skipped: macOS's ``._photo.jpg`` resource
    forks and Jupyter's ``.ipynb_checkpoints`` copies carry media extensions but are not samples.
    """
    exts = tuple(e.lower() for e in extensions)
    walked = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        walked.append(
            (root, [n for n in names if not n.startswith(".") and n.lower().endswith(exts)])
        )
    return [Path(root) / name for root, names in sorted(walked) for name in sorted(names)]


def class_folders(split_dir: Path, layout: str, example: str) -> list[str]:
    """Sorted class folder names of ``split_dir`` (hidden ones skipped), as torchvision's
    ``find_classes``; a missing folder or one without class folders is one clear error.

    Args:
        split_dir: ``ROOT/train`` or ``ROOT/val``.
        layout, example: the layout's name and a sample file pattern for the errors
            (``"an ImageNet-style folder"``, ``"*.jpg"``).
    Raises:
        UserFileNotFoundError: ``split_dir`` is missing or has no class folders.
    """
    if not split_dir.is_dir():
        raise UserFileNotFoundError(
            f"{split_dir} does not exist; expected {layout}: "
            f"{split_dir.parent}/train/<class>/{example} and {split_dir.parent}/val/<class>/{example}"
        )
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise UserFileNotFoundError(f"{split_dir} has no class sub-folders (<class>/{example})")
    return classes


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # 0..16 grey levels -> [0, 1]
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8x8 handwritten digit scans shipped with scikit-learn.

    Returns:
        ``(images, labels)``: float32 array (N, 8, 8) in [0, 1] and int64 array (N,) in 0..9.
        Both are read-only.
    """
    return _digits()


def split_digit_indices(
    labels: np.ndarray, val_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split digit scans into disjoint train/val pools, stratified by class.

    Validation scenes/clips are drawn from scans never seen in training, so held-out accuracy
    measures recognition of new handwriting rather than memorised pixels.

    Args:
        labels: (N,) digit labels.
        val_fraction: fraction of each class's scans that go to the validation pool.
        seed: seed of the shuffle.
    Returns:
        ``(train_indices, val_indices)`` into ``labels``, each sorted.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def render_digit(image8: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upscale an 8x8 digit scan to ``height`` x ``width`` with bilinear interpolation.

    Args:
        image8: (8, 8) float array in [0, 1].
        height, width: output size in pixels.
    Returns:
        float32 (height, width) array in [0, 1] (a smooth stroke intensity, usable as alpha).
    """
    t = torch.tensor(np.asarray(image8, dtype=np.float32))[None, None]
    # Pad one blank pixel so strokes touching the scan border fade out instead of being cut.
    t = torch.nn.functional.pad(t, (1, 1, 1, 1))
    ph, pw = round(height * 10 / 8), round(width * 10 / 8)
    up = torch.nn.functional.interpolate(t, size=(ph, pw), mode="bilinear", align_corners=False)
    top, left = (ph - height) // 2, (pw - width) // 2
    out = up[0, 0, top : top + height, left : left + width].clamp_(0, 1)
    return out.numpy()


def build_cached(root: str | Path, params: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Build a generated dataset once and reuse it while its parameters are unchanged.

    ``build(tmp_dir)`` writes the dataset into a fresh temporary directory next to ``root``; it is
    then renamed into place atomically with a ``_params.json`` stamp, so an interrupted build
    never leaves a half-written dataset and concurrent builders (e.g. several DDP ranks) agree.

    Args:
        root: final dataset directory.
        params: JSON-serialisable generation parameters; a different value rebuilds the dataset.
        build: callable that writes the dataset into the directory it is given.
    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    stamp = root / "_params.json"
    params = json.loads(json.dumps(params))  # normalise tuples -> lists for comparison

    def up_to_date() -> bool:
        try:
            return json.loads(stamp.read_text()) == params
        except (OSError, ValueError):
            return False

    if up_to_date():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / "_params.json").write_text(json.dumps(params, indent=1))
        if root.exists() and not up_to_date():
            shutil.rmtree(root, ignore_errors=True)  # stale: other parameters or version
        try:
            os.rename(tmp, root)
        except OSError:
            if not up_to_date():  # lost a race to a builder with other params: surface it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


class BadSample(Exception):
    """Raised by a dataset for a sample that cannot be read (missing or corrupt file, failed
    decode, a size that differs from the annotations).

    Args:
        path: the file at fault.
        reason: what went wrong, for people.
        kind: the :class:`SkipCounter` key it is counted under (e.g. ``"unreadable_image"``).
    """

    #: what a sample is called in messages (``"skipped unreadable video ..."``); a dataset's
    #: subclass names its own (``"video"``).
    what: str = "sample"

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = "unreadable") -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = str(path), reason, kind


class StrictDataError(UserValueError, RuntimeError):
    """A bad sample met with ``strict_data``: the user's data, one error line (exit 2)."""


def strict_data_error(error: BadSample, what: str | None = None) -> StrictDataError:
    """The one-line error for ``error`` met with ``strict_data`` (raise it ``from None``).

    Args:
        error: the bad sample.
        what: what a sample is called in the message (default: the error's
            :attr:`BadSample.what`, ``"sample"`` or e.g. ``"video"``).
    """
    what = what or error.what
    return StrictDataError(
        f"unreadable {what} (strict data): {error}; without strict_data such {what}s are "
        "skipped and counted"
    )


#: Rows of a :class:`SkipCounter`'s shared event table: the main process and DataLoader workers
#: 0-254 each add into a row of their own, because an add is a read-modify-write that loses
#: counts when two processes do it on one row at once (workers past 254 share rows).
EVENT_ROWS = 256


def _own_row() -> int:
    """This process's row of a :class:`SkipCounter` (0: not a DataLoader worker)."""
    info = get_worker_info()
    return 0 if info is None else 1 + info.id % (EVENT_ROWS - 1)


class SkipCounter:
    """Counts of skipped or repaired samples, shared with DataLoader worker processes.

    Values live in a shared-memory tensor, so increments made inside workers are visible in the
    main process (``counter.as_dict()`` after or during an epoch); each process adds into its own
    row (:data:`EVENT_ROWS`), so none is lost when workers count at once. Per-item flags are idempotent
    (setting the same flag twice counts once), which makes "number of bad files" exact even
    when several workers hit the same file.

    Args:
        keys: names of the event counters.
        num_items: number of items that can be flagged (e.g. videos in the list file).
    """

    def __init__(self, keys: Sequence[str], num_items: int = 0) -> None:
        self.keys = list(keys)
        self._events = torch.zeros(EVENT_ROWS, len(self.keys), dtype=torch.int64).share_memory_()
        # flag value = 1 + index of the key that first marked the item; 0 = not flagged.
        self._flags = torch.zeros(max(num_items, 1), dtype=torch.int16).share_memory_()

    def add(self, key: str, n: int = 1) -> None:
        """Increment event counter ``key`` by ``n``."""
        self._events[_own_row(), self.keys.index(key)] += n

    def flag(self, item: int, key: str) -> bool:
        """Mark ``item`` as bad for reason ``key`` (idempotent); True if it was not flagged yet
        (by any process): the caller names it then."""
        if int(self._flags[item]) != 0:
            return False
        self._flags[item] = self.keys.index(key) + 1
        return True

    def is_flagged(self, item: int) -> bool:
        """Whether ``item`` was marked bad by any worker."""
        return bool(self._flags[item] != 0)

    def flagged(self, key: str | None = None) -> list[int]:
        """Indices of items flagged (for reason ``key``, or any reason when None)."""
        f = self._flags
        sel = f != 0 if key is None else f == self.keys.index(key) + 1
        return torch.nonzero(sel).flatten().tolist()

    def __getitem__(self, key: str) -> int:
        return int(self._events[:, self.keys.index(key)].sum())

    def as_dict(self) -> dict[str, int]:
        """Event counters plus ``bad_<reason>`` counts of distinct flagged items."""
        out = dict(zip(self.keys, self._events.sum(0).tolist()))
        for i, k in enumerate(self.keys):
            n = int((self._flags == i + 1).sum())
            if n:
                out[f"bad_{k}"] = n
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"SkipCounter({body})"
