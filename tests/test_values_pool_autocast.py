"""Q/K/V pooling under CPU bf16 autocast with gradients (how a bf16 training step runs): a strided
pooling conv runs in fp32 where measured faster, the grouped LayerNorm in fp32, and both give the
values and gradients of float64 references written with torch.nn.functional."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvitv2.ops import implementation_choices, pooling
from test_values_ops import _norm

BF16 = torch.bfloat16


def _grid_case(spatial: bool, stride: tuple[int, ...], seed: int = 0):
    """Tokens ``(2, 1 + T*H*W, ch)`` in bf16 (one prefix token) and a depthwise pooling conv."""
    g = torch.Generator().manual_seed(seed)
    thw = (1, 6, 5) if spatial else (3, 4, 5)
    ch = 4
    x = torch.randn(2, 1 + math.prod(thw), ch, generator=g).to(BF16)
    kernel = (3, 3) if spatial else (3, 3, 3)
    conv = (nn.Conv2d if spatial else nn.Conv3d)(
        ch, ch, kernel, stride, tuple(k // 2 for k in kernel), groups=ch, bias=False
    )
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    return x, thw, conv


def _reference_pool(x: torch.Tensor, thw, conv: nn.Module) -> torch.Tensor:
    """The grid tokens of ``x`` pooled in float64 by a plain NCHW / NCDHW conv, prefix kept."""
    B, _, ch = x.shape
    T, H, W = thw
    grid = x[:, 1:].double().reshape(B, T, H, W, ch).permute(0, 4, 1, 2, 3)
    w = conv.weight.double()
    if w.dim() == 4:
        y = F.conv2d(grid[:, :, 0], w, None, conv.stride, conv.padding, 1, ch)[:, :, None]
    else:
        y = F.conv3d(grid, w, None, conv.stride, conv.padding, 1, ch)
    return torch.cat((x[:, :1].double(), y.flatten(2).transpose(1, 2)), dim=1)


@pytest.mark.parametrize(
    ("spatial", "stride"), [(True, (2, 2)), (True, (1, 2)), (False, (1, 2, 2)), (False, (2, 1, 1))]
)
def test_a_strided_pooling_conv_under_bf16_autocast_training_runs_in_fp32_where_faster(
    monkeypatch, spatial, stride
):
    """Measured faster in fp32: bf16 values (autocast's output dtype) equal to a float64 conv of
    the same bf16 tokens rounded once to bf16 (a bf16 conv would also round its weights and
    partial sums), and the input gradient is the float64 one rounded to bf16. Measured faster
    in bf16: the conv runs as autocast says, with bf16's rounding."""
    x, thw, conv = _grid_case(spatial, stride)
    want = _reference_pool(x, thw, conv)
    # a kernel of 3 padded by 1: n -> (n - 1) // s + 1 along each strided axis
    want_thw = tuple((n - 1) // s + 1 for n, s in zip(thw, ((1,) if spatial else ()) + stride))
    assert want.shape[1] == 1 + math.prod(want_thw)
    weights = torch.randn(
        want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    # The output is bf16, so the gradient reaching the conv is ``weights`` rounded to bf16.
    weights = weights.to(BF16).double()
    xr = x.double().requires_grad_()
    (want_grad,) = torch.autograd.grad((_reference_pool(xr, thw, conv) * weights).sum(), xr)
    for fp32_faster in (True, False):
        monkeypatch.setattr(
            pooling, "pool_conv_ms", lambda d, f=fp32_faster: (2.0, 1.0 if f else 3.0)
        )
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", BF16):
            got, got_thw = pooling._channels_last_pool(xg, thw, conv.weight, conv, 1)
        assert got_thw == want_thw
        assert got.dtype == BF16
        if fp32_faster:  # one rounding: within half a bf16 ulp (2**-8 relative)
            torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)
        else:
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
        (grad,) = torch.autograd.grad((got.double() * weights).sum(), xg)
        assert grad.dtype == BF16
        tol = 2**-8 if fp32_faster else 6e-2  # (bf16 conv: weights and partial sums rounded)
        torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)


def test_the_grouped_layernorm_under_bf16_autocast_training_runs_in_fp32(monkeypatch):
    """K and V of two heads normed in one call: fp32 values and weight, bias and input
    gradients equal to float64 LayerNorms of each group's heads on the same bf16 tokens."""
    g = torch.Generator().manual_seed(3)
    heads, C = 2, 5
    x = torch.randn(2, 7, 2 * heads * C, generator=g).to(BF16).requires_grad_()
    norms = [_norm(C, 5).float(), _norm(C, 6).float()]
    with torch.autocast("cpu", BF16):
        got = pooling._head_norm(x, norms, heads)
    assert got.dtype == torch.float32 and got.shape == (2, 7, 2, heads, C)
    # the backward keeps the caller's bf16 tokens, not an fp32 copy (half the bytes)
    kept = got.grad_fn.saved_tensors[0]
    assert kept.dtype == BF16 and kept.data_ptr() == x.data_ptr()
    params = [x] + [p for n in norms for p in (n.weight, n.bias)]
    xs = x.detach().double().requires_grad_()
    ref_params = [p.detach().double().requires_grad_() for p in params[1:]]
    groups = xs.reshape(2, 7, 2, heads, C)
    want = torch.stack(
        [
            F.layer_norm(groups[:, :, i], (C,), ref_params[2 * i], ref_params[2 * i + 1], 1e-6)
            for i in range(2)
        ],
        dim=2,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((got.double() * w).sum(), params)
    want_grads = torch.autograd.grad((want * w).sum(), [xs, *ref_params])
    assert [t.dtype for t in got_grads] == [BF16] + [torch.float32] * 4
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=2**-7, atol=1e-4)


def test_a_pooling_conv_runs_in_fp32_only_when_strided_under_cpu_autocast_training_and_faster(
    monkeypatch,
):
    measured, asked = {"ms": (2.0, 1.0)}, []
    monkeypatch.setattr(pooling, "pool_conv_ms", lambda d: asked.append(d) or measured["ms"])
    cpu, meta = torch.ones(1), torch.ones(1, device="meta")
    decide = pooling._pool_in_fp32
    with torch.autocast("cpu", BF16):
        assert decide(cpu, (2, 2)) and decide(cpu, (1, 1, 2)) and decide(cpu, (2, 1, 1))
        assert not decide(cpu, (1, 1)) and not decide(cpu, (1, 1, 1))  # unstrided
        assert not decide(meta, (2, 2))  # not a CPU tensor
        with torch.no_grad():
            assert not decide(cpu, (2, 2))  # no gradients: bf16's forward is fine
        monkeypatch.setattr(pooling, "tracing", lambda: True)
        assert not decide(cpu, (2, 2))  # an export traces the model's own dtypes
        monkeypatch.setattr(pooling, "tracing", lambda: False)
        for ms, want in [((1.0, 2.0), False), ((1.0, 1.0), False), ((1.0, 0.99), True)]:
            measured["ms"] = ms
            assert decide(cpu, (2, 2)) == want, ms
    measured["ms"] = (2.0, 1.0)
    assert not decide(cpu, (2, 2))  # no autocast: the conv runs in the tensors' dtype
    assert set(asked) == {BF16}
    asked.clear()
    with torch.autocast("cpu", torch.float16):  # each autocast dtype has its own measurement
        assert decide(cpu, (2, 2))
    assert asked == [torch.float16]


def test_a_pooling_conv_run_in_fp32_casts_low_precision_weights_up_too(monkeypatch):
    """Where the fp32 way is chosen for a strided pooling conv under bf16 autocast training,
    bf16 weights (a bf16 model) are cast up with the input: a float64 conv's values rounded
    once to bf16, the prefix token as it was."""
    monkeypatch.setattr(pooling, "_fp32_faster", lambda dtype: True)
    x, thw, conv = _grid_case(True, (2, 2))
    w = conv.weight.detach().to(BF16)
    with torch.no_grad():
        conv.weight.copy_(w)  # the reference convolves the same (bf16-exact) weights
    with torch.autocast("cpu", BF16):
        got, got_thw = pooling._channels_last_pool(x.clone().requires_grad_(), thw, w, conv, 1)
    assert got_thw == (1, 3, 3) and got.dtype == BF16
    assert torch.equal(got[:, 0], x[:, 0])
    torch.testing.assert_close(got.double(), _reference_pool(x, thw, conv), rtol=2**-8, atol=1e-6)


def test_the_pool_conv_measurement_times_a_stride_2_conv_as_autocast_runs_it_and_in_fp32(
    monkeypatch,
):
    """Both candidates run MViTv2's depthwise 3x3 stride-2 conv on a (2, 384, 28, 28) grid and
    its input gradient; the autocast one under autocast to the asked dtype, the fp32 one on the
    input cast up with autocast off; best of alternating rounds (at least 3, ~40 ms)."""
    seen, asked = [], {}
    real = F.conv2d

    def spy(x, w, b, stride, padding, dilation, groups):
        on = torch.is_autocast_enabled("cpu")
        seen.append((x.dtype, on and torch.get_autocast_dtype("cpu"), tuple(x.shape), stride))
        return real(x, w, b, stride, padding, dilation, groups)

    def fake_best_ms(candidates, budget_ms, min_rounds=2, max_rounds=10):
        asked.update(budget_ms=budget_ms, min_rounds=min_rounds, max_rounds=max_rounds)
        out = {}
        for i, (name, run) in enumerate(candidates.items()):
            seen.clear()
            (grad,) = run()
            assert grad.shape == (2, 384, 28, 28)
            out[name] = (seen[0], 5.0 + i)
        return out

    monkeypatch.setattr(pooling, "F", SimpleNamespace(conv2d=spy))
    monkeypatch.setattr(pooling, "best_ms", fake_best_ms)
    res = pooling.time_pool_conv(torch.float16)
    assert res == (
        ((torch.float16, torch.float16, (2, 384, 28, 28), 2), 5.0),
        ((torch.float32, False, (2, 384, 28, 28), 2), 6.0),
    )
    assert asked == {"budget_ms": 40.0, "min_rounds": 3, "max_rounds": 10}


def test_the_pool_conv_choice_is_reported_with_its_measurement(monkeypatch):
    monkeypatch.setattr(pooling, "pool_conv_ms", lambda dtype: {BF16: (7.25, 2.5)}[dtype])
    why = "measured a stride-2 depthwise conv's forward and backward: bfloat16 7.2 ms, fp32 2.5 ms"
    assert pooling.pool_choice(BF16, True) == {"pool_conv": "fp32", "pool_conv_why": why}
    monkeypatch.setattr(pooling, "pool_conv_ms", lambda dtype: (2.5, 7.25))
    assert pooling.pool_choice(torch.float16, True) == {
        "pool_conv": "as autocast",
        "pool_conv_why": "measured a stride-2 depthwise conv's forward and backward: float16 "
        "2.5 ms, fp32 7.2 ms",
    }
    unmeasured = {"pool_conv": "as autocast", "pool_conv_why": "fp32, or no gradients"}
    monkeypatch.setattr(pooling, "pool_conv_ms", None)  # not measured: would fail if called
    assert pooling.pool_choice(torch.float32, True) == unmeasured
    assert pooling.pool_choice(BF16, False) == unmeasured
    assert "pool_conv" in implementation_choices("cpu", torch.float32, training=True)
    assert "pool_conv" not in implementation_choices("cuda", BF16, training=True)


def _live_bytes_after(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes it allocated that are still live when it returns (what
    the result and the autograd graph behind it hold), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = prof.profiler.kineto_results.events()
    return out, sum(e.nbytes() for e in events if e.name() == "[memory]")


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_a_pooling_conv_run_in_fp32_keeps_its_input_for_the_backward_at_bf16s_size(
    monkeypatch, num_prefix
):
    """The fp32 conv's backward reads its input again: it is kept as the caller's bf16 tokens
    and cast up when read (an fp32 copy would double those bytes), so the forward leaves
    nothing live but its bf16 output; and the gradients equal those of the conv run plainly on
    an fp32 copy of the tokens (the cast up is exact)."""
    monkeypatch.setattr(pooling, "pool_conv_ms", lambda d: (2.0, 1.0))
    g = torch.Generator().manual_seed(4)
    thw, ch = (1, 16, 16), 32
    x = torch.randn(4, num_prefix + 256, ch, generator=g).to(BF16).requires_grad_()
    conv = nn.Conv2d(ch, ch, 3, 2, 1, groups=ch, bias=False)

    def pool():
        with torch.autocast("cpu", BF16):
            return pooling._channels_last_pool(x, thw, conv.weight, conv, num_prefix)[0]

    got, live = _live_bytes_after(pool)
    assert got.dtype == BF16 and got.shape == (4, num_prefix + 64, ch)
    assert live == got.numel() * 2  # an fp32 copy of x kept would add x.numel() * 4
    w = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad((got.float() * w).sum(), [x, conv.weight])
    x32 = x.detach().float().requires_grad_()
    grid = x32[:, num_prefix:].reshape(4, 16, 16, ch).permute(0, 3, 1, 2)
    y = F.conv2d(grid, conv.weight, None, 2, 1, 1, ch).flatten(2).transpose(1, 2)
    want = torch.cat((x32[:, :num_prefix], y), dim=1).to(BF16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_grads = torch.autograd.grad((want.float() * w).sum(), [x32, conv.weight])
    torch.testing.assert_close(grads[0], want_grads[0].to(BF16), rtol=0, atol=0)
    torch.testing.assert_close(grads[1], want_grads[1], rtol=1e-6, atol=1e-6)
