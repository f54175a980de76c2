"""Named variants and the public constructor :func:`create_model`."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable

from mvitv2.errors import UnknownKeyError, UnknownOptionError
from mvitv2.models.config import MViTConfig
from mvitv2.models.mvit import MViT
from mvitv2.utils.fields import checked_fields

_VIDEO = dict(
    temporal=True,
    use_cls_token=True,
    patch_kernel=(3, 7, 7),
    patch_stride=(2, 4, 4),
    patch_padding=(1, 3, 3),
    pool_kernel=(3, 3, 3),
    kv_stride=(1, 8, 8),
    head_drop=0.5,
    num_classes=400,
)

#: Every registered variant: name -> config (defaults: image MViTv2 at 224, 1000 classes).
MODEL_CONFIGS: dict[str, MViTConfig] = {
    # ImageNet-1k image models (mean-pooled head, no cls token).
    "mvitv2_tiny": MViTConfig(depths=(1, 2, 5, 2), drop_path_rate=0.1),
    "mvitv2_small": MViTConfig(depths=(1, 2, 11, 2), drop_path_rate=0.1),
    "mvitv2_base": MViTConfig(depths=(2, 3, 16, 3), drop_path_rate=0.3),
    # The released IN-1k MViTv2-L doubles width in the MLP, not in attention.
    "mvitv2_large": MViTConfig(
        depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, expand_attn=False, drop_path_rate=0.5
    ),
    "mvitv2_huge": MViTConfig(depths=(4, 8, 60, 8), embed_dim=192, num_heads=3, drop_path_rate=0.8),
    # ImageNet-21k models: cls token, 19,168 classes.
    "mvitv2_base_cls": MViTConfig(depths=(2, 3, 16, 3), use_cls_token=True, num_classes=19168),
    "mvitv2_large_cls": MViTConfig(
        depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, use_cls_token=True, num_classes=19168
    ),
    "mvitv2_huge_cls": MViTConfig(
        depths=(4, 8, 60, 8), embed_dim=192, num_heads=3, use_cls_token=True, num_classes=19168
    ),
    # Kinetics video models.
    "mvitv2_small_16x4": MViTConfig(
        depths=(1, 2, 11, 2), num_frames=16, drop_path_rate=0.2, **_VIDEO
    ),
    "mvitv2_base_32x3": MViTConfig(
        depths=(2, 3, 16, 3), num_frames=32, drop_path_rate=0.3, **_VIDEO
    ),
    "mvitv2_large_40x3": MViTConfig(
        depths=(2, 6, 36, 4),
        embed_dim=144,
        num_heads=2,
        num_frames=40,
        img_size=312,
        drop_path_rate=0.75,
        **_VIDEO,
    ),
    # MViTv1-B (torchvision's mvit_v1_b): abs pos, no rel-pos, no residual pooling.
    "mvitv1_base_16x4": MViTConfig(
        depths=(1, 2, 11, 2),
        num_frames=16,
        expand_attn=False,
        pool_q_every_block=False,
        use_abs_pos=True,
        use_rel_pos=False,
        residual_pooling=False,
        drop_path_rate=0.2,
        **_VIDEO,
    ),
}


def names_matching(names: Iterable[str], pattern: str) -> list[str]:
    """Sorted ``names`` that match ``pattern``: a shell-style wildcard where it has one of
    ``*?[`` (``"mvitv2*"``, as timm's ``list_models``), else a substring (``"16x4"``)."""
    if any(c in pattern for c in "*?["):
        return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
    return sorted(n for n in names if pattern in n)


def list_models(pattern: str = "") -> list[str]:
    """Names of the registered variants matching ``pattern`` (:func:`names_matching`)."""
    return names_matching(MODEL_CONFIGS, pattern)


def get_config(name: str, **overrides) -> MViTConfig:
    """The config of variant ``name`` with fields replaced by ``overrides``."""
    if name not in MODEL_CONFIGS:
        # A user's mistake in a config or on the command line: one line from the CLI.
        raise UnknownKeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(MViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) for {name}: {unknown}; valid: {sorted(fields)}"
        )
    overrides = checked_fields(MViTConfig, overrides, f"{name} option")
    return dataclasses.replace(MODEL_CONFIGS[name], **overrides)


def create_model(
    name: str,
    *,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    features_only: bool = False,
    **overrides,
) -> MViT:
    """Build a registered MViT variant.

    Args:
        name: a name from :func:`list_models`.
        pretrained: False, True (the variant's default released weights) or a weights tag from
            :func:`mvitv2.weights.list_weights`. Weights come from torch.hub's cache; offline, the
            error says which file to put where.
        num_classes: classifier outputs; when it differs from the pretrained weights' classes, the
            head is re-initialised and everything else loaded.
        features_only: return the four stage maps instead of logits (detection backbones).
        **overrides: any :class:`MViTConfig` field (``depths``, ``embed_dim``, ``img_size``,
            ``num_frames``, ``drop_path_rate``, ``window_size``, ``use_cls_token``, ...).
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = get_config(name, **overrides)
    model = MViT(cfg, features_only=features_only)
    if pretrained:
        from mvitv2.weights import load_pretrained

        load_pretrained(model, name, pretrained)
    return model
