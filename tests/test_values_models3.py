"""Model values left open by the other model tests, found by mutation testing the attention and
the backbone: each against torchvision's video ``MViT`` (same weights, converted) or a formula
written out here.

* Pooling kernels wider than 3 on video: the Q/K/V convs pad half the kernel on every axis, so
  the grids and values equal torchvision's with the same kernels.
* A two-frame video model has a one-step temporal grid: its temporal position table has one
  row, as torchvision's at ``temporal_size=2``.
* ``features_only`` stage norms use the model's LayerNorm epsilon (not PyTorch's default).
* Q-strided blocks max-pool their shortcut with kernel s + 1, stride s, padding (s + 1) // 2,
  in 2-D for images and 3-D for video (design doc §1).
* The least input height is checked against H's own least, not W's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mvitv2
from mvitv2.weights import convert_state_dict
from test_values_models import randomized
from test_values_models2 import _tv_blocks

tv_mvit = pytest.importorskip("torchvision.models.video.mvit")

TOL = dict(rtol=1e-4, atol=1e-4)


def _tv_video_pair(*, v1: bool, frames: int, kernel: tuple[int, int, int] = (3, 3, 3)):
    """torchvision's 5-block video MViT (``_tv_blocks``) with pooling ``kernel`` and ``frames``
    input frames, randomly filled, and ours built from our registry with its converted weights."""
    blocks = [
        dataclasses.replace(b, kernel_q=list(kernel) if b.kernel_q else [], kernel_kv=list(kernel))
        for b in _tv_blocks(v1)
    ]
    ref = tv_mvit.MViT(
        spatial_size=(32, 32),
        temporal_size=frames,
        block_setting=blocks,
        residual_pool=not v1,
        residual_with_cls_embed=v1,
        rel_pos_embed=not v1,
        proj_after_attn=not v1,
        dropout=0.0,
        num_classes=6,
    )
    ref = randomized(ref)
    model = mvitv2.create_model(
        "mvitv1_base_16x4" if v1 else "mvitv2_small_16x4",
        depths=(1, 2, 1, 1),
        embed_dim=8,
        num_heads=1,
        img_size=32,
        num_frames=frames,
        kv_stride=(1, 4, 4),
        pool_kernel=kernel,
        num_classes=6,
    )
    model.load_state_dict(convert_state_dict(ref.state_dict()), strict=True)
    return ref, model.eval()


@pytest.mark.parametrize("kernel", [(3, 5, 5), (5, 3, 5)], ids=["3x5x5", "5x3x5"])
def test_video_pooling_kernels_wider_than_three_pad_half_the_kernel_like_torchvision(kernel):
    """Pooling convs pad ``k // 2`` on every axis (5 -> 2): same token grids as torchvision's,
    whose convs are built the same way, and the same logits with the same weights."""
    ref, model = _tv_video_pair(v1=False, frames=4, kernel=kernel)
    blk = model.blocks[0].attn
    assert blk.pool_q.padding == tuple(k // 2 for k in kernel)  # (1|2, 2|1, 2), by hand
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, **TOL)
    assert want.abs().max() > 0.1


def test_a_two_frame_video_model_has_a_one_step_temporal_table_like_torchvision():
    """Two frames at temporal patch stride 2 give one time step: the separable temporal
    position table has one row (torchvision at ``temporal_size=2`` too; a strict load of its
    weights checks every shape) and the logits equal torchvision's."""
    ref, model = _tv_video_pair(v1=True, frames=2)
    assert model.pos_grid == (1, 8, 8) and model.pos_embed_temporal.shape == (1, 1, 8)
    x = torch.randn(2, 3, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, **TOL)
    assert want.abs().max() > 0.1


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis, written out: (x - mean) / sqrt(biased var + eps) * w + b."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def test_features_only_stage_norms_use_the_model_s_layernorm_epsilon():
    """With ``norm_eps=0.5`` every stage map of the ``features_only`` backbone is the
    classifier's stage output (same trunk weights) normed over channels with eps 0.5; PyTorch's
    default 1e-5 would give clearly other values at this epsilon."""
    kw = dict(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, img_size=64, norm_eps=0.5)
    cls = randomized(mvitv2.create_model("mvitv2_tiny", **kw, num_classes=6))
    feats = randomized(mvitv2.create_model("mvitv2_tiny", **kw, features_only=True))
    trunk = {k: v for k, v in cls.state_dict().items() if not k.startswith(("norm.", "head."))}
    feats.load_state_dict(
        {**trunk, **{k: v for k, v in feats.state_dict().items() if "feature_norms" in k}}
    )
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stages = cls.forward_intermediates(x)
        maps = feats(x)
    assert len(maps) == 4
    for i, (stage, got) in enumerate(zip(stages, maps, strict=True)):
        norm = feats.feature_norms[i]
        want = _layer_norm(stage.movedim(1, -1), norm.weight, norm.bias, 0.5).movedim(-1, 1)
        torch.testing.assert_close(got, want, **TOL)
        eps_default = _layer_norm(stage.movedim(1, -1), norm.weight, norm.bias, 1e-5)
        assert (got - eps_default.movedim(-1, 1)).abs().max() > 1e-2


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_strided_blocks_max_pool_the_shortcut_with_kernel_s_plus_1_in_the_input_s_rank(video):
    """Design §1: the shortcut of a Q-strided block is max-pooled with kernel s + 1, stride s,
    padding (s + 1) // 2 per strided axis (1, 1, 0 on the unstrided time axis): 2-D pooling for
    images (no time axis), 3-D for video; blocks of Q stride 1 keep the shortcut as is."""
    name = "mvitv2_small_16x4" if video else "mvitv2_tiny"
    kw = dict(num_frames=4) if video else {}
    with torch.device("meta"):
        model = mvitv2.create_model(name, depths=(1, 2, 1, 1), embed_dim=8, img_size=32, **kw)
    strided = [i for i, b in enumerate(model.blocks) if b.pool_skip is not None]
    assert strided == [1, 3, 4]  # the first block of stages 2, 3 and 4
    for i in strided:
        pool = model.blocks[i].pool_skip
        got = tuple(tuple(a) for a in (pool.kernel_size, pool.stride, pool.padding))
        if video:
            assert type(pool) is torch.nn.MaxPool3d
            assert got == ((1, 3, 3), (1, 2, 2), (0, 1, 1))
        else:
            assert type(pool) is torch.nn.MaxPool2d
            assert got == ((3, 3), (2, 2), (1, 1))


def test_a_height_below_its_own_least_is_refused_even_when_above_the_width_s_least():
    """Patch stride 4 on H and 2 on W over 4 stages: the least input is 4 * 8 = 32 high and
    2 * 8 = 16 wide. A height of 24 (a multiple of 4, above W's 16) is refused, naming both."""
    with torch.device("meta"):
        model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), patch_stride=(1, 4, 2))
    with pytest.raises(ValueError) as err:
        model(torch.empty(1, 3, 24, 64, device="meta"))
    assert str(err.value) == (
        "input height and width must be multiples of 4 (H) and 2 (W) and at least "
        "32 (H) and 16 (W), got (24, 64)"
    )
