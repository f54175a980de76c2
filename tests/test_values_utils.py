"""The small utilities by value: a validated process-wide choice, and parameter and
multiply-accumulate counts against counts made by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvitv2.utils.choice import Choice
from mvitv2.utils.flops import count_macs, count_params, macs_of
from mvitv2.utils.precision import choose_precision, gemm_shape, time_gemm
from mvitv2.utils.timing import MeasuredChoices
from test_timing import _U, _clock


# ---------------------------------------------------------------------- Choice
def test_a_choice_starts_at_a_valid_value_and_refuses_an_unknown_one_naming_the_valid_ones():
    assert Choice("GEMM backend", ("auto", "torch"), "torch").value == "torch"
    with pytest.raises(ValueError) as e:
        Choice("GEMM backend", ("auto", "torch"), "fast")
    assert str(e.value) == "unknown GEMM backend 'fast'; valid: ('auto', 'torch')"


def test_set_returns_the_previous_value_and_an_unknown_value_leaves_it_unchanged():
    c = Choice("path", ("a", "b", "c"), "a")
    assert c.check("b") == "b" and c.value == "a"  # check only validates
    assert c.set("b") == "a" and c.value == "b"
    assert c.set("c") == "b" and c.value == "c"
    with pytest.raises(ValueError, match=r"^unknown path 'd'; valid: \('a', 'b', 'c'\)$"):
        c.set("d")
    assert c.value == "c"


def test_using_sets_the_value_inside_the_block_and_restores_it_after_an_error_too():
    c = Choice("path", ("a", "b", "c"), "a")
    with c.using("b"):
        assert c.value == "b"
        with c.using("c"):
            assert c.value == "c"
        assert c.value == "b"
    assert c.value == "a"
    with pytest.raises(KeyError), c.using("c"):
        raise KeyError("inside")
    assert c.value == "a"
    with pytest.raises(ValueError), c.using("z"):
        pass
    assert c.value == "a"


# ---------------------------------------------------------------------- counts
def test_count_params_counts_each_parameter_once_also_on_the_meta_device():
    shared = nn.Linear(3, 4)  # 3 x 4 weights + 4 biases
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2, bias=False))
    assert count_params(model) == (12 + 4) + 8
    assert count_params(nn.Linear(300, 200, device="meta")) == 300 * 200 + 200


def test_macs_of_is_half_the_flops_as_an_int_and_gives_the_result_without_grad(capsys):
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 3)
    macs, out = macs_of(lambda a: a @ w, x)
    assert macs == 2 * 3 * 4 and type(macs) is int
    assert torch.equal(out, (x @ w).detach()) and not out.requires_grad
    macs, out = macs_of(torch.bmm, torch.ones(5, 2, 3), torch.ones(5, 3, 7))  # several args
    assert macs == 5 * 2 * 3 * 7 and out.shape == (5, 2, 7)
    assert capsys.readouterr().out == ""  # no flop table printed


def test_count_macs_of_a_model_on_its_device_from_an_input_shape():
    linear = nn.Linear(3, 4, device="meta")
    assert count_macs(linear, (5, 3)) == 5 * 3 * 4  # the input is made on the meta device too
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 10))
    # each of the 4 x 3 x 3 outputs of the 5 x 5 image sums 2 x 3 x 3 products; then 36 x 10
    assert count_macs(conv, (1, 2, 5, 5)) == 4 * 3 * 3 * (2 * 3 * 3) + 36 * 10


# ---------------------------------------------------------------------- precision
def test_the_timed_gemm_without_linear_layers_is_768_by_768_and_the_largest_layer_wins_by_work():
    assert gemm_shape(nn.Conv2d(3, 8, 3)) == (int(4e8) // (768 * 768), 768, 768)  # 678 rows
    # by count x in x out: 1000 x 10 (10000) beats 10 x 20 (200), both once
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(1000, 10))
    assert gemm_shape(model) == (4096, 1000, 10)  # 4e8 / 1e4 rows, capped at 4096


def test_every_decision_keeps_the_asked_setting_and_says_why():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    shapes = []

    def timer(shape):
        shapes.append(shape)
        return 0.25, 0.5

    cases = [
        (choose_precision("none", cpu, (8, 4, 2)), "none", None, "amp=none"),
        (choose_precision("fp16", cpu, (8, 4, 2)), "fp16", torch.float16, "amp=fp16"),
        (choose_precision("bf16", gpu, (8, 4, 2)), "bf16", torch.bfloat16, "amp=bf16 on cuda"),
        (
            choose_precision("bf16", cpu, (8, 4, 2), timer=timer),
            "bf16",
            torch.bfloat16,
            "amp=bf16: a 8x4x2 GEMM on this CPU took 250.00 ms in bf16, 500.00 ms in fp32",
        ),
    ]
    for got, amp, dtype, why in cases:
        assert (got.amp, got.dtype, got.why, got.note) == (amp, dtype, why, None)
        assert got.metadata()["precision_setting"] == amp
    assert shapes == [(8, 4, 2)]  # the shape asked for is the one timed


def test_time_gemm_takes_the_best_of_alternating_bf16_and_fp32_rounds_whatever_the_default_dtype(
    monkeypatch,
):
    """A fake layer on the fake clock: a warm-up call under bf16 autocast and one in fp32, then
    alternating rounds (at least 5); each result is its best timed call, in seconds."""
    import mvitv2.ops

    clock, dtypes = _clock(monkeypatch), []
    bf16 = iter([50, 4, 3, 5, 6, 4, 9])
    fp32 = iter([50, 9, 8, 7, 9, 8, 2])

    class FakeLinear:
        def __init__(self, k, n):
            pass

        def __call__(self, x):
            on = torch.is_autocast_enabled("cpu")
            dtypes.append(torch.get_autocast_dtype("cpu") if on else None)
            clock.now += next(bf16 if on else fp32) * _U

    monkeypatch.setattr(mvitv2.ops, "Linear", FakeLinear)
    previous = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)  # another default: bf16 is still what is timed
    try:
        # warm-up round 100 ticks (~98 ms) > the 30 ms budget: the 5 rounds at least
        assert time_gemm((2, 3, 4)) == (3 * _U, 7 * _U)
        assert dtypes == [torch.bfloat16, None] * 6
        # a budget that buys 6 rounds reaches bf16's 4 and fp32's 2
        bf16, fp32, dtypes[:] = iter([50, 4, 3, 5, 6, 4, 9]), iter([50, 9, 8, 7, 9, 8, 2]), []
        assert time_gemm((2, 3, 4), budget_ms=100 * _U * 1e3 * 5.5) == (3 * _U, 2 * _U)
        assert dtypes == [torch.bfloat16, None] * 7
        # by default about 30 ms of rounds: calls of 2.5 ms, a 5 ms warm-up round: 6 rounds
        bf16, fp32, dtypes[:] = iter([2.5 / 1e3 / _U] * 9), iter([2.5 / 1e3 / _U] * 9), []
        time_gemm((2, 3, 4))
        assert dtypes == [torch.bfloat16, None] * 7
    finally:
        torch.set_autocast_dtype("cpu", previous)


# ---------------------------------------------------------------------- MeasuredChoices
def _costing(clock, ticks: float, runs: list | None = None, name: str = ""):
    def run():
        clock.now += ticks * _U
        if runs is not None:
            runs.append(name)

    return run


def test_a_faster_candidate_wins_by_default_and_a_known_class_is_not_measured_again(monkeypatch):
    clock = _clock(monkeypatch)
    asked = []

    def measure(a, b):
        def fn():
            asked.append(1)
            return {"a": _costing(clock, a), "b": _costing(clock, b)}, "k"

        return fn

    table = MeasuredChoices(default="a")  # no margin: any gain counts
    assert table.choose("k", measure(10, 9)) == "b" and len(asked) == 1
    assert table.choose("k", measure(1, 9)) == "b" and len(asked) == 1  # its first choice


def test_measuring_takes_3_to_10_rounds_as_the_budget_buys(monkeypatch):
    clock = _clock(monkeypatch)
    # a warm-up round of 2 x 0.125 / 1.024 ms (exact floats): a 1 ms budget buys ceil(4.096) = 5
    # rounds, 60 ms would buy 246, 10 at most; a warm-up round over the budget still gets 3
    for ticks, budget, rounds in [(0.125, 1.0, 5), (0.125, 60.0, 10), (100, 60.0, 3)]:
        runs: list[str] = []
        cands = {n: _costing(clock, ticks, runs, n) for n in "ab"}
        MeasuredChoices("a", budget_ms=budget).choose("k", lambda c=cands: (c, "k"))
        assert runs == ["a", "b"] * (1 + rounds), (ticks, budget)
