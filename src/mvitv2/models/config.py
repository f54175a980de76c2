"""One frozen dataclass describes every MViT variant; :func:`block_specs` unrolls it per block.

The config never changes after construction: derived values (per-block widths, heads, strides,
windows) are computed by pure functions, so ``dataclasses.replace(cfg, depths=...)`` always gives
a consistent model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mvitv2.errors import UserValueError

#: The least value of each integer option (each entry, for a tuple).
_AT_LEAST = {
    "embed_dim": 1,
    "num_heads": 1,
    "in_chans": 1,
    "img_size": 1,
    "num_frames": 1,
    "patch_kernel": 1,
    "patch_stride": 1,
    "patch_padding": 0,
    "pool_kernel": 1,
    "kv_stride": 1,
    "global_kv_stride_mul": 1,
    "num_classes": 0,
}


@dataclass(frozen=True)
class MViTConfig:
    """Architecture of one MViT model (image or video).

    Args:
        depths: blocks per stage; width and heads double at each new stage.
        embed_dim: width of the first stage.
        num_heads: heads of the first stage.
        mlp_ratio: hidden width of the MLP relative to its input.
        qkv_bias: bias in the qkv projection.
        expand_attn: True doubles width (and heads) inside the attention of the first block of a
            stage (MViTv2 default, ``DIM_MUL_IN_ATT``); False doubles it in the MLP of the last
            block of the previous stage (released IN-1k MViTv2-L and MViTv1).
        pool_q_every_block: MViTv2 pools (conv + norm) Q in every block, with stride 1 except at
            stage starts; MViTv1 pools Q only where it strides.
        use_cls_token: prepend a class token; the head then reads token 0 instead of the mean.
        use_abs_pos: learned absolute position embedding (separable space/time for video).
        use_rel_pos: decomposed relative position terms (MViTv2).
        residual_pooling: add the pooled Q to the attention output (MViTv2).
        residual_pooling_cls: also add it to the class token (timm) instead of only to the
            spatial tokens (official code, torchvision).
        temporal: video model: 3-D patch embed, (T, H, W) token grid, temporal rel-pos.
        in_chans: input channels.
        img_size: training resolution; sets the rel-pos table and abs-pos sizes (other input
            sizes are handled by interpolation at run time).
        num_frames: training clip length (video); sets temporal table sizes.
        patch_kernel, patch_stride, patch_padding: patch embedding conv, (T, H, W) order.
        pool_kernel: kernel of the Q/K/V pooling convs, (T, H, W).
        kv_stride: KV pooling stride of the first stage, (T, H, W); divided by the Q stride at
            each stage change, floored at 1 (adaptive KV stride).
        window_size: per-stage attention window in tokens of the stage's grid (hybrid window
            attention for detection), or None for global attention everywhere.
        global_kv_stride_mul: KV stride multiplier of the global (last) blocks of stages 2 and 3
            when window attention is on (detectron2 uses 2).
        drop_path_rate: stochastic depth at the last block, linear from 0.
        head_drop: dropout before the classifier.
        norm_eps: LayerNorm epsilon.
        num_classes: classifier outputs (0 = no classifier, features only).
    """

    depths: tuple[int, ...] = (1, 2, 5, 2)
    embed_dim: int = 96
    num_heads: int = 1
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    expand_attn: bool = True
    pool_q_every_block: bool = True
    use_cls_token: bool = False
    use_abs_pos: bool = False
    use_rel_pos: bool = True
    residual_pooling: bool = True
    residual_pooling_cls: bool = False
    temporal: bool = False
    in_chans: int = 3
    img_size: int | tuple[int, int] = 224
    num_frames: int = 1
    patch_kernel: tuple[int, int, int] = (1, 7, 7)
    patch_stride: tuple[int, int, int] = (1, 4, 4)
    patch_padding: tuple[int, int, int] = (0, 3, 3)
    pool_kernel: tuple[int, int, int] = (1, 3, 3)
    kv_stride: tuple[int, int, int] = (1, 4, 4)
    window_size: tuple[int, ...] | None = None
    global_kv_stride_mul: int = 2
    drop_path_rate: float = 0.0
    head_drop: float = 0.0
    norm_eps: float = 1e-6
    num_classes: int = 1000

    def __post_init__(self) -> None:
        # UserValueError: a bad option (``model_args.drop_path_rate=1.5``) is the user's mistake,
        # one line from the CLI, caught here rather than as a traceback from a layer (DropPath,
        # Dropout) or a cryptic shape error in the first forward (heads not dividing the width).
        if len(self.depths) < 1 or min(self.depths) < 1:
            raise UserValueError(f"depths must be positive, got {self.depths}")
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if min(value if isinstance(value, tuple) else (value,)) < low:
                raise UserValueError(f"{name} must be at least {low}, got {value}")
        for name in ("drop_path_rate", "head_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise UserValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.embed_dim % self.num_heads:
            raise UserValueError(
                f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.window_size is not None:
            if len(self.window_size) != len(self.depths):
                raise UserValueError(
                    f"window_size needs one entry per stage ({len(self.depths)}), "
                    f"got {self.window_size}"
                )
            if self.use_cls_token or self.temporal:
                raise UserValueError("window attention supports image models without a cls token")
            if self.kv_stride[1] != self.kv_stride[2]:
                # Windows are square, so their pooled K/V windows must be too.
                raise UserValueError(
                    f"window attention needs the same KV stride on H and W, got {self.kv_stride}"
                )
        if not self.temporal and (
            self.num_frames != 1 or self.patch_stride[0] != 1 or self.kv_stride[0] != 1
        ):
            raise UserValueError("image models have num_frames=1 and no temporal stride")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))

    @property
    def total_stride(self) -> int:
        return self.patch_stride[-1] * 2 ** (self.num_stages - 1)


@dataclass(frozen=True)
class BlockSpec:
    """Everything one block needs, unrolled from :class:`MViTConfig`."""

    index: int
    stage: int
    dim: int
    dim_out: int
    attn_dim: int  # width inside attention: dim_out when expanding in attention, else dim
    num_heads: int
    stride_q: tuple[int, int, int]
    stride_kv: tuple[int, int, int]
    pool_q: bool
    window: int  # window in tokens of the block's input grid, 0 = global attention
    input_grid: tuple[int, int, int]  # token grid at the training size (sets table sizes)
    drop_path: float
    stage_end: bool = field(default=False)


def _div(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(x // y, 1) for x, y in zip(a, b))


def block_specs(cfg: MViTConfig) -> list[BlockSpec]:
    """Unroll a config into one :class:`BlockSpec` per block (pure function)."""
    h, w = cfg.image_hw
    grid = (
        max(cfg.num_frames // cfg.patch_stride[0], 1),
        h // cfg.patch_stride[1],
        w // cfg.patch_stride[2],
    )
    q_stage_stride = (1, 2, 2)
    kv = tuple(cfg.kv_stride)
    dims = cfg.stage_dims
    specs: list[BlockSpec] = []
    dim = dims[0]
    n = cfg.depth
    idx = 0
    for s, depth in enumerate(cfg.depths):
        if s > 0:
            kv = _div(kv, q_stage_stride)
        heads = cfg.num_heads * 2**s
        window = 0 if cfg.window_size is None else cfg.window_size[s]
        for j in range(depth):
            first = s > 0 and j == 0
            last = j == depth - 1
            stride_q = q_stage_stride if first else (1, 1, 1)
            if cfg.expand_attn:
                dim_out, attn_dim = dims[s], dims[s]
            else:
                dim_out = dims[s + 1] if last and s + 1 < cfg.num_stages else dims[s]
                attn_dim = dim
            stride_kv = kv
            # The window is counted on the block's input grid, so a stage's first (Q-strided)
            # block uses the previous stage's window and its pooled Q gets this stage's.
            block_window = cfg.window_size[s - 1] if first and cfg.window_size else window
            if cfg.window_size is not None and last and s > 0:
                # Hybrid window attention: the last block of stages 2-4 attends globally; those of
                # stages 2 and 3 with a coarser KV grid (detectron2's MViTv2 recipe).
                block_window = 0
                if s < cfg.num_stages - 1:
                    stride_kv = tuple(
                        k * cfg.global_kv_stride_mul if i > 0 else k for i, k in enumerate(kv)
                    )
            specs.append(
                BlockSpec(
                    index=idx,
                    stage=s,
                    dim=dim,
                    dim_out=dim_out,
                    attn_dim=attn_dim,
                    num_heads=heads,
                    stride_q=stride_q,
                    stride_kv=stride_kv,
                    pool_q=cfg.pool_q_every_block or first,
                    window=block_window,
                    input_grid=grid,
                    drop_path=cfg.drop_path_rate * idx / max(n - 1, 1),
                    stage_end=last,
                )
            )
            if first:
                grid = _div(grid, stride_q)
            dim = dim_out
            idx += 1
    return specs
