"""The measured choices' timer (best of alternating rounds) and the per-size-class table, on a
fake clock."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import pytest

from mvitv2.utils import timing

_U = 2.0**-10  # one fake-clock tick in seconds (its ms are exact floats)


def _clock(monkeypatch) -> SimpleNamespace:
    """A fake clock (``now``, seconds) and page-fault count (``faults``) for :mod:`timing`."""
    clock = SimpleNamespace(now=0.0, faults=0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(timing, "_page_faults", lambda: clock.faults)
    return clock


def _costs(clock: SimpleNamespace, runs: list, name: str, ticks: list[float]):
    """A call that advances the fake clock by the next of ``ticks`` and records its name."""
    it = iter(ticks)

    def run():
        runs.append(name)
        clock.now += next(it) * _U

    return run


def test_best_ms_alternates_the_candidates_and_keeps_each_ones_best_after_a_warm_up(monkeypatch):
    """A burst of another process that slows a's second and third calls leaves a's best at its
    fourth: the rounds alternate a, b, a, b (not a, a, a then b, b, b), and the warm-up round
    (the first calls, 50 ticks each) never counts."""
    clock = _clock(monkeypatch)
    runs: list[str] = []
    cands = {
        "a": _costs(clock, runs, "a", [50, 9, 30, 30, 8]),
        "b": _costs(clock, runs, "b", [50, 6, 7, 5, 6]),
    }
    got = timing.best_ms(cands, budget_ms=0.0, min_rounds=4)
    assert got == {"a": 8 * _U * 1e3, "b": 5 * _U * 1e3}
    assert runs == ["a", "b"] * 5


def test_best_ms_repeats_the_warm_up_until_a_round_runs_without_a_page_fault(monkeypatch):
    """a's output gets fresh pages at its first two calls, b's at its first: warm-up rounds 1
    and 2 faulted, round 3 did not, so the timed rounds start at the fourth calls, and round
    3's 2 x 4 ticks (7.8125 ms) size them: 20 ms buys ceil(2.56) = 3 rounds (the faulting first
    rounds, 2 x 40 ticks, would have bought 1, so the 2 at least)."""
    clock = _clock(monkeypatch)
    runs: list[str] = []

    def candidate(name: str, ticks: list[float], faulting: int):
        it, calls = iter(ticks), [0]

        def run():
            runs.append(name)
            calls[0] += 1
            clock.now += next(it) * _U
            clock.faults += 1000 * (calls[0] <= faulting)

        return run

    cands = {
        "a": candidate("a", [40, 40, 4, 5, 3, 6], faulting=2),
        "b": candidate("b", [40, 4, 4, 4, 2, 4], faulting=1),
    }
    got = timing.best_ms(cands, budget_ms=20.0)
    assert runs == ["a", "b"] * 6
    assert got == {"a": 3 * _U * 1e3, "b": 2 * _U * 1e3}


def test_best_ms_stops_warming_up_after_max_warmups_when_every_call_faults(monkeypatch):
    """Every call maps fresh memory (as glibc does by default for large blocks, or no fault
    count): 5 warm-up rounds by default, then the timed rounds; ``max_warmups=2`` two."""
    for kwargs, warmups in [({}, 5), ({"max_warmups": 2}, 2), ({"max_warmups": 1}, 1)]:
        clock = _clock(monkeypatch)
        runs: list[str] = []

        def run(clock=clock, runs=runs):
            runs.append("a")
            clock.now += 4 * _U
            clock.faults += 1

        got = timing.best_ms({"a": run}, budget_ms=0.0, min_rounds=3, **kwargs)
        assert runs == ["a"] * (warmups + 3), kwargs
        assert got == {"a": 4 * _U * 1e3}


@pytest.mark.real_page_faults
def test_page_faults_count_the_pages_a_call_touches_first():
    """On the real counter: touching 256 fresh anonymous pages faults at least 256 times, so a
    candidate that maps fresh memory at every call gets every warm-up round; one that touches
    only memory it already has stops warming up before that."""
    if timing.resource is None:
        pytest.skip("no page-fault count on this platform")
    page = mmap.PAGESIZE

    def fresh():
        with mmap.mmap(-1, 256 * page) as m:
            for i in range(0, 256 * page, page):
                m[i] = 1

    before = timing._page_faults()
    fresh()
    assert timing._page_faults() - before >= 256

    calls = {"fresh": 0, "kept": 0}
    kept = bytearray(256 * page)

    def count(name, fn):
        def run():
            calls[name] += 1
            fn()

        return run

    def touch_kept():
        for i in range(0, len(kept), page):
            kept[i] = 1

    timing.best_ms({"fresh": count("fresh", fresh)}, 0.0, min_rounds=1, max_rounds=1)
    assert calls["fresh"] == 5 + 1
    timing.best_ms({"kept": count("kept", touch_kept)}, 0.0, min_rounds=1, max_rounds=1)
    assert calls["kept"] < 5 + 1


def test_best_ms_takes_as_many_rounds_as_the_budget_buys_within_its_bounds(monkeypatch):
    """A warm-up round of 2 x 4 ticks = 7.8125 ms: 20 ms buys ceil(2.56) = 3 rounds, 100 ms 13
    (so the 10 at most), 1 ms 1 (so the 2 at least, or min_rounds)."""
    clock = _clock(monkeypatch)
    for budget, bounds, rounds in [
        (20.0, {}, 3),
        (100.0, {}, 10),
        (100.0, {"max_rounds": 12}, 12),
        (1.0, {}, 2),
        (1.0, {"min_rounds": 5}, 5),
        (100.0, {"min_rounds": 1, "max_rounds": 1}, 1),
    ]:
        runs: list[str] = []
        cands = {n: _costs(clock, runs, n, [4] * 20) for n in "ab"}
        got = timing.best_ms(cands, budget, **bounds)
        assert got == {"a": 4 * _U * 1e3, "b": 4 * _U * 1e3}
        assert runs == ["a", "b"] * (1 + rounds), (budget, bounds)


def test_measured_choices_by_default_spend_about_60_ms_per_class(monkeypatch):
    """Two candidates of 41 * 2**-12 s each (exact floats): the warm-up round takes 20.02 ms, so
    a 60 ms budget buys ceil(2.997) = 3 timed rounds (61 ms would buy 4)."""
    clock = _clock(monkeypatch)
    runs = []

    def candidate(name):
        def run():
            runs.append(name)
            clock.now += 41 * 2.0**-12

        return run

    table = timing.MeasuredChoices(default="a")
    assert table.choose("k", lambda: ({"a": candidate("a"), "b": candidate("b")}, "k")) == "a"
    assert runs == ["a", "b"] * 4  # warm-up + 3 rounds


def test_measured_choices_time_at_least_3_rounds_even_when_a_warm_up_exceeds_the_budget(
    monkeypatch,
):
    """A new shape's first calls run slow: with a warm-up round over the 60 ms budget, a class
    still gets 3 timed rounds, and a candidate slow in its first two rounds (25 ticks, then its
    true 10) wins on its third against a steady 15."""
    clock = _clock(monkeypatch)
    runs: list[str] = []
    cands = {
        "a": _costs(clock, runs, "a", [80, 15, 15, 15]),
        "b": _costs(clock, runs, "b", [80, 25, 25, 10]),
    }
    table = timing.MeasuredChoices(default="a")
    assert table.choose("k", lambda: (cands, "k")) == "b"
    assert runs == ["a", "b"] * 4  # warm-up + 3 rounds


def test_measured_choices_by_default_measure_64_classes_then_keep_the_default(monkeypatch):
    _clock(monkeypatch)
    runs, asked = [], []

    def measure():
        asked.append(1)
        return {"a": lambda: runs.append("a"), "b": lambda: runs.append("b")}, "x"

    table = timing.MeasuredChoices(default="a")
    for key in range(64):
        table.choose(key, measure)
    assert len(table.table) == 64 and len(asked) == 64
    runs.clear()
    assert table.choose(64, measure) == "a"
    assert table.choose(3, measure) == "a"  # a known class: its choice, no new measurement
    assert runs == [] and len(table.table) == 64 and len(asked) == 64


def test_measured_choices_keep_the_default_unless_another_beats_it_by_the_margin(monkeypatch):
    clock = _clock(monkeypatch)

    def costing(ticks):
        def run():
            clock.now += ticks * _U

        return run

    for margin, fast, want in [(0.0, 9, "b"), (0.1, 9, "a"), (0.1, 8, "b"), (0.0, 10, "a")]:
        table = timing.MeasuredChoices(default="a", margin=margin)
        candidates = {"a": costing(10), "b": costing(fast)}
        got = table.choose("k", lambda c=candidates: (c, "label"))
        assert got == want, (margin, fast)
        a_ms, b_ms = 10 * _U * 1000, fast * _U * 1000
        assert table.report() == {"label": f"{want} (a {a_ms:.2f} ms, b {b_ms:.2f} ms)"}
        # a class's own margin overrides the table's
        for own, want_own in [(0.0, "b" if fast < 10 else "a"), (0.15, "b" if fast < 8.5 else "a")]:
            got = table.choose(("own", own), lambda c=candidates: (c, "label"), margin=own)
            assert got == want_own, (own, fast)


def test_measured_choices_measure_a_class_once_and_then_keep_its_choice(monkeypatch):
    """The second and later calls of a class (and of each other class) reuse its first
    measurement: ``measure`` is asked once per key, and the winner stays though later calls
    would time otherwise."""
    clock = _clock(monkeypatch)
    asked: list[str] = []

    def measure_for(key, a_ticks, b_ticks):
        def measure():
            asked.append(key)
            runs: list[str] = []
            return {
                "a": _costs(clock, runs, "a", [a_ticks] * 10),
                "b": _costs(clock, runs, "b", [b_ticks] * 10),
            }, key

        return measure

    table = timing.MeasuredChoices(default="a")
    assert table.choose("k1", measure_for("k1", 10, 5)) == "b"
    assert table.choose("k2", measure_for("k2", 5, 10)) == "a"
    assert table.choose("k1", measure_for("k1", 5, 10)) == "b"
    assert table.choose("k2", measure_for("k2", 10, 5)) == "a"
    assert asked == ["k1", "k2"]


def test_best_ms_sizes_the_rounds_by_a_warm_up_under_a_millisecond(monkeypatch):
    """A 1-tick (0.977 ms) warm-up: a 9 ms budget buys ceil(9.216) = 10 rounds."""
    clock = _clock(monkeypatch)
    runs: list[str] = []
    got = timing.best_ms({"a": _costs(clock, runs, "a", [1] * 30)}, 9.0, max_rounds=20)
    assert got == {"a": _U * 1e3}
    assert len(runs) == 1 + 10


@pytest.mark.real_page_faults
def test_without_a_fault_count_page_faults_read_zero_and_one_warm_up_round_runs(monkeypatch):
    """Where the ``resource`` module is missing (not Unix) the count is 0 at every reading, so
    the first warm-up round already counts as fault-free."""
    monkeypatch.setattr(timing, "resource", None)
    assert timing._page_faults() == 0 and timing._page_faults() == 0
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    runs: list[str] = []
    timing.best_ms({"a": _costs(clock, runs, "a", [4] * 10)}, 0.0, min_rounds=2, max_rounds=2)
    assert len(runs) == 1 + 2
