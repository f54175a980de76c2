"""Our linear layers give PyTorch's results on either GEMM backend (oneDNN or PyTorch's own),
in forward and backward, and fall back to ``F.linear`` wherever oneDNN does not apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.ops import gemm, kept
from mvitv2.ops.gemm import gemm_backend, linear, set_gemm_backend, uses_onednn
from mvitv2.utils import timing
from mvitv2.utils.flops import count_macs

needs_onednn = pytest.mark.skipif(
    gemm._onednn_linear_op() is None, reason="this PyTorch build has no oneDNN linear"
)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(b.abs().max().item(), 1.0))


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
def test_forward_matches_f_linear_with_strided_operands(gelu):
    """Non-contiguous input, a row-slice of a weight, a strided bias (oneDNN reads a strided
    bias as dense unless we copy it), no bias, fused GELU."""
    torch.manual_seed(0)
    x = torch.randn(6, 20, 24).transpose(0, 1)  # (20, 6, 24), not contiguous
    w = torch.randn(40, 24)[5:35]
    b = torch.randn(60)[::2]
    with torch.no_grad(), gemm_backend("onednn"):
        assert uses_onednn(x)
        for bias in (b, None):
            want = F.linear(x, w, bias)
            want = F.gelu(want) if gelu else want
            got = linear(x, w, bias, gelu=gelu)
            assert got.shape == want.shape
            assert _close(got, want)


@needs_onednn
@pytest.mark.parametrize("out_features", [96, 8])  # both orientations of the weight gradient
def test_gradients_match_autograd(out_features):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 32, requires_grad=True)
    w = torch.randn(out_features, 32, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True)
    dy = torch.randn(3, 50, out_features)
    want = torch.autograd.grad((F.linear(x, w, b) * dy).sum(), (x, w, b))
    with gemm_backend("onednn"):
        y = linear(x, w, b)
        assert y.grad_fn is not None and "OneDNN" in type(y.grad_fn).__name__
        got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    for g, h in zip(got, want):
        assert g.shape == h.shape
        assert _close(g, h)
    # Only the weight needs a gradient (frozen input), no bias.
    with gemm_backend("onednn"):
        (gw,) = torch.autograd.grad((linear(x.detach(), w) * dy).sum(), (w,))
    assert _close(gw, want[1])


@needs_onednn
def test_model_forward_and_training_step_agree_across_backends():
    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_tiny",
        num_classes=5,
        depths=(1, 1, 2, 1),
        embed_dim=32,
        img_size=64,
        drop_path_rate=0.0,
    )
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for backend in ("aten", "onednn"):
        model.zero_grad()
        with gemm_backend(backend):
            out = model(x)
            out.square().sum().backward()
            with torch.inference_mode():
                inf = model.eval()(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    inf_bf16 = model(x)
            model.train()
        grads = [p.grad.clone() for p in model.parameters()]
        results[backend] = (out.detach(), inf, grads, inf_bf16)
    (a_out, a_inf, a_grads, a_bf16), (b_out, b_inf, b_grads, b_bf16) = results.values()
    assert _close(b_out, a_out) and _close(b_inf, a_inf)
    # bf16 autocast: the same model to bf16 precision (a few bf16 steps through 5 blocks)
    assert b_bf16.dtype == a_bf16.dtype and _close(b_bf16.float(), a_inf, 3e-2)
    assert _close(a_bf16.float(), a_inf, 3e-2)
    assert len(a_grads) == len(b_grads)
    for g, h in zip(b_grads, a_grads):
        assert _close(g, h, 1e-4)


def test_falls_back_to_f_linear_where_onednn_does_not_apply():
    x = torch.randn(4, 8)
    with gemm_backend("onednn"):
        assert not uses_onednn(x.double())
        assert not uses_onednn(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not uses_onednn(x)  # training under autocast: autocast's F.linear
            y = linear(x.clone().requires_grad_(), torch.randn(3, 8))
            assert y.dtype == torch.bfloat16 and "Mm" in type(y.grad_fn).__name__
        with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():  # fp16: F.linear
            assert gemm._onednn_at_inference(x, torch.randn(3, 8), None, False) is None
    with gemm_backend("aten"):
        assert not uses_onednn(x)
        y = linear(x.requires_grad_(), torch.randn(3, 8))
        assert "Addmm" in type(y.grad_fn).__name__ or "Mm" in type(y.grad_fn).__name__


def test_backend_setting_api():
    assert gemm.get_gemm_backend() in gemm.GEMM_BACKENDS
    with pytest.raises(ValueError, match="unknown GEMM backend"):
        set_gemm_backend("mkl")
    previous = set_gemm_backend("aten")
    try:
        assert gemm.get_gemm_backend() == "aten"
        with gemm_backend("onednn"):
            assert gemm.get_gemm_backend() == "onednn"
        assert gemm.get_gemm_backend() == "aten"
    finally:
        set_gemm_backend(previous)


@needs_onednn
def test_flop_count_does_not_depend_on_the_backend():
    """Under the FLOP counter (a dispatch mode) our linears run ATen's F.linear whatever the
    backend setting, so the count is the full count (oneDNN's op has no FLOP formula)."""
    model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=32, img_size=64)
    with gemm_backend("onednn"):
        a = count_macs(model, (1, 3, 64, 64))
    with gemm_backend("aten"):
        b = count_macs(model, (1, 3, 64, 64))
    with torch.device("meta"):
        meta = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=32, img_size=64)
    assert a == b == count_macs(meta, (1, 3, 64, 64)) > 0


@needs_onednn
def test_widely_spaced_operands_are_made_dense():
    """A weight whose rows are spaced wider than their length runs ~100x slower on oneDNN (and a
    transposed one with padded rows is not a layout we hand it); both must be copied dense."""
    from mvitv2.ops.gemm import _dense

    wide = torch.randn(96, 192)[:, :96]
    assert not wide.is_contiguous() and _dense(wide).is_contiguous()
    assert _dense(wide.t()).is_contiguous()
    dense = torch.randn(96, 64)
    assert _dense(dense) is dense and _dense(dense.t()).data_ptr() == dense.data_ptr()
    x = torch.randn(30, 96)
    with torch.no_grad(), gemm_backend("onednn"):
        assert _close(linear(x, wide), x @ wide.t())
        assert _close(linear(x[:, :48], wide[:, :48]), x[:, :48] @ wide[:, :48].t())


def test_convert_linears_keeps_parameters_and_outputs():
    head = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3, False)
    )
    params = list(head.parameters())
    x = torch.randn(5, 3, 4)
    want = head(x)
    state = head.state_dict()
    gemm.convert_linears(head)
    assert [type(m).__name__ for m in head] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert all(isinstance(m, gemm.Linear) for m in (head[1], head[3]))
    assert all(a is b for a, b in zip(head.parameters(), params))
    assert head.state_dict().keys() == state.keys()
    assert _close(head(x), want)


def test_detector_heads_use_our_linears():
    detector = mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=3, depths=(1, 1, 1, 1))
    linears = [m for m in detector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, gemm.Linear) for m in linears)


_U = 2.0**-10  # one fake-clock tick in seconds (its ms are exact floats)
_U_MS = _U * 1000


class _FakeBackends:
    """ATen's and oneDNN's linear on a fake clock (each call advances it by that backend's ticks)
    and a fresh table of GEMM measurements; every call is logged by backend."""

    def __init__(self, monkeypatch, ticks: dict[str, int]) -> None:
        self.now, self.calls, self.args = 0.0, [], []  # args: each call's (bias, gelu)
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: self.now))
        self.table = timing.MeasuredChoices(default="aten", margin=0.1)
        monkeypatch.setattr(gemm, "_MEASURED", self.table)
        real = {"aten": gemm._aten_linear, "onednn": gemm._nt}
        for name, attr in (("aten", "_aten_linear"), ("onednn", "_nt")):

            def fake(x, w, b=None, gelu=False, name=name):
                self.now += ticks[name] * _U
                self.calls.append(name)
                self.args.append((b, gelu))
                return real[name](x, w, b, gelu)

            monkeypatch.setattr(gemm, attr, fake)


@needs_onednn
@pytest.mark.parametrize(
    ("onednn", "aten", "want"),
    [
        (8, 10, "onednn"),  # 20 % faster
        (9, 10, "aten"),  # 10 % faster: within the margin, ATen
        (10, 8, "aten"),
    ],
)
def test_auto_at_inference_times_each_gemm_size_class_once_and_keeps_onednn_only_if_10pc_faster(
    monkeypatch, onednn, aten, want
):
    """``"auto"`` without gradients times ATen's and oneDNN's linear on the call's own tensors at
    a size class's first call (a warm-up, then at least 3 alternating rounds), keeps oneDNN
    only if it was more than 10 % faster, and then runs the kept one alone; the values are
    F.linear's (+ GELU)."""
    fake = _FakeBackends(monkeypatch, {"onednn": onednn, "aten": aten})
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    with gemm_backend("auto"), torch.no_grad():
        assert gemm.gemm_choice()["gemm"] == "measured"
        for gelu in (False, True):
            fake.calls.clear()
            fake.args.clear()
            got = linear(x, w, b, gelu=gelu)
            assert all(bias is b and g is gelu for bias, g in fake.args)  # timed as it runs
            ref = F.linear(x, w, b)
            assert _close(got, F.gelu(ref) if gelu else ref)
            n = len(fake.calls) - 1  # the measurement, then the kept backend's run
            assert n >= 6 and fake.calls[:n] == ["aten", "onednn"] * (n // 2)
            assert fake.calls[-1] == want
            fake.calls.clear()
            linear(x, w, b, gelu=gelu)
            assert fake.calls == [want]  # remembered: no second timing
    times = f"aten {aten * _U_MS:.2f} ms, onednn {onednn * _U_MS:.2f} ms"
    assert gemm.gemm_measurements() == {
        "5x16 @ 16x12 +bias": f"{want} ({times})",
        "5x16 @ 16x12 +bias +GELU": f"{want} ({times})",
    }


@needs_onednn
def test_gemm_size_classes_count_rows_by_power_of_two_and_the_rest_exactly(monkeypatch):
    fake = _FakeBackends(monkeypatch, {"onednn": 1, "aten": 2})
    w, b = torch.randn(12, 16), torch.randn(12)
    with gemm_backend("auto"), torch.no_grad():
        linear(torch.randn(5, 16), w, b)
        linear(torch.randn(2, 3, 16), w, b)  # 6 rows: 4-7, the same class
        linear(torch.randn(7, 16), w, b)
        assert len(fake.table.table) == 1
        linear(torch.randn(8, 16), w, b)  # 8-15 rows
        linear(torch.randn(5, 16), w, None)  # no bias
        linear(torch.randn(5, 16), w, b, gelu=True)
        linear(torch.randn(16, 5).t(), w, b)  # a transposed input
        linear(torch.randn(5, 16), torch.randn(10, 16), b[:10])  # another output width
        linear(torch.randn(5, 8), w[:, :8], b)  # another input width
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: a class of its own
            linear(torch.randn(5, 16), w, b)
        # (rows by bit length, in width, out width, bias, GELU, dense input, dtype)
        f32, bf16 = torch.float32, torch.bfloat16
        assert set(fake.table.table) == {
            (3, 16, 12, True, False, True, f32),
            (4, 16, 12, True, False, True, f32),
            (3, 16, 12, False, False, True, f32),
            (3, 16, 12, True, True, True, f32),
            (3, 16, 12, True, False, False, f32),
            (3, 16, 10, True, False, True, f32),
            (3, 8, 12, True, False, True, f32),
            (3, 16, 12, True, False, True, bf16),
        }
        assert "5x16 @ 16x12 +bias bf16" in gemm.gemm_measurements()
        del fake.table.table[(3, 16, 12, True, False, True, bf16)]
        linear(torch.randn(5, 1), w[:, :1], b)  # one input column: 5 rows
        assert "5x1 @ 1x12 +bias" in gemm.gemm_measurements()
        del fake.table.table[(3, 1, 12, True, False, True, f32)]
        with gemm_backend("onednn"):  # a set backend: no timing
            fake.calls.clear()
            linear(torch.randn(100, 3), torch.randn(4, 3))
            assert fake.calls == ["onednn"]
        with gemm_backend("aten"):
            fake.calls.clear()
            linear(torch.randn(100, 3), torch.randn(4, 3))
            assert fake.calls == ["aten"]
    assert len(fake.table.table) == 7
    with gemm_backend("auto"):  # a gradient to compute: the one-off measurement decides
        monkeypatch.setattr(gemm, "_measured_ms", lambda: (1.0, 10.0))
        y = linear(torch.randn(3, 16, requires_grad=True), w, b)
        assert "OneDNN" in type(y.grad_fn).__name__ and len(fake.table.table) == 7


def test_gemm_measurement_is_the_best_of_alternating_rounds_after_a_warm_up(monkeypatch):
    """``_measured_ms`` times oneDNN's linear and ATen's on the documented 6272x384 @ 384x1536
    GEMM with bias: a warm-up call of each, then alternating rounds (at least 3; a warm-up round
    over the 200 ms budget gets 3), the best of each; it returns ``(oneDNN ms, ATen ms)``. Fake
    kernels advance a fake clock."""
    clock = SimpleNamespace(now=0.0)
    calls: list[tuple] = []
    ticks = {"onednn": [300, 5, 2, 3, 1], "linear": [9, 6, 4, 5, 1]}

    def tick(name: str) -> None:
        clock.now += ticks[name][sum(c[0] == name for c in calls)] * _U

    def op(x, w, b, attr, scalars, algorithm):
        tick("onednn")
        calls.append(("onednn", x.shape, w.shape, b.shape, attr, scalars, algorithm))
        return x

    def f_linear(x, w, b):
        tick("linear")
        calls.append(("linear", x.shape, w.shape, b.shape))
        return x

    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: op)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(gemm, "F", SimpleNamespace(linear=f_linear))
    gemm._measured_ms.cache_clear()
    try:
        x, w, b = (6272, 384), (1536, 384), (1536,)
        assert gemm._measured_ms() == (2 * _U_MS, 4 * _U_MS)
        assert calls == [("onednn", x, w, b, "none", [], ""), ("linear", x, w, b)] * 4
        monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: None)
        gemm._measured_ms.cache_clear()
        assert gemm._measured_ms() is None
        assert gemm._onednn_measured_faster() is False
    finally:
        gemm._measured_ms.cache_clear()


@pytest.mark.parametrize(
    ("which", "warm_up_ticks", "rounds"),
    # about 200 ms of rounds for the linear GEMM: a 41-tick (40.04 ms) warm-up round buys 5;
    # about 60 ms for the attention products: a 15.5-tick (15.14 ms) one buys 4
    [("linear", 20.5, 5), ("group", 7.75, 4)],
)
def test_the_one_off_measurements_take_as_many_rounds_as_their_budget_buys(
    monkeypatch, which, warm_up_ticks, rounds
):
    clock = SimpleNamespace(now=0.0)
    calls: list[str] = []

    def kernel(name: str):
        def run(*args, **kwargs):
            first = name not in calls
            clock.now += (warm_up_ticks if first else 1) * _U
            calls.append(name)
            return args[0]

        return run

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    if which == "linear":
        monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: kernel("onednn"))
        monkeypatch.setattr(gemm, "F", SimpleNamespace(linear=kernel("aten")))
        measure = gemm._measured_ms
    else:
        fakes = {True: kernel("onednn"), False: kernel("aten")}
        monkeypatch.setattr(gemm, "group_products", lambda a, w, on: fakes[on](a))
        measure = gemm._measured_group_ms
    measure.cache_clear()
    try:
        assert measure() == (_U_MS, _U_MS)
        assert calls == ["onednn", "aten"] * (1 + rounds)
    finally:
        measure.cache_clear()


@pytest.mark.parametrize(
    ("ms", "faster"),
    [((9.0, 10.0), False), ((8.99, 10.0), True), ((10.0, 9.0), False), ((4.5, 5.0), False)],
)
def test_onednn_counts_as_faster_only_beyond_a_10_percent_margin(monkeypatch, ms, faster):
    monkeypatch.setattr(gemm, "_measured_ms", lambda: ms)
    assert gemm._onednn_measured_faster() is faster


def test_uses_onednn_only_for_eager_fp32_cpu_tensors_with_onednn_present(monkeypatch):
    """The rules of ``uses_onednn`` with the kernel's presence and the measurement faked:
    ``"onednn"`` needs no measurement; a meta/fp64 tensor, tracing, a dispatch mode, autocast or
    a build without oneDNN send the layer to ``F.linear``."""
    present = SimpleNamespace()
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: present)
    ms = {"now": (10.0, 10.0)}
    monkeypatch.setattr(gemm, "_measured_ms", lambda: ms["now"])
    x = torch.zeros(2, 4)
    with gemm_backend("onednn"):
        assert uses_onednn(x)  # measured slower: still oneDNN
        assert not uses_onednn(x.to("meta")) and not uses_onednn(x.double())
        with torch.autocast("cpu", torch.bfloat16):
            assert not uses_onednn(x)
        monkeypatch.setattr(gemm, "tracing", lambda: True)
        assert not uses_onednn(x)
        monkeypatch.setattr(gemm, "tracing", lambda: False)
        monkeypatch.setattr(gemm, "intercepted", lambda: True)
        assert not uses_onednn(x)
        monkeypatch.setattr(gemm, "intercepted", lambda: False)
        assert uses_onednn(x)
    with gemm_backend("auto"):
        assert not uses_onednn(x)
        ms["now"] = (1.0, 10.0)
        assert uses_onednn(x) and not uses_onednn(x.to("meta"))
        with torch.autocast("cpu", torch.bfloat16):
            assert not uses_onednn(x)
    with gemm_backend("aten"):
        assert not uses_onednn(x)
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: None)
    with gemm_backend("onednn"):
        assert not uses_onednn(x)


def test_gemm_choice_names_a_set_backend_and_a_build_without_onednn(monkeypatch):
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: SimpleNamespace())
    for setting in ("aten", "onednn"):
        with gemm_backend(setting):
            want = {"gemm": setting, "gemm_setting": setting, "gemm_why": "set"}
            assert gemm.gemm_choice() == want
            assert gemm.gemm_choice(training=True) == {**want, "attention_gemm": setting}
    with gemm_backend("auto"):
        monkeypatch.setattr(gemm, "_measured_ms", lambda: (8.0, 10.0))
        monkeypatch.setattr(gemm, "_measured_group_ms", lambda: (9.5, 10.0))
        assert gemm.gemm_choice(training=True) == {
            "gemm": "onednn",
            "gemm_setting": "auto",
            "gemm_why": "measured 6272x384x1536 with bias: oneDNN 8.0 ms, ATen 10.0 ms; attention"
            " products, 32 groups of 167x96 @ 96x784: oneDNN 9.5 ms, ATen 10.0 ms",
            "attention_gemm": "aten",
        }
        monkeypatch.setattr(gemm, "_measured_ms", lambda: (9.5, 10.0))
        monkeypatch.setattr(gemm, "_measured_group_ms", lambda: (8.0, 10.0))
        choice = gemm.gemm_choice(training=True)
        assert choice["gemm"] == "aten" and choice["attention_gemm"] == "onednn"
        assert gemm.gemm_choice() == {
            "gemm": "measured",
            "gemm_setting": "auto",
            "gemm_why": "measured per GEMM size class at its first call: aten, or onednn if "
            ">10 % faster (fp32) or faster (bf16 autocast)",
        }
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: None)
    for setting in ("auto", "onednn"):
        with gemm_backend(setting):
            want = {"gemm": "aten", "gemm_setting": setting, "gemm_why": "no oneDNN in this build"}
            assert gemm.gemm_choice() == want
            assert gemm.gemm_choice(training=True) == {**want, "attention_gemm": "aten"}
            # bf16 training: memory-efficient attention is not used, no products named
            assert "attention_gemm" not in gemm.gemm_choice(True, torch.bfloat16)


def _groups_naive(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per group, row by row, in float64: out[i, g, j] = sum_c a[i, g, c] * w[g, j, c]."""
    n, G, _ = a.shape
    out = torch.zeros(n, G, w.shape[1], dtype=torch.float64)
    for g in range(G):
        for i in range(n):
            out[i, g] = (a[i, g].double()[None, :] * w[g].double()).sum(-1)
    return out


@pytest.mark.parametrize("onednn", [False, True])
def test_group_products_are_each_group_s_rows_times_its_matrix(onednn):
    """``group_products(a, w)[:, g] = a[:, g] @ w[g].T`` on either backend, for dense operands and
    for strided views (a transposed weight, rows of a wider tensor), against a naive float64
    loop. The oneDNN result is dense: the next product reads it as it lies."""
    if onednn and gemm._onednn_linear_op() is None:
        pytest.skip("no oneDNN in this build")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 5, 6, generator=g)
    w = torch.randn(5, 9, 6, generator=g)
    out = gemm.group_products(a, w, onednn)
    assert out.shape == (7, 5, 9) and (out.is_contiguous() or not onednn)
    assert _close(out.double(), _groups_naive(a, w))
    wide = torch.randn(5, 7, 2, 6, generator=g)  # (G, n, 2, K): rows of a wider tensor
    a2 = wide[:, :, 1].transpose(0, 1)
    w2 = torch.randn(5, 6, 9, generator=g).transpose(1, 2)  # (G, N, K), transposed
    assert _close(gemm.group_products(a2, w2, onednn).double(), _groups_naive(a2, w2))
    # transposed=False: a[:, g] @ w[g] with w (G, K, N), dense or strided
    for wk in (w.transpose(1, 2).contiguous(), w.transpose(1, 2), w2.transpose(1, 2)):
        out = gemm.group_products(a, wk, onednn, transposed=False)
        assert out.shape == (7, 5, 9) and (out.is_contiguous() or not onednn)
        assert _close(out.double(), _groups_naive(a, wk.transpose(1, 2)))


def test_attention_products_go_to_onednn_only_for_eager_fp32_cpu_tensors(monkeypatch):
    """The rules of ``group_products_on_onednn``: the setting; with ``"auto"`` oneDNN only if
    measured more than 10 % faster; never for other dtypes or devices, under autocast, while
    tracing, under a dispatch mode or without oneDNN."""
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: SimpleNamespace())
    ms = {"now": (9.0, 10.0)}
    monkeypatch.setattr(gemm, "_measured_group_ms", lambda: ms["now"])
    x = torch.zeros(2, 4)
    with gemm_backend("auto"):
        assert not gemm.group_products_on_onednn(x)  # 10 % faster is not enough
        ms["now"] = (8.99, 10.0)
        assert gemm.group_products_on_onednn(x)
        assert not gemm.group_products_on_onednn(x.double())
        assert not gemm.group_products_on_onednn(x.to("meta"))
        with torch.autocast("cpu", torch.bfloat16):
            assert not gemm.group_products_on_onednn(x)
        monkeypatch.setattr(gemm, "tracing", lambda: True)
        assert not gemm.group_products_on_onednn(x)
        monkeypatch.setattr(gemm, "tracing", lambda: False)
        monkeypatch.setattr(gemm, "intercepted", lambda: True)
        assert not gemm.group_products_on_onednn(x)
        monkeypatch.setattr(gemm, "intercepted", lambda: False)
    ms["now"] = (20.0, 10.0)
    with gemm_backend("onednn"):
        assert gemm.group_products_on_onednn(x)  # measured slower: still oneDNN
    ms["now"] = (1.0, 10.0)
    with gemm_backend("aten"):
        assert not gemm.group_products_on_onednn(x)  # measured faster: still ATen
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: None)
    with gemm_backend("onednn"):
        assert not gemm.group_products_on_onednn(x)


def test_attention_product_measurement_times_one_query_chunk_each_way(monkeypatch):
    """``_measured_group_ms`` times both backends of ``group_products`` on one chunk of
    MViTv2-T's stage-2 scores (167 rows, 32 groups, 96 -> 784): a warm-up call of each, then
    alternating rounds (at least 3: the warm-up round here is over the 60 ms budget), the best
    of each; ``(oneDNN ms, ATen ms)``."""
    clock = SimpleNamespace(now=0.0)
    calls: list[tuple] = []
    ticks = {True: [80, 5, 2, 3], False: [9, 6, 4, 5]}

    def fake(a, w, onednn):
        clock.now += ticks[onednn][sum(c[2] == onednn for c in calls)] * _U
        calls.append((tuple(a.shape), tuple(w.shape), onednn))
        return a

    monkeypatch.setattr(gemm, "group_products", fake)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    gemm._measured_group_ms.cache_clear()
    try:
        assert gemm._measured_group_ms() == (2 * _U_MS, 4 * _U_MS)
        shapes = ((167, 32, 96), (32, 784, 96))
        assert calls == [(*shapes, True), (*shapes, False)] * 4
    finally:
        gemm._measured_group_ms.cache_clear()


@needs_onednn
def test_onednn_linear_gives_gradients_when_only_the_bias_needs_one_and_with_the_gelu():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)
    dy = torch.randn(6, 5)
    with gemm_backend("onednn"):
        bias = b.clone().requires_grad_()
        (db,) = torch.autograd.grad((linear(x, w, bias) * dy).sum(), (bias,))
        assert _close(db, dy.sum(0))
        xg = x.clone().requires_grad_()
        y = linear(xg, w, b, gelu=True)
        (dx,) = torch.autograd.grad((y * dy).sum(), (xg,))
    xr = x.clone().requires_grad_()
    ref = F.gelu(F.linear(xr, w, b))
    (dx_ref,) = torch.autograd.grad((ref * dy).sum(), (xr,))
    assert _close(y.detach(), ref.detach()) and _close(dx, dx_ref)


@needs_onednn
def test_without_gradients_onednn_runs_the_gelu_fused_into_the_gemm(monkeypatch):
    """Where no gradient is needed (under ``no_grad``, or no input requires one) the GELU goes
    into oneDNN's GEMM call, with no autograd graph."""
    seen = []
    real = gemm._nt
    monkeypatch.setattr(gemm, "_nt", lambda *a: seen.append(a[3:]) or real(*a))
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8), torch.randn(5)
    with gemm_backend("onednn"), torch.no_grad():
        y = linear(x, w, b, gelu=True)
    assert seen == [(True,)] and y.grad_fn is None
    assert _close(y, F.gelu(F.linear(x, w, b)).detach())
    seen.clear()
    with gemm_backend("onednn"):  # gradients enabled, but none needs one: the same fused call
        for bias in (b, None):
            y = linear(x.detach(), w, bias, gelu=True)
            assert y.grad_fn is None and _close(y, F.gelu(F.linear(x.detach(), w, bias)))
    assert seen == [(True,), (True,)]


def test_onednn_dtype_rules_fp32_without_autocast_and_bf16_autocast_only_at_inference():
    x = torch.zeros(2, 4)
    assert gemm._onednn_dtype(x) is torch.float32
    assert gemm._onednn_dtype(x, inference=True) is torch.float32
    for t in (x.double(), x.bfloat16(), x.to("meta")):
        assert gemm._onednn_dtype(t, inference=True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm._onednn_dtype(x) is None  # under autograd: autocast's F.linear
        assert gemm._onednn_dtype(x, inference=True) is torch.bfloat16
        assert gemm._onednn_dtype(x.bfloat16(), inference=True) is torch.bfloat16
        assert gemm._onednn_dtype(x.double(), inference=True) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert gemm._onednn_dtype(x, inference=True) is None


def test_bf16_goes_to_onednn_only_on_a_cpu_with_its_bf16_kernels(monkeypatch):
    """Without AVX-512/AMX oneDNN's bf16 linear refuses to run: ATen's bf16 GEMM then."""
    x = torch.zeros(2, 4)
    monkeypatch.setattr(gemm, "_onednn_bf16_supported", lambda: False)
    monkeypatch.setattr(gemm, "_onednn_linear_op", lambda: object())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm._onednn_dtype(x, inference=True) is None
    assert gemm._onednn_dtype(x, inference=True) is torch.float32  # fp32 is not affected
    monkeypatch.setattr(gemm, "_onednn_bf16_supported", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm._onednn_dtype(x, inference=True) is torch.bfloat16
    monkeypatch.undo()
    want = (
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if torch.backends.mkldnn.is_available()
        else False
    )
    assert gemm._onednn_bf16_supported() is bool(want)


@needs_onednn
@pytest.mark.skipif(not gemm._onednn_bf16_supported(), reason="no oneDNN bf16 kernels here")
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_autocast_inference_on_onednn_is_the_product_of_the_bf16_operands(monkeypatch, gelu):
    """Under CPU bf16 autocast without gradients, oneDNN gets x, the weight (a row slice, as the
    qkv projection passes) and the bias cast to bf16, adds the bias (and the exact GELU) in its
    GEMM, and returns bf16: the fp32 product of the bf16-rounded operands, rounded once (within
    a bf16 step), and F.linear's result under autocast within two bf16 steps (it rounds the
    bias fill and the GEMM output separately, and the GELU's input)."""
    seen = []
    real = gemm._nt
    monkeypatch.setattr(
        gemm,
        "_nt",
        lambda a, b, bias, g: seen.append((a.dtype, b.dtype, bias.dtype, g)) or real(a, b, bias, g),
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 24, generator=g)
    w_full, b = torch.randn(30, 24, generator=g), torch.randn(10, generator=g)
    w = w_full[10:20]  # rows of a larger weight
    r = lambda t: t.bfloat16().float()  # noqa: E731
    want = F.linear(r(x), r(w), r(b))
    want = F.gelu(want) if gelu else want
    with gemm_backend("onednn"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear(x, w, b, gelu=gelu)
        aten = F.linear(x, w, b)
        aten = F.gelu(aten) if gelu else aten
    bf16 = torch.bfloat16
    assert seen == [(bf16, bf16, bf16, gelu)] and got.dtype == bf16
    step = 2.0**-7 * want.abs().clamp(min=1.0)  # one bf16 step, at least at 1.0
    assert bool(((got.float() - want).abs() <= step).all())
    assert bool(((got.float() - aten.float()).abs() <= 2 * step).all())


@needs_onednn
def test_auto_under_bf16_autocast_keeps_onednn_when_faster_at_all_but_fp32_needs_10pc(
    monkeypatch,
):
    """Both dtypes timed 9 ticks on oneDNN against 10 on ATen (10 % faster): fp32 keeps ATen
    (its margin), bf16 autocast takes oneDNN (no margin: ATen's bf16 GEMM is oneDNN's own, only
    the bias/GELU epilogue differs); equal times keep ATen in both."""
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    for ticks, want_fp32, want_bf16 in [(9, "aten", "onednn"), (10, "aten", "aten")]:
        _FakeBackends(monkeypatch, {"onednn": ticks, "aten": 10})
        with gemm_backend("auto"), torch.no_grad():
            linear(x, w, b)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = linear(x, w, b)
        assert y.dtype == torch.bfloat16
        got = {label: c.split(" ")[0] for label, c in gemm.gemm_measurements().items()}
        assert got == {"5x16 @ 16x12 +bias": want_fp32, "5x16 @ 16x12 +bias bf16": want_bf16}


# ------------------------------------------------------- kept low-precision weights (inference)
_BF16 = torch.bfloat16


@pytest.fixture
def no_kept_casts():
    kept.clear_kept()
    yield
    kept.clear_kept()


def _cast_under_inference(t: torch.Tensor, dtype=_BF16) -> torch.Tensor:
    with torch.no_grad():
        return gemm.inference_cast(t, dtype)


def test_kept_cast_is_the_plain_cast_kept_across_calls_for_every_slice_of_one_weight(
    no_kept_casts,
):
    """Row slices of one weight (as Q/K/V's projections take them) read one kept bf16 copy of
    the whole weight: bit-equal to ``slice.to(bf16)``, the same memory on the next call, and
    its bytes are the weight's in bf16."""
    w = torch.nn.Parameter(torch.randn(30, 24))
    for rows in (slice(0, 10), slice(10, 20), slice(20, 30)):
        got = _cast_under_inference(w[rows])
        assert got.dtype == _BF16 and got.shape == (10, 24)
        assert torch.equal(got, w[rows].detach().to(_BF16))
    first, again = _cast_under_inference(w[10:20]), _cast_under_inference(w[10:20])
    assert first.data_ptr() == again.data_ptr()
    assert kept.kept_bytes("cast") == 30 * 24 * 2
    col = w[:, 5]  # a strided view reads its own elements of the kept copy
    assert torch.equal(_cast_under_inference(col), col.detach().to(_BF16))


@pytest.mark.parametrize(
    "change",
    [
        "in_place",
        "load_state_dict",
        "copy_",
        "data_replaced",
        "data_replaced_old_kept",
        "data_replaced_twice",
    ],
)
def test_a_changed_weight_is_cast_again(no_kept_casts, change):
    """Every way a weight's values change between inference calls makes a new copy: an
    in-place write (optimizer step), ``load_state_dict``, ``copy_``, and ``.data = ...``
    (which keeps the version counter: the storage is compared, whether the old one lives on
    elsewhere or is freed, and when another replacement follows the freeing: without the kept
    copy's weak reference, that storage's bookkeeping would land at the freed one's address)."""
    lin = torch.nn.Linear(24, 30)
    w = lin.weight
    before = _cast_under_inference(w).clone()
    old = w.detach()  # the old storage, alive
    new = torch.randn(30, 24)
    with torch.no_grad():
        if change == "in_place":
            w.add_(1.0)
        elif change == "load_state_dict":
            lin.load_state_dict({"weight": new, "bias": lin.bias.detach().clone()})
        elif change == "copy_":
            w.copy_(new)
        elif change.startswith("data_replaced"):
            w.data = new
            if change != "data_replaced_old_kept":
                del old
            if change == "data_replaced_twice":
                w.data = torch.empty(0)
                w.data = torch.randn(30, 24)
    got = _cast_under_inference(w)
    assert torch.equal(got, w.detach().to(_BF16))
    assert not torch.equal(got, before)


def test_kept_casts_go_with_their_weight_and_can_be_cleared(no_kept_casts):
    w = torch.nn.Parameter(torch.randn(16, 8))
    _cast_under_inference(w)
    assert kept.kept_bytes("cast") == 16 * 8 * 2
    del w
    assert kept.kept_bytes("cast") == 0
    w2 = torch.nn.Parameter(torch.randn(4, 8))
    _cast_under_inference(w2)
    kept.clear_kept()
    assert kept.kept_bytes("cast") == 0


def test_casts_are_fresh_where_a_copy_cannot_be_kept(no_kept_casts):
    """With gradients enabled, for an inference tensor (no version counter) or a
    non-contiguous base the cast is made anew (same values, nothing kept); a tensor already in
    the dtype, or not fp32, comes back as it is (autocast casts only fp32); a dtype change
    replaces the kept copy."""
    w = torch.nn.Parameter(torch.randn(6, 5))
    got = gemm.inference_cast(w, _BF16)  # gradients enabled
    assert torch.equal(got, w.detach().to(_BF16)) and got.requires_grad
    assert kept.kept_bytes("cast") == 0
    with torch.inference_mode():
        inf = torch.randn(6, 5)
        assert torch.equal(gemm.inference_cast(inf, _BF16), inf.to(_BF16))
    nc = torch.empty_strided((6, 5), (1, 6)).normal_()  # no base, not contiguous
    assert torch.equal(_cast_under_inference(nc), nc.to(_BF16))
    assert kept.kept_bytes("cast") == 0
    for t in (w.detach().to(_BF16), w.detach().double()):
        assert _cast_under_inference(t) is t
    assert _cast_under_inference(w, torch.float32) is w
    _cast_under_inference(w)
    half = _cast_under_inference(w, torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, w.detach().half())
    assert kept.kept_bytes("cast") == 6 * 5 * 2


def test_no_copy_is_kept_while_tracing_or_under_a_dispatch_mode(no_kept_casts, monkeypatch):
    """Compiling/exporting (a traced copy must not outlive the trace) and FLOP counting get a
    fresh cast."""
    from torch.utils.flop_counter import FlopCounterMode

    w = torch.nn.Parameter(torch.randn(6, 5))
    with FlopCounterMode(display=False):
        assert torch.equal(_cast_under_inference(w), w.detach().to(_BF16))
    assert kept.kept_bytes("cast") == 0
    monkeypatch.setattr(kept, "tracing", lambda: True)
    assert torch.equal(_cast_under_inference(w), w.detach().to(_BF16))
    assert kept.kept_bytes("cast") == 0


def test_a_weight_at_an_offset_of_its_storage_reads_its_own_elements(no_kept_casts):
    """A weight with no base that starts inside its storage (e.g. detached from a slice): the
    kept copy starts at its first element."""
    w = torch.randn(40, 24)[10:].detach()
    assert w._base is None and w.storage_offset() == 240
    assert torch.equal(_cast_under_inference(w), w.to(_BF16))
    assert torch.equal(_cast_under_inference(w[5:9]), w[5:9].to(_BF16))


def test_kept_casts_made_in_inference_mode_serve_no_grad_calls(no_kept_casts):
    w = torch.nn.Parameter(torch.randn(6, 5))
    with torch.inference_mode():
        a = gemm.inference_cast(w, _BF16)
    b = _cast_under_inference(w)
    assert torch.equal(a, b) and a.data_ptr() == b.data_ptr()


@pytest.mark.parametrize("backend", ["aten", pytest.param("onednn", marks=needs_onednn)])
def test_linear_under_autocast_inference_sees_every_weight_change(no_kept_casts, backend):
    """``linear`` under bf16 autocast without gradients equals ``F.linear`` under autocast
    (on ATen bit-exactly: the same bf16 operands), keeps the copies, and after the weight and
    bias change in place gives the new weights' result."""
    if backend == "onednn" and not gemm._onednn_bf16_supported():
        pytest.skip("no oneDNN bf16 kernels here")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 24, generator=g)
    lin = torch.nn.Linear(24, 30)
    for _ in range(2):  # the second time with changed weights
        with gemm_backend(backend), torch.no_grad(), torch.autocast("cpu", dtype=_BF16):
            got = linear(x, lin.weight, lin.bias)
            want = F.linear(x, lin.weight, lin.bias)
        if backend == "aten":
            assert torch.equal(got, want)
        else:
            assert _close(got.float(), want.float(), 2**-6)
        assert kept.kept_bytes("cast") == (30 * 24 + 30) * 2
        with torch.no_grad():
            lin.weight.mul_(-2.0)
            lin.bias.add_(3.0)
    with gemm_backend(backend), torch.no_grad(), torch.autocast("cpu", dtype=_BF16):
        got, want = linear(x, lin.weight), F.linear(x, lin.weight)  # no bias
    assert _close(got.float(), want.float(), 0.0 if backend == "aten" else 2**-6)


def test_a_model_given_new_weights_predicts_with_them_under_bf16_autocast(no_kept_casts):
    """Predict, load other weights into the same model, predict again: the second result is a
    fresh model's with those weights, bit for bit (no copy of the old weights is used), and
    the kept copies are the bf16 size of the linear weights and biases, once."""
    kw = dict(num_classes=5, depths=(1, 1, 2, 1), embed_dim=32, img_size=64)
    torch.manual_seed(0)
    model, other = (mvitv2.create_model("mvitv2_tiny", **kw).eval() for _ in range(2))
    x = torch.randn(2, 3, 64, 64)

    def predict(m):
        with torch.inference_mode(), torch.autocast("cpu", dtype=_BF16):
            return m(x)

    first = predict(model)
    assert torch.equal(predict(model), first)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    want_bytes = sum(2 * (m.weight.numel() + m.bias.numel()) for m in linears)
    assert kept.kept_bytes("cast") == want_bytes
    model.load_state_dict(other.state_dict())
    fresh = predict(other)
    assert not torch.equal(fresh, first)
    assert torch.equal(predict(model), fresh)
