"""Parameters and FLOPs (multiply-accumulates) of a detector, per part, on the meta device.

torchvision's detection code has data-dependent steps (anchor matching, NMS, the RoIAlign level
assignment) that cannot run on meta tensors, so the count runs the dense parts on meta inputs of
the right shapes: backbone and FPN on the padded image, the RPN head on every level, the box
head(s) on ``num_proposals`` RoIs and the mask head on ``num_detections`` boxes. RoIAlign, NMS
and anchor decoding are not counted (they are not matmuls or convs; fvcore, which produced the
paper's figures, skips them too).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from mvitv2.detection.backbone import FEATURE_NAMES
from mvitv2.detection.cascade import CascadeRoIHeads
from mvitv2.detection.model import MViTDetector
from mvitv2.utils.flops import count_params, macs_of


def detector_complexity(
    model: MViTDetector,
    image_size: tuple[int, int] = (800, 1333),
    *,
    num_proposals: int = 1000,
    num_detections: int = 100,
) -> dict[str, int]:
    """Parameters and MACs of one image through ``model`` (which may live on the meta device).

    Args:
        model: a detector from :func:`~mvitv2.detection.create_detector`.
        image_size: ``(H, W)`` after resizing; padded up to a multiple of 32 as the model does.
        num_proposals: RoIs per image entering the box head (the RPN's post-NMS top-k at test).
        num_detections: boxes entering the mask head (detections per image).

    Returns:
        ``params`` and ``params_backbone``, and MACs per part (``macs_backbone``, ``macs_fpn``,
        ``macs_rpn``, ``macs_box``, ``macs_mask``) plus their sum ``macs``.
    """
    device = next(model.parameters()).device
    h, w = (math.ceil(s / 32) * 32 for s in image_size)
    x = torch.empty(1, 3, h, w, device=device)
    out: dict[str, int] = {
        "params": count_params(model),
        "params_backbone": count_params(model.backbone.body),
    }
    was_training = model.training
    model.eval()
    try:
        out["macs_backbone"], maps = macs_of(model.backbone.body, x)
        out["macs_fpn"], feats = macs_of(model.backbone.fpn, OrderedDict(zip(FEATURE_NAMES, maps)))
        out["macs_rpn"], _ = macs_of(model.rpn.head, list(feats.values()))
        c = model.backbone.out_channels
        rois = torch.empty(num_proposals, c, 7, 7, device=device)
        heads = model.roi_heads
        if isinstance(heads, CascadeRoIHeads):
            stages: list[tuple[nn.Module, nn.Module]] = list(
                zip(heads.box_heads, heads.box_predictors)
            )
        else:
            stages = [(heads.box_head, heads.box_predictor)]
        out["macs_box"] = sum(macs_of(lambda r, h=hd, p=pr: p(h(r)), rois)[0] for hd, pr in stages)
        out["macs_mask"] = 0
        if heads.has_mask():
            masks_in = torch.empty(num_detections, c, 14, 14, device=device)
            out["macs_mask"], _ = macs_of(
                lambda r: heads.mask_predictor(heads.mask_head(r)), masks_in
            )
    finally:
        model.train(was_training)
    out["macs"] = sum(v for k, v in out.items() if k.startswith("macs_"))
    return out
