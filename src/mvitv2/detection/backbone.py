"""MViT backbone + FPN for the R-CNN detectors, and the channel-norm factory the heads share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mvitv2.errors import UserValueError
from mvitv2.models.mvit import MViT

#: Names of the FPN outputs P2-P5 (``LastLevelMaxPool`` appends ``"pool"``, i.e. P6).
FEATURE_NAMES = ("p2", "p3", "p4", "p5")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map at every position (detectron2's ``"LN"``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm_layer(kind: str) -> Callable[[int], nn.Module] | None:
    """A constructor ``f(channels) -> module`` for a conv norm, as detectron2's ``norm`` option.

    Args:
        kind: ``""`` (no norm, convs keep their bias), ``"BN"`` (BatchNorm2d; convert to
            SyncBatchNorm for DDP), ``"GN"`` (GroupNorm with 32 groups) or ``"LN"`` (channel
            LayerNorm, eps 1e-6).
    """
    kinds: dict[str, Callable[[int], nn.Module] | None] = {
        "": None,
        "BN": nn.BatchNorm2d,
        "GN": lambda c: nn.GroupNorm(32, c),
        "LN": lambda c: LayerNorm2d(c, eps=1e-6),
    }
    if kind not in kinds:
        raise UserValueError(f"unknown norm {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind]


class MViTFPN(nn.Module):
    """MViT stage maps (strides 4-32, each after its own LayerNorm) -> FPN P2-P6.

    Args:
        body: an ``MViT`` built with ``features_only=True``.
        out_channels: FPN width (256 in the paper).
        norm: FPN conv norm (see :func:`norm_layer`); detectron2's MViTv2 configs use none.

    ``forward`` takes a normalised ``(B, 3, H, W)`` batch with H, W multiples of 32 and returns an
    ordered dict ``p2, p3, p4, p5, pool`` of ``(B, out_channels, H/s, W/s)`` maps.
    """

    def __init__(self, body: MViT, out_channels: int = 256, norm: str = "") -> None:
        super().__init__()
        if not body.features_only:
            raise ValueError("MViTFPN needs an MViT built with features_only=True")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_channels),
            out_channels,
            extra_blocks=LastLevelMaxPool(),
            norm_layer=norm_layer(norm),
        )
        self.out_channels = out_channels
        self.strides = [*body.feature_strides, body.feature_strides[-1] * 2]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict(zip(FEATURE_NAMES, self.body(x))))
