"""Model options by value against independent implementations: timm's ``MultiScaleVit`` (images)
and torchvision's ``MViT`` (video), built here at tiny sizes from their own configuration classes
(never from ours), randomly filled, converted with ``convert_state_dict`` and run on the same
input; and cases computed by hand where neither reference has the option.

Each option that changes the math (cls token, absolute positions, residual pooling on or off and
onto the cls token, width doubling in attention or in the MLP, rel-pos on or off, pooling kernels,
KV strides, patch conv, MLP ratio, qkv bias, LayerNorm epsilon, heads, drop path and head dropout
in training) is one case with the reference configured the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.weights import convert_state_dict
from test_values_models import randomized

timm_mvitv2 = pytest.importorskip("timm.models.mvitv2")
tv_mvit = pytest.importorskip("torchvision.models.video.mvit")

TOL = dict(rtol=1e-4, atol=1e-4)


def _loaded(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """``ours`` with ``ref``'s (converted) weights, strictly: same parameters, nothing left."""
    ours.load_state_dict(convert_state_dict(ref.state_dict()), strict=True)
    return ours.eval()


# =========================================================================== timm, images
# (timm MultiScaleVitCfg fields, our create_model overrides) on top of a 5-block, 8-wide model at
# 32 px (8x8 tokens, stage grids 8, 4, 2, 1). timm adds the pooled Q to the cls token as well.
TIMM_BASE = dict(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1)
OURS_BASE = dict(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, img_size=32, num_classes=6)
TIMM_CASES = {
    "default": ({}, {}),
    "cls_token_and_abs_pos": (
        dict(use_cls_token=True, use_abs_pos=True),
        dict(use_cls_token=True, use_abs_pos=True, residual_pooling_cls=True),
    ),
    "abs_pos_without_cls": (dict(use_abs_pos=True), dict(use_abs_pos=True)),
    "width_doubled_in_the_mlp": (dict(expand_attn=False), dict(expand_attn=False)),
    "no_residual_pooling": (dict(residual_pooling=False), dict(residual_pooling=False)),
    "no_rel_pos": (dict(rel_pos_type="none"), dict(use_rel_pos=False)),
    "pool_kernel_5x3_kv_stride_2": (
        dict(kernel_qkv=(5, 3), stride_kv_adaptive=(2, 2)),
        dict(pool_kernel=(1, 5, 3), kv_stride=(1, 2, 2)),
    ),
    "patch_conv_3x5_stride_2_pad_1x2": (
        dict(patch_kernel=(3, 5), patch_stride=(2, 2), patch_padding=(1, 2)),
        dict(patch_kernel=(1, 3, 5), patch_stride=(1, 2, 2), patch_padding=(0, 1, 2)),
    ),
    "mlp_ratio_2_no_qkv_bias_layernorm_eps_0.5": (
        dict(mlp_ratio=2.0, qkv_bias=False, norm_eps=0.5),
        dict(mlp_ratio=2.0, qkv_bias=False, norm_eps=0.5),
    ),
    "two_heads_width_16": (dict(embed_dim=16, num_heads=2), dict(embed_dim=16, num_heads=2)),
}


def _timm_pair(case: str, img: int = 32):
    theirs, ours = TIMM_CASES[case]
    cfg = timm_mvitv2.MultiScaleVitCfg(**{**TIMM_BASE, **theirs})
    ref = randomized(timm_mvitv2.MultiScaleVit(cfg, img_size=(img, img), num_classes=6))
    model = mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, **ours, "img_size": img})
    return ref, _loaded(model, ref)


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_image_options_equal_timm_with_the_same_weights(case):
    ref, model = _timm_pair(case)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, **TOL)
        # The pooled pre-logits features too (the head reads token 0 with a cls token).
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pre, ref.forward_head(ref.forward_features(x), True), **TOL)
    assert want.abs().max() > 0.1  # the logits are not trivially small


def test_stage_maps_equal_timm_intermediates_and_features_only_norms_them():
    """A classifier's ``forward_intermediates`` are timm's stage outputs (NCHW, cls token
    dropped); the ``features_only`` backbone with the same weights gives each after its own
    LayerNorm over channels (eps 1e-6)."""
    ref, model = _timm_pair("cls_token_and_abs_pos", img=64)
    feats = mvitv2.create_model(
        "mvitv2_tiny",
        **{**OURS_BASE, **TIMM_CASES["cls_token_and_abs_pos"][1], "img_size": 64},
        features_only=True,
    )
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("norm.", "head."))}
    g = torch.Generator().manual_seed(3)
    norms = {}
    for i, c in enumerate((8, 16, 32, 64)):
        norms[f"feature_norms.{i}.weight"] = 1 + 0.3 * torch.randn(c, generator=g)
        norms[f"feature_norms.{i}.bias"] = 0.3 * torch.randn(c, generator=g)
    feats.load_state_dict({**sd, **norms}, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.forward_intermediates(x, intermediates_only=True)
        got = model.forward_intermediates(x)
        maps = feats.eval()(x)
    assert [tuple(m.shape) for m in want] == [
        (1, 8, 16, 16),
        (1, 16, 8, 8),
        (1, 32, 4, 4),
        (1, 64, 2, 2),
    ]
    for i, (g_map, f_map, w_map) in enumerate(zip(got, maps, want, strict=True)):
        torch.testing.assert_close(g_map, w_map, **TOL)
        w, b = norms[f"feature_norms.{i}.weight"], norms[f"feature_norms.{i}.bias"]
        normed = F.layer_norm(w_map.permute(0, 2, 3, 1), w.shape, w, b, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(f_map, normed, **TOL)


# =========================================================================== torchvision, video
def _tv_blocks(v1: bool) -> list:
    """The torchvision block list of a 5-block video model (stages 1-2-1-1, width 8, one head),
    written out by hand: Q stride 2 at stage starts, KV stride 4 halved per stage (floored at 1);
    v2 doubles width in the attention of a stage's first block and pools Q everywhere, v1 doubles
    it in the MLP of a stage's last block and pools Q only where it strides."""
    cfg = tv_mvit.MSBlockConfig
    k3 = [3, 3, 3]
    rows = [  # heads, in, out (v2), out (v1), stride_q, stride_kv
        (1, 8, 8, 16, [1, 1, 1], [1, 4, 4]),
        (2, 8, 16, 16, [1, 2, 2], [1, 2, 2]),
        (2, 16, 16, 32, [1, 1, 1], [1, 2, 2]),
        (4, 16, 32, 64, [1, 2, 2], [1, 1, 1]),
        (8, 32, 64, 64, [1, 2, 2], [1, 1, 1]),
    ]
    blocks, dim = [], 8
    for heads, c_in, out2, out1, sq, skv in rows:
        out = out1 if v1 else out2
        kq = k3 if not v1 or sq != [1, 1, 1] else []
        blocks.append(cfg(heads, dim if v1 else c_in, out, kq, k3, sq, skv))
        dim = out
    return blocks


def _tv_pair(v1: bool, *, drop_path: float = 0.0, head_drop: float = 0.5):
    ref = tv_mvit.MViT(
        spatial_size=(32, 32),
        temporal_size=4,
        block_setting=_tv_blocks(v1),
        residual_pool=not v1,
        residual_with_cls_embed=v1,
        rel_pos_embed=not v1,
        proj_after_attn=not v1,
        dropout=head_drop,
        stochastic_depth_prob=drop_path,
        num_classes=6,
    )
    ref = randomized(ref)
    name = "mvitv1_base_16x4" if v1 else "mvitv2_small_16x4"
    model = mvitv2.create_model(
        name,
        depths=(1, 2, 1, 1),
        embed_dim=8,
        num_heads=1,
        img_size=32,
        num_frames=4,
        kv_stride=(1, 4, 4),
        num_classes=6,
        drop_path_rate=drop_path,
        head_drop=head_drop,
    )
    return ref, _loaded(model, ref)


@pytest.mark.parametrize("v1", [False, True], ids=["mvitv2", "mvitv1"])
def test_video_models_equal_torchvision_with_the_same_weights(v1):
    """MViTv2 video (rel-pos with a temporal table, residual pooling off the cls token, width
    doubled in attention) and MViTv1 (separable abs-pos with a class position, no residual
    pooling, width doubled in the MLP, Q pooled only where strided)."""
    ref, model = _tv_pair(v1)
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, **TOL)
    assert want.abs().max() > 0.1


@pytest.mark.parametrize("v1", [False, True], ids=["mvitv2", "mvitv1"])
def test_training_drop_path_and_head_dropout_equal_torchvision_draw_for_draw(v1):
    """In training, stochastic depth (rate 0.6 ramped linearly over the five blocks, one draw per
    sample per branch, attention then MLP) and the head's dropout (0.5) use the random stream as
    torchvision does: the same seed gives the same logits. Without them the logits differ."""
    ref, model = _tv_pair(v1, drop_path=0.6, head_drop=0.5)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.15, 0.3, 0.45, 0.6])
    ref.train(), model.train()
    x = torch.randn(8, 3, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.manual_seed(11)
        want = ref(x)
        torch.manual_seed(11)
        got = model(x)
        torch.testing.assert_close(got, want, **TOL)
        eval_out = model.eval()(x)
    assert not torch.allclose(got, eval_out, **TOL)


# =========================================================================== classifier reset
def test_reset_classifier_in_eval_mode_keeps_the_new_head_in_eval_mode():
    """Regression: the new head used to be built in training mode, so a model in eval mode with
    head dropout (0.5 for the video variants) dropped features at random after a reset. The new
    head follows the model's mode, as timm's ``reset_classifier`` does; its logits are the
    pooled features times its weight plus its bias."""
    model = randomized(
        mvitv2.create_model(
            "mvitv2_small_16x4", depths=(1, 1, 1, 1), embed_dim=8, img_size=32, num_frames=4
        )
    )
    model.reset_classifier(3)
    assert not model.head.training and model.head.dropout.p == 0.5
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        w, b = model.head.projection.weight, model.head.projection.bias
        torch.testing.assert_close(model(x), pre @ w.t() + b)
    model.train()
    model.reset_classifier(4)
    assert model.head.training


def test_reset_classifier_after_a_headless_model_takes_the_model_s_dtype():
    """A float64 model reset to 0 classes and then to 3 gets a float64 classifier (the removed
    head has no weight to copy the dtype from), so it still runs."""
    model = mvitv2.create_model("mvitv2_tiny", **dict(OURS_BASE, num_classes=0)).double().eval()
    model.reset_classifier(3)
    assert model.head.projection.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 3)


# =========================================================================== abs-pos at training size
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_abs_pos_at_the_training_grid_is_the_table_itself_without_resampling(video, monkeypatch):
    """At the training token grid the stored position tables are added as they are: nothing is
    interpolated (the resampling is only for other input sizes)."""
    name, shape = (
        ("mvitv1_base_16x4", (1, 3, 4, 32, 32)) if video else ("mvitv2_base_cls", (1, 3, 32, 32))
    )
    kw = dict(depths=(1, 1, 1, 1), embed_dim=8, img_size=32, use_abs_pos=True, num_classes=3)
    model = randomized(mvitv2.create_model(name, **kw, **({"num_frames": 4} if video else {})))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def refuse(*args, **kw):
        raise AssertionError("interpolated at the training size")

    monkeypatch.setattr(F, "interpolate", refuse)
    with torch.no_grad():
        tokens, thw = model._embed(x)
        patches, _ = model.patch_embed(x)
    cls = model.cls_token[0]
    if video:
        t, s = model.pos_embed_temporal[0], model.pos_embed_spatial[0]
        pos = [t[i] + s[j] for i in range(2) for j in range(64)]
        want = torch.stack([cls[0] + model.pos_embed_class[0, 0], *(patches[0] + torch.stack(pos))])
    else:
        want = torch.cat((cls, patches[0])) + model.pos_embed[0]
    assert thw == ((2, 8, 8) if video else (1, 8, 8))
    torch.testing.assert_close(tokens[0], want)


# =========================================================================== init_weights, config errors
def test_init_weights_reinitialises_a_trained_model():
    """``init_weights()`` on a model with arbitrary values restores the documented init: every
    LayerNorm (blocks, Q/K/V norms, final norm) weight 1 and bias 0, every Linear bias 0, and
    fresh normal(0, 0.02) values in Linear weights, rel-pos tables, abs-pos and cls token (all
    within 6 std of 0; the random values they replace are 6 to 50 times larger)."""
    model = randomized(
        mvitv2.create_model("mvitv2_base_cls", **dict(OURS_BASE, use_abs_pos=True, num_classes=6))
    )
    model.init_weights()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # per block norm1, norm2, norm_q/k/v and qkv, proj, fc1, fc2; 3 width projections; final
    # norm and head
    assert len(norms) == 5 * 5 + 1 and len(linears) == 5 * 4 + 3 + 1
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    fresh = [m.weight for m in linears] + [model.pos_embed, model.cls_token]
    fresh += [p for n, p in model.named_parameters() if "rel_pos" in n]
    assert len(fresh) == 24 + 2 + 2 * 5
    assert all(p.abs().max() < 6 * 0.02 for p in fresh)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(depths=()), "depths must be positive, got ()"),
        (dict(depths=(2, 0, 1)), "depths must be positive, got (2, 0, 1)"),
        (dict(window_size=(8, 4, 2)), "window_size needs one entry per stage (4), got (8, 4, 2)"),
        (
            dict(window_size=(8, 4, 4, 2), kv_stride=(1, 2, 4)),
            "window attention needs the same KV stride on H and W, got (1, 2, 4)",
        ),
    ],
)
def test_config_errors_are_exactly_these_lines(kw, message):
    with pytest.raises(ValueError) as err:
        mvitv2.MViTConfig(**kw)
    assert str(err.value) == message


def test_reset_classifier_keeps_the_old_head_s_dtype_over_the_trunk_s():
    """A classifier kept in float64 on a float32 trunk is replaced by a float64 one."""
    model = mvitv2.create_model("mvitv2_tiny", **OURS_BASE)
    model.head.double()
    model.reset_classifier(3)
    assert model.head.projection.weight.dtype == torch.float64
    assert model.patch_embed.proj.weight.dtype == torch.float32


def test_reset_classifier_to_a_negative_class_count_is_refused_and_keeps_the_head():
    model = mvitv2.create_model("mvitv2_tiny", **dict(OURS_BASE, num_classes=5))
    head = model.head
    with pytest.raises(
        ValueError, match=r"^num_classes must be >= 0 \(0: no classifier\), got -1$"
    ):
        model.reset_classifier(-1)
    assert model.head is head and model.head.projection.out_features == 5


def test_a_timm_training_checkpoint_loads_its_weights_and_says_it_holds_ema_weights():
    """timm's train.py saves ``state_dict`` and ``state_dict_ema``: the plain weights load (as
    timm's validate.py does by default), the report says where the EMA weights are, and those
    load when passed themselves."""
    ref, _ = _timm_pair("default")
    ema = copy.deepcopy(ref)
    with torch.no_grad():
        for p in ema.parameters():  # other weights than ref's
            p.mul_(0.9).add_(0.05)
    ckpt = {"epoch": 3, "state_dict": ref.state_dict(), "state_dict_ema": ema.state_dict()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "img_size": 32})
    report = mvitv2.load_checkpoint(model, ckpt)
    assert (
        "the file also holds EMA weights under 'state_dict_ema', not loaded (to load them, "
        "pass checkpoint['state_dict_ema'] as the source)" in report.notes
    )
    deit_style = {"model": ref.state_dict(), "model_ema": ema.state_dict()}
    assert mvitv2.load_checkpoint(model, deit_style).notes[-1] == (
        "the file also holds EMA weights under 'model_ema', not loaded (to load them, "
        "pass checkpoint['model_ema'] as the source)"
    )
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), **TOL)
        assert (ema.eval()(x) - ref(x)).abs().max() > 0.1
        report = mvitv2.load_checkpoint(model, ckpt["state_dict_ema"])
        assert not any("EMA" in n for n in report.notes)
        torch.testing.assert_close(model(x), ema.eval()(x), **TOL)


@pytest.mark.parametrize("in_chans", [1, 2, 4, 7])
def test_rgb_weights_load_into_another_input_channel_count_as_timm_adapts_them(in_chans):
    """Fine-tuning RGB weights on grey or multispectral images: the patch kernel is timm's
    ``adapt_input_conv`` of the RGB one (the rest loads as it is); a grey model gives the RGB
    model's output on the grey image repeated three times."""
    from timm.models._manipulate import adapt_input_conv

    rgb = randomized(mvitv2.create_model("mvitv2_tiny", **OURS_BASE)).eval()
    model = mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "in_chans": in_chans}).eval()
    report = mvitv2.load_checkpoint(model, rgb.state_dict())
    w = rgb.patch_embed.proj.weight.detach()
    assert torch.equal(model.patch_embed.proj.weight, adapt_input_conv(in_chans, w.clone()))
    assert report.adapted == {
        "patch_embed.proj.weight": f"RGB kernel adapted to {in_chans} input channel(s) "
        "(timm's adapt_input_conv)"
    }
    assert torch.equal(model.blocks[1].mlp.fc1.weight, rgb.blocks[1].mlp.fc1.weight)
    if in_chans == 1:
        x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(x), rgb(x.expand(-1, 3, -1, -1)), **TOL)


def test_rgb_image_weights_inflate_into_a_grey_video_model():
    """Image -> video inflation after the channel adaptation: the kernel summed over RGB, then
    put at the centre frame (the paper's inflation)."""
    rgb = randomized(mvitv2.create_model("mvitv2_tiny", **OURS_BASE))
    video = mvitv2.create_model(
        "mvitv2_small_16x4",
        depths=(1, 2, 1, 1),
        embed_dim=8,
        num_heads=1,
        img_size=32,
        num_frames=4,
        num_classes=6,
        in_chans=1,
    )
    report = mvitv2.load_checkpoint(video, rgb.state_dict())
    got = video.patch_embed.proj.weight.detach()  # (O, 1, kT, kH, kW)
    summed = rgb.patch_embed.proj.weight.detach().sum(1, keepdim=True)
    centre = got.shape[2] // 2
    assert torch.equal(got[:, :, centre], summed)
    assert got[:, :, [t for t in range(got.shape[2]) if t != centre]].abs().max() == 0
    assert report.adapted["patch_embed.proj.weight"].startswith(
        "RGB kernel adapted to 1 input channel(s) (timm's adapt_input_conv); inflated 2-D kernel"
    )


@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_base"])
def test_feature_info_gives_timm_s_channels_and_reductions(name, features_only):
    """``model.feature_info`` as timm's (a dict per stage; ``channels()``, ``reduction()``), on
    the meta device; its modules are the blocks whose outputs ``forward_intermediates`` gives."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model(name, features_only=True)
        model = mvitv2.create_model(name, features_only=features_only)
    info = model.feature_info
    assert info.channels() == ref.feature_info.channels() == [f["num_chs"] for f in info]
    assert info.reduction() == ref.feature_info.reduction() == [f["reduction"] for f in info]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    small = randomized(mvitv2.create_model("mvitv2_tiny", **{**OURS_BASE, "num_classes": 0}))
    outs: list[torch.Tensor] = []  # each named block's output tokens (B, N, C)
    for m in small.feature_info.module_name():
        small.get_submodule(m).register_forward_hook(lambda mod, a, out: outs.append(out[0]))
    with torch.no_grad():
        maps = small.forward_intermediates(x)  # (B, C, H, W), no cls token here
    assert len(outs) == len(maps) == 4
    for tokens, fmap in zip(outs, maps, strict=True):
        torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)
