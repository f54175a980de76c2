"""Tensors derived from parameters (bf16 casts, pooling weights repeated over heads, stacked
norm weights, gathered rel-pos tables), made once and kept across inference calls.

At inference every call would otherwise make them again from unchanged parameters: small ops,
but many (with the kept rel-pos one-hots, MViTv2-S video under bf16 went from 2,579 to 1,987
ops per forward: 3 ms of a 16x32x32 clip's 35, 2 threads of the Intel Xeon of
docs/benchmarks.md), and autocast's weight casts are a quarter to a third of a bf16 linear
layer's time (see :func:`mvitv2.ops.gemm.inference_cast`).

A kept tensor is keyed weakly by its first source (it goes when that tensor goes) and made again
when any source's storage (``.data = ...``) or version counter (an in-place write:
``load_state_dict``, ``copy_``, a foreach optimizer step) has changed since. PyTorch's fused
optimizers (``fused=True``, as our engine builds them) write parameters without counting a
version, so every ``torch.optim`` step drops all kept tensors (a global step hook); writes
through ``.data`` are not counted either: call :func:`clear_kept` after them. Nothing is kept
with gradients enabled, while compiling, exporting or tracing, under a dispatch mode (FLOP
counting), or from an inference tensor (no version counter): there the derivation is made
afresh at each call.

Tensors that depend on their arguments only (rel-pos index tables, key one-hots) are made once
per arguments in eager code (:func:`once_per_arguments`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakTensorKeyDictionary

from mvitv2.ops.context import intercepted, tracing


class _Kept(NamedTuple):
    """A kept tensor and the state of its sources when it was made."""

    key: Hashable
    storages: tuple[StorageWeakRef, ...]
    versions: tuple[int, ...]
    value: Tensor


# first source -> {(kind, number of sources): _Kept}: one tensor per kind, so that memory stays
# bounded where the key changes (a detector given images of many sizes).
_KEPT: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def keeping() -> bool:
    """Whether derived tensors are kept now: no gradients, eager code, no dispatch mode."""
    return not torch.is_grad_enabled() and not tracing() and not intercepted()


def kept(kind: str, key: Hashable, make: Callable[..., Tensor], *sources: Tensor) -> Tensor:
    """``make(*sources)``, kept across calls while :func:`keeping` (else made afresh).

    Args:
        kind: what is kept (``"cast"``, ``"heads"``...; :func:`kept_bytes` counts per kind).
            One tensor per kind and number of sources is kept for a first source.
        key: what else ``make`` depends on (dtype, sizes...): another key replaces it.
        make: makes the tensor from ``sources``: a new tensor, neither a source nor a view of
            one (a kept value that holds its first source would keep it alive).
        sources: the tensors it is made from (parameters).
    """
    if not keeping() or any(s.is_inference() for s in sources):
        return make(*sources)
    storages = [s.untyped_storage() for s in sources]
    versions = tuple(s._version for s in sources)
    entries = _KEPT.get(sources[0])
    if entries is None:
        entries = _KEPT[sources[0]] = {}
    name = (kind, len(sources))
    k = entries.get(name)
    # The weak references keep the old storages' bookkeeping allocated, so a new storage can
    # never have one's address: equal addresses mean the same storage.
    if (
        k is None
        or k.key != key
        or k.versions != versions
        or any(w.cdata != s._cdata for w, s in zip(k.storages, storages))
    ):
        k = _Kept(key, tuple(StorageWeakRef(s) for s in storages), versions, make(*sources))
        entries[name] = k
    return k.value


def kept_bytes(kind: str | None = None) -> int:
    """Bytes of the tensors kept now (of one ``kind``, or all)."""
    return sum(
        k.value.numel() * k.value.element_size()
        for entries in _KEPT.values()
        for (kept_kind, _), k in entries.items()
        if kind is None or kept_kind == kind
    )


def clear_kept() -> None:
    """Drop every kept tensor (each is made again when next used)."""
    _KEPT.clear()


def once_per_arguments(maxsize: int) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator for a tensor that depends only on its (hashable) arguments: in eager code made
    once per arguments (at most ``maxsize`` kept) and shared, so read-only; a normal tensor, so
    autograd may save it even when first made under ``inference_mode``. While tracing or under
    a dispatch mode it is made afresh, as ops of the graph (a traced constant, or a fake tensor
    kept from FLOP counting, would break later calls). The wrapper has ``cache_info`` and
    ``cache_clear`` of :func:`functools.lru_cache`."""

    def decorate(make: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.lru_cache(maxsize=maxsize)
        def made(*args: object, **kwargs: object) -> Tensor:
            with torch.inference_mode(False):
                return make(*args, **kwargs)

        @functools.wraps(make)
        def get(*args: object, **kwargs: object) -> Tensor:
            if tracing() or intercepted():
                return make(*args, **kwargs)
            return made(*args, **kwargs)

        get.cache_info, get.cache_clear = made.cache_info, made.cache_clear
        return get

    return decorate


def _drop_after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    clear_kept()


register_optimizer_step_post_hook(_drop_after_step)
