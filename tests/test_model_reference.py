"""The model's numbers against naive references written here from the design doc (§1, §4).

Every reference is built from the module's own parameters and the rules of
``/work/shared/design/mvitv2.md``, never from the code under test: rel-pos distances from the
formula element by element, table interpolation element by element (linear, align_corners=False,
as SlowFast and detectron2 interpolate at run time), the decomposed rel-pos term per (query, key)
pair, pooling attention per head (depthwise conv kernel 3 padding 1, LayerNorm per head),
window attention per window (zero-padded grids, q window = w / stride_q, kv window = w /
stride_kv), the block (max-pool shortcut kernel s+1 stride s padding (s+1)//2, width projection),
and the per-block schedule (strides, widths, heads, windows, drop-path ramp) from the stated rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.models import block_specs, get_config
from mvitv2.ops import (
    attention_impl,
    get_rel_pos,
    rel_pos,
    rel_pos_bias,
    rel_pos_index,
    resize_rel_pos,
)

EPS = 1e-6  # LayerNorm epsilon everywhere (§1)
PATHS = ("reference", "bias", "folded", "chunked", "memeff")


# =========================================================================== naive references
def naive_index(q: int, k: int, i: int, j: int) -> int:
    """§1: ``d = i*max(k/q,1) - j*max(q/k,1) + (k-1)*max(q/k,1)`` for one (i, j)."""
    return int(i * max(k / q, 1.0) - j * max(q / k, 1.0) + (k - 1) * max(q / k, 1.0))


def naive_resize(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of a ``(L, C)`` table to ``length`` rows, one row at a time, with
    half-pixel centres (``align_corners=False``: source ``(i + 0.5) * L / length - 0.5``,
    clamped at 0), the way ``F.interpolate(mode="linear")`` in SlowFast/detectron2 does it."""
    n_in = table.shape[0]
    if n_in == length:
        return table
    rows = []
    for i in range(length):
        src = max((i + 0.5) * n_in / length - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        rows.append((1 - lam) * table[i0] + lam * table[i1])
    return torch.stack(rows)


def naive_rel_term(q: torch.Tensor, q_thw, k_thw, tables: dict) -> torch.Tensor:
    """``rel[i, j] = sum over axes a of q_i . R_a[d_a(i, j)]`` for grid queries ``q (..., Nq, C)``.

    ``tables`` maps axis (0 = t, 1 = h, 2 = w) to its stored table; each is first resized to
    ``2 * max(q_a, k_a) - 1``. Tokens are ordered t-major, then h, then w.
    """
    qs = list(itertools.product(*map(range, q_thw)))
    ks = list(itertools.product(*map(range, k_thw)))
    R = torch.zeros(len(qs), len(ks), q.shape[-1], dtype=q.dtype)
    for a, table in tables.items():
        table = naive_resize(table, 2 * max(q_thw[a], k_thw[a]) - 1)
        idx = [[naive_index(q_thw[a], k_thw[a], qi[a], kj[a]) for kj in ks] for qi in qs]
        R = R + table[torch.tensor(idx)]
    return torch.einsum("...ic,ijc->...ij", q, R)


def lin(x: torch.Tensor, m) -> torch.Tensor:
    return x @ m.weight.t() + (m.bias if m.bias is not None else 0)


def ln(x: torch.Tensor, m) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), m.weight, m.bias, EPS)


def naive_attention(
    attn, x, thw, e: dict, *, cls: bool, cls_residual: bool = False, residual: bool = True
):
    """Pooling attention from the module's parameters; ``e`` is the expected block layout
    (``heads``, ``stride_q``, ``stride_kv``, ``window``, ``pool_q``)."""
    B, N, _ = x.shape
    heads, p = e["heads"], int(cls)
    D = attn.qkv.weight.shape[0] // 3
    C = D // heads
    qkv = lin(x, attn.qkv)
    q, k, v = (
        qkv[..., i * D : (i + 1) * D].reshape(B, N, heads, C).transpose(1, 2) for i in range(3)
    )

    def pool(t, conv, norm, stride):
        T, H, W = thw
        grid = t[:, :, p:].reshape(B * heads, T, H, W, C)
        w = conv.weight
        if w.dim() == 5:  # video: kernel 3 on every axis
            assert tuple(w.shape) == (C, 1, 3, 3, 3)
            g = F.conv3d(grid.permute(0, 4, 1, 2, 3), w, stride=stride, padding=1, groups=C)
        else:
            assert tuple(w.shape) == (C, 1, 3, 3)
            g = grid[:, 0].permute(0, 3, 1, 2)
            g = F.conv2d(g, w, stride=stride[1:], padding=1, groups=C)[:, :, None]
        new = tuple(g.shape[2:])
        g = g.flatten(2).transpose(1, 2).reshape(B, heads, -1, C)
        return ln(torch.cat((t[:, :, :p], g), dim=2), norm), new

    if e["pool_q"]:
        q, q_thw = pool(q, attn.pool_q, attn.norm_q, e["stride_q"])
    else:
        assert attn.pool_q is None and e["stride_q"] == (1, 1, 1)
        q_thw = tuple(thw)
    k, k_thw = pool(k, attn.pool_k, attn.norm_k, e["stride_kv"])
    v, _ = pool(v, attn.pool_v, attn.norm_v, e["stride_kv"])

    tables = {}
    if attn.rel_pos_h is not None:
        tables = {1: attn.rel_pos_h, 2: attn.rel_pos_w}
        if attn.rel_pos_t is not None:
            tables[0] = attn.rel_pos_t
    scale = C**-0.5

    def attend(qq, kk, vv, qg, kg, prefix):
        s = (qq * scale) @ kk.transpose(-1, -2)
        if tables:  # unscaled q; no term on the cls row or column
            rel = naive_rel_term(qq[..., prefix:, :], qg, kg, tables)
            s = s + F.pad(rel, (prefix, 0, prefix, 0))
        return s.softmax(dim=-1) @ vv

    if e["window"]:
        qw, kw = e["window"] // e["stride_q"][1], e["window"] // e["stride_kv"][1]
        (_, Hq, Wq), (_, Hk, Wk) = q_thw, k_thw
        nh, nw = -(-Hq // qw), -(-Wq // qw)
        assert (nh, nw) == (-(-Hk // kw), -(-Wk // kw)), "q and kv window counts differ"

        def padded(t, H, W, w):
            return F.pad(t.reshape(B, heads, H, W, C), (0, 0, 0, nw * w - W, 0, nh * w - H))

        qg, kg, vg = padded(q, Hq, Wq, qw), padded(k, Hk, Wk, kw), padded(v, Hk, Wk, kw)
        out = torch.zeros_like(qg)
        for a in range(nh):
            for b in range(nw):
                qs = qg[:, :, a * qw : (a + 1) * qw, b * qw : (b + 1) * qw].reshape(B, heads, -1, C)
                ks = kg[:, :, a * kw : (a + 1) * kw, b * kw : (b + 1) * kw].reshape(B, heads, -1, C)
                vs = vg[:, :, a * kw : (a + 1) * kw, b * kw : (b + 1) * kw].reshape(B, heads, -1, C)
                o = attend(qs, ks, vs, (1, qw, qw), (1, kw, kw), 0)
                if residual:
                    o = o + qs
                out[:, :, a * qw : (a + 1) * qw, b * qw : (b + 1) * qw] = o.reshape(
                    B, heads, qw, qw, C
                )
        out = out[:, :, :Hq, :Wq].reshape(B, heads, Hq * Wq, C)
    else:
        out = attend(q, k, v, q_thw, k_thw, p)
        if residual:
            if cls_residual:  # timm: q added to every token
                out = out + q
            else:  # official: the cls token gets no residual
                out = torch.cat((out[:, :, :p], out[:, :, p:] + q[:, :, p:]), dim=2)
    out = out.transpose(1, 2).reshape(B, -1, D)
    return lin(out, attn.proj), q_thw


def naive_max_pool(x, thw, stride, p: int):
    """Shortcut pooling: kernel s+1, stride s, padding (s+1)//2 on strided axes."""
    B, _, Cx = x.shape
    kernel = [s + 1 if s > 1 else 1 for s in stride]
    pad = [(s + 1) // 2 if s > 1 else 0 for s in stride]
    g = x[:, p:].reshape(B, *thw, Cx).permute(0, 4, 1, 2, 3)
    g = F.max_pool3d(g, kernel, stride, pad)
    return torch.cat((x[:, :p], g.flatten(2).transpose(1, 2)), dim=1)


def naive_block(blk, x, thw, e: dict, *, cls: bool, cls_residual=False, residual=True):
    """Pre-norm block: shortcut (projected when the width changes, max-pooled when strided)."""
    xn = ln(x, blk.norm1)
    y, new_thw = naive_attention(
        blk.attn, xn, thw, e, cls=cls, cls_residual=cls_residual, residual=residual
    )
    widen = e["dim"] != e["dim_out"]
    shortcut = lin(xn, blk.proj) if widen and e["expand"] else x
    if max(e["stride_q"]) > 1:
        shortcut = naive_max_pool(shortcut, thw, e["stride_q"], int(cls))
    x = shortcut + y
    xn = ln(x, blk.norm2)
    assert blk.mlp.fc1.weight.shape[0] == 4 * xn.shape[-1]  # MLP ratio 4
    h = lin(F.gelu(lin(xn, blk.mlp.fc1)), blk.mlp.fc2)
    shortcut = lin(xn, blk.proj) if widen and not e["expand"] else x
    return shortcut + h, new_thw


def expected_blocks(
    depths, embed, heads, *, expand=True, video=False, windows=None, rate=0.0, v1=False
) -> list[dict]:
    """The per-block layout from the rules of §1 and §4, written independently of the package.

    Q stride 2 at the first block of stages 2-4; KV stride 4 (image) / 8 (video, spatial axes)
    divided by 2 per stage, floored at 1; width and heads double per stage (in the attention of a
    stage's first block, or with ``expand=False`` in the MLP of the previous stage's last block);
    windows: the previous stage's window for a stage's first block, global (0) for the last block
    of stages 2-4, twice the KV stride for those of stages 2 and 3; drop path linspace(0, rate).
    """
    rows = []
    dim = embed
    n = sum(depths)
    ramp = torch.linspace(0, rate, n, dtype=torch.float64).tolist()
    for s, depth in enumerate(depths):
        kv = max((8 if video else 4) // 2**s, 1)
        for j in range(depth):
            first, last = s > 0 and j == 0, j == depth - 1
            sq = 2 if first else 1
            if expand or not (last and s < len(depths) - 1):
                dim_out = embed * 2**s
            else:
                dim_out = embed * 2 ** (s + 1)
            kv_block, window = kv, 0
            if windows:
                window = windows[s - 1] if first else windows[s]
                if last and s > 0:
                    window = 0
                    if s in (1, 2):
                        kv_block = 2 * kv
            rows.append(
                dict(
                    stage=s,
                    dim=dim,
                    dim_out=dim_out,
                    expand=expand,
                    attn_dim=dim_out if expand else dim,
                    heads=heads * 2**s,
                    stride_q=(1, sq, sq),
                    stride_kv=(1, kv_block, kv_block),
                    window=window,
                    pool_q=first or not v1,
                    drop_path=ramp[len(rows)],
                    stage_end=last,
                )
            )
            dim = dim_out
    return rows


def naive_forward(model, x, rows, *, features=False):
    """Whole network: patch conv, cls token, blocks, final norm and head (or stage norms)."""
    cfg = model.cfg
    cls = cfg.use_cls_token
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    if cfg.temporal:
        assert tuple(w.shape[2:]) == (3, 7, 7)
        y = F.conv3d(x, w, b, stride=(2, 4, 4), padding=(1, 3, 3))
        thw = tuple(y.shape[2:])
    else:
        assert tuple(w.shape[2:]) == (7, 7)
        y = F.conv2d(x, w, b, stride=4, padding=3)
        thw = (1, *y.shape[2:])
    t = y.flatten(2).transpose(1, 2)
    if cls:
        t = torch.cat((model.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    if cfg.use_abs_pos:  # separable space/time (video), at the training grid only
        assert thw == model.pos_grid
        pos = (model.pos_embed_temporal[:, :, None] + model.pos_embed_spatial[:, None]).flatten(
            1, 2
        )
        t = t + torch.cat((model.pos_embed_class, pos), dim=1)
    feats = []
    for blk, e in zip(model.blocks, rows, strict=True):
        t, thw = naive_block(
            blk,
            t,
            thw,
            e,
            cls=cls,
            cls_residual=cfg.residual_pooling_cls,
            residual=cfg.residual_pooling,
        )
        if features and e["stage_end"]:
            f = t if model.feature_norms is None else ln(t, model.feature_norms[len(feats)])
            f = f[:, int(cls) :]
            # (B, C, H, W) maps; video keeps T first in the token order: (B, C, T*H, W) here,
            # split into (B, C, T, H, W) at the end.
            f = f.reshape(f.shape[0], thw[0] * thw[1], thw[2], -1).permute(0, 3, 1, 2)
            feats.append(f)
    if features:
        if cfg.temporal:
            return [f.reshape(f.shape[0], f.shape[1], thw[0], -1, f.shape[-1]) for f in feats]
        return feats
    t = ln(t, model.norm)
    pooled = t[:, 0] if cls else t.mean(dim=1)
    return lin(pooled, model.head.projection)


def randomized(model):
    """Non-trivial values everywhere (norm weights, biases, rel-pos tables as large as q.k), so a
    wrong or missing term shows far above the tolerance."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "rel_pos" in name:
                p.copy_(0.5 * r)
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.3 * r)
            elif p.dim() == 1:
                p.copy_(0.3 * r)
            else:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
    return model.eval()


def close(got, want, tol=2e-5):
    if isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            close(a, b, tol)
        return
    assert got.shape == want.shape
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e}"


# =========================================================================== rel-pos helpers
@pytest.mark.parametrize(("q", "k"), [(7, 7), (14, 7), (7, 14), (56, 14), (5, 3), (3, 5), (1, 4)])
def test_rel_pos_index_equals_the_formula_element_by_element(q, k):
    want = torch.tensor([[naive_index(q, k, i, j) for j in range(k)] for i in range(q)])
    assert torch.equal(rel_pos_index(q, k), want)


@pytest.mark.parametrize(("length", "new"), [(7, 13), (13, 7), (31, 23), (15, 55), (5, 5)])
def test_rel_pos_table_interpolation_is_linear_with_half_pixel_centres(length, new):
    table = torch.randn(length, 6, generator=torch.Generator().manual_seed(length))
    torch.testing.assert_close(resize_rel_pos(table, new), naive_resize(table, new))


@pytest.mark.parametrize(("q", "k", "stored"), [(6, 3, 7), (4, 8, 31), (5, 5, 9), (3, 6, 11)])
def test_get_rel_pos_gathers_from_the_resized_table(q, k, stored):
    table = torch.randn(stored, 4, generator=torch.Generator().manual_seed(q * k))
    resized = naive_resize(table, 2 * max(q, k) - 1)
    want = torch.stack(
        [torch.stack([resized[naive_index(q, k, i, j)] for j in range(k)]) for i in range(q)]
    )
    torch.testing.assert_close(get_rel_pos(q, k, table), want)


def test_get_rel_pos_keeps_its_indices_and_they_serve_autograd_after_inference_mode():
    """The indices are made once per sizes (a second call, and a call inside inference mode, reuse
    them) and are a normal tensor, so a table gathered with indices first made under
    ``inference_mode`` still gets its gradient (an inference tensor cannot be saved for
    backward); the gradient counts how often each table row is used."""
    rel_pos._kept_index.cache_clear()
    made = []
    real = rel_pos.rel_pos_index

    def counting(q, k, device=None):
        made.append((q, k))
        return real(q, k, device)

    table = torch.randn(13, 4, generator=torch.Generator().manual_seed(3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rel_pos, "rel_pos_index", counting)
        with torch.inference_mode():
            first = get_rel_pos(7, 4, table)
        leaf = table.clone().requires_grad_()
        second = get_rel_pos(7, 4, leaf)
        second.sum().backward()
    assert made == [(7, 4)]
    torch.testing.assert_close(first, second.detach())
    uses = torch.zeros(13)
    for i in range(7):
        for j in range(4):
            uses[naive_index(7, 4, i, j)] += 1
    torch.testing.assert_close(leaf.grad, uses[:, None].expand(13, 4))


def test_get_rel_pos_keeps_no_indices_made_under_a_dispatch_mode_or_while_tracing():
    """Under a dispatch mode (fake tensors here, FLOP counting in the benchmark) and while tracing
    the indices are made afresh as ops of the graph: a fake tensor kept from there would break
    the next real call, and a traced graph would hold a constant."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rel_pos._kept_index.cache_clear()
    table = torch.randn(17, 4, generator=torch.Generator().manual_seed(5))
    with FakeTensorMode() as mode:
        assert get_rel_pos(5, 9, mode.from_tensor(table)).shape == (5, 9, 4)
    traced = torch.jit.trace(lambda t: get_rel_pos(9, 5, t), (table,), check_trace=False)
    assert "aten::arange" in str(traced.graph)
    assert rel_pos._kept_index.cache_info().currsize == 0
    for q, k in [(5, 9), (9, 5)]:
        want = table[torch.tensor([[naive_index(q, k, i, j) for j in range(k)] for i in range(q)])]
        torch.testing.assert_close(get_rel_pos(q, k, table), want)


def test_get_rel_pos_makes_its_indices_on_the_tables_device():
    """On the table's device (meta here; on a GPU a host-side index would be copied over at
    every call): kept per device in eager code, and made there under a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("arange"):
                self.seen.append(out.device.type)
            return out

    rel_pos._kept_index.cache_clear()
    table = torch.empty(13, 4, device="meta")
    assert get_rel_pos(7, 4, table).device.type == "meta"
    rel_pos._kept_index(7, 4, torch.device("meta"))
    assert rel_pos._kept_index.cache_info().hits == 1
    with Devices() as mode:
        get_rel_pos(4, 7, table)
    assert mode.seen == ["meta", "meta"]


@pytest.mark.parametrize(
    ("q_thw", "k_thw", "temporal"),
    [
        ((1, 4, 6), (1, 2, 3), False),  # image, q finer than kv
        ((1, 3, 5), (1, 6, 5), False),  # kv finer than q, non-square
        ((2, 4, 2), (2, 2, 1), True),  # video
        ((3, 2, 4), (2, 2, 2), True),  # video, temporal sizes differ
    ],
)
def test_rel_pos_term_equals_a_per_pair_loop(q_thw, k_thw, temporal):
    g = torch.Generator().manual_seed(1)
    C = 5
    # Stored tables of other lengths than needed: the term interpolates them first.
    tables = {a: torch.randn(2 * max(q_thw[a], k_thw[a]) + 1, C, generator=g) for a in (0, 1, 2)}
    q = torch.randn(2, 3, math.prod(q_thw), C, generator=g)
    got = rel_pos_bias(q, q_thw, k_thw, tables[1], tables[2], tables[0] if temporal else None)
    want = naive_rel_term(q, q_thw, k_thw, tables if temporal else {1: tables[1], 2: tables[2]})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# =========================================================================== schedules
# The design doc's tables (§2, §3): depths, embed/heads, drop path, expand_attn.
VARIANTS = {
    "mvitv2_tiny": ((1, 2, 5, 2), 96, 1, 0.1, True, False),
    "mvitv2_small": ((1, 2, 11, 2), 96, 1, 0.1, True, False),
    "mvitv2_base": ((2, 3, 16, 3), 96, 1, 0.3, True, False),
    "mvitv2_large": ((2, 6, 36, 4), 144, 2, 0.5, False, False),
    "mvitv2_huge": ((4, 8, 60, 8), 192, 3, 0.8, True, False),
    "mvitv2_small_16x4": ((1, 2, 11, 2), 96, 1, 0.2, True, True),
    "mvitv2_base_32x3": ((2, 3, 16, 3), 96, 1, 0.3, True, True),
    "mvitv2_large_40x3": ((2, 6, 36, 4), 144, 2, 0.75, True, True),
}


def _spec_rows(cfg) -> list[dict]:
    return [
        dict(
            stage=s.stage,
            dim=s.dim,
            dim_out=s.dim_out,
            attn_dim=s.attn_dim,
            heads=s.num_heads,
            stride_q=tuple(s.stride_q),
            stride_kv=tuple(s.stride_kv),
            window=s.window,
            pool_q=s.pool_q,
            drop_path=s.drop_path,
            stage_end=s.stage_end,
        )
        for s in block_specs(cfg)
    ]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "expand"} for r in rows]


def _assert_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a["drop_path"] == pytest.approx(b["drop_path"], abs=1e-12), i
        assert {**a, "drop_path": 0} == {**b, "drop_path": 0}, i


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_block_specs_follow_the_design_rules(name):
    depths, embed, heads, rate, expand, video = VARIANTS[name]
    cfg = get_config(name)
    assert (cfg.depths, cfg.embed_dim, cfg.num_heads) == (depths, embed, heads)
    assert (cfg.drop_path_rate, cfg.expand_attn, cfg.temporal) == (rate, expand, video)
    want = expected_blocks(depths, embed, heads, expand=expand, video=video, rate=rate)
    grid = 312 // 4 if name == "mvitv2_large_40x3" else 56
    for r, s in zip(want, block_specs(cfg)):  # token grid at the training size
        frames = cfg.num_frames // 2 if video else 1
        g = grid // 2 ** (r["stage"] - (1 if r["stride_q"][1] > 1 else 0))
        assert s.input_grid == (frames, g, g)
    _assert_rows(_spec_rows(cfg), _strip(want))


def test_block_specs_of_the_cls_and_in21k_variants():
    for name, (depths, embed, heads) in {
        "mvitv2_base_cls": ((2, 3, 16, 3), 96, 1),
        "mvitv2_large_cls": ((2, 6, 36, 4), 144, 2),  # IN-21k L expands in attention
        "mvitv2_huge_cls": ((4, 8, 60, 8), 192, 3),
    }.items():
        cfg = get_config(name)
        assert cfg.use_cls_token and cfg.num_classes == 19168
        _assert_rows(_spec_rows(cfg), _strip(expected_blocks(depths, embed, heads)))


def test_hybrid_window_specs_follow_detectron2():
    for name, (depths, embed, heads, *_) in VARIANTS.items():
        if "x" in name:
            continue
        cfg = get_config(name, window_size=(56, 28, 14, 7), drop_path_rate=0.4)
        want = expected_blocks(
            depths, embed, heads, expand=cfg.expand_attn, windows=(56, 28, 14, 7), rate=0.4
        )
        _assert_rows(_spec_rows(cfg), _strip(want))


def test_video_variants_configuration():
    for name, frames, size in [
        ("mvitv2_small_16x4", 16, 224),
        ("mvitv2_base_32x3", 32, 224),
        ("mvitv2_large_40x3", 40, 312),
    ]:
        cfg = get_config(name)
        assert (cfg.num_frames, cfg.image_hw, cfg.use_cls_token) == (frames, (size, size), True)
        assert (cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding) == (
            (3, 7, 7),
            (2, 4, 4),
            (1, 3, 3),
        )
        assert (cfg.pool_kernel, cfg.kv_stride, cfg.head_drop) == ((3, 3, 3), (1, 8, 8), 0.5)
        assert cfg.num_classes == 400 and cfg.use_rel_pos and cfg.residual_pooling
        assert all(s.stride_q[0] == 1 and s.stride_kv[0] == 1 for s in block_specs(cfg))
    for name in ("mvitv2_tiny", "mvitv2_small", "mvitv2_base", "mvitv2_large", "mvitv2_huge"):
        cfg = get_config(name)
        assert not cfg.use_cls_token and cfg.num_classes == 1000 and cfg.use_rel_pos
        assert (cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding) == (
            (1, 7, 7),
            (1, 4, 4),
            (0, 3, 3),
        )
        assert (cfg.mlp_ratio, cfg.norm_eps, cfg.image_hw) == (4.0, 1e-6, (224, 224))


def test_modules_are_built_from_the_specs():
    """The pooling convs, tables and shortcut pools of a built model have the expected strides,
    kernels, paddings and sizes (tables ``2 * max(q, kv) - 1`` at the training size)."""
    with torch.device("meta"):
        model = mvitv2.create_model("mvitv2_small_16x4", depths=(1, 2, 2, 1), num_frames=8)
    rows = expected_blocks((1, 2, 2, 1), 96, 1, video=True)
    grid = [4, 56, 56]
    for blk, e in zip(model.blocks, rows):
        a = blk.attn
        for conv, stride in ((a.pool_q, e["stride_q"]), (a.pool_k, e["stride_kv"])):
            assert tuple(conv.stride) == stride and tuple(conv.padding) == (1, 1, 1)
            assert conv.groups == conv.in_channels == e["attn_dim"] // e["heads"]
        assert a.num_heads == e["heads"]
        q = [g // s for g, s in zip(grid, e["stride_q"])]
        kv = [g // s for g, s in zip(grid, e["stride_kv"])]
        lengths = [2 * max(x, y) - 1 for x, y in zip(q, kv)]
        assert [a.rel_pos_t.shape[0], a.rel_pos_h.shape[0], a.rel_pos_w.shape[0]] == lengths
        if e["stride_q"][1] > 1:
            pool = blk.pool_skip
            assert (tuple(pool.kernel_size), tuple(pool.stride)) == ((1, 3, 3), (1, 2, 2))
            assert tuple(pool.padding) == (0, 1, 1)
        else:
            assert blk.pool_skip is None
        grid = q


# =========================================================================== whole network
SMALL = dict(depths=(1, 2, 2, 1), embed_dim=16, num_heads=2, img_size=32, num_classes=5)
MODELS = {
    # (variant, overrides, input shape, expected_blocks kwargs)
    "image": ("mvitv2_tiny", SMALL, (2, 3, 48, 64), {}),
    "cls_official": ("mvitv2_base_cls", SMALL, (1, 3, 64, 32), {}),
    "cls_timm": ("mvitv2_base_cls", dict(SMALL, residual_pooling_cls=True), (1, 3, 32, 32), {}),
    "expand_in_mlp": ("mvitv2_large", SMALL, (1, 3, 48, 64), dict(expand=False)),
    "video": ("mvitv2_small_16x4", dict(SMALL, num_frames=4), (1, 3, 6, 48, 32), dict(video=True)),
    "mvitv1": (
        "mvitv1_base_16x4",
        dict(SMALL, num_frames=4),
        (1, 3, 4, 32, 32),
        dict(video=True, expand=False, v1=True),
    ),
}


def _rows_for(model, kw) -> list[dict]:
    cfg = model.cfg
    return expected_blocks(cfg.depths, cfg.embed_dim, cfg.num_heads, **kw)


@pytest.mark.parametrize("case", sorted(MODELS))
def test_forward_equals_the_naive_network_on_every_attention_path(case):
    """Eval forward (non-training sizes: tables interpolated at run time) on every attention
    path, and the default path with gradients enabled, equal the naive network."""
    name, kw, shape, exp = MODELS[case]
    model = randomized(mvitv2.create_model(name, **kw))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = naive_forward(model, x, _rows_for(model, exp))
        for impl in PATHS:
            with attention_impl(impl):
                close(model(x), want)
    close(model(x).detach(), want)  # training-time kernels (custom autograd functions)


WINDOW = dict(depths=(1, 3, 3, 2), embed_dim=16, num_heads=2, img_size=64)


@pytest.mark.parametrize("windows", [(8, 5, 4, 2), (8, 4, 4, 2)])
def test_window_backbone_equals_naive_windows_with_padding(windows):
    """Hybrid window attention (detection backbone): 96x128 input gives stage grids 24x32,
    12x16, 6x8, 3x4; windows of 5, 4 and 2 tokens pad. Stage maps after their own norms."""
    model = randomized(
        mvitv2.create_model("mvitv2_tiny", features_only=True, window_size=windows, **WINDOW)
    )
    rows = expected_blocks((1, 3, 3, 2), 16, 2, windows=windows)
    assert [r["window"] for r in rows] == [s.window for s in block_specs(model.cfg)]
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = naive_forward(model, x, rows, features=True)
        assert [tuple(f.shape) for f in want] == [
            (1, 16, 24, 32),
            (1, 32, 12, 16),
            (1, 64, 6, 8),
            (1, 128, 3, 4),
        ]
        for impl in PATHS:
            with attention_impl(impl):
                close(model(x), want)
    close([f.detach() for f in model(x)], want)


def test_window_backbone_without_residual_pooling_equals_the_naive_network():
    """``residual_pooling=False`` with windows: the pooled queries are not added back as the
    windows are joined (MViTv1-style attention in a detection backbone)."""
    model = randomized(
        mvitv2.create_model(
            "mvitv2_tiny",
            features_only=True,
            window_size=(8, 4, 4, 2),
            residual_pooling=False,
            **WINDOW,
        )
    )
    rows = expected_blocks((1, 3, 3, 2), 16, 2, windows=(8, 4, 4, 2))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = naive_forward(model, x, rows, features=True)
        for impl in ("reference", "bias"):
            with attention_impl(impl):
                close(model(x), want)


def test_single_window_block_sizes_after_pooling():
    """A stage's first (Q-strided) window block: q window = w / 2, kv window = w / stride_kv;
    with padding on both grids (q 10x14 -> 3x4 windows of 4, kv 5x7 -> 3x4 windows of 2)."""
    model = randomized(
        mvitv2.create_model("mvitv2_tiny", features_only=True, window_size=(8, 4, 4, 2), **WINDOW)
    )
    blk = model.blocks[1]  # first block of stage 2: window 8, stride_q 2, stride_kv 2
    e = expected_blocks((1, 3, 3, 2), 16, 2, windows=(8, 4, 4, 2))[1]
    assert (e["window"], e["stride_q"], e["stride_kv"]) == (8, (1, 2, 2), (1, 2, 2))
    x = torch.randn(2, 20 * 28, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, thw = naive_block(blk, x, (1, 20, 28), e, cls=False)
        for impl in PATHS:
            with attention_impl(impl):
                got, got_thw = blk(x, (1, 20, 28))
            assert got_thw == thw == (1, 10, 14)
            close(got, want)


# =========================================================================== drop path
def _rates(model) -> list[float]:
    return [blk.drop_path.p for blk in model.blocks]


@pytest.mark.parametrize(
    ("name", "kw", "rate"),
    [
        ("mvitv2_base", {}, 0.3),
        ("mvitv2_large_40x3", {}, 0.75),
        ("mvitv2_small", dict(window_size=(56, 28, 14, 7), drop_path_rate=0.2), 0.2),
        ("mvitv2_tiny", dict(depths=(1, 1, 1, 1), drop_path_rate=0.6), 0.6),
    ],
)
def test_drop_path_rates_ramp_linearly_over_blocks(name, kw, rate):
    with torch.device("meta"):
        model = mvitv2.create_model(name, features_only="window_size" in kw, **kw)
    want = torch.linspace(0, rate, len(model.blocks), dtype=torch.float64).tolist()
    assert _rates(model) == pytest.approx(want, abs=1e-9)
    assert _rates(model)[-1] == pytest.approx(rate, abs=1e-12)


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), drop_path_rate=0.6)
    dp = model.blocks[-1].drop_path
    x = torch.randn(4000, 3, 5)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(7)
    out = dp(x)
    torch.manual_seed(7)
    keep = torch.empty(4000, 1, 1).bernoulli_(1 - 0.6)  # one draw per sample, as in the reference
    torch.testing.assert_close(out, x * keep / (1 - 0.6))
    kept = (out != 0).flatten(1).all(1)
    assert torch.equal(kept, ((out == 0).flatten(1).all(1)).logical_not())  # whole samples
    assert abs(kept.float().mean().item() - 0.4) < 0.03


def test_block_applies_drop_path_to_both_branches_in_training():
    """Training block = shortcut + mask1 * attn / (1-p), then + mask2 * mlp / (1-p), with one
    Bernoulli draw per sample per branch, in that order; p = 1 drops both branches."""
    torch.manual_seed(0)
    model = randomized(mvitv2.create_model("mvitv2_tiny", **dict(SMALL, drop_path_rate=0.9)))
    blk, e = model.blocks[1], _rows_for(model, {})[1]  # stage 2's first block: strided, widened
    blk.train()
    p = blk.drop_path.p
    x = torch.randn(6, 8 * 8, 16)
    torch.manual_seed(3)
    got, _ = blk(x, (1, 8, 8))
    torch.manual_seed(3)
    m1 = torch.empty(6, 1, 1).bernoulli_(1 - p) / (1 - p)
    m2 = torch.empty(6, 1, 1).bernoulli_(1 - p) / (1 - p)
    with torch.no_grad():
        xn = ln(x, blk.norm1)
        y, _ = naive_attention(blk.attn, xn, (1, 8, 8), e, cls=False)
        h = naive_max_pool(lin(xn, blk.proj), (1, 8, 8), (1, 2, 2), 0) + m1 * y
        want = h + m2 * lin(F.gelu(lin(ln(h, blk.norm2), blk.mlp.fc1)), blk.mlp.fc2)
    close(got.detach(), want)

    blk.drop_path.p = 1.0
    with torch.no_grad():
        got, _ = blk(x, (1, 8, 8))
    torch.testing.assert_close(
        got, naive_max_pool(lin(ln(x, blk.norm1), blk.proj), (1, 8, 8), (1, 2, 2), 0)
    )


# =========================================================================== init
def test_init_linear_layernorm_tables_and_tokens():
    """Linear: trunc-normal std 0.02 and zero bias; LayerNorm 1 / 0; rel-pos tables, abs-pos
    embeddings and the cls token trunc-normal 0.02 (std checked to a band of a few standard
    errors on millions of values)."""
    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_base_cls", depths=(1, 1, 1, 1), use_abs_pos=True, num_classes=1000
    )
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.numel() > 5_000_000
    assert abs(weights.std().item() / 0.02 - 1) < 0.005
    assert abs(weights.mean().item()) < 0.0002
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 * 4 + 1  # per block: norm1, norm2, norm_q/k/v; final norm
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert all(m.eps == EPS for m in norms)
    tables = torch.cat(
        [p.detach().flatten() for n, p in model.named_parameters() if "rel_pos" in n]
    )
    assert tables.numel() > 40_000
    assert abs(tables.std().item() / 0.02 - 1) < 0.03
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 56 * 56, 96) and abs(pos.std().item() / 0.02 - 1) < 0.02
    assert 0.01 < model.cls_token.detach().std().item() < 0.03

    model.reset_classifier(2000)
    head = model.head.projection
    assert abs(head.weight.std().item() / 0.02 - 1) < 0.005 and torch.count_nonzero(head.bias) == 0


def test_detection_backbone_init_matches():
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), features_only=True)
    for m in model.feature_norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == EPS
    assert [m.normalized_shape[0] for m in model.feature_norms] == [96, 192, 384, 768]
    assert model.norm is None and model.head is None


def test_config_is_frozen_and_replace_stays_consistent():
    cfg = get_config("mvitv2_tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depths = (1, 1, 1, 1)
    small = dataclasses.replace(cfg, depths=(1, 1, 1, 1))
    assert len(block_specs(small)) == 4 and len(block_specs(cfg)) == 10


@pytest.mark.parametrize("case", ["image", "video", "cls_official"])
def test_classifier_intermediates_and_pre_logits_equal_the_naive_network(case):
    """A classifier's stage maps (no stage norms) and its pooled pre-logits features."""
    name, kw, shape, exp = MODELS[case]
    model = randomized(mvitv2.create_model(name, **kw))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    rows = _rows_for(model, exp)
    with torch.no_grad():
        close(model.forward_intermediates(x), naive_forward(model, x, rows, features=True))
        tokens = model.forward_features(x)
        pre = model.forward_head(tokens, pre_logits=True)
        want = tokens[:, 0] if model.cfg.use_cls_token else tokens.mean(dim=1)
        torch.testing.assert_close(pre, want)
        close(lin(pre, model.head.projection), naive_forward(model, x, rows))


def test_head_dropout_weight_decay_exemptions_and_classifier_errors():
    with torch.device("meta"):
        video = mvitv2.create_model("mvitv2_small_16x4", depths=(1, 1, 1, 1))
        image = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1))
    assert video.head.dropout.p == 0.5 and image.head.dropout.p == 0.0
    model = mvitv2.create_model("mvitv2_base_cls", **dict(SMALL, use_abs_pos=True))
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() == {
        n for n in names if "rel_pos" in n or n in ("pos_embed", "cls_token")
    }
    assert {"pos_embed", "cls_token", "blocks.0.attn.rel_pos_h"} <= model.no_weight_decay()
    feat = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, num_classes=0), features_only=True)
    for call in (feat.get_classifier, lambda: feat.reset_classifier(3)):
        with pytest.raises(RuntimeError, match="features_only model has no classifier"):
            call()
    with pytest.raises(RuntimeError, match="features_only"):
        feat.forward_features(torch.randn(1, 3, 32, 32))
    model = mvitv2.create_model("mvitv2_tiny", **SMALL).to(torch.float64)
    model.reset_classifier(3)
    assert model.head.projection.weight.dtype == torch.float64 and model.num_classes == 3
    assert model.feature_channels == [16, 32, 64, 128] and model.feature_strides == [4, 8, 16, 32]
    assert model.num_features == 128 and model.pos_grid == (1, 8, 8)


WINDOW_ONLY = "window attention supports image models without a cls token"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(depths=()), r"depths must be positive, got \(\)"),
        (dict(depths=(1, 0, 1, 1)), r"depths must be positive, got \(1, 0, 1, 1\)"),
        (
            dict(window_size=(8, 4, 2)),
            r"window_size needs one entry per stage \(4\), got \(8, 4, 2\)",
        ),
        (dict(window_size=(8, 4, 2, 1), use_cls_token=True), f"^{WINDOW_ONLY}$"),
        (dict(window_size=(8, 4, 2, 1), temporal=True), f"^{WINDOW_ONLY}$"),
        (dict(num_frames=2), "^image models have num_frames=1 and no temporal stride$"),
        (dict(patch_stride=(2, 4, 4)), "image models have num_frames=1"),
        (dict(kv_stride=(2, 4, 4)), "image models have num_frames=1"),
    ],
)
def test_invalid_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        mvitv2.MViTConfig(**kw)


def test_short_and_anisotropic_configs():
    """One stage, two blocks: the ramp ends at the rate; a patch stride of 2 (H) x 4 (W) gives a
    (H/2, W/4) token grid."""
    cfg = mvitv2.MViTConfig(depths=(2,), drop_path_rate=0.4)
    assert [s.drop_path for s in block_specs(cfg)] == pytest.approx([0.0, 0.4])
    cfg = mvitv2.MViTConfig(depths=(1, 1), drop_path_rate=0.4)
    assert [s.drop_path for s in block_specs(cfg)] == pytest.approx([0.0, 0.4])
    cfg = mvitv2.MViTConfig(img_size=(32, 64), patch_stride=(1, 2, 4))
    assert block_specs(cfg)[0].input_grid == (1, 16, 16)
