"""mvitv2.ops pooling by value: the fast token-major Q/K/V pooling, the prefix-keeping grid
pooling, the windows, the indices-only max pool and the grouped LayerNorm equal plain
per-head loops written with torch.nn.functional (float64, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvitv2.ops import pooling
from mvitv2.ops.pooling import pool_qkv, pool_tokens
from mvitv2.ops.rel_pos import rel_pos_bias, rel_pos_onehots, rel_pos_terms
from mvitv2.ops.windows import window_partition, window_unpartition

DT = torch.float64


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5 + (1 if p.dim() == 1 else 0))
    return module


def _pool(kernel, stride, c: int, spatial: bool, seed: int) -> nn.Module:
    conv = nn.Conv2d if spatial else nn.Conv3d
    pad = tuple(k // 2 for k in kernel)
    m = conv(c, c, kernel, stride, pad, groups=c, bias=False, dtype=DT)
    return _randomise(m, seed)


def _norm(c: int, seed: int) -> nn.LayerNorm:
    return _randomise(nn.LayerNorm(c, eps=1e-6, dtype=DT), seed)


def naive_pool_qkv(x, thw, qkv, pools, norms, num_heads, num_prefix):
    """Project, split Q/K/V and heads, then pool and norm each head on its own."""
    B, N, _ = x.shape
    D = qkv.out_features // 3
    C = D // num_heads
    y = x @ qkv.weight.t()
    if qkv.bias is not None:
        y = y + qkv.bias
    T, H, W = thw
    outs, grids = [], []
    for g in range(3):
        t = y[..., g * D : (g + 1) * D].reshape(B, N, num_heads, C)
        pool, norm = pools[g], norms[g]
        if pool is None:
            outs.append(t)
            grids.append(thw)
            continue
        heads = []
        for h in range(num_heads):
            th = t[:, :, h]
            prefix, tokens = th[:, :num_prefix], th[:, num_prefix:]
            vol = tokens.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
            if isinstance(pool, nn.Conv2d):
                out = F.conv2d(vol[:, :, 0], pool.weight, None, pool.stride, pool.padding, 1, C)
                out = out[:, :, None]
            else:
                out = F.conv3d(vol, pool.weight, None, pool.stride, pool.padding, 1, C)
            grid = tuple(out.shape[2:])
            tok = torch.cat([prefix, out.flatten(2).transpose(1, 2)], dim=1)
            mean = tok.mean(-1, keepdim=True)
            var = ((tok - mean) ** 2).mean(-1, keepdim=True)
            heads.append((tok - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias)
        outs.append(torch.stack(heads, dim=2))
        grids.append(grid)
    return outs[0], outs[1], outs[2], grids[0], grids[1]


CASES = {
    # name: (thw, strides q/k/v, spatial (2-D convs), q pooled, num_prefix, bias)
    "image_same_strides_cls": ((1, 4, 6), ((1, 2, 2), (1, 2, 2)), True, True, 1, True),
    "image_q_unstrided_kv_strided": ((1, 4, 4), ((1, 1, 1), (1, 2, 2)), True, True, 0, True),
    "image_no_q_pool": ((1, 4, 4), (None, (1, 2, 2)), True, False, 1, True),
    "video_same_strides": ((4, 4, 2), ((2, 2, 1), (2, 2, 1)), False, True, 1, True),
    "video_different_strides": ((2, 4, 4), ((1, 2, 2), (1, 4, 4)), False, True, 0, False),
}


def _case(name: str):
    thw, (sq, skv), spatial, q_pooled, num_prefix, bias = CASES[name]
    heads, C, dim = 2, 3, 5
    kernel = (3, 3) if spatial else (3, 3, 3)
    strip = (lambda s: s[1:]) if spatial else (lambda s: s)
    pools = [
        _pool(kernel, strip(sq), C, spatial, 1) if q_pooled else None,
        _pool(kernel, strip(skv), C, spatial, 2),
        _pool(kernel, strip(skv), C, spatial, 3),
    ]
    norms = [_norm(C, 4) if q_pooled else None, _norm(C, 5), _norm(C, 6)]
    qkv = _randomise(nn.Linear(dim, 3 * heads * C, bias=bias, dtype=DT), 7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, num_prefix + math.prod(thw), dim, generator=g, dtype=DT)
    return x, thw, qkv, pools, norms, heads, num_prefix


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["fast_grad", "fast_no_grad", "split", "plain"])
def test_pool_qkv_equals_per_head_pooling_and_norm(name, mode, monkeypatch):
    x, thw, qkv, pools, norms, heads, num_prefix = _case(name)
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix)
    if mode == "split":  # Q, K and V projected and pooled one at a time (large inputs)
        monkeypatch.setattr(pooling, "SPLIT_ELEMENTS", 0)
    with torch.set_grad_enabled(mode == "fast_grad"):
        got = pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix, plain=mode == "plain")
    for a, b in zip(got[:3], want[:3]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[3:] == want[3:]


def test_pool_qkv_gradients_equal_the_per_head_loop():
    """The grouped LayerNorm's own backward (input, per-group weight and bias) and the
    temporal-tap decomposition of the video conv give autograd's gradients of the loop."""
    x, thw, qkv, pools, norms, heads, num_prefix = _case("video_same_strides")
    x.requires_grad_(True)
    params = [x, qkv.weight, qkv.bias]
    params += [p.weight for p in pools] + [w for n in norms for w in (n.weight, n.bias)]
    got = pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix)[:3]
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix)[:3]
    g = torch.Generator().manual_seed(9)
    ws = [torch.randn(t.shape, generator=g, dtype=DT) for t in want]
    ga = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, ws)), params)
    gb = torch.autograd.grad(sum((b * w).sum() for b, w in zip(want, ws)), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_pool_qkv_under_autocast_gives_one_dtype():
    x, thw, qkv, pools, norms, heads, num_prefix = _case("image_same_strides_cls")
    qkv, pools, norms = qkv.float(), [p.float() for p in pools], [n.float() for n in norms]
    x = x.float()
    want = naive_pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool_qkv(x, thw, qkv, pools, norms, heads, num_prefix)
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("spatial", [True, False])
def test_pool_tokens_keeps_prefix_tokens_and_pools_the_grid(num_prefix, spatial):
    g = torch.Generator().manual_seed(num_prefix)
    thw = (1, 5, 4) if spatial else (3, 4, 5)
    C = 2
    x = torch.randn(2, 3, num_prefix + math.prod(thw), C, generator=g, dtype=DT)
    pool = nn.MaxPool2d(3, (2, 1), 1) if spatial else nn.MaxPool3d((3, 3, 1), (2, 2, 1), (1, 1, 0))
    got, grid = pool_tokens(x, thw, pool, num_prefix, spatial)
    rows = []
    for b in range(2):
        for h in range(3):
            vol = x[b, h, num_prefix:].reshape(*thw, C).permute(3, 0, 1, 2)
            out = pool(vol[:, 0])[:, None] if spatial else pool(vol)
            rows.append(torch.cat([x[b, h, :num_prefix], out.flatten(1).t()]))
            want_grid = tuple(out.shape[1:])
    want = torch.stack(rows).reshape(2, 3, -1, C)
    assert grid == want_grid
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, 2, 1, dilation=2),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.MaxPool2d(3, 1, 1),
        # dilation along one axis only, given per axis (3-D: the input as (C, D, H, W))
        nn.MaxPool2d(3, 2, 1, dilation=(2, 1)),
        nn.MaxPool2d(3, 2, 1, dilation=(1, 2)),
        nn.MaxPool3d(3, 1, 1, dilation=(2, 1, 1)),
        nn.MaxPool3d(3, 1, 1, dilation=(1, 2, 1)),
        nn.MaxPool3d(3, 1, 1, dilation=(1, 1, 2)),
    ],
)
def test_max_pool_under_autograd_equals_the_module(pool):
    x = torch.randn(2, 3, 7, 7, dtype=DT, requires_grad=True)
    y = pooling.max_pool(x, pool)
    torch.testing.assert_close(y, pool(x), rtol=0, atol=0)
    w = torch.randn_like(y)
    (a,) = torch.autograd.grad((y * w).sum(), x)
    (b,) = torch.autograd.grad((pool(x) * w).sum(), x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_max_pool_keeps_only_indices_under_autograd_and_is_plain_otherwise():
    pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = torch.randn(1, 2, 2, 5, 5, requires_grad=True)
    assert type(pooling.max_pool(x, pool).grad_fn).__name__ == "_MaxPoolIndicesBackward"
    with torch.no_grad():
        assert torch.equal(pooling.max_pool(x, pool), pool(x))
    saved = pooling.max_pool(x, pool).grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [torch.int32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_max_pool_under_cpu_autocast_gives_the_module_s_values_without_casting_the_input(dtype):
    pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    # channels-last tokens, as pool_tokens hands them over
    x = torch.randn(1, 2, 6, 6, 8).to(dtype).permute(0, 4, 1, 2, 3)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        want = pool(x)  # autocast runs max_pool3d in fp32 on CPU
        with torch.profiler.profile(record_shapes=True) as prof:
            got = pooling.max_pool(x, pool)
    assert want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    copied = [e for e in prof.events() if e.name == "aten::copy_"]
    if dtype in (torch.bfloat16, torch.float16):  # only the pooled result is cast, not the input
        assert [list(e.input_shapes[0]) for e in copied] == [list(want.shape)]
    else:  # fp32 and fp64 are pooled as they are
        assert copied == []


@pytest.mark.parametrize(("hw", "window"), [((5, 7), 3), ((4, 4), 2), ((6, 3), 4)])
def test_window_unpartition_inverts_the_partition_and_drops_the_padding(hw, window):
    H, W = hw
    x = torch.randn(2, 3, H * W, 4, dtype=DT)
    parts, padded = window_partition(x, hw, window)
    assert padded == (-(-H // window) * window, -(-W // window) * window)
    # window (i, j) of image b holds rows i*window.., columns j*window.. (zero padded)
    grid = F.pad(x.reshape(2, 3, H, W, 4), (0, 0, 0, padded[1] - W, 0, padded[0] - H))
    nh, nw = padded[0] // window, padded[1] // window
    for b in range(2):
        for i in range(nh):
            for j in range(nw):
                win = grid[b, :, i * window : (i + 1) * window, j * window : (j + 1) * window]
                assert torch.equal(parts[(b * nh + i) * nw + j], win.reshape(3, -1, 4))
    assert torch.equal(window_unpartition(parts, window, padded, hw), x)
    tok, _ = window_partition(x.transpose(1, 2), hw, window, token_dim=1)
    back = window_unpartition(tok, window, padded, hw, token_dim=1)
    assert torch.equal(back, x.transpose(1, 2))


@pytest.mark.parametrize(
    ("q_thw", "k_thw", "temporal"),
    [((1, 4, 3), (1, 2, 3), False), ((2, 2, 3), (1, 2, 1), True), ((1, 2, 2), (3, 2, 2), False)],
)
def test_rel_pos_terms_times_key_onehots_equal_the_bias(q_thw, k_thw, temporal):
    """The folded form: ``terms(q) @ onehots(k).T == factor * bias`` on every key layout,
    and each one-hot row marks the key's own (h, w, t) position."""
    g = torch.Generator().manual_seed(3)
    C = 4
    tables = [
        torch.randn(2 * max(q_thw[a], k_thw[a]) - 1, C, generator=g, dtype=DT) for a in (0, 1, 2)
    ]
    q = torch.randn(2, 2, math.prod(q_thw), C, generator=g, dtype=DT)
    rt = tables[0] if temporal else None
    bias = rel_pos_bias(q, q_thw, k_thw, tables[1], tables[2], rt)
    terms = rel_pos_terms(q, q_thw, k_thw, tables[1], tables[2], rt, factor=0.25)
    hot = rel_pos_onehots(k_thw, temporal, dtype=DT)
    torch.testing.assert_close(terms @ hot.t(), 0.25 * bias, rtol=1e-10, atol=1e-10)
    kt, kh, kw = k_thw
    want = torch.zeros(kt * kh * kw, kh + kw + (kt if temporal else 0), dtype=DT)
    for t in range(kt):
        for y in range(kh):
            for x in range(kw):
                row = (t * kh + y) * kw + x
                want[row, y] = want[row, kh + x] = 1
                if temporal:
                    want[row, kh + kw + t] = 1
    assert torch.equal(hot, want)


def test_rel_pos_onehots_follow_the_requested_dtype_and_device():
    hot = rel_pos_onehots((2, 3, 2), True, dtype=torch.bfloat16)
    assert hot.dtype == torch.bfloat16
    assert rel_pos_onehots((2, 3, 2), True, device="meta").device.type == "meta"


@pytest.mark.parametrize("temporal", [False, True])
def test_conv_tokens_are_the_conv_output_token_by_token_in_dense_memory(temporal):
    """Token ``n`` of image ``b`` is the conv's output vector at grid cell ``n`` (row-major over
    ``[T,] H, W``), read with an explicit loop over cells; the tokens are dense (the patch
    embedding's LayerNorm and residual add get them without a strided copy)."""
    if temporal:
        conv = nn.Conv3d(3, 8, (3, 7, 7), (2, 4, 4), (1, 3, 3))
        x = torch.randn(2, 3, 5, 20, 16)
    else:
        conv = nn.Conv2d(3, 8, 7, 4, 3)
        x = torch.randn(2, 3, 20, 16)
    tokens, grid = pooling.conv_tokens(conv, x)
    y = conv(x)  # channels-first, as nn.Conv returns it
    assert grid == tuple(y.shape[2:]) == ((3, 5, 4) if temporal else (5, 4))
    y5 = y if temporal else y[:, :, None]
    T, H, W = y5.shape[2:]
    cells = [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]
    want = torch.stack([torch.stack([y5[b, :, t, h, w] for t, h, w in cells]) for b in range(2)])
    torch.testing.assert_close(tokens, want, rtol=1e-6, atol=1e-6)
    assert tokens.is_contiguous()


def test_conv_tokens_traced_are_the_plain_conv_view(monkeypatch):
    """While compiling or exporting, the patch embedding is the plain conv and its transposed
    view (standard ops only in a traced graph): same values, the view's strides."""
    conv = nn.Conv2d(3, 8, 7, 4, 3)
    x = torch.randn(2, 3, 20, 16)
    monkeypatch.setattr(pooling, "tracing", lambda: True)
    tokens, grid = pooling.conv_tokens(conv, x)
    plain = conv(x).flatten(2).transpose(1, 2)
    assert grid == (5, 4)
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)
    assert tokens.stride() == plain.stride() and not tokens.is_contiguous()
