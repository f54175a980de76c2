"""mvitv2.weights.formats by value: checkpoint key conversions checked against names and tensors
written out by hand from the other codebases' module layouts (torchvision's detection heads,
timm's staged blocks, torchvision's video MViT), on tiny synthetic state dicts."""

from __future__ import annotations

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork

from mvitv2.weights.formats import convert_detectron2_detector


def _t(*shape: int, start: float = 0.0) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(start, start + n, dtype=torch.float32).reshape(shape)


def test_detectron2_detector_keys_land_on_torchvision_module_names():
    """Every detectron2 rule, with conv keys listed out of order, a cascade stage without convs,
    and keys no rule knows; each expected name exists in the torchvision module it belongs to."""
    K = 3  # classes (detectron2: background is the last cls_score row)
    d2 = {
        "backbone.bottom_up.patch_embed.proj.weight": _t(2),
        "backbone.bottom_up.scale3_norm.weight": _t(2, start=1),
        "backbone.fpn_lateral3.weight": _t(2, start=2),
        "backbone.fpn_lateral2.norm.bias": _t(2, start=3),
        "backbone.fpn_output5.weight": _t(2, start=4),
        "backbone.fpn_output4.norm.weight": _t(2, start=5),
        "proposal_generator.rpn_head.conv.weight": _t(2, start=6),
        "proposal_generator.rpn_head.conv.conv1.bias": _t(2, start=7),
        "proposal_generator.rpn_head.objectness_logits.weight": _t(2, start=8),
        "proposal_generator.rpn_head.anchor_deltas.bias": _t(2, start=9),
        "proposal_generator.anchor_generator.cell_anchors.0": _t(3, 4),
        "pixel_mean": _t(3),
        "pixel_std": _t(3),
        # single-stage head: 2 convs (conv2 listed first), 2 fcs
        "roi_heads.box_head.conv2.weight": _t(2, start=10),
        "roi_heads.box_head.conv1.norm.weight": _t(2, start=11),
        "roi_heads.box_head.fc1.weight": _t(2, start=12),
        "roi_heads.box_head.fc2.bias": _t(2, start=13),
        "roi_heads.box_head.pool.weight": _t(1),
        # cascade stage 1: fcs only
        "roi_heads.box_head.1.fc1.weight": _t(2, start=14),
        "roi_heads.box_head.1.fc2.weight": _t(2, start=15),
        "roi_heads.box_predictor.cls_score.weight": _t(K + 1, 2),
        "roi_heads.box_predictor.cls_score.bias": _t(K + 1, start=20),
        "roi_heads.box_predictor.bbox_pred.weight": _t(4 * K, 2, start=30),
        "roi_heads.box_predictor.bbox_pred.bias": _t(4 * K, start=60),
        "roi_heads.box_predictor.1.cls_score.bias": _t(K + 1, start=80),
        "roi_heads.box_predictor.1.bbox_pred.bias": _t(4, start=90),
        "roi_heads.mask_head.mask_fcn2.weight": _t(2, start=100),
        "roi_heads.mask_head.mask_fcn1.norm.bias": _t(2, start=101),
        "roi_heads.mask_head.deconv.weight": _t(2, start=102),
        "roi_heads.mask_head.predictor.weight": _t(K, 2, start=110),
        "roi_heads.mask_head.predictor.bias": _t(K, start=120),
        "roi_heads.keypoint_head.conv_fcn1.weight": _t(1),
    }
    out, adapted, not_loaded, unknown = convert_detectron2_detector(d2)
    # torchvision's layouts (convs at 0..n-1 with norm at .1, Flatten, then fc/ReLU pairs)
    bn = torch.nn.BatchNorm2d
    tv = {
        "rpn.head.": RPNHead(2, 3, conv_depth=2),
        "backbone.fpn.": FeaturePyramidNetwork([2] * 4, 2, norm_layer=bn),
        "roi_heads.box_head.": FastRCNNConvFCHead((2, 7, 7), [2, 2], [2, 2], norm_layer=bn),
        "roi_heads.box_heads.1.": FastRCNNConvFCHead((2, 7, 7), [], [2, 2]),
        "roi_heads.mask_head.": MaskRCNNHeads(2, [2, 2], 1, norm_layer=bn),
        "roi_heads.mask_predictor.": MaskRCNNPredictor(2, 2, K + 1),
    }
    renamed = {
        "backbone.bottom_up.patch_embed.proj.weight": "backbone.body.patch_embed.proj.weight",
        "backbone.bottom_up.scale3_norm.weight": "backbone.body.feature_norms.1.weight",
        "backbone.fpn_lateral3.weight": "backbone.fpn.inner_blocks.1.0.weight",
        "backbone.fpn_lateral2.norm.bias": "backbone.fpn.inner_blocks.0.1.bias",
        "backbone.fpn_output5.weight": "backbone.fpn.layer_blocks.3.0.weight",
        "backbone.fpn_output4.norm.weight": "backbone.fpn.layer_blocks.2.1.weight",
        "proposal_generator.rpn_head.conv.weight": "rpn.head.conv.0.0.weight",
        "proposal_generator.rpn_head.conv.conv1.bias": "rpn.head.conv.1.0.bias",
        "proposal_generator.rpn_head.objectness_logits.weight": "rpn.head.cls_logits.weight",
        "proposal_generator.rpn_head.anchor_deltas.bias": "rpn.head.bbox_pred.bias",
        "roi_heads.box_head.conv2.weight": "roi_heads.box_head.1.0.weight",
        "roi_heads.box_head.conv1.norm.weight": "roi_heads.box_head.0.1.weight",
        "roi_heads.box_head.fc1.weight": "roi_heads.box_head.3.weight",
        "roi_heads.box_head.fc2.bias": "roi_heads.box_head.5.bias",
        "roi_heads.box_head.1.fc1.weight": "roi_heads.box_heads.1.1.weight",
        "roi_heads.box_head.1.fc2.weight": "roi_heads.box_heads.1.3.weight",
        "roi_heads.mask_head.mask_fcn2.weight": "roi_heads.mask_head.1.0.weight",
        "roi_heads.mask_head.mask_fcn1.norm.bias": "roi_heads.mask_head.0.1.bias",
        "roi_heads.mask_head.deconv.weight": "roi_heads.mask_predictor.conv5_mask.weight",
    }
    for src, dst in renamed.items():
        assert torch.equal(out[dst], d2[src]), dst
        prefix = next((p for p in tv if dst.startswith(p)), None)
        if prefix is not None:
            assert dst[len(prefix) :] in tv[prefix].state_dict(), dst

    # background: last cls_score row -> row 0; class-specific boxes and masks get zero rows first
    rot = [K, *range(K)]
    assert torch.equal(
        out["roi_heads.box_predictor.cls_score.weight"],
        d2["roi_heads.box_predictor.cls_score.weight"][rot],
    )
    assert torch.equal(
        out["roi_heads.box_predictor.cls_score.bias"],
        d2["roi_heads.box_predictor.cls_score.bias"][rot],
    )
    assert torch.equal(
        out["roi_heads.box_predictors.1.cls_score.bias"],
        d2["roi_heads.box_predictor.1.cls_score.bias"][rot],
    )
    box_w = out["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(
        box_w, torch.cat([torch.zeros(4, 2), d2["roi_heads.box_predictor.bbox_pred.weight"]])
    )
    box_b = out["roi_heads.box_predictor.bbox_pred.bias"]
    assert torch.equal(
        box_b, torch.cat([torch.zeros(4), d2["roi_heads.box_predictor.bbox_pred.bias"]])
    )
    # cascade stages are class-agnostic: 4 rows, unchanged
    assert torch.equal(
        out["roi_heads.box_predictors.1.bbox_pred.bias"],
        d2["roi_heads.box_predictor.1.bbox_pred.bias"],
    )
    mask_w = out["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(
        mask_w, torch.cat([torch.zeros(1, 2), d2["roi_heads.mask_head.predictor.weight"]])
    )
    mask_b = out["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(
        mask_b, torch.cat([torch.zeros(1), d2["roi_heads.mask_head.predictor.bias"]])
    )
    predictor = MaskRCNNPredictor(2, 2, K + 1).state_dict()
    assert mask_w.shape[0] == predictor["mask_fcn_logits.weight"].shape[0]

    assert set(adapted) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictors.1.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
    }
    assert set(not_loaded) == {
        "proposal_generator.anchor_generator.cell_anchors.0",
        "pixel_mean",
        "pixel_std",
    }
    assert "anchors" in not_loaded["proposal_generator.anchor_generator.cell_anchors.0"]
    assert "normalisation" in not_loaded["pixel_mean"] == not_loaded["pixel_std"]
    assert all("background" in why for why in adapted.values())
    assert sorted(unknown) == [
        "roi_heads.box_head.pool.weight",
        "roi_heads.keypoint_head.conv_fcn1.weight",
    ]
    assert len(out) == len(d2) - len(not_loaded) - len(unknown)


def test_detectron2_class_agnostic_masks_and_boxes_get_no_background_rows():
    d2 = {
        "roi_heads.box_predictor.cls_score.bias": _t(3),
        "roi_heads.box_predictor.bbox_pred.weight": _t(4, 2),  # agnostic: 4 rows
        "roi_heads.mask_head.predictor.weight": _t(1, 2),  # agnostic mask
    }
    out, adapted, _, _ = convert_detectron2_detector(d2)
    assert torch.equal(
        out["roi_heads.box_predictor.bbox_pred.weight"],
        d2["roi_heads.box_predictor.bbox_pred.weight"],
    )
    assert torch.equal(
        out["roi_heads.mask_predictor.mask_fcn_logits.weight"],
        d2["roi_heads.mask_head.predictor.weight"],
    )
    assert set(adapted) == {"roi_heads.box_predictor.cls_score.bias"}
    assert torch.equal(out["roi_heads.box_predictor.cls_score.bias"], torch.tensor([2.0, 0.0, 1.0]))
