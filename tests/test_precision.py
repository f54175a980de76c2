"""bf16 on a CPU only where it is faster: the decision from injected timings, the forcing option,
and what the run says and stores (no assertion on real timings)."""

from __future__ import annotations

import pytest
import torch

from engine_toy import ToyTask, toy_config
from mvitv2.engine.cli import describe_run
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.trainer import Trainer
from mvitv2.errors import UserError
from mvitv2.utils import precision, timing
from mvitv2.utils.precision import choose_precision, gemm_shape

CPU = torch.device("cpu")
SHAPE = (1000, 300, 1000)


def never(shape):
    raise AssertionError("timed although the decision needs no measurement")


def test_bf16_on_a_cpu_is_kept_only_when_measured_faster():
    fast = choose_precision("bf16", CPU, SHAPE, timer=lambda s: (0.002, 0.004))
    assert fast.dtype == torch.bfloat16 and fast.note is None
    measured = "a 1000x300x1000 GEMM on this CPU took 2.00 ms in bf16, 4.00 ms in fp32"
    assert fast.describe() == f"bf16 autocast (amp=bf16: {measured})"
    assert fast.metadata() == {
        "precision": "bf16",
        "precision_setting": "bf16",
        "precision_why": f"amp=bf16: {measured}",
    }
    for bf16, fp32 in ((0.0092, 0.004), (0.004, 0.004)):  # slower, and equal: not faster
        slow = choose_precision("bf16", CPU, SHAPE, timer=lambda s, t=(bf16, fp32): t)
        measured = (
            f"a 1000x300x1000 GEMM on this CPU took {bf16 * 1e3:.2f} ms in bf16, 4.00 ms in fp32"
        )
        assert slow.dtype is None
        assert slow.note == (
            f"amp=bf16 asked, but bf16 autocast is not faster here ({measured}): training in "
            "fp32; amp=bf16_force keeps bf16"
        )
        assert slow.describe() == f"fp32 (amp=bf16 measured not faster: {measured})"
        assert slow.metadata()["precision"] == "fp32"
        assert slow.metadata()["precision_setting"] == "bf16"


def test_forced_bf16_other_devices_and_other_settings_are_not_measured():
    forced = choose_precision("bf16_force", CPU, SHAPE, timer=never)
    assert (forced.dtype, forced.note) == (torch.bfloat16, None)
    assert forced.describe() == "bf16 autocast (amp=bf16_force: not measured)"
    cuda = choose_precision("bf16", torch.device("cuda", 0), SHAPE, timer=never)
    assert cuda.dtype == torch.bfloat16 and cuda.why == "amp=bf16 on cuda"
    assert choose_precision("none", CPU, SHAPE, timer=never).describe() == "fp32 (amp=none)"
    fp16 = choose_precision("fp16", CPU, SHAPE, timer=never)
    assert fp16.dtype == torch.float16 and fp16.metadata()["precision"] == "fp16"
    assert TrainConfig(amp="bf16_force").amp == "bf16_force"
    with pytest.raises(UserError, match="amp must be one of none, bf16, bf16_force, fp16"):
        TrainConfig(amp="bf16force")


def test_the_timed_gemm_is_the_models_dominant_linear_of_about_4e8_macs_and_256_rows_at_least():
    def net(*shapes):
        return torch.nn.Sequential(*(torch.nn.Linear(k, n) for k, n in shapes))

    # count x in x out: 3 x (20x40) = 2400 beats 1 x (30x50) = 1500; rows capped at 4096
    assert gemm_shape(net((20, 40), (30, 50), (20, 40), (20, 40))) == (4096, 20, 40)
    assert gemm_shape(net((300, 1000))) == (1333, 300, 1000)  # 4e8 / 3e5
    assert gemm_shape(net((1000, 3000))) == (256, 1000, 3000)  # 133 rows, raised to 256
    assert gemm_shape(net((400, 1500), (400, 1500), (10, 20))) == (666, 400, 1500)  # 4e8 / 6e5


@pytest.mark.parametrize(
    ("amp", "timings", "want"),
    [("bf16", (2.0, 1.0), "fp32"), ("bf16", (1.0, 2.0), "bf16"), ("bf16_force", None, "bf16")],
)
def test_the_trainer_runs_says_and_checkpoints_the_decision(
    tmp_path, capsys, monkeypatch, amp, timings, want
):
    monkeypatch.setattr(precision, "time_gemm", never if timings is None else lambda s: timings)
    cfg = toy_config(str(tmp_path), "p", f"amp={amp}", "epochs=1")
    trainer = Trainer(ToyTask(cfg), cfg)
    try:
        assert trainer.autocast_dtype == {"fp32": None, "bf16": torch.bfloat16}[want]
        stored = trainer.state_dict()["implementation"]
        assert stored["precision"] == want and stored["precision_setting"] == amp
        notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: amp=")]
        assert len(notes) == (want == "fp32")
        banner = describe_run(trainer)[1]
        assert f"precision {trainer.precision.describe()}" in banner
        assert banner.split("precision ")[1].startswith("fp32" if want == "fp32" else "bf16")
        # the toy model's dominant linear layer is the one timed
        fc = max(
            (m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)),
            key=lambda m: m.in_features * m.out_features,
        )
        if timings is not None:
            assert f"x{fc.in_features}x{fc.out_features} GEMM" in stored["precision_why"]
    finally:
        trainer.close()


def test_time_gemm_times_the_models_layer_in_alternating_bf16_and_fp32_rounds(monkeypatch):
    """With a fake layer and clock: calls alternate between bf16 autocast and fp32, each on an
    (M, K) input to a K->N layer, on one thread; each result is the best call after the warm-up
    pair (whose times are ignored)."""
    import mvitv2.ops

    calls, threads = [], []

    class FakeLinear:
        def __init__(self, k, n):
            self.shape = (k, n)

        def __call__(self, x):
            calls.append((tuple(x.shape), self.shape, torch.is_autocast_enabled("cpu")))
            threads.append(torch.get_num_threads())

    # clock readings in pairs around each call; warm-up bf16 100, fp32 90, then rounds of
    # (bf16, fp32): (5, 9), (3, 7), (2, 8), (4, 9), (6, 7): over the 0.03 s budget, 5 rounds
    durations = [100, 90] + [5, 9, 3, 7, 2, 8, 4, 9, 6, 7]
    readings = []
    for i, d in enumerate(durations):
        readings += [1000 * i, 1000 * i + d]
    clock = iter(readings)
    monkeypatch.setattr(mvitv2.ops, "Linear", FakeLinear)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert precision.time_gemm((6, 4, 5)) == (2, 7)
        assert torch.get_num_threads() == 2  # the caller's, restored
    finally:
        torch.set_num_threads(before)
    assert threads == [1] * 12  # every call on one thread (robust to other jobs)
    assert [c[2] for c in calls] == [True, False] * 6
    assert {c[:2] for c in calls} == {((6, 4), (4, 5))}
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the default, restored
