"""Reproducible, sharded, fault-tolerant data loading shared by every task.

* :class:`EpochSampler` shuffles with a generator seeded by ``(seed, epoch)`` (the same global
  order for any number of processes), gives rank ``r`` the indices ``r::world_size`` so that the
  union of the ranks' k-th batches is the k-th batch of a 1-process run with the same global batch,
  and can start mid-epoch (resume).
* :class:`SeededDataset` runs each sample's random augmentation under a seed derived from
  ``(seed, epoch, index)``, so augmentation does not depend on worker count, process count or
  where a run was resumed.
* A dataset signals an unreadable sample by raising :class:`~mvitv2.data.common.BadSample` (the
  policy shared by every dataset, see :mod:`mvitv2.data.common`); the wrapper counts it and
  (training) substitutes the next sample or (evaluation) drops it, or raises the one-line
  :class:`~mvitv2.data.common.StrictDataError` in strict mode. Every dataset leaves this policy
  to the wrapper (the video dataset included: a bad video raises for each of its test views).
  :meth:`SeededDataset.take_new_bad` names each such file once (path and reason) in the main
  process, also those met by DataLoader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mvitv2.data.common import BadSample, SkipCounter, StrictDataError, strict_data_error
from mvitv2.errors import UserValueError

#: unreadable samples in a row after which training stops (the data, not a few files, is broken).
MAX_BAD_IN_A_ROW = 16

__all__ = [
    "MAX_BAD_IN_A_ROW",
    "BadSample",
    "EpochSampler",
    "SeededDataset",
    "StrictDataError",
    "build_loader",
    "collate_skip_none",
    "sample_seed",
]


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank; the order depends only on seed and epoch.

    Args:
        length: dataset size.
        rank, world_size: this process's shard.
        shuffle: random order per epoch (training) or the natural order (evaluation).
        seed: base seed.
        pad: repeat samples so every rank gets the same count (training; DDP needs equal steps).
    """

    def __init__(
        self,
        length: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
    ) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` samples of this rank (resume)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.length / self.world_size) * self.world_size
            order += order[: total - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices()[self.start :]:
            yield i, sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (
        1 << 63
    )


class SeededDataset(Dataset):
    """Wraps a dataset indexed by ``(index, seed)`` pairs from :class:`EpochSampler`.

    Args:
        dataset: the task's dataset; may raise :class:`BadSample`.
        substitute: on a bad sample use the next index (training, keeps batch sizes equal across
            processes); otherwise return None, dropped by :func:`collate_skip_none` (evaluation).
        strict: raise the one-line :class:`StrictDataError` instead.

    Raises:
        UserValueError: :data:`MAX_BAD_IN_A_ROW` samples in a row are unreadable (training).
    """

    def __init__(self, dataset: Dataset, substitute: bool, strict: bool = False) -> None:
        self.dataset, self.substitute, self.strict = dataset, substitute, strict
        # Shared memory: the main process sees what the workers met.
        self.counter = SkipCounter(["unreadable"], num_items=len(self))
        self._errors: dict[int, BadSample] = {}  # met in this process (workers keep their own)
        self._named: set[int] = set()  # flagged indices already looked at by take_new_bad
        self._named_paths: set[str] = set()  # files already named (several items may share one)
        self._events_seen = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def bad_samples(self) -> int:
        """Distinct unreadable samples met so far (all workers of this process)."""
        return len(self.counter.flagged())

    @property
    def skipped(self) -> int:
        """Samples skipped so far (all workers of this process; a bad sample met in two epochs
        counts twice)."""
        return self.counter["unreadable"]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        index, seed = key if isinstance(key, tuple) else (key, sample_seed(0, 0, key))
        n = len(self)
        tries = min(n, MAX_BAD_IN_A_ROW)
        for attempt in range(tries):
            i = (index + attempt) % n
            try:
                with torch.random.fork_rng(devices=[]):
                    # The CPU generator only: torch.manual_seed would also (re)seed every CUDA
                    # device's generator, which fork_rng(devices=[]) does not restore, and costs
                    # ~0.4-1.8 ms a sample even without CUDA (it queues the seeding lazily).
                    torch.default_generator.manual_seed(seed)
                    return self.dataset[i]
            except BadSample as e:
                if self.strict:
                    raise strict_data_error(e) from None
                self._errors.setdefault(i, e)
                self.counter.flag(i, "unreadable")  # first: whoever sees the count sees the flag
                self.counter.add("unreadable")
                if not self.substitute:
                    return None
                last = e
        raise UserValueError(
            f"{tries} unreadable {last.what}s in a row from index {index}, the last "
            f"{last.path}: {last.reason}; the data looks broken: check that the data root and "
            f"the list or annotation file point at existing, readable files"
        )

    def take_new_bad(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every unreadable file not named by an earlier call: a file is
        named once even when several items share it (the test views of one video).

        Call it in the main process (cheap when nothing new was skipped). A sample skipped inside
        a DataLoader worker is read once more here to recover its path and reason (the RNG
        states are kept, so this does not change the run).
        """
        events = self.skipped
        if events == self._events_seen:
            return []
        self._events_seen = events
        out = []
        for i in self.counter.flagged():
            if i in self._named:
                continue
            self._named.add(i)
            e = self._errors.get(i) or self._reread(i)
            path, reason = (
                (e.path, e.reason)
                if e is not None
                else (f"sample {i}", "unreadable in a data worker, readable when read again")
            )
            if path not in self._named_paths:
                self._named_paths.add(path)
                out.append((path, reason))
        return out

    def _reread(self, i: int) -> BadSample | None:
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                self.dataset[i]
        except BadSample as e:
            return e
        finally:
            random.setstate(py)
            np.random.set_state(npy)
        return None


def collate_skip_none(collate: Callable[[list], Any] | None = None) -> Callable[[list], Any]:
    """A collate function that drops None samples (skipped ones) before ``collate``."""
    inner = collate or default_collate

    def fn(batch: Sequence[Any]) -> Any:
        kept = [b for b in batch if b is not None]
        return inner(kept) if kept else None

    return fn


def first_mentions(found: Sequence[tuple[str, str]], named: set[str]) -> list[tuple[str, str]]:
    """The ``(path, reason)`` pairs of ``found`` whose file is not in ``named`` yet, each file
    once, in order; adds them to ``named`` (the test views of one video may fail in several
    processes, and a file met again later is not named again)."""
    out = []
    for path, reason in found:
        if path not in named:
            named.add(path)
            out.append((path, reason))
    return out


def gather_first_mentions(
    dist: Any, mine: Sequence[tuple[str, str]], named: set[str]
) -> list[tuple[str, str]]:
    """Collective (every process calls it): the unreadable files every process met
    (:meth:`SeededDataset.take_new_bad`), gathered, then :func:`first_mentions` of them; only
    the main process's answer is meant to be reported."""
    found = [b for part in dist.all_gather_object(list(mine)) for b in part]
    return first_mentions(found, named)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int = 0,
    collate_fn: Callable[[list], Any] | None = None,
    strict: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over ``dataset`` wrapped in :class:`SeededDataset` with an :class:`EpochSampler`.

    Args:
        dataset: the task's dataset (may raise :class:`BadSample`).
        batch_size: per-process batch.
        train: shuffle, pad shards to equal length, drop the last partial batch, substitute bad
            samples; otherwise the natural order, no padding, bad samples dropped.
        rank, world_size: this process's shard.
        seed: base seed of the order and augmentation.
        workers: worker processes.
        collate_fn: the task's collate (default: ``default_collate``).
        strict: fail on a bad sample.
        pin_memory: pin batches (CUDA).

    The loader's ``sampler`` is the :class:`EpochSampler` (call ``set_epoch``) and its
    ``dataset`` the :class:`SeededDataset` (``bad_samples``).
    """
    wrapped = SeededDataset(dataset, substitute=train, strict=strict)
    sampler = EpochSampler(len(wrapped), rank, world_size, shuffle=train, seed=seed, pad=train)
    return DataLoader(
        wrapped,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn if train else collate_skip_none(collate_fn),
        drop_last=train,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Own generator: creating an iterator must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
