"""The measured choices' timer (best of alternating rounds) and the per-size-class table, on a
fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from mvitv2.utils import timing

_U = 2.0**-10  # one fake-clock tick in seconds (its ms are exact floats)


def _clock(monkeypatch) -> SimpleNamespace:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
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
