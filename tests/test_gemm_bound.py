"""benchmarks/gemm_bound.py: the zero-overhead bound from our GEMM calls replayed alone."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))  # gemm_bound imports op_profile from its folder
_spec = importlib.util.spec_from_file_location("gemm_bound", _DIR / "gemm_bound.py")
gemm_bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemm_bound)
aten = torch.ops.aten


def _flops(calls: Counter) -> int:
    """GEMM FLOPs of recorded calls, from their shapes (2*M*N*K per product)."""
    total = 0
    for (func, specs, _), n in calls.items():
        a, b = (
            (specs[1], specs[2])
            if func in (aten.addmm.default, aten.baddbmm_.default)
            else specs[:2]
        )
        *batch, m, k = a[1]
        total += n * 2 * m * k * b[1][-1] * (batch[0] if batch else 1)
    return total


def test_recorder_counts_linear_matmul_and_attention_as_their_gemms_under_inference_mode():
    x, w, bias = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)
    a, b = torch.randn(3, 4, 7), torch.randn(3, 7, 2)
    q, k, v = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)

    def fn():
        with torch.inference_mode():
            F.linear(x, w, bias)  # addmm 6x8 @ 8x5
            F.linear(x, w, bias)
            a @ b  # bmm 3 x (4x7 @ 7x2)
            F.scaled_dot_product_attention(q, k, v)  # 6 x (9x4 @ 4x6) and 6 x (9x6 @ 6x4)

    calls = gemm_bound.record_gemms(fn)
    assert sum(calls.values()) == 5
    (linear,) = [c for c in calls if c[0] == aten.addmm.default]
    assert calls[linear] == 2
    assert linear[1][:3] == (
        ("T", (5,), (1,), torch.float32),
        ("T", (6, 8), (8, 1), torch.float32),
        ("T", (8, 5), (1, 8), torch.float32),
    )
    by_hand = 2 * (2 * 6 * 8 * 5) + 2 * 3 * 4 * 7 * 2 + 2 * (2 * 6 * 9 * 4 * 6)
    assert _flops(calls) == by_hand


def test_recorder_sees_the_backward_gemms_of_a_training_step():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(10, 8)

    def step():
        lin(x).sum().backward()

    calls = gemm_bound.record_gemms(step)
    # forward addmm (10x8 @ 8x4); backward: weight grad 4x10 @ 10x8 (the input needs none)
    assert _flops(calls) == 2 * 10 * 8 * 4 + 2 * 4 * 10 * 8
    assert sum(calls.values()) == 2


def test_gemm_only_time_sums_each_call_best_time_times_its_count(monkeypatch):
    calls = Counter({("a",): 3, ("b",): 2})
    monkeypatch.setattr(gemm_bound, "replay_ms", lambda c, repeats=5: {"a": 1.5, "b": 4.0}[c[0]])
    assert gemm_bound.replayed_ms(calls) == pytest.approx(3 * 1.5 + 2 * 4.0)


def test_replay_runs_the_recorded_op_on_tensors_of_the_recorded_layout(monkeypatch):
    seen = []

    def fake(*args):
        seen.append([(tuple(t.shape), t.stride()) for t in args])

    spec = ("T", (4, 3), (1, 4), torch.float32)  # a transposed (column-major) operand
    ms = gemm_bound.replay_ms((fake, (spec, ("T", (3, 2), (2, 1), torch.float32)), ()), repeats=2)
    assert ms >= 0 and len(seen) == 3  # one warm-up, two timed
    assert seen[0] == [((4, 3), (1, 4)), ((3, 2), (2, 1))]


def test_essential_ops_are_recorded_with_their_arguments_and_replay_with_valid_indices():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    ln = torch.nn.LayerNorm(4)

    def step():
        y, _ = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        (ln(y).softmax(-1) * torch.randn(2, 3, 4, 4)).sum().backward()

    kinds = gemm_bound.record_essential(step)
    assert not (kinds["attention"] or kinds["bias_grads"] or kinds["optimizer"])
    calls = kinds["kernels"]
    names = sorted(str(c[0]) for c in calls)
    assert names == [
        "aten._softmax.default",
        "aten._softmax_backward_data.default",
        "aten.max_pool2d_with_indices.default",
        "aten.max_pool2d_with_indices_backward.default",
        "aten.native_layer_norm.default",
        "aten.native_layer_norm_backward.default",
    ]
    (ln_call,) = [c for c in calls if c[0] == aten.native_layer_norm.default]
    assert ln_call[1] == (
        ("T", (2, 3, 4, 4), (48, 16, 4, 1), torch.float32),
        (4,),
        ("T", (4,), (1,), torch.float32),
        ("T", (4,), (1,), torch.float32),
        1e-5,
    )
    for c in calls:  # the max-pool backward gets int64 zero indices: in range
        assert gemm_bound.replay_ms(c, repeats=1) >= 0


def test_quick_bound_is_reference_wall_over_our_gemm_only_time(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["--case", "train", "--quick", "--rounds", "1", "--repeats", "2", "--json", str(out)]
    assert gemm_bound.main(argv) == 0
    import json

    res = json.loads(out.read_text())
    assert res["ceiling"] == pytest.approx(res["wall_ms"]["timm"] / res["our_gemm_only_ms"])
    assert res["our_overhead_ms"] == pytest.approx(res["wall_ms"]["ours"] - res["our_gemm_only_ms"])
    assert res["our_gemm_calls"] > 0 and res["essential_calls"] > 0
    assert len(res["measurements"]) == 2
    assert {k: res[k] for k in res["measurements"][0]} in res["measurements"]  # a whole run
    kinds = res["essential_ms_by_kind"]
    assert list(kinds) == ["kernels", "attention", "bias_grads", "optimizer"]
    assert kinds["optimizer"] > 0 and kinds["bias_grads"] > 0  # a training step has both
    assert res["essential_ms"] == pytest.approx(sum(kinds.values()))
    both = res["our_gemm_only_ms"] + res["essential_ms"]
    assert res["ceiling_with_essential"] == pytest.approx(res["wall_ms"]["timm"] / both)
    assert "zero-overhead ceiling" in capsys.readouterr().out


def test_percent_of_peak_bounds_are_the_case_s_flops_over_each_time_against_the_better_peak(
    tmp_path, monkeypatch
):
    """Each measurement's % of the matmul peak, for our wall and for the two bounds (GEMMs
    alone, GEMMs and essential kernels), is the case's FLOPs (as the benchmark counts them)
    over that time, against the better of the peaks measured just before and just after it."""
    import json

    from mvitv2 import benchmark as bm

    peaks = iter([100.0, 300.0, 250.0, 50.0])  # measurement 1: before, after; then 2
    monkeypatch.setattr(gemm_bound, "matmul_peak", lambda dtype, device, n: next(peaks))
    out = tmp_path / "b.json"
    argv = ["--case", "image_fp32", "--quick", "--rounds", "1", "--repeats", "2"]
    assert gemm_bound.main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    setup = bm.case_setup("image_fp32", quick=True)
    gflop = 2 * bm.case_macs(setup) / 1e9
    for m, peak in zip(res["measurements"], [300.0, 250.0], strict=True):
        assert m["gflop"] == pytest.approx(gflop)
        assert m["matmul_peak_gflops"] == peak
        s = {
            "pct_peak_wall": m["wall_ms"]["ours"] / 1e3,
            "pct_peak_gemm_only": m["our_gemm_only_ms"] / 1e3,
            "pct_peak_with_essential": (m["our_gemm_only_ms"] + m["essential_ms"]) / 1e3,
        }
        for key, seconds in s.items():
            assert m[key] == pytest.approx(100 * gflop / seconds / peak)


def test_essential_counts_bias_gradients_and_each_op_of_the_optimizer_step_only():
    lin = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)  # one add_ per parameter
    x, w = torch.randn(10, 8), torch.randn(10, 4)

    def step():
        opt.zero_grad()
        (lin(x) * w).sum().backward()  # mul, sum: neither essential nor in the step
        opt.step()

    kinds = gemm_bound.record_essential(step)
    f32 = torch.float32
    bias_grad = (aten.sum.dim_IntList, (("T", (10, 4), (4, 1), f32), (0,), True), ())
    sgd = [
        (aten.add_.Tensor, (("T", s, st, f32), ("T", s, st, f32)), (("alpha", -0.1),))
        for s, st in (((4, 8), (8, 1)), ((4,), (1,)))
    ]
    assert kinds == {
        "kernels": Counter(),
        "attention": Counter(),
        "bias_grads": Counter({bias_grad: 1}),
        "optimizer": Counter({sgd[0]: 1, sgd[1]: 1}),
    }
    assert gemm_bound.is_bias_grad(aten.sum.dim_IntList, (torch.ones(3, 2), [-2]))
    assert not gemm_bound.is_bias_grad(aten.sum.dim_IntList, (torch.ones(3, 2), [1]))
    assert not gemm_bound.is_bias_grad(aten.sum.dim_IntList, (torch.ones(3, 2, 2), [0]))
    assert not gemm_bound.is_bias_grad(aten.mean.dim, (torch.ones(3, 2), [0]))


def test_essential_counts_fused_attention_as_its_time_beyond_its_two_gemms(monkeypatch):
    q, k, v = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)

    def fn():
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, k, v)

    kinds = gemm_bound.record_essential(fn)
    calls = kinds["attention"]
    assert not (kinds["kernels"] or kinds["bias_grads"] or kinds["optimizer"])
    (sdpa,) = [c for c, n in calls.items() if n == 1]
    assert sdpa[0] in gemm_bound.ATTENTION_OPS
    bmms = sorted(c[1] for c, n in calls.items() if n == -1 and c[0] == aten.bmm.default)
    f32 = torch.float32
    assert bmms == [  # 6 x (9x4 @ 4x6) and 6 x (9x6 @ 6x4), dense
        (("T", (6, 9, 4), (36, 4, 1), f32), ("T", (6, 4, 6), (24, 1, 4), f32)),
        (("T", (6, 9, 6), (54, 6, 1), f32), ("T", (6, 6, 4), (24, 4, 1), f32)),
    ]
    assert len(calls) == 3
    times = {sdpa: 10.0}
    monkeypatch.setattr(gemm_bound, "replay_ms", lambda c, repeats=5: times.get(c, 3.0))
    assert gemm_bound.replayed_ms(calls) == pytest.approx(10.0 - 3.0 - 3.0)


def test_the_median_measurement_is_one_whole_run_ranked_by_the_ceiling_with_essential():
    runs = [{"ceiling_with_essential": c, "id": i} for i, c in enumerate([1.6, 1.2, 1.4, 1.3])]
    assert gemm_bound.median_measurement(runs)["id"] == 3  # 1.2 1.3 | 1.4 1.6: the lower middle
    assert gemm_bound.median_measurement(runs[:3])["id"] == 2  # 1.2 1.4 1.6
    assert gemm_bound.median_measurement(runs[:1])["id"] == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_recorder_counts_onednn_linears_as_gemms_with_their_fused_gelu():
    from mvitv2.ops import gemm

    x, w, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)

    def fn():
        with torch.inference_mode(), gemm.gemm_backend("onednn"):
            gemm.linear(x, w, b, gelu=True)

    calls = gemm_bound.record_gemms(fn)
    f32 = torch.float32
    (call,) = calls
    assert call[0] == torch.ops.mkldnn._linear_pointwise.default and calls[call] == 1
    assert call[1] == (
        ("T", (6, 8), (8, 1), f32),
        ("T", (5, 8), (8, 1), f32),
        ("T", (5,), (1,), f32),
        "gelu",
        (),
        "none",
    )
    assert not any(gemm_bound.record_essential(fn).values())  # its GELU is inside the GEMM
    assert gemm_bound.replay_ms(call, repeats=1) >= 0


def test_recorded_calls_are_those_of_our_measured_choices_not_of_the_plain_fallback(monkeypatch):
    """Under a dispatch mode our kernels normally fall back to the plain ones (no timing runs
    there); the recorders let them choose as they run: here the measured attention path
    ("chunked": explicit GEMMs and softmax), not fused SDPA (the fallback)."""
    from mvitv2.ops import attend
    from mvitv2.ops import attention as ops_attention

    monkeypatch.setattr(ops_attention._MEASURED, "choose", lambda *args: "chunked")
    q = torch.randn(1, 2, 8, 4)

    def fn():
        with torch.no_grad():
            attend(q, q, q, 0.5, None, "auto")

    kinds = gemm_bound.record_essential(fn)
    assert not kinds["attention"]
    assert [c[0] for c in kinds["kernels"]] == [aten._softmax.default]


def test_under_autocast_the_gemms_are_recorded_in_the_dtype_they_run_in():
    """The bf16 cases (``--case image_bf16`` / ``video_bf16``) bound the GEMMs that autocast runs:
    a linear under CPU bf16 autocast is recorded (and so replayed) as a bf16 ``addmm`` of the
    cast operands, not as the fp32 call the model wrote; outside autocast it stays fp32."""
    x, w, bias = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)

    def fn():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(x, w, bias)

    (call,) = gemm_bound.record_gemms(fn)
    assert call[0] is aten.addmm.default
    assert [s[3] for s in call[1][:3]] == [torch.bfloat16] * 3
    assert call[1][1][1] == (6, 8) and call[1][2][1] == (8, 5)
    assert gemm_bound.replay_ms(call, repeats=1) >= 0
    with torch.inference_mode():
        (fp32,) = gemm_bound.record_gemms(lambda: F.linear(x, w, bias))
    assert [s[3] for s in fp32[1][:3]] == [torch.float32] * 3
