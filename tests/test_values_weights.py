"""mvitv2.weights.formats by value: checkpoint key conversions checked against names and tensors
written out by hand from the other codebases' module layouts (torchvision's detection heads,
timm's staged blocks, torchvision's video MViT), on tiny synthetic state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork

from mvitv2.weights.formats import (
    convert_detectron2_detector,
    convert_state_dict,
    detect_format,
    migrate,
    to_official,
    unwrap,
)


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
    # the report's wording, as the loader prints it
    moved = "background moved from the last class row to row 0"
    boxes = "box deltas: zero background row(s) added in front (never used)"
    masks = "mask logits: zero background row(s) added in front (never used)"
    assert adapted["roi_heads.box_predictor.cls_score.weight"] == moved
    assert adapted["roi_heads.box_predictors.1.cls_score.bias"] == moved
    assert adapted["roi_heads.box_predictor.bbox_pred.weight"] == boxes
    assert adapted["roi_heads.box_predictor.bbox_pred.bias"] == boxes
    assert adapted["roi_heads.mask_predictor.mask_fcn_logits.weight"] == masks
    assert adapted["roi_heads.mask_predictor.mask_fcn_logits.bias"] == masks
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
    two = convert_detectron2_detector({"roi_heads.mask_head.predictor.weight": _t(2, 2)})[0]
    assert torch.equal(
        two["roi_heads.mask_predictor.mask_fcn_logits.weight"],
        torch.cat([torch.zeros(1, 2), _t(2, 2)]),
    )


# --------------------------------------------------------------------------- key formats
def _conv(ckpt) -> tuple[dict, str, list[str]]:
    return convert_state_dict(ckpt, return_info=True)


def test_timm_stage_blocks_become_flat_blocks_in_stage_order():
    """Block j of stage s is block sum(depths[:s]) + j; keys listed out of order."""
    timm = {
        "patch_embed.proj.weight": _t(2),
        "stages.1.blocks.1.norm1.weight": _t(2, start=1),
        "stages.0.blocks.0.attn.qkv.weight": _t(2, start=2),
        "stages.1.blocks.0.shortcut_proj_attn.weight": _t(2, start=3),
        "stages.2.blocks.0.shortcut_proj_mlp.bias": _t(2, start=4),
        "stages.2.blocks.1.mlp.fc1.weight": _t(2, start=5),
        "stages.2.blocks.2.attn.rel_pos_h": _t(2, start=6),
        "norm.weight": _t(2, start=7),
        "head.fc.weight": _t(2, start=8),
    }
    want = {
        "patch_embed.proj.weight": "patch_embed.proj.weight",
        "stages.1.blocks.1.norm1.weight": "blocks.2.norm1.weight",
        "stages.0.blocks.0.attn.qkv.weight": "blocks.0.attn.qkv.weight",
        "stages.1.blocks.0.shortcut_proj_attn.weight": "blocks.1.proj.weight",
        "stages.2.blocks.0.shortcut_proj_mlp.bias": "blocks.3.proj.bias",
        "stages.2.blocks.1.mlp.fc1.weight": "blocks.4.mlp.fc1.weight",
        "stages.2.blocks.2.attn.rel_pos_h": "blocks.5.attn.rel_pos_h",
        "norm.weight": "norm.weight",
        "head.fc.weight": "head.projection.weight",
    }
    sd, name, notes = _conv({"state_dict": timm})
    assert name == "timm"
    assert notes == ["timm stage depths (1, 2, 3)"]
    assert sd.keys() == set(want.values())
    for src, dst in want.items():
        assert torch.equal(sd[dst], timm[src]), dst


def test_torchvision_names_and_batchless_position_tensors():
    C = 3
    tv = {
        "conv_proj.weight": _t(2),
        "conv_proj.bias": _t(2, start=1),
        "pos_encoding.class_token": _t(C, start=2),
        "pos_encoding.spatial_pos": _t(4, C, start=3),
        "pos_encoding.temporal_pos": _t(2, C, start=4),
        "pos_encoding.class_pos": _t(C, start=5),
        "blocks.0.attn.pool_q.pool.weight": _t(2, start=6),
        "blocks.0.attn.pool_k.norm_act.0.bias": _t(2, start=7),
        "blocks.0.attn.pool_v.norm_act.0.weight": _t(2, start=8),
        "blocks.0.attn.project.0.weight": _t(2, start=9),
        "blocks.0.attn.qkv.weight": _t(2, start=10),
        "blocks.0.mlp.0.weight": _t(2, start=11),
        "blocks.0.mlp.3.bias": _t(2, start=12),
        "blocks.1.project.weight": _t(2, start=13),
        "blocks.1.norm1.weight": _t(2, start=14),
        "head.1.weight": _t(2, start=15),
        "norm.bias": _t(2, start=16),
    }
    renamed = {
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "blocks.0.attn.pool_q.pool.weight": "blocks.0.attn.pool_q.weight",
        "blocks.0.attn.pool_k.norm_act.0.bias": "blocks.0.attn.norm_k.bias",
        "blocks.0.attn.pool_v.norm_act.0.weight": "blocks.0.attn.norm_v.weight",
        "blocks.0.attn.project.0.weight": "blocks.0.attn.proj.weight",
        "blocks.0.attn.qkv.weight": "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.0.weight": "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.3.bias": "blocks.0.mlp.fc2.bias",
        "blocks.1.project.weight": "blocks.1.proj.weight",
        "blocks.1.norm1.weight": "blocks.1.norm1.weight",
        "head.1.weight": "head.projection.weight",
        "norm.bias": "norm.bias",
    }
    sd, name, notes = _conv(tv)
    assert (name, notes) == ("torchvision", [])
    for src, dst in renamed.items():
        assert torch.equal(sd[dst], tv[src]), dst
    assert torch.equal(sd["cls_token"], tv["pos_encoding.class_token"].view(1, 1, C))
    assert torch.equal(sd["pos_embed_class"], tv["pos_encoding.class_pos"].view(1, 1, C))
    assert torch.equal(sd["pos_embed_spatial"], tv["pos_encoding.spatial_pos"].view(1, 4, C))
    assert torch.equal(sd["pos_embed_temporal"], tv["pos_encoding.temporal_pos"].view(1, 2, C))
    assert len(sd) == len(tv)


def test_detectron2_backbone_keeps_the_bottom_up_keys_and_counts_the_rest():
    d2 = {
        "backbone.bottom_up.patch_embed.proj.weight": _t(2),
        "backbone.bottom_up.scale2_norm.weight": _t(2, start=1),
        "backbone.bottom_up.scale5_norm.bias": _t(2, start=2),
        "backbone.bottom_up.blocks.0.attn.qkv.weight": _t(2, start=3),
        "backbone.fpn_lateral2.weight": _t(2),
        "proposal_generator.rpn_head.conv.weight": _t(2),
        "roi_heads.box_head.fc1.weight": _t(2),
    }
    sd, name, notes = _conv({"model": d2, "iteration": 7})
    assert name == "detectron2"
    assert notes == ["detectron2: kept the backbone, ignored 3 detector (FPN/RPN/ROI) keys"]
    want = {
        "patch_embed.proj.weight": d2["backbone.bottom_up.patch_embed.proj.weight"],
        "feature_norms.0.weight": d2["backbone.bottom_up.scale2_norm.weight"],
        "feature_norms.3.bias": d2["backbone.bottom_up.scale5_norm.bias"],
        "blocks.0.attn.qkv.weight": d2["backbone.bottom_up.blocks.0.attn.qkv.weight"],
    }
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], v) for k, v in want.items())


def test_unwrap_takes_the_first_container_strips_wrappers_and_converts_arrays():
    sd = {
        "module.module._orig_mod.blocks.0.w": np.arange(3.0),
        "_orig_mod.x": torch.ones(2),
        "counter": 5,
        "name": "text",
    }
    got, version = unwrap({"model_state": sd, "model": {"y": torch.ones(1)}, "format_version": 1})
    assert version == 1
    assert got.keys() == {"blocks.0.w", "x"}
    assert isinstance(got["blocks.0.w"], torch.Tensor)
    assert torch.equal(got["blocks.0.w"], torch.arange(3.0, dtype=torch.float64))
    # containers in the order model_state, model, state_dict, module
    a, b = {"a": torch.ones(1)}, {"b": torch.ones(1)}
    assert unwrap({"model": a, "state_dict": b})[0].keys() == {"a"}
    assert unwrap({"state_dict": a, "module": b})[0].keys() == {"a"}
    assert unwrap({"epoch": 3, "module": b, "model": {"n": 1}}) == ({"b": b["b"]}, None)
    assert unwrap({"x": torch.ones(1), "format_version": "2"})[1] is None
    with pytest.raises(TypeError, match=r"^a checkpoint must be a dict, got list$"):
        unwrap([torch.ones(1)])
    with pytest.raises(ValueError) as err:
        unwrap({"epoch": 1, "model": {"n": 1}})
    assert str(err.value) == (
        "no state dict found: expected tensors at the top level or under one of "
        "['model_state', 'model', 'state_dict', 'module']; top-level keys are ['epoch', 'model']"
    )


def test_layouts_are_told_apart_by_their_own_keys():
    one = torch.ones(1)
    assert detect_format({"patch_embed.proj.weight": one, "blocks.0.norm1.weight": one}).name == (
        "official"
    )
    assert detect_format({"conv_proj.weight": one, "pos_encoding.class_token": one}).name == (
        "torchvision"
    )
    assert detect_format({"stages.0.blocks.0.x": one, "backbone.bottom_up.y": one}).name == (
        "detectron2"
    )
    for partial in (
        {"patch_embed.proj.weight": one, "blocks.1.norm1.weight": one},  # no block 0
        {"patch_embed.proj.weight": one},
        {"blocks.0.norm1.weight": one},
        {"conv_proj.weight": one},
        {"pos_encoding.class_token": one},
        {"stages.1.blocks.0.x": one},
        {"a.backbone.bottom_up.y": one},
    ):
        with pytest.raises(ValueError) as err:
            detect_format(partial)
        assert str(err.value) == (
            "unrecognised checkpoint layout (known: detectron2, timm, torchvision, official); "
            f"first keys: {sorted(partial)}"
        )


def test_to_official_writes_only_conv_kernels_as_5d():
    sd = {
        "patch_embed.proj.weight": _t(2, 3, 1, 1),
        "blocks.0.attn.pool_q.weight": _t(2, 1, 3, 3),
        "blocks.0.attn.pool_v.weight": _t(2, 1, 1, 3, 3),  # already 5-D
        "blocks.0.attn.pool_k.bias": _t(2),
        "head.projection.weight": _t(2, 2, 1, 1),  # 4-D, not a conv kernel of ours
    }
    out = to_official(sd)
    assert out["format_version"] == 1 and out.keys() == {"model_state", "format_version"}
    got = out["model_state"]
    assert torch.equal(got["patch_embed.proj.weight"], sd["patch_embed.proj.weight"][:, :, None])
    assert torch.equal(
        got["blocks.0.attn.pool_q.weight"], sd["blocks.0.attn.pool_q.weight"][:, :, None]
    )
    for k in ("blocks.0.attn.pool_v.weight", "blocks.0.attn.pool_k.bias", "head.projection.weight"):
        assert torch.equal(got[k], sd[k]) and got[k].shape == sd[k].shape
    flat = to_official(sd, image_kernels_5d=False)["model_state"]
    assert all(flat[k].shape == v.shape for k, v in sd.items())


def test_separate_qkv_rows_are_stacked_q_k_v_with_a_note():
    rows = {n: _t(2, 3, start=10 * i) for i, n in enumerate("qkv")}
    sd = {"patch_embed.proj.weight": _t(1), "blocks.0.norm1.weight": _t(1)}
    for b in (0, 2):
        for n in "qkv":
            sd[f"blocks.{b}.attn.{n}.weight"] = rows[n] + b
            sd[f"blocks.{b}.attn.{n}.bias"] = rows[n][:, 0] - b
    got, name, notes = _conv({"model_state": sd, "cfg": "MVIT:\n  POOL_FIRST: False\n"})
    assert name == "official"
    assert notes == [
        "merged separate attn.q/k/v into attn.qkv in 2 blocks (recorded MVIT.POOL_FIRST=False: exact)"
    ]
    for b in (0, 2):
        w = torch.cat([rows["q"], rows["k"], rows["v"]]) + b
        assert torch.equal(got[f"blocks.{b}.attn.qkv.weight"], w)
        assert torch.equal(got[f"blocks.{b}.attn.qkv.bias"], w[:, 0] - 2 * b)
        assert not any(f"blocks.{b}.attn.{n}." in k for k in got for n in "qkv")
    assert len(got) == 2 + 4
    with pytest.raises(ValueError) as err:
        convert_state_dict({"model_state": sd, "cfg": {"MVIT": {"POOL_FIRST": True}}})
    assert str(err.value) == (
        "the checkpoint was trained with MVIT.POOL_FIRST=True (Q/K/V pooled before their "
        "attn.q/k/v projections); mvitv2 projects before pooling, so these weights cannot be "
        "loaded exactly and are refused. Use weights trained with MVIT.POOL_FIRST=False."
    )
    with pytest.raises(ValueError) as err:
        convert_state_dict(sd)
    assert str(err.value) == (
        "the checkpoint stores separate attn.q/k/v projections but no training config "
        "('cfg' with MVIT.POOL_FIRST) saying whether Q/K/V were projected before pooling "
        "(MVIT.POOL_FIRST=False: loads exactly) or after it (MVIT.POOL_FIRST=True: cannot "
        "be loaded). If it was trained with MVIT.POOL_FIRST=False, pass {'model_state': "
        "state_dict, 'cfg': 'MVIT: {POOL_FIRST: false}'} as the source."
    )
    plain = {"patch_embed.proj.weight": _t(1), "blocks.0.attn.qkv.weight": _t(1)}
    assert _conv(plain) == (plain, "official", [])


def test_migrations_need_an_older_recorded_version():
    sd = {"patch_embed.proj.weight": _t(1), "blocks.0.norm1.weight": _t(1)}
    assert migrate(dict(sd), 1) == sd
    assert convert_state_dict({"model": sd, "format_version": 1}) == sd  # current: unchanged
    with pytest.raises(ValueError) as err:
        migrate(sd, 2)
    assert str(err.value) == (
        "checkpoint format_version 2 is newer than this mvitv2 (1); upgrade mvitv2"
    )
    with pytest.raises(ValueError, match="format_version 5 is newer"):
        convert_state_dict({"model": sd, "format_version": 5})
    # only our own layout records versions: a timm file with one is not migrated
    timm = {"stages.0.blocks.0.norm1.weight": _t(1)}
    assert convert_state_dict({"model": timm, "format_version": 5}).keys() == {
        "blocks.0.norm1.weight"
    }


def test_unwrap_strips_wrappers_in_any_nesting_order():
    # torch.compile(DistributedDataParallel(model)) and DDP(torch.compile(model)) write these
    got, _ = unwrap(
        {"_orig_mod.module.blocks.0.w": torch.ones(1), "module._orig_mod.x": torch.ones(1)}
    )
    assert got.keys() == {"blocks.0.w", "x"}
