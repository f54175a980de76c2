"""The precision a training run computes in, decided on the machine at hand.

The paper recipes ask for bf16 autocast (``amp: bf16``). On a GPU that is always faster; on a CPU
it depends on the chip: with native bf16 matrix units it is, elsewhere bf16 autocast can be
several times slower than fp32 (2.3x for a video step on one Xeon). So on a CPU, ``amp: bf16``
times one GEMM of the model's most common shape in bf16 and in fp32 (0.1-1 s, on one thread)
and keeps bf16 only when it is faster; ``amp: bf16_force`` keeps bf16 without measuring.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mvitv2.utils.timing import KEPT_WHY, best_ms

FORCE_BF16 = "bf16_force"  # one of mvitv2.engine.config.AMP_CHOICES
GEMM_WORK = 4e8  # multiply-accumulates of the timed GEMM (~2 ms in fp32 on 2 AVX-512 cores)
#: Rows of the timed GEMM at least: bf16 autocast casts the weight at every call, and with few
#: rows that cast outweighs the product (a detector's 12544 -> 1024 box head on the AMD EPYC of
#: docs/benchmarks.md: bf16 5.4 vs fp32 6.2 ms at 64 rows, 10.2 vs 15.4 at 256, 19.2 vs 33.4 at
#: 512; a training step batches hundreds of rows per layer, so 256 is the least we time).
GEMM_MIN_ROWS = 256

GemmShape = tuple[int, int, int]  # (rows M, in K, out N)
Timer = Callable[[GemmShape], tuple[float, float]]  # shape -> (bf16 seconds, fp32 seconds)


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in.

    Args:
        amp: what the config asked (``none``, ``bf16``, ``bf16_force`` or ``fp16``).
        dtype: the autocast dtype in force; None for plain fp32.
        why: how it was decided (the measurement when there was one).
        note: a line to show the user when the run does not do what the config asked.
    """

    amp: str
    dtype: torch.dtype | None
    why: str
    note: str | None = None

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        """For the run banner: ``bf16 autocast (measured ...)``."""
        kind = "fp32" if self.dtype is None else f"{self.name} autocast"
        return f"{kind} ({self.why})"

    def metadata(self) -> dict[str, str]:
        """For the checkpoint's ``implementation`` entry."""
        return {"precision": self.name, "precision_setting": self.amp, "precision_why": self.why}


def gemm_shape(model: nn.Module) -> GemmShape:
    """The model's most common linear layer by compute (count x in x out), as a GEMM of about
    :data:`GEMM_WORK` multiply-accumulates (:data:`GEMM_MIN_ROWS` to 4096 rows):
    ``(rows, in_features, out_features)``."""
    shapes = collections.Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)
    )
    if not shapes:
        k = n = 768
    else:
        k, n = max(shapes, key=lambda s: shapes[s] * s[0] * s[1])
    return min(4096, max(GEMM_MIN_ROWS, int(GEMM_WORK // (k * n)))), k, n


def time_gemm(shape: GemmShape, budget_ms: float = 30.0) -> tuple[float, float]:
    """Seconds of one ``(M, K) @ (K, N)`` linear layer on the CPU under bf16 autocast and in fp32,
    through the layer the models use: the best of each over alternating rounds after a warm-up
    (:func:`~mvitv2.utils.timing.best_ms`: 5-10 rounds, about ``budget_ms``: a wrong call here
    halves or doubles a whole run's speed).

    Timed on one thread: bf16's speed-up over fp32 is the core's (on the AMD EPYC of
    docs/benchmarks.md, bf16/fp32 0.61 at one thread and 0.65 at two for 256x12544x1024, 0.58
    and 0.58 for 256x768x3072), and one thread is not held up at every parallel region by
    another process: with other jobs on the 2 cores (load average 6.6) two threads timed bf16
    slower in 16 of 20 tries, one thread in none of 20."""
    from mvitv2.ops import Linear

    m, k, n = shape
    layer = Linear(k, n)
    x = torch.randn(m, k)

    def run(autocast: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return layer(x)

        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = best_ms({"bf16": run(True), "fp32": run(False)}, budget_ms, min_rounds=5)
    finally:
        torch.set_num_threads(threads)
    return ms["bf16"] / 1e3, ms["fp32"] / 1e3


def choose_precision(
    amp: str, device: torch.device, shape: GemmShape, timer: Timer | None = None
) -> Precision:
    """Decide the precision of a run.

    Args:
        amp: the config's ``amp``.
        device: where the run computes.
        shape: the GEMM to time on a CPU (:func:`gemm_shape` of the model).
        timer: measures ``shape`` in bf16 and fp32 (default :func:`time_gemm`).
    """
    if amp == "none":
        return Precision(amp, None, "amp=none")
    if amp == "fp16":
        return Precision(amp, torch.float16, "amp=fp16")
    if amp == FORCE_BF16:
        return Precision(amp, torch.bfloat16, f"amp={FORCE_BF16}: not measured")
    if device.type != "cpu":
        return Precision(amp, torch.bfloat16, f"amp=bf16 on {device.type}")
    bf16, fp32 = (timer or time_gemm)(shape)
    measured = (
        f"a {'x'.join(map(str, shape))} GEMM on this CPU took {bf16 * 1e3:.2f} ms in bf16, "
        f"{fp32 * 1e3:.2f} ms in fp32"
    )
    if bf16 < fp32:
        return Precision(amp, torch.bfloat16, f"amp=bf16: {measured}")
    note = (
        f"amp=bf16 asked, but bf16 autocast is not faster here ({measured}): training in fp32; "
        f"amp={FORCE_BF16} keeps bf16"
    )
    return Precision(amp, None, f"amp=bf16 measured not faster: {measured}", note)


def kept_precision(amp: str, device: torch.device, recorded: Mapping[str, str]) -> Precision | None:
    """The precision a resumed run keeps: the one its checkpoint's ``implementation`` entry
    (``recorded``) says the run before the kill measured (``amp=bf16`` on a CPU), so that a run
    does not change precision at a resume; None where nothing was measured or ``amp`` changed
    (then :func:`choose_precision` decides)."""
    name = recorded.get("precision")
    if amp != "bf16" or device.type != "cpu" or recorded.get("precision_setting") != amp:
        return None
    if name not in ("bf16", "fp32"):
        return None
    why = recorded.get("precision_why", "")
    if not why.startswith(KEPT_WHY):  # the measurement, said once however often the run resumes
        why = f"{KEPT_WHY} ({why})"
    if name == "bf16":
        return Precision(amp, torch.bfloat16, why)
    note = f"amp=bf16 asked; training in fp32 as the run being resumed did; amp={FORCE_BF16} keeps bf16"
    return Precision(amp, None, why, note)
