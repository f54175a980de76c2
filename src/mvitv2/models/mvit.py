"""The MViT backbone/classifier: patch embed -> multiscale blocks -> norm -> head.

One class serves images (``(B, 3, H, W)``, 2-D convs on a ``T = 1`` grid) and video
(``(B, 3, T, H, W)``); with ``features_only=True`` it returns the four stage outputs as maps for
detection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mvitv2.models.attention import MultiScaleAttention
from mvitv2.models.config import BlockSpec, MViTConfig, block_specs
from mvitv2.ops import Linear, add_residual, conv_tokens, pool_tokens
from mvitv2.ops.mlp import mlp
from mvitv2.ops.rel_pos import Grid


class DropPath(nn.Module):
    """Stochastic depth, row mode: in training, zero whole samples with probability ``p`` and
    scale the kept ones by ``1 / (1 - p)``; identity in eval.

    The same computation and random draws as ``torchvision.ops.StochasticDepth(p, "row")``, written
    here because importing torchvision pulls in torch._dynamo (seconds), which model code does not
    need (``mvitv2 info`` builds every model).

    Args:
        p: probability of dropping a sample's branch, in [0, 1].
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop path probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (computed by :func:`mvitv2.ops.mlp.mlp`)."""

    def __init__(self, dim: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return mlp(x, self.fc1, self.act, self.fc2)


class MultiScaleBlock(nn.Module):
    """Pre-norm block: pooling attention and MLP, each with a (pooled/projected) shortcut.

    When the width changes, ``proj`` maps the normed input to the new width: after attention
    when the attention itself expands (``attn_dim == dim_out``), else after the MLP.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
        eps = cfg.norm_eps
        self.num_prefix = int(cfg.use_cls_token)
        self.spatial_only = not cfg.temporal
        self.norm1 = nn.LayerNorm(spec.dim, eps=eps)
        self.attn = MultiScaleAttention(spec, cfg)
        self.norm2 = nn.LayerNorm(spec.attn_dim, eps=eps)
        self.mlp = Mlp(spec.attn_dim, int(spec.attn_dim * cfg.mlp_ratio), spec.dim_out)
        self.proj = Linear(spec.dim, spec.dim_out) if spec.dim != spec.dim_out else None
        self.proj_after_attn = spec.attn_dim == spec.dim_out
        self.pool_skip = None
        if math.prod(spec.stride_q) > 1:
            kernel = [s + 1 if s > 1 else s for s in spec.stride_q]
            pad = [k // 2 for k in kernel]
            if self.spatial_only:
                self.pool_skip = nn.MaxPool2d(kernel[1:], spec.stride_q[1:], pad[1:])
            else:
                self.pool_skip = nn.MaxPool3d(kernel, spec.stride_q, pad)
        self.drop_path = DropPath(spec.drop_path)

    def forward(self, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        """x: ``(B, N, dim)`` on grid ``thw`` -> ``(B, N', dim_out)`` on the pooled grid."""
        xn = self.norm1(x)
        y, new_thw = self.attn(xn, thw)
        shortcut = self.proj(xn) if self.proj is not None and self.proj_after_attn else x
        if self.pool_skip is not None:
            shortcut, _ = pool_tokens(
                shortcut, thw, self.pool_skip, self.num_prefix, self.spatial_only
            )
        x = add_residual(shortcut, self.drop_path(y))
        xn = self.norm2(x)
        shortcut = self.proj(xn) if self.proj is not None and not self.proj_after_attn else x
        return add_residual(shortcut, self.drop_path(self.mlp(xn))), new_thw


class PatchEmbed(nn.Module):
    """Conv patch embedding: ``(B, C, [T,] H, W)`` -> tokens ``(B, N, D)`` and their grid."""

    def __init__(self, cfg: MViTConfig) -> None:
        super().__init__()
        self.temporal = cfg.temporal
        if cfg.temporal:
            self.proj = nn.Conv3d(
                cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding
            )
        else:
            kernel, stride, pad = cfg.patch_kernel[1:], cfg.patch_stride[1:], cfg.patch_padding[1:]
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel, stride, pad)

    def forward(self, x: Tensor) -> tuple[Tensor, Grid]:
        x, grid = conv_tokens(self.proj, x)
        return x, grid if self.temporal else (1, *grid)


class ClassifierHead(nn.Module):
    """Dropout + linear layer (official name: ``head.projection``); returns logits."""

    def __init__(self, dim: int, num_classes: int, drop: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(drop)
        self.projection = Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.dropout(x))


def _per_axis(hw: tuple[int, int]) -> str:
    """``"32"`` for equal H and W values, else ``"32 (H) and 16 (W)"``."""
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]} (H) and {hw[1]} (W)"


class FeatureInfo(list):
    """timm's ``feature_info``: a dict per stage output (``module``, its last block; ``num_chs``;
    ``reduction``, its spatial stride), and the lists timm's ``FeatureInfo`` gives of them."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class MViT(nn.Module):
    """Multiscale Vision Transformer (v1 and v2), image or video.

    Args:
        cfg: the architecture.
        features_only: drop the final norm and head; ``forward`` returns the four stage outputs,
            each after its own LayerNorm, as ``(B, C, H, W)`` (``(B, C, T, H, W)`` for video)
            maps at strides 4/8/16/32.
    """

    def __init__(self, cfg: MViTConfig, *, features_only: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.features_only = features_only
        self.grad_checkpointing = False
        self.num_prefix = int(cfg.use_cls_token)
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.use_cls_token else None

        h, w = cfg.image_hw
        t = max(cfg.num_frames // cfg.patch_stride[0], 1)
        self.pos_grid = (t, h // cfg.patch_stride[1], w // cfg.patch_stride[2])
        self.pos_embed = self.pos_embed_spatial = self.pos_embed_temporal = None
        self.pos_embed_class = None
        if cfg.use_abs_pos and cfg.temporal:  # separable space/time (SlowFast, torchvision)
            self.pos_embed_spatial = nn.Parameter(
                torch.zeros(1, self.pos_grid[1] * self.pos_grid[2], dim)
            )
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, dim))
            if cfg.use_cls_token:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        elif cfg.use_abs_pos:
            n = self.pos_grid[1] * self.pos_grid[2] + self.num_prefix
            self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))

        specs = block_specs(cfg)
        self.blocks = nn.ModuleList(MultiScaleBlock(s, cfg) for s in specs)
        self.stage_ends = [s.index for s in specs if s.stage_end]
        self.feature_channels = [specs[i].dim_out for i in self.stage_ends]
        self.feature_strides = [cfg.patch_stride[-1] * 2**i for i in range(cfg.num_stages)]
        self.feature_info = FeatureInfo(
            {"module": f"blocks.{i}", "num_chs": c, "reduction": r}
            for i, c, r in zip(self.stage_ends, self.feature_channels, self.feature_strides)
        )
        self.num_features = specs[-1].dim_out
        self.feature_norms = self.norm = self.head = None
        if features_only:
            self.feature_norms = nn.ModuleList(
                nn.LayerNorm(c, eps=cfg.norm_eps) for c in self.feature_channels
            )
        else:
            self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
            self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.head_drop)
        self.init_weights()

    # ----------------------------------------------------------------- init / API
    def init_weights(self) -> None:
        """Trunc-normal(0.02) for linears, tables and tokens; zero biases; LayerNorm 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or name == "cls_token":
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def num_classes(self) -> int:
        if self.head is None or isinstance(self.head.projection, nn.Identity):
            return 0
        return self.head.projection.out_features

    def no_weight_decay(self) -> set[str]:
        """Position tables and cls token: the ``pos`` kind of ``TrainConfig.wd_exempt``."""
        keys = ("rel_pos", "pos_embed", "cls_token")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (activation checkpointing)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        if self.head is None:
            raise RuntimeError("features_only model has no classifier")
        return self.head.projection

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs."""
        if self.head is None:
            raise RuntimeError("features_only model has no classifier")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        ref = self.head.projection
        like = ref.weight if isinstance(ref, nn.Linear) else next(self.parameters())
        head = ClassifierHead(self.num_features, num_classes, self.cfg.head_drop)
        if num_classes > 0:
            nn.init.trunc_normal_(head.projection.weight, std=0.02)
            nn.init.zeros_(head.projection.bias)
        # The old head's (or else the model's) device and dtype, and the model's train/eval mode.
        self.head = head.to(like.device, like.dtype).train(self.training)

    # ----------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        want = 5 if cfg.temporal else 4
        layout = "(B, C, T, H, W)" if cfg.temporal else "(B, C, H, W)"
        if x.dim() != want:
            raise ValueError(f"expected a {want}-D input {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected {cfg.in_chans} input channels in dim 1 of {layout}, "
                f"got shape {tuple(x.shape)}"
            )
        # Pooling rounds odd grids up, so any multiple of the patch stride works (312 px for
        # MViTv2-L video); feature maps for FPNs need exact strides, so multiples of 32 there.
        least = tuple(s * 2 ** (cfg.num_stages - 1) for s in cfg.patch_stride[1:])
        step = least if self.features_only else cfg.patch_stride[1:]
        h, w = x.shape[-2:]
        if h % step[0] or w % step[1] or h < least[0] or w < least[1]:
            raise ValueError(
                f"input height and width must be multiples of {_per_axis(step)} and at least "
                f"{_per_axis(least)}, got {(h, w)}"
            )

    def _abs_pos(self, thw: Grid) -> Tensor:
        """Absolute position embedding for grid ``thw``, interpolated from the training grid."""
        t0, h0, w0 = self.pos_grid

        def spatial(pe: Tensor) -> Tensor:  # (1, h0*w0, C) -> (1, H*W, C)
            if (h0, w0) == thw[1:]:
                return pe
            pe = pe.reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
            pe = F.interpolate(pe, size=thw[1:], mode="bicubic", align_corners=False)
            return pe.flatten(2).transpose(1, 2)

        if self.pos_embed is not None:
            p = self.num_prefix
            return torch.cat((self.pos_embed[:, :p], spatial(self.pos_embed[:, p:])), dim=1)
        temporal = self.pos_embed_temporal
        if temporal.shape[1] != thw[0]:
            temporal = F.interpolate(temporal.transpose(1, 2), size=thw[0], mode="linear")
            temporal = temporal.transpose(1, 2)
        sp = spatial(self.pos_embed_spatial)
        pos = (temporal[:, :, None] + sp[:, None]).flatten(1, 2)
        if self.pos_embed_class is not None:
            pos = torch.cat((self.pos_embed_class, pos), dim=1)
        return pos

    def _embed(self, x: Tensor) -> tuple[Tensor, Grid]:
        self._check_input(x)
        x, thw = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None or self.pos_embed_spatial is not None:
            x = x + self._abs_pos(thw)
        return x, thw

    def _run_block(self, i: int, x: Tensor, thw: Grid) -> tuple[Tensor, Grid]:
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, thw, use_reentrant=False)
        return blk(x, thw)

    def _to_map(self, x: Tensor, thw: Grid) -> Tensor:
        """Grid tokens ``(B, N, C)`` -> ``(B, C, T, H, W)`` (``(B, C, H, W)`` for images)."""
        x = x[:, self.num_prefix :]
        x = x.reshape(x.shape[0], *thw, x.shape[-1]).permute(0, 4, 1, 2, 3)
        return x if self.cfg.temporal else x[:, :, 0]

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs as maps (each after its stage LayerNorm if features_only)."""
        x, thw = self._embed(x)
        outs = []
        ends = set(self.stage_ends)
        for i in range(len(self.blocks)):
            x, thw = self._run_block(i, x, thw)
            if i in ends:
                y = x
                if self.feature_norms is not None:
                    y = self.feature_norms[len(outs)](y)
                outs.append(self._to_map(y, thw))
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Input -> normed tokens ``(B, N, C)`` (cls token first when the model has one)."""
        if self.norm is None:
            raise RuntimeError("features_only model: use forward() / forward_intermediates()")
        x, thw = self._embed(x)
        for i in range(len(self.blocks)):
            x, thw = self._run_block(i, x, thw)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits: cls token if present, else the mean of the grid tokens."""
        x = x[:, 0] if self.num_prefix else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))
