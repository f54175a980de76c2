"""Model values the other model tests leave open, each against an independent reference.

* The config defaults are the published MViTv2 image recipe (design doc §1, §2).
* Absolute position embeddings at another input size are the training-size tables resized
  bicubically (spatial, Keys kernel a = -0.75, half-pixel centres) and linearly (time), written
  here per output element, not with ``F.interpolate``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.models import MODEL_CONFIGS, MViTConfig
from test_weights_formats import _cubic as keys_cubic_taps  # Keys' kernel, a = -0.75

SMALL = dict(depths=(1, 2, 2, 1), embed_dim=16, num_heads=2, img_size=32, num_classes=5)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values in every parameter (position tables as large as the tokens)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "pos" in name or name == "cls_token":
                p.copy_(r)
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.3 * r)
            elif p.dim() == 1:
                p.copy_(0.3 * r)
            else:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
    return model.eval()


# =========================================================================== config defaults
def test_default_config_is_the_published_mvitv2_image_recipe():
    """§1/§2: MViTv2-T-like image model at 224: width 96, 1 head, MLP ratio 4, qkv bias, width
    doubled in attention, Q pooled in every block, rel-pos, residual pooling onto the grid tokens
    only, patch conv 7x7 stride 4 pad 3, pool kernel 3, KV stride 4, global blocks' KV stride x2,
    LayerNorm eps 1e-6, 1000 classes, no dropout."""
    cfg = MViTConfig()
    want = dict(
        depths=(1, 2, 5, 2),
        embed_dim=96,
        num_heads=1,
        mlp_ratio=4.0,
        qkv_bias=True,
        expand_attn=True,
        pool_q_every_block=True,
        use_cls_token=False,
        use_abs_pos=False,
        use_rel_pos=True,
        residual_pooling=True,
        residual_pooling_cls=False,
        temporal=False,
        in_chans=3,
        img_size=224,
        num_frames=1,
        patch_kernel=(1, 7, 7),
        patch_stride=(1, 4, 4),
        patch_padding=(0, 3, 3),
        pool_kernel=(1, 3, 3),
        kv_stride=(1, 4, 4),
        window_size=None,
        global_kv_stride_mul=2,
        drop_path_rate=0.0,
        head_drop=0.0,
        norm_eps=1e-6,
        num_classes=1000,
    )
    assert {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)} == want
    assert (cfg.num_stages, cfg.depth, cfg.image_hw) == (4, 10, (224, 224))
    assert (cfg.stage_dims, cfg.total_stride) == ((96, 192, 384, 768), 32)


# =========================================================================== abs-pos resizing
def _resize_matrix(n_in: int, n_out: int, cubic: bool) -> torch.Tensor:
    """``(n_out, n_in)`` weights: output i samples the input at ``(i + 0.5) * n_in / n_out - 0.5``
    (half-pixel centres); cubic taps at floor-1..floor+2 clamped to the border, linear taps
    floor/floor+1 with the source clamped at 0."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        if cubic:
            base = math.floor(src)
            for tap, w in zip(range(base - 1, base + 3), keys_cubic_taps(src - base)):
                m[i, min(max(tap, 0), n_in - 1)] += w
        else:
            src = max(src, 0.0)
            i0 = min(math.floor(src), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            m[i, i0] += 1 - (src - i0)
            m[i, i1] += src - i0
    return m


def _bicubic(pe: torch.Tensor, hw: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """``(1, h*w, C)`` table -> ``(1, H*W, C)``: separable bicubic, one axis at a time."""
    grid = pe.reshape(hw[0], hw[1], -1).double()
    rows, cols = _resize_matrix(hw[0], new[0], True), _resize_matrix(hw[1], new[1], True)
    out = torch.einsum("Hh,hwc,Ww->HWc", rows, grid, cols)
    return out.reshape(1, new[0] * new[1], -1).to(pe.dtype)


def _load_resized(src: torch.nn.Module, dst: torch.nn.Module, resized: dict) -> None:
    sd = src.state_dict()
    sd.update(resized)
    dst.load_state_dict(sd)


def test_image_abs_pos_is_resized_bicubically_at_other_input_sizes():
    """A cls-token image model trained at 32 px (8x8 grid) run on 48x64 equals the same weights
    in a model built for 48x64 whose grid table is the bicubic resize; the cls entry is kept."""
    kw = dict(SMALL, use_abs_pos=True, use_rel_pos=False)
    model = randomized(mvitv2.create_model("mvitv2_base_cls", **kw))
    big = mvitv2.create_model("mvitv2_base_cls", **dict(kw, img_size=(48, 64))).eval()
    pe = model.pos_embed.detach()
    assert pe.shape == (1, 1 + 8 * 8, 16) and model.cls_token.shape == (1, 1, 16)
    grid = _bicubic(pe[:, 1:], (8, 8), (12, 16))
    _load_resized(model, big, {"pos_embed": torch.cat((pe[:, :1], grid), dim=1)})
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(x), big(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, model(torch.flip(x, dims=(0,))))  # inputs matter


def test_video_abs_pos_resizes_time_linearly_and_space_bicubically():
    """MViTv1-B (separable space/time abs-pos, cls position): trained on 16 frames at 32 px
    (8x8x8 grid), run on 8 frames at 32x48 (4x8x12), equals a model built for that clip whose
    temporal table is the linear resize (8 -> 4) and spatial table the bicubic one; cls entry
    kept. (Width 4 = new frame count and old frame count = height catch axis mix-ups.)"""
    kw = dict(SMALL, embed_dim=4, num_heads=1, num_frames=16)
    model = randomized(mvitv2.create_model("mvitv1_base_16x4", **kw))
    big = mvitv2.create_model("mvitv1_base_16x4", **dict(kw, num_frames=8, img_size=(32, 48)))
    sp, tp = model.pos_embed_spatial.detach(), model.pos_embed_temporal.detach()
    assert (sp.shape, tp.shape) == ((1, 64, 4), (1, 8, 4))
    temporal = torch.einsum("Tt,tc->Tc", _resize_matrix(8, 4, False), tp[0].double())
    resized = {
        "pos_embed_spatial": _bicubic(sp, (8, 8), (8, 12)),
        "pos_embed_temporal": temporal[None].float(),
    }
    _load_resized(model, big.eval(), resized)
    x = torch.randn(1, 3, 8, 32, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), big(x), rtol=1e-4, atol=1e-5)


# =========================================================================== attention paths
def test_reference_path_pools_qkv_the_plain_way_and_per_module_setting_wins(monkeypatch):
    """``"reference"`` is the unfused baseline of the released implementations: its Q/K/V
    pooling goes through the plain (head-major) pooling, the other paths never do; a module's own
    ``attn_impl`` overrides the global setting for that module only."""
    import mvitv2.models.attention as attention_module
    import mvitv2.ops.pooling as pooling
    from mvitv2.ops import attention_impl

    plain_calls, impls = [], []
    real_plain, real_attend = pooling._pool_qkv_plain, attention_module.attend

    def plain(*args, **kw):
        plain_calls.append(args[1])
        return real_plain(*args, **kw)

    def attend(*args):
        impls.append(args[-1])
        return real_attend(*args)

    monkeypatch.setattr(pooling, "_pool_qkv_plain", plain)
    monkeypatch.setattr(attention_module, "attend", attend)
    model = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, depths=(1, 1, 1, 1))).eval()
    assert all(blk.attn.attn_impl is None for blk in model.blocks)  # None: the global setting
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for impl, n_plain in (("reference", 4), ("bias", 0), ("folded", 0)):
            plain_calls.clear(), impls.clear()
            with attention_impl(impl):
                model(x)
            assert (len(plain_calls), impls) == (n_plain, [impl] * 4), impl
        model.blocks[2].attn.attn_impl = "reference"
        plain_calls.clear(), impls.clear()
        with attention_impl("bias"):
            model(x)
    assert plain_calls == [(1, 4, 4)]  # block 2's input grid: 8x8 pooled once by stage 2
    assert impls == ["bias", "bias", "reference", "bias"]


def test_reference_path_splits_and_joins_windows_the_plain_way(monkeypatch):
    """The detection benchmark's unfused baseline (``"reference"``) pads, splits and joins the
    windows of Q, K and V the plain (detectron2) way; every other path takes the fast one."""
    import inspect

    import mvitv2.models.attention as attention_module
    from mvitv2.ops import attention_impl

    calls = []
    real_part, real_unpart = attention_module.window_partition, attention_module.window_unpartition

    def plain_arg(fn, args, kw) -> bool:
        bound = inspect.signature(fn).bind(*args, **kw)
        bound.apply_defaults()
        return bound.arguments["plain"]

    def part(*args, **kw):
        calls.append(("partition", plain_arg(real_part, args, kw)))
        return real_part(*args, **kw)

    def unpart(*args, **kw):
        calls.append(("unpartition", plain_arg(real_unpart, args, kw)))
        return real_unpart(*args, **kw)

    monkeypatch.setattr(attention_module, "window_partition", part)
    monkeypatch.setattr(attention_module, "window_unpartition", unpart)
    kw = dict(SMALL, depths=(1, 1, 1, 1), num_classes=0)
    model = mvitv2.create_model("mvitv2_tiny", window_size=(4, 2, 2, 2), **kw).eval()
    windowed = sum(blk.attn.window > 0 for blk in model.blocks)
    assert windowed > 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for impl, plain in (("reference", True), ("bias", False), ("chunked", False)):
            calls.clear()
            with attention_impl(impl):
                model(x)
            want = [("partition", plain)] * 3 + [("unpartition", plain)]
            assert calls == want * windowed, impl


def test_window_attention_refuses_an_anisotropic_kv_stride():
    """Square windows pool to square K/V windows only with equal H/W KV strides; a (1, 4, 2)
    stride used to fail deep inside the attention with a tensor size mismatch."""
    with pytest.raises(ValueError, match=r"same KV stride on H and W, got \(1, 4, 2\)"):
        MViTConfig(window_size=(8, 4, 4, 2), kv_stride=(1, 4, 2))
    assert MViTConfig(kv_stride=(1, 4, 2)).kv_stride == (1, 4, 2)  # global attention: fine


@pytest.mark.parametrize(("kernel", "pad"), [((1, 5, 3), (2, 1)), ((3, 5, 3), (1, 2, 1))])
def test_pooling_convs_pad_half_the_kernel_so_stride_one_keeps_the_grid(kernel, pad):
    """Q/K/V pooling convs are depthwise, bias-free, padded ``k // 2`` per axis ("same" for odd
    kernels): a stride-1 block keeps its token grid, a stride-2 one halves it (rounding up)."""
    video = len(pad) == 3
    name = "mvitv2_small_16x4" if video else "mvitv2_tiny"
    kw = dict(SMALL, depths=(2, 1, 1, 1), pool_kernel=kernel, kv_stride=(1, 1, 1))
    if video:
        kw["num_frames"] = 4
    model = mvitv2.create_model(name, **kw).eval()
    for conv in (model.blocks[0].attn.pool_q, model.blocks[0].attn.pool_k):
        assert tuple(conv.kernel_size) == kernel[3 - len(pad) :] and tuple(conv.padding) == pad
        assert conv.bias is None and conv.groups == conv.in_channels == 8  # head width 16 / 2
    thw = (2, 6, 10) if video else (1, 6, 10)
    x = torch.randn(1, int(video) + math.prod(thw), 16)  # video models have a cls token
    with torch.no_grad():
        y, y_thw = model.blocks[0](x, thw)
        assert y_thw == thw and y.shape == x.shape
        y, y_thw = model.blocks[2](x, thw)  # first block of stage 2: Q stride 2
        assert y_thw == (thw[0], 3, 5) and y.shape == (1, int(video) + thw[0] * 15, 32)


def test_kv_pooling_strides_each_axis_by_its_own_stride():
    """An anisotropic KV stride (1, 4, 2) pools K and V by 4 along H and 2 along W, divided by
    the Q stride per stage: (2, 1), then (1, 1)."""
    model = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, kv_stride=(1, 4, 2)))
    strides = [tuple(b.attn.pool_k.stride) for b in model.blocks]
    assert strides == [(4, 2), (2, 1), (2, 1), (1, 1), (1, 1), (1, 1)]
    assert all(tuple(b.attn.pool_v.stride) == s for b, s in zip(model.blocks, strides))
    assert model(torch.randn(1, 3, 32, 64)).shape == (1, 5)


# =========================================================================== network API
def test_drop_path_accepts_probabilities_0_to_1_and_names_its_rate():
    from mvitv2.models.mvit import DropPath

    x = torch.randn(5, 2, 3)
    state = torch.get_rng_state()
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing: same random stream
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))  # every sample dropped
    for p in (-0.1, 1.5):
        with pytest.raises(
            ValueError, match=rf"^drop path probability must be in \[0, 1\], got {p}$"
        ):
            DropPath(p)
    assert repr(DropPath(0.25)) == "DropPath(p=0.25)"
    half = torch.randn(4000, 3, dtype=torch.bfloat16)
    torch.manual_seed(0)
    out = DropPath(0.5).train()(half)
    assert out.dtype == torch.bfloat16  # the mask takes the input's dtype (no fp32 promotion)
    kept = out.abs().sum(1) > 0
    torch.testing.assert_close(out[kept], 2 * half[kept], rtol=0, atol=0)


def test_num_classes_is_zero_without_a_classifier():
    with torch.device("meta"):
        feats = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), features_only=True)
        headless = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), num_classes=0)
        clf = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), num_classes=7)
    assert (feats.num_classes, headless.num_classes, clf.num_classes) == (0, 0, 7)
    with torch.device("meta"):
        direct = mvitv2.MViT(MViTConfig(depths=(1, 1, 1, 1)))  # a classifier unless asked
    assert not direct.features_only and direct.num_classes == 1000
    assert isinstance(headless.get_classifier(), torch.nn.Identity)
    for call in (feats.get_classifier, lambda: feats.reset_classifier(3)):
        with pytest.raises(RuntimeError) as err:
            call()
        assert str(err.value) == "features_only model has no classifier"
    with pytest.raises(RuntimeError) as err:
        feats.forward_features(torch.empty(1, 3, 32, 32, device="meta"))
    assert str(err.value) == "features_only model: use forward() / forward_intermediates()"


def test_reset_classifier_keeps_device_and_head_dropout():
    """The new head lives where the model does (here the meta device) and keeps the variant's
    head dropout (0.5 for the video models); 0 classes leaves the pooled features."""
    with torch.device("meta"):
        model = mvitv2.create_model("mvitv2_small_16x4", depths=(1, 1, 1, 1))
    model.reset_classifier(11)
    head = model.head
    assert head.projection.weight.device.type == "meta" and head.projection.out_features == 11
    assert head.projection.in_features == model.num_features == 768
    assert head.dropout.p == 0.5
    model.reset_classifier(1)  # a single-logit (binary) classifier is a linear layer too
    assert model.head.projection.out_features == 1 and model.num_classes == 1
    small = mvitv2.create_model("mvitv2_tiny", **SMALL).double()
    small.reset_classifier(1)  # initialised like any head: zero bias, the model's dtype
    bias = small.head.projection.bias
    assert bias.dtype == torch.float64 and torch.count_nonzero(bias) == 0
    model.reset_classifier(0)
    assert isinstance(model.head.projection, torch.nn.Identity) and model.head.dropout.p == 0.5


def test_grad_checkpointing_recomputes_every_block_only_when_gradients_flow(monkeypatch):
    """Activation checkpointing (non-reentrant) wraps each block when enabled and gradients are
    on; not under no_grad, not when disabled; ``set_grad_checkpointing()`` enables it."""
    import mvitv2.models.mvit as mvit_module

    calls = []
    real = mvit_module.checkpoint

    def spy(fn, *args, **kw):
        calls.append(kw)
        return real(fn, *args, **kw)

    monkeypatch.setattr(mvit_module, "checkpoint", spy)
    model = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, depths=(1, 1, 1, 1)))
    x = torch.randn(1, 3, 32, 32)
    assert model.grad_checkpointing is False  # off by default
    model(x).sum().backward()
    assert calls == []
    model.set_grad_checkpointing()
    assert model.grad_checkpointing is True
    model(x).sum().backward()
    assert calls == [{"use_reentrant": False}] * 4
    calls.clear()
    with torch.no_grad():
        model(x)
    assert calls == []
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize(
    ("name", "shape", "features", "message"),
    [
        (
            "mvitv2_tiny",
            (3, 64, 64),
            False,
            "expected a 4-D input (B, C, H, W), got shape (3, 64, 64)",
        ),
        (
            "mvitv2_small_16x4",
            (1, 3, 64, 64),
            False,
            "expected a 5-D input (B, C, T, H, W), got shape (1, 3, 64, 64)",
        ),
        (
            "mvitv2_tiny",
            (1, 4, 64, 64),
            False,
            "expected 3 input channels in dim 1 of (B, C, H, W), got shape (1, 4, 64, 64)",
        ),
        (
            "mvitv2_small_16x4",
            (1, 1, 4, 64, 64),
            False,
            "expected 3 input channels in dim 1 of (B, C, T, H, W), got shape (1, 1, 4, 64, 64)",
        ),
        (
            "mvitv2_tiny",
            (1, 3, 64, 66),
            False,
            "input height and width must be multiples of 4 and at least 32, got (64, 66)",
        ),
        (
            "mvitv2_tiny",
            (1, 3, 28, 64),
            False,
            "input height and width must be multiples of 4 and at least 32, got (28, 64)",
        ),
        (
            "mvitv2_tiny",
            (1, 3, 64, 36),
            True,
            "input height and width must be multiples of 32 and at least 32, got (64, 36)",
        ),
    ],
)
def test_bad_inputs_name_the_expected_layout_and_the_shape_given(name, shape, features, message):
    with torch.device("meta"):
        model = mvitv2.create_model(name, depths=(1, 1, 1, 1), features_only=features)
    with pytest.raises(ValueError) as err:
        model(torch.empty(shape, device="meta"))
    assert str(err.value) == message


def test_smallest_accepted_inputs_run():
    """32 px is the smallest classifier input (one token at stride 32), on any aspect."""
    with torch.device("meta"):
        model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), num_classes=3)
        feats = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), features_only=True)
    assert model(torch.empty(2, 3, 32, 36, device="meta")).shape == (2, 3)
    with torch.device("meta"):  # width only needs to be a multiple of its own patch stride (2)
        narrow = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), patch_stride=(1, 4, 2))
    assert narrow(torch.empty(1, 3, 64, 34, device="meta")).shape == (1, 1000)
    maps = feats(torch.empty(1, 3, 32, 64, device="meta"))
    assert [tuple(m.shape) for m in maps] == [
        (1, 96, 8, 16),
        (1, 192, 4, 8),
        (1, 384, 2, 4),
        (1, 768, 1, 2),
    ]


@pytest.mark.parametrize("features", [False, True])
def test_height_and_width_are_each_checked_against_their_own_patch_stride(features):
    """With patch stride 4 on H and 2 on W, a height of 34 is refused (it used to be checked
    against W's stride) and a width of 34 accepted; feature maps need 32 and 16."""
    with torch.device("meta"):
        model = mvitv2.create_model(
            "mvitv2_tiny", depths=(1, 1, 1, 1), patch_stride=(1, 4, 2), features_only=features
        )
    step = "32 (H) and 16 (W)" if features else "4 (H) and 2 (W)"
    with pytest.raises(ValueError) as err:
        model(torch.empty(1, 3, 34 if not features else 48, 64, device="meta"))
    assert str(err.value) == (
        f"input height and width must be multiples of {step} and at least 32 (H) and 16 (W), "
        f"got {(34 if not features else 48, 64)}"
    )
    with pytest.raises(ValueError, match=r"at least 32 \(H\) and 16 \(W\), got \(64, 8\)"):
        model(torch.empty(1, 3, 64, 8, device="meta"))
    ok = (64, 48) if features else (64, 34)
    assert model(torch.empty(1, 3, *ok, device="meta")) is not None
    if features:
        # 16 wide is the least, and a multiple of W's 16: one token wide at the last stage
        assert model(torch.empty(1, 3, 32, 16, device="meta"))[-1].shape[-2:] == (1, 1)


ANISO = dict(patch_kernel=(1, 3, 7), patch_stride=(1, 2, 4), patch_padding=(0, 1, 3))


@pytest.mark.parametrize(
    ("name", "kw", "shape", "grid"),
    [
        ("mvitv2_tiny", {}, (2, 3, 48, 64), (1, 12, 16)),
        ("mvitv2_tiny", ANISO, (2, 3, 48, 64), (1, 24, 16)),
        ("mvitv2_small_16x4", {}, (1, 3, 6, 32, 64), (3, 8, 16)),
    ],
)
def test_patch_embed_gives_conv_tokens_on_a_t_h_w_grid(name, kw, shape, grid):
    """Images are a one-frame grid; tokens are the conv output (7x7 stride 4 pad 3, or the
    configured per-axis kernel/stride/padding; video 3x7x7 stride 2x4x4 pad 1x3x3), flattened
    t-major then h then w."""
    model = mvitv2.create_model(name, **dict(SMALL, depths=(1, 1, 1, 1), **kw))
    x = torch.randn(shape)
    tokens, thw = model.patch_embed(x)
    assert thw == grid
    w, b = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    if len(shape) == 5:
        want = F.conv3d(x, w, b, stride=(2, 4, 4), padding=(1, 3, 3))
    elif kw:
        assert tuple(w.shape[2:]) == (3, 7)
        want = F.conv2d(x, w, b, stride=(2, 4), padding=(1, 3))
    else:
        want = F.conv2d(x, w, b, stride=4, padding=3)
    want = want.reshape(shape[0], 16, -1).transpose(1, 2)
    torch.testing.assert_close(tokens, want)


# =========================================================================== registry
def test_get_config_turns_list_overrides_into_tuples():
    """Overrides from YAML/CLI arrive as lists; the frozen config stores tuples (hashable, equal
    to the tuple-built config)."""
    cfg = mvitv2.get_config("mvitv2_tiny", depths=[1, 1, 1, 1], window_size=[8, 4, 4, 2])
    assert cfg == mvitv2.get_config("mvitv2_tiny", depths=(1, 1, 1, 1), window_size=(8, 4, 4, 2))
    assert isinstance(cfg.depths, tuple) and isinstance(cfg.window_size, tuple)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert mvitv2.get_config("mvitv2_tiny", drop_path_rate=0.0).drop_path_rate == 0.0


@pytest.mark.parametrize(
    ("ours", "theirs"), [("mvitv1_base_16x4", "mvit_v1_b"), ("mvitv2_small_16x4", "mvit_v2_s")]
)
def test_video_variants_drop_path_equals_torchvision_per_block(ours, theirs):
    """torchvision's builders (stochastic depth 0.2, ramped over the blocks) are the reference
    for the Kinetics small/v1 variants."""
    tv = pytest.importorskip("torchvision.models.video")
    with torch.device("meta"):
        ref = getattr(tv, theirs)()
        model = mvitv2.create_model(ours)
    want = [blk.stochastic_depth.p for blk in ref.blocks]
    assert [blk.drop_path.p for blk in model.blocks] == pytest.approx(want, abs=1e-12)


def test_unknown_model_and_option_errors_say_what_is_valid():
    with pytest.raises(KeyError) as err:
        mvitv2.get_config("mvitv3_tiny")
    names = ", ".join(sorted(MODEL_CONFIGS))
    assert str(err.value) == f"unknown model 'mvitv3_tiny'; available: {names}"
    fields = sorted(f.name for f in dataclasses.fields(MViTConfig))
    with pytest.raises(TypeError) as err:
        mvitv2.get_config("mvitv2_tiny", depth=3, colour=1)
    assert (
        str(err.value) == f"unknown option(s) for mvitv2_tiny: ['colour', 'depth']; valid: {fields}"
    )


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_qkv_bias_option_removes_exactly_the_qkv_biases():
    """``qkv_bias=False`` drops the 3 * width bias of each block's qkv projection, nothing else."""
    with torch.device("meta"):
        base = mvitv2.create_model("mvitv2_tiny", **SMALL)
        nobias = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, qkv_bias=False))
    assert all(blk.attn.qkv.bias is None for blk in nobias.blocks)
    widths = [16, 32, 32, 64, 64, 128]  # attention width per block (doubles at stage starts)
    assert [tuple(blk.attn.qkv.bias.shape) for blk in base.blocks] == [(3 * w,) for w in widths]
    assert _count(base) - _count(nobias) == 3 * sum(widths)


def test_rel_pos_tables_are_sized_per_axis_at_the_training_grid():
    """Each table has ``2 * max(q, kv) - 1`` rows for its own axis, q and kv being the block's
    pooled training-size grid (floored at one token): a 32x64 image (8x16 tokens) gets different
    H and W tables; a 2-frame video (one token in time) a one-row temporal table."""
    image = mvitv2.create_model(
        "mvitv2_tiny", **dict(SMALL, depths=(1, 1, 1, 1), img_size=(32, 64))
    )
    # block: input grid -> q (stride 1, 2, 2, 2), kv (stride 4, 2, 1, 1)
    # 8x16 -> 8x16, 2x4; 8x16 -> 4x8, 4x8; 4x8 -> 2x4, 4x8; 2x4 -> 1x2, 2x4
    lengths = [(b.attn.rel_pos_h.shape[0], b.attn.rel_pos_w.shape[0]) for b in image.blocks]
    assert lengths == [(15, 31), (7, 15), (7, 15), (3, 7)]
    assert all(b.attn.rel_pos_t is None for b in image.blocks)
    video = mvitv2.create_model(
        "mvitv2_small_16x4", **dict(SMALL, depths=(1, 1, 1, 1), num_frames=2)
    )
    # one frame of 8x8 tokens; kv stride 8, 4, 2, 1: q 8, 4, 2, 1 and kv 1, 2, 2, 2 along H/W
    tables = [[getattr(b.attn, f"rel_pos_{a}").shape[0] for a in "thw"] for b in video.blocks]
    assert tables == [[1, 15, 15], [1, 7, 7], [1, 3, 3], [1, 3, 3]]


def test_abs_pos_tables_follow_the_per_axis_token_grid():
    """Image table: one row per token of the (H / stride_h, W / stride_w) training grid; video
    without a cls token: patch tokens + temporal[t] + spatial[h, w], no class position."""
    with torch.device("meta"):
        image = mvitv2.create_model("mvitv2_tiny", **dict(SMALL, use_abs_pos=True, **ANISO))
    assert image.pos_grid == (1, 16, 8) and image.pos_embed.shape == (1, 16 * 8, 16)
    # one scalar stride per map, the width's, as the input check's total stride
    assert image.feature_strides == [4, 8, 16, 32] and image.cfg.total_stride == 32
    video = randomized(
        mvitv2.create_model("mvitv1_base_16x4", **dict(SMALL, num_frames=4, use_cls_token=False))
    )
    assert video.pos_embed_class is None and video.cls_token is None
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        tokens, thw = video._embed(x)
        patches, _ = video.patch_embed(x)
    t, s = video.pos_embed_temporal[0], video.pos_embed_spatial[0]
    want = patches + torch.stack([t[i] + s[j] for i in range(2) for j in range(64)])
    assert thw == (2, 8, 8)
    torch.testing.assert_close(tokens, want)
