"""The measured choices' timers: best-of-N, and the per-size-class table, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

from mvitv2.utils import timing

_U = 2.0**-10  # one fake-clock tick in seconds (its ms are exact floats)


def _clock(monkeypatch) -> SimpleNamespace:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    return clock


def test_best_seconds_by_default_is_the_best_of_three_calls_after_a_warm_up(monkeypatch):
    clock = _clock(monkeypatch)
    costs = iter([1, 7, 5, 6, 2])  # warm-up 1 (not timed), then 7, 5, 6; the 2 is never run
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(costs) * _U

    assert timing.best_seconds(fn) == 5 * _U
    assert len(calls) == 4


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
