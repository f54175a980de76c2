"""mvitv2.ops: the reported implementation choices are the ones that run, the residual add is
exact; the trainer logs and stores the choices (the window partition: test_windows.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mvitv2
from engine_toy import ToyTask, toy_config
from mvitv2.engine import Trainer
from mvitv2.ops import (
    add_residual,
    add_residual_after_prefix,
    attention_impl,
    gemm_backend,
    implementation_choices,
)
from mvitv2.ops import attention as attention_ops
from mvitv2.ops import gemm as gemm_ops
from mvitv2.utils import timing
from mvitv2.utils.allocator import allocator_setting

TINY = dict(num_classes=3, depths=(1, 1, 1, 1), embed_dim=16, img_size=64)


def _fresh_attention_table(monkeypatch, **kw) -> timing.MeasuredChoices:
    """A new, empty table of attention measurements in place of the process's (as the module
    builds it: "bias" kept on a tie; ``kw`` overrides the budget or the class cap)."""
    table = timing.MeasuredChoices(default="bias", **kw)
    monkeypatch.setattr(attention_ops, "_MEASURED", table)
    return table


PATH_FUNCTIONS = {
    "reference": "attention_reference",
    "bias": "attention_bias",
    "folded": "attention_folded",
    "chunked": "attention_chunked",
    "memeff": "attention_memeff",
}


def _paths_run(monkeypatch, fn) -> set[str]:
    """The attention paths that ``fn()`` runs, seen by wrapping each path function."""
    seen: set[str] = set()
    for name, attr in PATH_FUNCTIONS.items():
        real = getattr(attention_ops, attr)

        def spy(*args, name=name, real=real, **kwargs):
            seen.add(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(attention_ops, attr, spy)
    fn()
    return seen


@pytest.mark.parametrize(
    ("setting", "dtype", "training", "expected"),
    [
        # CPU training: memeff in fp32 (memory), chunked under bf16 (no fused SDPA backward);
        # CPU inference is measured per shape (tested below).
        ("auto", torch.float32, True, "memeff"),
        ("auto", torch.bfloat16, True, "chunked"),
        ("folded", torch.float32, True, "folded"),
        ("reference", torch.bfloat16, False, "reference"),
    ],
)
def test_implementation_choices_name_the_attention_path_the_model_runs(
    setting, dtype, training, expected, monkeypatch
):
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", **TINY).train(training)
    x = torch.randn(2, 3, 64, 64)

    def forward():
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            if training:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)

    with attention_impl(setting):
        choices = implementation_choices("cpu", dtype, training=training)
        ran = _paths_run(monkeypatch, forward)
    assert ran == {expected}
    assert choices["attention"] == expected and choices["attention_setting"] == setting
    if setting == "auto":
        assert choices["attention_why"].startswith("training")
    else:
        assert choices["attention_why"] == "set"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", ["bias", "chunked", "folded"])
def test_auto_at_cpu_inference_times_each_attention_shape_once_and_keeps_the_fastest(
    monkeypatch, dtype, fast
):
    """``"auto"`` at CPU inference times bias, chunked and folded on each attention shape at its
    first call and then runs only the fastest for that shape. The timer is a fake clock that each
    path advances (``fast`` by 1 ms, the others by 3 ms), so the fastest is known whatever the
    machine's load. The outputs are those of the reference path."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    _fresh_attention_table(monkeypatch)
    for name in attention_ops.MEASURED_PATHS:
        real = getattr(attention_ops, PATH_FUNCTIONS[name])

        def timed(*args, real=real, cost=1e-3 if name == fast else 3e-3, **kwargs):
            clock.now += cost
            return real(*args, **kwargs)

        monkeypatch.setattr(attention_ops, PATH_FUNCTIONS[name], timed)
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            return model(x).float()

    choices = implementation_choices("cpu", dtype)
    assert choices["attention"] == "measured" and choices["attention_setting"] == "auto"
    assert choices["attention_why"].startswith("measured per attention size class")
    first = forward()
    # one measurement per attention size class; the 4 blocks of this model (64 px, patch
    # stride 4, Q pooled by 2 from the second stage on, K/V by 4 then 2, 1, 1) differ in each
    measured = attention_ops.attention_measurements()
    assert sorted(measured) == sorted(
        f"q {q} k {k} {dtype}"
        for q, k in [
            ((2, 1, 256, 16), (2, 1, 16, 16)),
            ((2, 2, 64, 16), (2, 2, 64, 16)),
            ((2, 4, 16, 16), (2, 4, 64, 16)),
            ((2, 8, 4, 16), (2, 8, 16, 16)),
        ]
    )
    assert len(measured) == 4 and all(m.startswith(f"{fast} (") for m in measured.values())
    assert all(f"{fast} 1.00 ms" in m and m.count(" 3.00 ms") == 2 for m in measured.values())
    assert all(str(dtype) in key for key in measured)
    assert _paths_run(monkeypatch, forward) == {fast}  # no new timing on the second call
    with attention_impl("reference"):
        want = forward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(first, want, atol=tol * want.abs().max().item(), rtol=0)


def test_auto_is_not_measured_while_compiling_or_on_a_gpu(monkeypatch):
    monkeypatch.setattr(attention_ops, "tracing", lambda: True)
    assert attention_ops._auto("cpu", torch.float32, False) == (
        "bias",
        "compiling or exporting: not measured",
    )
    assert attention_ops._auto("cuda", torch.float32, False)[0] == "bias"


def test_implementation_choices_on_cuda_say_the_table_is_not_measured():
    choices = implementation_choices("cuda:1", torch.bfloat16, training=True)
    assert choices["attention"] == "bias" and "not measured" in choices["attention_why"]
    assert choices["gemm"] == "aten"
    assert choices["gemm_why"] == (
        "oneDNN is used on CPU only, for fp32 and for bf16 autocast at inference"
    )


def test_implementation_choices_name_the_gemm_backend_the_linear_layers_use(monkeypatch):
    onednn_calls = []
    real = gemm_ops._nt
    monkeypatch.setattr(gemm_ops, "_nt", lambda *a, **k: onednn_calls.append(1) or real(*a, **k))
    monkeypatch.setattr(gemm_ops, "_MEASURED", timing.MeasuredChoices("aten", margin=0.1))
    layer = gemm_ops.Linear(8, 4)
    x = torch.randn(3, 8)
    has_onednn = gemm_ops._onednn_linear_op() is not None
    for backend in ("aten", "onednn", "auto"):
        if backend == "onednn" and not has_onednn:
            continue
        with gemm_backend(backend):
            with torch.no_grad():
                choices = implementation_choices("cpu", torch.float32)
                layer(x)  # (with "auto": the measurement)
                onednn_calls.clear()
                layer(x)
            ran = "onednn" if onednn_calls else "aten"
            if backend == "auto" and has_onednn:  # at inference: per size class, as measured
                assert choices["gemm"] == "measured"
                assert gemm_ops.gemm_measurements()["3x8 @ 8x4 +bias"].startswith(ran + " (")
            else:
                assert choices["gemm"] == ran, backend
                assert choices["gemm_why"] in ("set", "no oneDNN in this build")
            assert choices["gemm_setting"] == backend
            train = implementation_choices("cpu", torch.float32, training=True)
            y = layer(x.clone().requires_grad_())
            assert train["gemm"] == ("onednn" if "OneDNN" in type(y.grad_fn).__name__ else "aten")
            if backend == "auto" and has_onednn:
                onednn_ms, aten_ms = gemm_ops._measured_ms()
                assert f"oneDNN {onednn_ms:.1f} ms, ATen {aten_ms:.1f} ms" in train["gemm_why"]
    bf16_onednn = has_onednn and gemm_ops._onednn_bf16_supported()
    with gemm_backend("onednn"):  # bf16 autocast: oneDNN at inference, F.linear in training
        inference = implementation_choices("cpu", torch.bfloat16)
        assert inference["gemm"] == ("onednn" if bf16_onednn else "aten")
        train = implementation_choices("cpu", torch.bfloat16, training=True)
        assert train["gemm"] == "aten" and "at inference" in train["gemm_why"]
        onednn_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.clone().requires_grad_())
        assert not onednn_calls and y.dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert len(onednn_calls) == int(bf16_onednn)
    monkeypatch.setattr(gemm_ops, "_onednn_bf16_supported", lambda: False)
    with gemm_backend("onednn"):
        assert implementation_choices("cpu", torch.bfloat16) == {
            **attention_ops.attention_choice("cpu", torch.bfloat16, False),
            "gemm": "aten",
            "gemm_setting": "onednn",
            "gemm_why": "this CPU has no oneDNN bf16 kernels",
            "pool_conv": "as autocast",
            "pool_conv_why": "fp32, or no gradients",
            **attention_ops.folded_choice(torch.bfloat16, False),
        }


def test_add_residual_adds_in_place_only_without_gradients():
    shortcut, branch = torch.randn(4, 6), torch.randn(4, 6)
    want = shortcut + branch
    with torch.no_grad():
        fresh = branch.clone()
        out = add_residual(shortcut, fresh)
    assert torch.equal(out, want) and out.data_ptr() == fresh.data_ptr()  # no new buffer
    branch_g = branch.clone().requires_grad_(True)
    out = add_residual(shortcut, branch_g)
    assert torch.equal(out, want) and out.data_ptr() != branch_g.data_ptr()
    (grad,) = torch.autograd.grad(out.sum(), branch_g)
    assert torch.equal(grad, torch.ones_like(grad))


def test_add_residual_keeps_the_fp32_stream_under_autocast():
    """A bf16 branch (a linear layer's output under autocast) onto the fp32 residual stream: the
    plain add's fp32 sum, bit for bit, not the branch rounded in place; a bf16 stream with a
    bf16 branch still adds in place."""
    g = torch.Generator().manual_seed(2)
    shortcut = torch.randn(4, 6, generator=g)
    branch = torch.randn(4, 6, generator=g).bfloat16()
    with torch.no_grad():
        out = add_residual(shortcut, branch.clone())
        assert out.dtype == torch.float32 and torch.equal(out, shortcut + branch)
        low = shortcut.bfloat16()
        fresh = branch.clone()
        out = add_residual(low, fresh)
        assert out.data_ptr() == fresh.data_ptr() and torch.equal(out, low + branch)


@pytest.mark.parametrize(
    ("branch_dtype", "shortcut_dtype", "prefix"),
    [
        (torch.float32, torch.float32, 1),
        (torch.bfloat16, torch.bfloat16, 1),
        (torch.bfloat16, torch.float32, 1),
        (torch.float32, torch.bfloat16, 2),
    ],
)
def test_add_residual_after_prefix_skips_the_prefix_tokens(branch_dtype, shortcut_dtype, prefix):
    """Residual pooling that skips the cls token(s), token by token against a loop: every
    token after the prefix is branch + shortcut in the promoted dtype, the prefix keeps the
    branch; with and without gradients, from a transposed (head-major) branch as attention
    gives it, into a dense token-major result; the shortcut's prefix rows get no gradient."""
    g = torch.Generator().manual_seed(7)
    B, N, nH, C = 2, 6, 3, 4
    branch = torch.randn(B, nH, N, C, generator=g).to(branch_dtype).transpose(1, 2)
    shortcut = torch.randn(B, N, nH, C, generator=g).to(shortcut_dtype)
    dtype = torch.promote_types(branch_dtype, shortcut_dtype)
    want = torch.empty(B, N, nH, C, dtype=dtype)
    for n in range(N):
        want[:, n] = branch[:, n].to(dtype) + (shortcut[:, n].to(dtype) if n >= prefix else 0)
    with torch.no_grad():
        out = add_residual_after_prefix(shortcut, branch, prefix)
    assert out.dtype == dtype and out.is_contiguous() and torch.equal(out, want)
    s = shortcut.clone().requires_grad_(True)
    out = add_residual_after_prefix(s, branch, prefix)
    assert torch.equal(out, want)
    (grad,) = torch.autograd.grad(out.float().sum(), s)
    assert torch.equal(grad[:, :prefix], torch.zeros_like(grad[:, :prefix]))
    assert torch.equal(grad[:, prefix:], torch.ones_like(grad[:, prefix:]))


@pytest.mark.parametrize("cls_token", [True, False])
def test_blocks_keep_the_plain_residual_dtype_under_bf16_autocast(monkeypatch, cls_token):
    """Under CPU bf16 autocast at inference each block's output has the dtype of the plain
    modules' ``shortcut + branch``: fp32 once the fp32 cls token is prepended (as in
    torchvision's video model; rounding that stream to bf16 at every block made MViTv2-S
    video's error against fp32 about a quarter larger than torchvision's), bf16 without one
    (the conv's bf16 tokens, as in timm's image models) and after a stage's shortcut
    projection."""
    import mvitv2.models.mvit as mvit_module

    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_tiny",
        num_classes=5,
        depths=(1, 1, 1, 1),
        embed_dim=32,
        img_size=64,
        use_cls_token=cls_token,
    ).eval()
    dtypes: list[torch.dtype] = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda mod, args, out: dtypes.append(out[0].dtype))

    def run() -> list[torch.dtype]:
        dtypes.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(1, 3, 64, 64))
        return list(dtypes)

    ours = run()
    monkeypatch.setattr(mvit_module, "add_residual", lambda a, b: a + b)
    assert ours == run()
    # fp32 from the cls token on, until a stage's shortcut projection (a bf16 linear) starts a
    # bf16 stream, as in the references
    assert ours[0] == (torch.float32 if cls_token else torch.bfloat16)


@pytest.mark.parametrize(
    ("amp", "attention", "gemm"), [("none", "memeff", None), ("bf16_force", "chunked", "aten")]
)
def test_trainer_logs_and_checkpoints_the_kernels_in_force(tmp_path, capsys, amp, attention, gemm):
    """CPU training: fp32 uses memeff (and whichever GEMM backend was measured faster), bf16
    autocast the chunked path and PyTorch's GEMMs (docs/benchmarks.md)."""
    cfg = toy_config(str(tmp_path), f"k{amp}", f"amp={amp}")
    trainer = Trainer(ToyTask(cfg), cfg)
    stored = trainer.state_dict()["implementation"]
    assert stored["attention"] == attention and stored["attention_setting"] == "auto"
    if gemm is not None:
        assert stored["gemm"] == gemm
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("kernels: "))
    assert f"attention={attention}" in line and f"gemm={stored['gemm']}" in line
    assert f"gemm_why={stored['gemm_why']}" in line
    assert stored["allocator"] == allocator_setting()  # how the C allocator was set up
    trainer.close()


@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_group_layer_norm_values_and_gradients_match_one_layer_norm_per_group(needs):
    """The pooled Q/K/V LayerNorm of training (one call for G groups, weights per group) against
    G separate ``F.layer_norm`` calls under autograd, in float64; with gradients wanted for all
    of x, weight and bias, or for one alone (frozen norms, a frozen input)."""
    from mvitv2.ops.pooling import _GroupLayerNorm

    g = torch.Generator().manual_seed(0)
    B, N, G, nH, C = 2, 5, 3, 2, 4
    x = torch.randn(B, N, G, nH, C, generator=g, dtype=torch.float64)
    w = torch.randn(G, 1, C, generator=g, dtype=torch.float64)
    b = torch.randn(G, 1, C, generator=g, dtype=torch.float64)
    wanted = [t.requires_grad_(n) for t, n in zip((x, w, b), needs) if n]
    dy = torch.randn(B, N, G, nH, C, generator=g, dtype=torch.float64)
    ours = _GroupLayerNorm.apply(x, w, b, 1e-6)
    grads = torch.autograd.grad(ours, wanted, dy)
    ref = torch.stack(
        [F.layer_norm(x[:, :, i], (C,), w[i, 0], b[i, 0], 1e-6) for i in range(G)], dim=2
    )
    ref_grads = torch.autograd.grad(ref, wanted, dy)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_affine_free_layer_norm_is_the_formula_and_bit_identical_to_aten_s_own():
    """``_normalize`` (a unit weight and zero bias, for ATen's vectorised CPU kernel) gives the
    same bits as the affine-free ``F.layer_norm`` in fp32, and in float64 the formula
    ``(x - mean) / sqrt(var + eps)`` with the biased variance, and its mean and rstd."""
    from mvitv2.ops.pooling import _normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 2, 3, 96, generator=g) * 3 + 1
    y, mean, rstd = _normalize(x, 1e-6)
    assert torch.equal(y, F.layer_norm(x, (96,), None, None, 1e-6))
    x64 = x.double()
    y64, mean64, rstd64 = _normalize(x64, 1e-3)
    mu = x64.sum(-1, keepdim=True) / 96
    var = ((x64 - mu) ** 2).sum(-1, keepdim=True) / 96
    torch.testing.assert_close(y64, (x64 - mu) / torch.sqrt(var + 1e-3), rtol=0, atol=1e-12)
    torch.testing.assert_close(mean64.reshape(mu.shape), mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(rstd64.reshape(mu.shape), (var + 1e-3) ** -0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_inference_head_norm_is_one_layer_norm_module_per_group_and_head(groups):
    """At inference the pooled Q/K/V LayerNorm of ``(B, N, G*nH*C)`` tokens equals group
    ``g``'s ``nn.LayerNorm`` applied to every head's ``C`` channels of group ``g``."""
    from mvitv2.ops.pooling import _head_norm

    torch.manual_seed(0)
    B, N, nH, C = 2, 7, 3, 8
    norms = [nn.LayerNorm(C, eps=1e-6) for _ in range(groups)]
    for n in norms:
        nn.init.normal_(n.weight)
        nn.init.normal_(n.bias)
    x = torch.randn(B, N, groups * nH * C, dtype=torch.float64) * 2 - 1
    norms = [n.double() for n in norms]
    with torch.no_grad():
        ours = _head_norm(x.clone(), norms, nH)
        for gi, n in enumerate(norms):
            for h in range(nH):
                part = x[:, :, (gi * nH + h) * C : (gi * nH + h + 1) * C]
                torch.testing.assert_close(ours[:, :, gi, h], n(part), rtol=0, atol=1e-12)
    assert ours.shape == (B, N, groups, nH, C)


def test_counting_flops_on_a_cpu_model_does_not_time_attention_paths(monkeypatch):
    """Under ``FlopCounterMode`` "auto" does not measure (its extra calls would be counted):
    the count is that of the ``bias`` path, no shape is recorded as measured and no GEMM
    backend is timed."""
    from mvitv2.utils.flops import macs_of

    table = _fresh_attention_table(monkeypatch)
    gemm_table = timing.MeasuredChoices(default="aten", margin=0.1)
    monkeypatch.setattr(gemm_ops, "_MEASURED", gemm_table)
    gemm_ops._measured_ms.cache_clear()
    model = mvitv2.create_model("mvitv2_tiny", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    macs, _ = macs_of(model, x)
    assert table.table == {} and gemm_table.table == {}
    assert gemm_ops._measured_ms.cache_info().currsize == 0
    with attention_impl("bias"):
        assert macs_of(model, x)[0] == macs


def test_shapes_of_one_size_class_share_a_measurement_and_measurements_are_capped(monkeypatch):
    """Detection images of many sizes must not each pay for a timing: batch and token counts
    count by power of two (256 and 300 queries share a class, 600 do not), heads and head width
    exactly; after the cap on classes (64; here 3) "auto" takes bias without timing."""
    measured = _fresh_attention_table(monkeypatch, max_classes=3).table

    def attend(b, n_q, n_k, heads=2, c=8):
        q, k = torch.randn(b, heads, n_q, c), torch.randn(b, heads, n_k, c)
        with torch.no_grad():
            return attention_ops.attend(q, k, k, c**-0.5, None, "auto"), (q, k, c**-0.5)

    def check(result):
        out, (q, k, scale) = result
        assert torch.allclose(out, attention_ops.attention_reference(q, k, k, scale), atol=1e-5)

    check(attend(1, 256, 64))
    check(attend(1, 300, 127))  # same class: 256-511 queries, 64-127 keys
    assert len(measured) == 1
    check(attend(1, 600, 64))  # 512-1023 queries
    check(attend(1, 256, 64, heads=4))  # other heads
    assert len(measured) == 3
    results = []
    ran = _paths_run(monkeypatch, lambda: results.append(attend(3, 256, 64)))  # 4th: over cap
    assert ran == {"bias"} and len(measured) == 3
    check(results[0])


_U = 2.0**-10  # one fake-clock tick in seconds (binary: tick sums and their ms are exact floats)
_U_MS = _U * 1000


class _FakePaths:
    """Fake bias/chunked/folded paths on a fake clock: call ``i`` of path ``name`` advances the
    clock by ``costs[name][min(i, len - 1)]`` ticks; every call and its ``rel`` is logged."""

    def __init__(self, monkeypatch, costs: dict[str, list[int]]) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, object]] = []
        monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: self.now))
        self.table = _fresh_attention_table(monkeypatch)
        for name in attention_ops.MEASURED_PATHS:

            def fake(q, k, v, scale, rel=None, name=name):
                ticks = costs[name]
                self.now += ticks[min(sum(c[0] == name for c in self.calls), len(ticks) - 1)] * _U
                self.calls.append((name, rel))
                return q

            monkeypatch.setattr(attention_ops, PATH_FUNCTIONS[name], fake)

    def rounds(self) -> int:
        """Timed rounds after the warm-up, checking that the paths alternate in order."""
        n = len(self.calls) // 3
        assert [c[0] for c in self.calls] == list(attention_ops.MEASURED_PATHS) * n
        return n - 1


@pytest.mark.parametrize(
    ("measure_ticks", "first_ticks", "rounds"),
    [
        (10, (1, 1, 1), 4),  # 10 / 3 ticks: ceil(3.33) = 4 rounds
        (10, (1, 1, 2), 3),  # ceil(2.5) = 3
        (10, (2, 2, 1), 3),  # the budget buys 2: at least 3
        (10, (20, 20, 20), 3),  # over budget after the warm-up: still 3 rounds
        (100, (1, 1, 1), 10),  # at most 10 rounds
        (5, (0, 0, 0), 10),  # a zero-time warm-up (coarse clock): 10 rounds, no division by 0
    ],
)
def test_measured_path_runs_as_many_rounds_as_fill_the_time_budget(
    monkeypatch, measure_ticks, first_ticks, rounds
):
    """After a warm-up round, ``ceil(budget / warm-up time)`` alternating rounds, at least 3
    and at most 10 (the warm-up time taken as at least 1 us)."""
    bias, chunked, folded = first_ticks
    fake = _FakePaths(
        monkeypatch, {"bias": [bias, 1], "chunked": [chunked, 2], "folded": [folded, 3]}
    )
    fake.table.budget_ms = measure_ticks * _U_MS
    q = torch.zeros(1, 1, 4, 8)
    assert attention_ops._measured_path(q, q, q, 0.5, None) == "bias"
    assert fake.rounds() == rounds


def test_measured_path_keeps_each_path_s_best_timed_round_per_shape_and_grids(monkeypatch):
    """The warm-up round is not counted (chunked's fast warm-up does not win), each path keeps
    its best round, the paths get the call's ``rel``, and a size class is timed once: device,
    compute dtype, heads, head width, prefix and temporal table exactly, batch and token counts
    by power of two (other grids of the same sizes, or 20 queries instead of 16, are not new)."""
    costs = {"bias": [9, 6, 4, 5], "chunked": [1, 5, 5, 5, 5], "folded": [9, 3, 4, 6]}
    fake = _FakePaths(monkeypatch, costs)
    fake.table.budget_ms = 57 * _U_MS  # 57 / 19 ticks: 3 rounds
    q, k = torch.zeros(2, 1, 16, 8), torch.zeros(2, 1, 4, 8)
    rel = SimpleNamespace(q_thw=(1, 4, 4), k_thw=(1, 2, 2), num_prefix=0, t=None)
    assert attention_ops._measured_path(q, k, k, 0.5, rel) == "folded"
    assert fake.rounds() == 3 and all(r is rel for _, r in fake.calls)
    want_ms = {"bias": 4 * _U_MS, "chunked": 5 * _U_MS, "folded": 3 * _U_MS}
    # size class: device, compute dtype, heads, head width, (prefix, temporal table), then
    # batch, queries and keys by bit length (2 -> 2, 16 -> 5, 4 -> 3)
    key = ("cpu", torch.float32, 1, 8, (0, False), 2, 5, 3)
    measured = fake.table.table
    assert measured == {key: ("folded", want_ms, "q (2, 1, 16, 8) k (2, 1, 4, 8) torch.float32")}
    assert attention_ops.attention_measurements() == {
        "q (2, 1, 16, 8) k (2, 1, 4, 8) torch.float32": "folded (bias 3.91 ms, chunked 4.88 ms, folded 2.93 ms)"
    }
    fake.calls.clear()
    assert attention_ops._measured_path(q, k, k, 0.5, rel) == "folded" and fake.calls == []
    for grids in (((1, 2, 8), (1, 2, 2)), ((1, 4, 4), (1, 1, 4))):  # other grids: same class
        other = SimpleNamespace(q_thw=grids[0], k_thw=grids[1], num_prefix=0, t=None)
        attention_ops._measured_path(q, k, k, 0.5, other)
    q20 = torch.zeros(2, 1, 20, 8)  # 20 queries: 16-31, the same class
    attention_ops._measured_path(q20, k, k, 0.5, rel)
    assert len(measured) == 1 and fake.calls == []
    others = [
        SimpleNamespace(q_thw=(1, 4, 4), k_thw=(1, 2, 2), num_prefix=1, t=None),
        SimpleNamespace(q_thw=(1, 4, 4), k_thw=(1, 2, 2), num_prefix=0, t=torch.zeros(1)),
        None,
    ]
    for i, other in enumerate(others, start=2):  # another prefix, a temporal table, none
        attention_ops._measured_path(q, k, k, 0.5, other)
        assert len(measured) == i
    with torch.autocast("cpu", torch.bfloat16):  # the compute dtype, not the tensors' dtype
        attention_ops._measured_path(q, k, k, 0.5, rel)
    assert len(measured) == 5
    assert {key[1] for key in measured} == {torch.float32, torch.bfloat16}
    attention_ops._measured_path(q, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), 0.5, rel)
    attention_ops._measured_path(q[:1], k[:1], k[:1], 0.5, rel)  # batch 1: another class
    attention_ops._measured_path(torch.zeros(2, 2, 16, 8), k.expand(2, 2, 4, 8), k, 0.5, rel)
    attention_ops._measured_path(torch.zeros(2, 1, 16, 4), k[..., :4], k[..., :4], 0.5, rel)
    assert len(measured) == 9
    attention_ops._measured_path(q.to("meta"), k.to("meta"), k.to("meta"), 0.5, rel)
    assert {key[0] for key in measured} == {"cpu", "meta"}


def test_attend_times_the_paths_at_cpu_inference_with_and_without_rel_pos(monkeypatch):
    fake = _FakePaths(monkeypatch, {"bias": [3], "chunked": [1], "folded": [2]})
    q = torch.zeros(1, 2, 4, 8)
    with torch.no_grad():
        assert attention_ops.attend(q, q, q, 0.5) is q
    assert fake.calls.pop() == ("chunked", None)  # the fastest ran after the timing
    assert fake.rounds() == 10
    ((key, (chosen, _, _)),) = fake.table.table.items()
    assert key[4] is None and chosen == "chunked"
    fake.calls.clear()
    rel = SimpleNamespace(q_thw=(1, 2, 2), k_thw=(1, 2, 2), num_prefix=0, t=None)
    with torch.no_grad():  # with rel-pos: the paths are timed on it and the fastest runs with it
        attention_ops.attend(q, q, q, 0.5, rel)
    assert len(fake.calls) == 34 and all(r is rel for _, r in fake.calls)


@pytest.mark.parametrize(
    ("device", "dtype", "training", "intercept", "want"),
    [
        ("cuda", torch.float32, False, False, ("bias", "not measured on a GPU: default")),
        ("cuda", torch.float32, True, False, ("bias", "not measured on a GPU: default")),
        (
            "cpu",
            torch.float32,
            True,
            False,
            ("memeff", "training: the least memory (no score-sized tensor kept)"),
        ),
        (
            "cpu",
            torch.bfloat16,
            True,
            True,
            ("chunked", "training under bf16: SDPA's CPU backward has no fused kernel"),
        ),
        ("cpu", torch.float16, True, False, ("bias", "training: default")),
        (
            "cpu",
            torch.float32,
            False,
            True,
            ("bias", "under a dispatch mode (e.g. FLOP counting): not measured"),
        ),
        (
            "cpu",
            torch.bfloat16,
            False,
            False,
            (
                "measured",
                "measured per attention size class at its first call: bias, chunked, folded",
            ),
        ),
    ],
)
def test_auto_names_its_choice_and_reason_for_each_context(
    monkeypatch, device, dtype, training, intercept, want
):
    monkeypatch.setattr(attention_ops, "intercepted", lambda: intercept)
    assert attention_ops._auto(device, dtype, training) == want
    with attention_impl("auto"):
        assert attention_ops.attention_choice(device, dtype, training) == {
            "attention": want[0],
            "attention_setting": "auto",
            "attention_why": want[1],
        }
    with attention_impl("folded"):
        assert attention_ops.attention_choice(device, dtype, training) == {
            "attention": "folded",
            "attention_setting": "folded",
            "attention_why": "set",
        }


def test_resolve_auto_follows_the_autocast_dtype_and_whether_a_gradient_flows():
    x = torch.zeros(1, 1, 4, 8, requires_grad=True)
    assert attention_ops.resolve_attention_impl("auto", x) == "memeff"
    assert attention_ops.resolve_attention_impl("folded", x) == "folded"
    with torch.autocast("cpu", torch.bfloat16):
        assert attention_ops.resolve_attention_impl("auto", x) == "chunked"
    with torch.no_grad():
        assert attention_ops.resolve_attention_impl("auto", x) == "measured"
    assert attention_ops.resolve_attention_impl("auto", x.detach()) == "measured"
    assert attention_ops.resolve_attention_impl("auto", x.detach().to("meta")) == "bias"
