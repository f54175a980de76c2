"""The one timer behind the measured choices (GEMM backend, training precision)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


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
