"""The timer behind every measured choice (:func:`best_ms`: the one-off choices of a training
run, GEMM backends and precision) and the per-size-class table of interchangeable kernels built on
it (attention path, GEMM backend at inference)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping

#: The reason a resumed training run gives for a choice it took from its checkpoint instead of
#: measuring it again (see :func:`mvitv2.ops.keep_training_choices`).
KEPT_WHY = "kept from the checkpoint being resumed"

try:
    import resource
except ImportError:  # not on Unix: no page-fault count, one warm-up round
    resource = None


def _page_faults() -> int:
    """This process's minor page faults so far, all threads (0 where not counted)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best_ms(
    candidates: Mapping[str, Callable[[], object]],
    budget_ms: float,
    min_rounds: int = 2,
    max_rounds: int = 10,
    max_warmups: int = 5,
) -> dict[str, float]:
    """The best time in ms of each of interchangeable calls, timed in alternating rounds.

    Each candidate is called once (a warm-up round, timed only to size the measurement), then all
    are called in turn for ``ceil(budget_ms / warm-up round)`` rounds, at least ``min_rounds`` and
    at most ``max_rounds``. Alternating rounds and the best of each: on a shared machine another
    process slows the calls it overlaps, and a burst of it then hits every candidate's rounds
    alike instead of one candidate's whole series.

    The warm-up round is repeated, up to ``max_warmups`` rounds, until one runs without a page
    fault: a large output gets fresh pages from the kernel until the C allocator has a free block
    it can reuse for it, which with 64-byte aligned blocks of one size took glibc up to four
    allocations (measured on an Intel Xeon, 2 threads: ``25088x96 @ 96x576`` on oneDNN 28 ms
    while its 58 MB output faulted in, 15 ms after; so a class measured at a model's first
    forward chose the slower backend). Without a fault count, or where every call faults (glibc
    maps each large block afresh by default), the last warm-up round sizes the measurement.

    Args:
        candidates: names mapped to the calls to time (their outputs are dropped).
        budget_ms: time to spend on the timed rounds, about (fast candidates get more rounds).
        min_rounds: timed rounds at least, whatever the budget.
        max_rounds: timed rounds at most.
        max_warmups: warm-up rounds at most.
    """

    def timed(name: str) -> float:
        start = time.perf_counter()
        candidates[name]()
        return (time.perf_counter() - start) * 1e3

    for _ in range(max_warmups):
        faults = _page_faults()
        first = sum(timed(name) for name in candidates)
        if _page_faults() == faults:
            break
    rounds = min(max(math.ceil(budget_ms / max(first, 1e-3)), min_rounds), max_rounds)
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(rounds):
        for name in candidates:
            best[name] = min(best[name], timed(name))
    return best


class MeasuredChoices:
    """The fastest of interchangeable implementations, per size class, for this process.

    At a class's first :meth:`choose` the candidates are timed by :func:`best_ms` (warm-up
    rounds until one runs without a page fault, then 3-10 alternating rounds, about
    ``budget_ms`` in all; the best time of each). At least 3: a new GEMM shape's first calls on
    oneDNN run up to 2x slow (measured on an Intel Xeon, 2 cores: ``65536x96 @ 96x192`` 14, 23,
    24, then 10-12 ms), and with 2 rounds such a start decided for the slower backend for the
    whole process. The default candidate is kept unless another beat it by more than ``margin``
    (a fraction). After ``max_classes`` classes, new classes get the default unmeasured (bounded
    time and memory).

    Args:
        default: the candidate name kept on a tie (and beyond ``max_classes``).
        budget_ms: time spent measuring one class, about (more rounds for fast candidates).
        max_classes: classes measured per process at most.
        margin: how much faster (fraction of the default's time) another candidate must be.
        min_rounds: timed rounds at least.
    """

    def __init__(
        self,
        default: str,
        budget_ms: float = 60.0,
        max_classes: int = 64,
        margin: float = 0.0,
        min_rounds: int = 3,
    ) -> None:
        self.default, self.budget_ms, self.min_rounds = default, budget_ms, min_rounds
        self.max_classes, self.margin = max_classes, margin
        # class key -> (chosen name, best ms per candidate, label)
        self.table: dict[Hashable, tuple[str, dict[str, float], str]] = {}

    def choose(
        self,
        key: Hashable,
        measure: Callable[[], tuple[dict[str, Callable[[], object]], str]],
        margin: float | None = None,
    ) -> str:
        """The name of the fastest candidate for class ``key`` (measured now if new).

        ``measure()`` is called only for a new class (a known class costs one dict lookup, on
        every call of the kernel): it returns the candidates, names mapped to calls on the
        actual inputs (their outputs are dropped), and a label that names the class in
        :meth:`report` (e.g. the shapes it was timed on). ``margin``: this class's margin
        (None: the table's).
        """
        known = self.table.get(key)
        if known is not None:
            return known[0]
        if len(self.table) >= self.max_classes:
            return self.default
        candidates, label = measure()
        best = best_ms(candidates, self.budget_ms, self.min_rounds)
        chosen = min(best, key=best.get)
        margin = self.margin if margin is None else margin
        if self.default in best and best[chosen] >= (1 - margin) * best[self.default]:
            chosen = self.default
        self.table[key] = (chosen, best, label)
        return chosen

    def report(self) -> dict[str, str]:
        """``{label: "chosen (name ms, ...)"}`` for each class measured so far."""
        out = {}
        for chosen, ms, label in self.table.values():
            times = ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items())
            out[label] = f"{chosen} ({times})"
        return out
