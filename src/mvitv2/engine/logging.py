"""Run logging on rank 0: a progress bar, TensorBoard scalars and ``metrics.jsonl`` (one line per epoch)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class RunLogger:
    """Everything a run reports. On ranks other than 0 every method does nothing.

    Args:
        run_dir: the run folder (``metrics.jsonl``, ``tb/`` events).
        enabled: True on rank 0.
        tensorboard: write TensorBoard events.
        progress: show a tqdm bar per epoch (only when stderr is a terminal).
    """

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = True, progress: bool = True
    ) -> None:
        self.run_dir, self.enabled, self.tensorboard = Path(run_dir), enabled, tensorboard
        # Without a terminal (a log file, CI) a bar would write hundreds of "\r" updates; the
        # per-epoch summary lines say the same.
        self.progress = progress and _is_terminal(sys.stderr)
        self.bar: tqdm | None = None
        self._writer = None
        self._t0 = time.perf_counter()
        self._images = 0

    @property
    def writer(self) -> Any:
        """The TensorBoard writer, created on first use: a run that fails before logging
        anything leaves no ``tb/`` folder."""
        if self._writer is None and self.enabled and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def info(self, msg: str) -> None:
        """A message line (above the progress bar)."""
        if self.enabled:
            (tqdm.write if self.bar is not None else print)(msg, file=sys.stderr)

    def start_epoch(self, epoch: int, total_epochs: int, steps: int, first_step: int = 0) -> None:
        """Open the progress bar of an epoch with ``steps`` optimizer steps."""
        self._t0, self._images = time.perf_counter(), 0
        if self.enabled and self.progress:
            self.bar = tqdm(
                total=steps,
                initial=first_step,
                desc=f"epoch {epoch + 1}/{total_epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def step(self, global_step: int, loss: float, lr: float, images: int, scalars: dict) -> None:
        """After an optimizer step: update the bar; TensorBoard via :meth:`scalars`."""
        self._images += images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{self.images_per_s:.0f}", refresh=False
            )

    @property
    def images_per_s(self) -> float:
        """Training throughput of this process since the epoch started."""
        return self._images / max(1e-9, time.perf_counter() - self._t0)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """TensorBoard scalars ``prefix/key`` at ``step`` (non-numbers ignored)."""
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and print a summary line."""
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        self.info(shown)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
