"""detector_complexity by value: each part's multiply-accumulates against counts written out by
hand from the layer shapes (FPN, RPN, box and mask heads) or torch's own FlopCounterMode (the
MViT trunk), on a small detector built on the meta device."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mvitv2.detection import create_detector
from mvitv2.detection.flops import detector_complexity

# Trunk widths 16/32/64/128 at strides 4/8/16/32; FPN, box and mask heads 32 wide; 3 classes.
SMALL = dict(depths=(1, 1, 1, 1), embed_dim=16, img_size=64, anchor_sizes=(8, 16, 32, 64, 128))
HEADS = dict(fpn_channels=32, box_fc_dim=64, box_conv_dim=32, mask_head_dim=32, mask_head_convs=1)
C = 32
# (100, 130) is padded to (128, 160): P2-P5 maps of 32x40, 16x20, 8x10, 4x5 and P6 (max-pool
# of P5 with stride 2) of 2x3.
LEVELS = [(32 * 40, 16), (16 * 20, 32), (8 * 10, 64), (4 * 5, 128)]
FPN = sum(n * cin * C for n, cin in LEVELS) + sum(n for n, _ in LEVELS) * C * C * 9
RPN_POSITIONS = sum(n for n, _ in LEVELS) + 2 * 3
RPN_OUT = C * 3 + C * 4 * 3  # objectness and 4 deltas for each of the 3 anchors
# Mask head: one 3x3 conv at 14x14, a 2x2 stride-2 deconv to 28x28, a 1x1 conv to 4 classes.
MASK = 14 * 14 * C * C * 9 + 14 * 14 * C * C * 4 + 28 * 28 * C * 4


def _detector(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return create_detector(name, num_classes=3, **SMALL, **HEADS, **kw)


def _trunk_macs(model) -> int:
    """torch's FlopCounterMode (FLOPs = 2 x MACs) around the trunk on one 128x160 image."""
    with FlopCounterMode(display=False) as counter:
        model.backbone.body(torch.empty(1, 3, 128, 160, device="meta"))
    return counter.get_total_flops() // 2


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for _, p in module.named_parameters())


def test_mask_rcnn_complexity_is_the_sum_of_its_parts_at_1000_rois_and_100_masks():
    """Mask R-CNN (2fc box head, class-specific deltas): the defaults are the test-time 1000
    RoIs and 100 detections; a model in training mode is left in it."""
    model = _detector("maskrcnn_mvitv2_tiny").train()
    got = detector_complexity(model, (100, 130))
    assert model.training
    box = C * 49 * 64 + 64 * 64 + 64 * 4 + 64 * 4 * 4  # fc6, fc7, scores, deltas per class
    want = {
        "params": _params(model),
        "params_backbone": _params(model.backbone.body),
        "macs_backbone": _trunk_macs(model),
        "macs_fpn": FPN,
        "macs_rpn": RPN_POSITIONS * (C * C * 9 + RPN_OUT),
        "macs_box": 1000 * box,
        "macs_mask": 100 * MASK,
    }
    want["macs"] = sum(v for k, v in want.items() if k.startswith("macs_"))
    assert got == want


def test_cascade_complexity_counts_each_stages_box_head_and_the_given_roi_numbers():
    """Cascade: three 4conv1fc stages with class-agnostic deltas, a two-conv RPN head; the RoI
    and detection counts scale the box and mask heads only."""
    model = _detector("cascade_maskrcnn_mvitv2_tiny")
    got = detector_complexity(model, (100, 130), num_proposals=7, num_detections=5)
    stage = 49 * C * C * 9 * 4 + C * 49 * 64 + 64 * 4 + 64 * 4
    macs = {
        "macs_backbone": _trunk_macs(model),
        "macs_fpn": FPN,
        "macs_rpn": RPN_POSITIONS * (2 * C * C * 9 + RPN_OUT),
        "macs_box": 7 * 3 * stage,
        "macs_mask": 5 * MASK,
    }
    assert {k: got[k] for k in macs} == macs
    assert got["macs"] == sum(macs.values())
    assert got["params"] == _params(model)
    assert got["params_backbone"] == _params(model.backbone.body)


def test_a_detector_without_masks_counts_no_mask_head_and_stays_in_eval_mode():
    model = _detector("maskrcnn_mvitv2_tiny", mask=False).eval()
    got = detector_complexity(model, (128, 160), num_proposals=2)
    assert not model.training
    assert got["macs_mask"] == 0
    assert got["macs_box"] == 2 * (C * 49 * 64 + 64 * 64 + 64 * 4 + 64 * 4 * 4)
    parts = ("macs_backbone", "macs_fpn", "macs_rpn", "macs_box")
    assert got["macs"] == sum(got[k] for k in parts)
