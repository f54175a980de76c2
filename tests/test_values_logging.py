"""Run logging (RunLogger) read back by independent readers: ``metrics.jsonl`` parsed with
``json``, TensorBoard events with TensorBoard's own EventAccumulator, the progress bar's state
from tqdm, throughput against a hand-set clock."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from mvitv2.engine import logging as run_logging
from mvitv2.engine.logging import RunLogger


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars on disk now, as TensorBoard reads them: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_each_epoch_appends_one_sorted_json_line_and_prints_a_summary(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')  # a resumed run's earlier epochs
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=False)
    first = {"epoch": 1, "top1": 12.345678, "train_loss": 0.000123456, "note": "x"}
    log.epoch_metrics(first)
    log.epoch_metrics({"epoch": 2, "loss": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"epoch": 0}, first, {"epoch": 2, "loss": 2.0}]
    assert list(json.loads(lines[1])) == ["epoch", "note", "top1", "train_loss"]  # keys sorted
    # Floats to 4 significant digits, in the record's order; other values as they are.
    assert capsys.readouterr().err.splitlines() == [
        "epoch=1, top1=12.35, train_loss=0.0001235, note=x",
        "epoch=2, loss=2",
    ]
    assert not (tmp_path / "tb").exists()  # tensorboard off: no events folder
    log.close()


def test_ranks_other_than_0_write_and_print_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_logging.sys, "stderr", _Terminal())
    log = RunLogger(tmp_path, enabled=False)
    log.start_epoch(0, 1, steps=3)
    log.step(1, loss=0.5, lr=0.1, images=8, scalars={})
    log.scalars("train", {"loss": 0.5}, 1)
    log.info("hello")
    log.epoch_metrics({"epoch": 1})
    log.close()
    assert log.bar is None and log.writer is None
    assert list(tmp_path.iterdir()) == [] and run_logging.sys.stderr.getvalue() == ""
    assert capsys.readouterr().out == ""


def test_tensorboard_gets_the_finite_numbers_under_their_prefix(tmp_path):
    log = RunLogger(tmp_path, enabled=True, progress=False)
    assert not (tmp_path / "tb").exists()  # no events folder before the first scalar
    values = {"loss": 0.25, "lr": 1e-3, "step_images": 32, "nan": math.nan, "inf": -math.inf}
    log.scalars("train", {**values, "name": "not a number", "none": None}, step=7)
    log.scalars("train", {"loss": 0.125}, step=8)
    log.epoch_metrics({"epoch": 1, "top1": 50.0})
    log.scalars("epoch", {"top1": 50.0}, step=1)
    log.close()
    assert _events(tmp_path) == {
        "train/loss": [(7, 0.25), (8, 0.125)],
        "train/lr": [(7, pytest.approx(1e-3))],
        "train/step_images": [(7, 32.0)],
        "epoch/top1": [(1, 50.0)],
    }
    log.close()  # the trainer may close twice (after an error)


def test_images_per_second_counts_this_epochs_images_over_its_time(tmp_path, monkeypatch):
    clock = [90.0]
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: clock[0])
    log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=False)
    clock[0] = 92.0
    assert log.images_per_s == 0.0
    log.step(1, loss=1.0, lr=0.1, images=12, scalars={})  # before any epoch: since creation
    clock[0] = 100.0
    assert log.images_per_s == pytest.approx(12 / 10)
    log.start_epoch(0, 2, steps=3)
    for images in (32, 32, 16):
        log.step(1, loss=1.0, lr=0.1, images=images, scalars={})
    clock[0] = 104.0
    assert log.images_per_s == pytest.approx(80 / 4)
    log.start_epoch(1, 2, steps=3)  # a new epoch starts counting anew
    log.step(4, loss=1.0, lr=0.1, images=10, scalars={})
    clock[0] = 109.0
    assert log.images_per_s == pytest.approx(10 / 5)


def test_a_terminal_shows_one_bar_per_epoch_with_its_progress_and_messages_above(
    tmp_path, monkeypatch
):
    term = _Terminal()
    monkeypatch.setattr(run_logging.sys, "stderr", term)
    clock = [10.0]
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: clock[0])
    log = RunLogger(tmp_path, enabled=True, tensorboard=False)
    log.start_epoch(2, 5, steps=10, first_step=4)  # resumed inside the third epoch
    bar = log.bar
    assert (bar.total, bar.n, bar.desc) == (10, 4, "epoch 3/5")
    clock[0] = 12.0
    log.step(5, loss=0.123456, lr=3e-4, images=64, scalars={})
    assert bar.n == 5 and set(bar.postfix.split(", ")) == {"loss=0.1235", "lr=3.00e-04", "img_s=32"}
    log.info("skipped unreadable sample a.png")
    log.end_epoch()
    assert log.bar is None and bar.disable  # closed (tqdm disables a closed bar)
    shown = term.getvalue()
    assert "epoch 3/5" in shown
    # A message goes on a line of its own above the bar (the bar line cleared first).
    assert "skipped unreadable sample a.png\n" in shown.split("\r")
    # The bar is erased at the end of its epoch (the summary line follows), not left standing.
    assert shown.endswith("\r") and shown.split("\r")[-2].strip() == ""
    log.start_epoch(3, 5, steps=50)  # a fresh epoch starts at step 0
    assert (log.bar.n, log.bar.desc) == (0, "epoch 4/5")
    before = shown.count("\r")
    for i in range(50):
        log.step(i, loss=1.0, lr=0.1, images=1, scalars={})
    # Not redrawn at every step (a fast loop would spend its time printing): tqdm redraws at
    # most every 0.1 s; one redraw per step would be 50.
    assert term.getvalue().count("\r") - before < 25 and log.bar.n == 50
    log.close()


def test_the_bar_follows_the_terminals_width_when_it_is_resized(tmp_path, monkeypatch):
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import select
    import struct
    import termios
    import time

    master, child = pty.openpty()
    os.set_blocking(master, False)  # a test that fails, not one that hangs, if nothing is drawn

    def resize(columns: int) -> None:
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    shown = []

    def last_line_width(want: int) -> int:
        """The width of the last line drawn, once it is ``want`` or after 5 s: the pty passes
        the bytes on asynchronously (one read may see part of a line, or none yet)."""
        term.flush()
        width, deadline = 0, time.monotonic() + 5
        while width != want and time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                shown.append(os.read(master, 65536).decode())
            lines = [x for x in "".join(shown).split("\r") if x.strip()]
            width = len(lines[-1]) if lines else 0
        return width

    resize(60)
    with os.fdopen(child, "w") as term:
        monkeypatch.setattr(run_logging.sys, "stderr", term)
        log = RunLogger(tmp_path, enabled=True, tensorboard=False)
        log.start_epoch(0, 1, steps=10)
        log.step(1, loss=1.0, lr=0.1, images=1, scalars={})
        log.bar.refresh()
        assert last_line_width(59) == 59  # tqdm leaves the last column free
        resize(100)
        log.bar.refresh()
        assert last_line_width(99) == 99
        log.close()
    os.close(master)


def test_without_a_terminal_or_with_progress_off_there_is_no_bar(tmp_path, monkeypatch):
    class NoIsatty:  # e.g. a stream replaced by a logging framework
        def write(self, s: str) -> None:
            pass

    for stream, progress in [(io.StringIO(), True), (NoIsatty(), True), (_Terminal(), False)]:
        monkeypatch.setattr(run_logging.sys, "stderr", stream)
        log = RunLogger(tmp_path, enabled=True, tensorboard=False, progress=progress)
        log.start_epoch(0, 1, steps=2)
        log.step(1, loss=1.0, lr=0.1, images=1, scalars={})
        assert log.bar is None, (stream, progress)
        log.close()
