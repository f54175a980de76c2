"""The timers behind the measured choices: one best-of-N timer (GEMM backend, training
precision) and the per-size-class table of interchangeable kernels (attention path, GEMM backend
at inference)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, in seconds, after one untimed warm-up
    call (the minimum is what survives other processes on a shared machine)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class MeasuredChoices:
    """The fastest of interchangeable implementations, per size class, for this process.

    At a class's first :meth:`choose` each candidate is run once (warm-up), then in 2-10
    alternating rounds, about ``budget_ms`` in all; the best time of each counts. The default
    candidate is kept unless another beat it by more than ``margin`` (a fraction). After
    ``max_classes`` classes, new classes get the default unmeasured (bounded time and memory).

    Args:
        default: the candidate name kept on a tie (and beyond ``max_classes``).
        budget_ms: time spent measuring one class, about (more rounds for fast candidates).
        max_classes: classes measured per process at most.
        margin: how much faster (fraction of the default's time) another candidate must be.
    """

    def __init__(
        self, default: str, budget_ms: float = 60.0, max_classes: int = 64, margin: float = 0.0
    ) -> None:
        self.default, self.budget_ms = default, budget_ms
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

        def timed(name: str) -> float:
            start = time.perf_counter()
            candidates[name]()
            return (time.perf_counter() - start) * 1e3

        first = {name: timed(name) for name in candidates}  # warm-up
        rounds = min(max(math.ceil(self.budget_ms / max(sum(first.values()), 1e-3)), 2), 10)
        best = dict.fromkeys(candidates, math.inf)
        for _ in range(rounds):
            for name in candidates:
                best[name] = min(best[name], timed(name))
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
