"""mvitv2.ops.pooling, cases found by mutation testing: the affine-free LayerNorm of pooled
Q/K/V asks ATen for its vectorised CPU kernel (a unit weight, a zero bias) and for the plain one
on other devices, with the formula's values; the pooling weights repeated over heads are kept
in the conv's dtype; Q, K and V are projected one at a time exactly when the split rule asks."""

from __future__ import annotations

import pytest
import torch

from mvitv2.ops import kept, pooling
from test_values_ops import _case, naive_pool_qkv


def test_normalize_asks_aten_for_the_vectorised_cpu_kernel_and_the_affine_free_one_elsewhere(
    monkeypatch,
):
    """On CPU ``_normalize`` calls ``native_layer_norm`` with a unit weight and a zero bias
    (ATen's vectorised kernel; same bits); on any other device (meta here, as a GPU) with none,
    and gives the ``(x, mean, rstd)`` shapes of an affine-free LayerNorm over the last dim."""
    calls = []
    real = torch.native_layer_norm

    def spy(x, shape, weight, bias, eps):
        calls.append((x.device.type, tuple(shape), weight, bias, eps))
        return real(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch, "native_layer_norm", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    y, mean, rstd = pooling._normalize(x, 1e-3)
    ((dev, shape, weight, bias, eps),) = calls
    assert (dev, shape, eps) == ("cpu", (5,), 1e-3)
    assert torch.equal(weight, torch.ones(5, dtype=torch.float64))
    assert torch.equal(bias, torch.zeros(5, dtype=torch.float64))
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    torch.testing.assert_close(y, (x - mu) / torch.sqrt(var + 1e-3), rtol=0, atol=1e-12)
    calls.clear()
    y, mean, rstd = pooling._normalize(x.to("meta"), 1e-3)
    assert calls == [("meta", (5,), None, None, 1e-3)]
    assert (y.device.type, y.shape, mean.shape, rstd.shape) == (
        "meta",
        x.shape,
        (2, 3, 1),
        (2, 3, 1),
    )


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_pool_qkv_at_inference_keeps_the_pooling_weights_over_heads_in_the_conv_s_dtype(bf16):
    """At inference the ``(3*nH*C, 1, 3, 3)`` pooling weights of Q, K and V (one group, equal
    strides) are kept once, in the dtype the conv runs in (bf16 under bf16 autocast: 2 bytes an
    element, else 4), not cast again at every call; the values are the per-head loop's."""
    x, thw, qkv, pools, norms, heads, p = _case("image_same_strides_cls")
    qkv, pools, norms, x = (
        qkv.float(),
        [m.float() for m in pools],
        [m.float() for m in norms],
        x.float(),
    )
    C = pools[0].weight.shape[0]
    kept.clear_kept()
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            first = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p)
            again = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p)
        assert kept.kept_bytes("heads") == 3 * heads * C * 9 * (2 if bf16 else 4)
    finally:
        kept.clear_kept()
    for a, b in zip(first, again):
        assert a == b if isinstance(a, tuple) else torch.equal(a, b)
    with torch.no_grad():
        want = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p, plain=True)
    tol = 0.05 if bf16 else 1e-5
    for a, b in zip(first[:3], want[:3]):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    assert first[3:] == want[3:]


@pytest.mark.parametrize(
    ("mode", "path"),
    [
        ("train", ["group", "normalize"]),  # the grouped autograd LayerNorm (keeps less)
        ("infer", ["normalize"]),  # affine in place: no second full-size tensor
        ("infer_bf16", ["layer_norm"]),  # in fp32 under autocast, as autocast runs LayerNorm
        ("traced_train", ["layer_norm"]),  # plain ops for the exported graph
        ("traced_infer", ["layer_norm"]),
    ],
)
def test_head_norm_of_several_groups_takes_its_path_by_mode_with_the_per_group_values(
    mode, path, monkeypatch
):
    """``_head_norm`` of K and V pooled together (G = 2) equals group ``g``'s LayerNorm on
    every head, whichever way it runs: the grouped autograd function under autograd, the
    in-place affine at fp32 inference, ``F.layer_norm`` + ``addcmul`` under autocast and while
    traced (spied)."""
    calls = []
    real_group, real_normalize, real_ln = (
        pooling._GroupLayerNorm.apply,
        pooling._normalize,
        torch.nn.functional.layer_norm,
    )
    monkeypatch.setattr(
        pooling._GroupLayerNorm,
        "apply",
        staticmethod(lambda *a: calls.append("group") or real_group(*a)),
    )
    monkeypatch.setattr(
        pooling, "_normalize", lambda *a: calls.append("normalize") or real_normalize(*a)
    )
    monkeypatch.setattr(
        torch.nn.functional, "layer_norm", lambda *a: calls.append("layer_norm") or real_ln(*a)
    )
    monkeypatch.setattr(pooling, "tracing", lambda: mode.startswith("traced"))
    g = torch.Generator().manual_seed(5)
    B, N, nH, C = 2, 3, 2, 4
    norms = [torch.nn.LayerNorm(C, eps=0.1) for _ in range(2)]  # eps matters: var ~0.1
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(torch.randn(C, generator=g) + 1)
            n.bias.copy_(torch.randn(C, generator=g))
    x = torch.randn(B, N, 2 * nH * C, generator=g) * 0.3 + 1
    groups = x.reshape(B, N, 2, nH, C)  # group g, head h: LayerNorm g over its C channels
    want = torch.stack(
        [real_ln(groups[:, :, i], (C,), n.weight, n.bias, 0.1) for i, n in enumerate(norms)],
        dim=2,
    ).detach()
    bf16 = mode == "infer_bf16"
    grad = mode.endswith("train")
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        got = pooling._head_norm(x.bfloat16() if bf16 else x.clone(), norms, nH)
    assert calls == path
    tol = 2e-2 if bf16 else 1e-6
    torch.testing.assert_close(got.float().detach(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("grad", "traced", "limit", "groups"),
    [
        (False, False, 0, [1, 1, 1]),  # inference over the limit: K, V, then Q, one at a time
        (False, False, 1 << 30, [3]),  # under the limit: Q, K and V in one projection
        (False, False, "at", [3]),  # B*N*D elements (2*25*6 = 300) exactly at the limit
        (False, False, "below", [1, 1, 1]),  # one over it
        (True, False, 0, [3]),  # autograd keeps them all anyway: never split
        (False, True, 0, [3]),  # traced: one graph for every size, never split
    ],
)
def test_pool_qkv_projects_one_of_q_k_v_at_a_time_only_at_untraced_inference_over_the_limit(
    grad, traced, limit, groups, monkeypatch
):
    """``SPLIT_ELEMENTS`` bounds the unpooled projection at inference (``B*N*D`` elements of
    one of Q/K/V over it: one group a call, spied by its weight rows); with the per-head loop's
    values either way, and the fast way unless the plain one is asked for."""
    x, thw, qkv, pools, norms, heads, p = _case("image_same_strides_cls")
    D = qkv.out_features // 3
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, p)
    calls, plain_calls = [], []
    real_group, real_plain = pooling._pool_group, pooling._pool_qkv_plain
    monkeypatch.setattr(
        pooling,
        "_pool_group",
        lambda x, w, *a: calls.append(w.shape[0] // D) or real_group(x, w, *a),
    )
    monkeypatch.setattr(
        pooling, "_pool_qkv_plain", lambda *a: plain_calls.append(1) or real_plain(*a)
    )
    monkeypatch.setattr(pooling, "tracing", lambda: traced)
    elements = x.shape[0] * x.shape[1] * D
    assert elements == 2 * 25 * 6
    limit = {"at": elements, "below": elements - 1}.get(limit, limit)
    monkeypatch.setattr(pooling, "SPLIT_ELEMENTS", limit)
    with torch.set_grad_enabled(grad):
        got = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p)
    assert (calls, plain_calls) == (groups, [])
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[3:] == want[3:]
    calls.clear()
    with torch.set_grad_enabled(grad):
        pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p, plain=True)
    assert (calls, plain_calls) == ([], [1])


@pytest.mark.parametrize("grad", [False, True])
def test_pool_qkv_without_a_q_pool_or_a_qkv_bias_equals_the_per_head_loop(grad):
    """Q unpooled (projected on its own, no norm) with a bias-free qkv projection: the loop's
    values, Q on the input grid."""
    x, thw, qkv, pools, norms, heads, p = _case("image_no_q_pool")
    qkv.bias = None
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, p)
    with torch.set_grad_enabled(grad):
        got = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[3:] == want[3:] and got[3] == thw


@pytest.mark.parametrize(
    ("hw", "grad", "traced", "by_2d"),
    [
        ((13, 15), True, False, True),  # 195 tokens a frame, under autograd: 2-D convs
        ((14, 14), True, False, False),  # 196: ATen's Conv3d is as fast from 14x14 up
        ((13, 15), False, False, False),  # inference: the Conv3d forward is not the slow part
        ((13, 15), True, True, False),  # traced: the plain conv in the graph
    ],
)
def test_channels_last_pool_uses_2d_convs_below_14x14_under_autograd_with_conv3d_values(
    hw, grad, traced, by_2d, monkeypatch
):
    """A 3-D depthwise pooling conv of token-major ``(B, 1 + T*H*W, ch)`` keeps the prefix
    token and gives ``F.conv3d``'s values on the channels-first grid, whichever kernel runs:
    the temporal-tap 2-D decomposition only under autograd, untraced, below 196 tokens a
    frame (spied)."""
    calls = []
    real = pooling._depthwise_conv3d_by_2d
    monkeypatch.setattr(pooling, "_depthwise_conv3d_by_2d", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(pooling, "tracing", lambda: traced)
    g = torch.Generator().manual_seed(6)
    (H, W), T, ch = hw, 2, 2
    conv = torch.nn.Conv3d(ch, ch, 3, (1, 2, 2), 1, groups=ch, bias=False, dtype=torch.float64)
    w = torch.randn(ch, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 1 + T * H * W, ch, generator=g, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        y, thw = pooling._channels_last_pool(x.requires_grad_(grad), (T, H, W), w, conv, 1)
    assert calls == ([1] if by_2d else [])
    grid = x[:, 1:].detach().reshape(2, T, H, W, ch).permute(0, 4, 1, 2, 3)
    want = torch.nn.functional.conv3d(grid, w, None, (1, 2, 2), 1, 1, ch)
    assert thw == tuple(want.shape[2:]) == (T, (H + 1) // 2, (W + 1) // 2)
    torch.testing.assert_close(y[:, 0], x[:, 0].detach(), rtol=0, atol=0)
    torch.testing.assert_close(
        y[:, 1:].detach(), want.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "name", ["image_same_strides_cls", "image_q_unstrided_kv_strided", "image_no_q_pool"]
)
def test_pool_qkv_in_autocast_training_gives_q_k_v_in_the_autocast_dtype(name):
    """Under bf16 autocast with autograd the grouped LayerNorm computes in fp32; Q, K and V
    still reach attention in bf16 (one dtype for its kernels), with the loop's values."""
    x, thw, qkv, pools, norms, heads, p = _case(name)
    qkv, x = qkv.float(), x.float()
    pools = [m if m is None else m.float() for m in pools]
    norms = [m if m is None else m.float() for m in norms]
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, p)
    with torch.autocast("cpu", torch.bfloat16):
        got = pooling.pool_qkv(x, thw, qkv, pools, norms, heads, p)
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.detach(), rtol=0.05, atol=0.05)
