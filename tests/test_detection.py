"""Detectors: registry, sizes vs the paper, training/inference contract of both R-CNN variants."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.detection import (
    CascadeRoIHeads,
    MViTDetector,
    create_detector,
    get_detector_config,
    list_detectors,
)
from mvitv2.detection.flops import detector_complexity
from mvitv2.engine.cli import RECIPES_DIR

SIZES = ("tiny", "small", "base", "large", "huge")
# A detector small enough for a CPU test: 1 block per stage, narrow FPN and heads.
TINY = dict(
    depths=(1, 1, 1, 1),
    embed_dim=16,
    img_size=64,
    fpn_channels=32,
    box_fc_dim=64,
    box_conv_dim=32,
    mask_head_dim=32,
    mask_head_convs=1,
    min_size=96,
    max_size=128,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_post_nms_top_n_train=64,
    rpn_post_nms_top_n_test=32,
    box_batch_size_per_image=32,
)


def _targets(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    out = []
    for im in images:
        h, w = im.shape[-2:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:40, 12:30] = 1
        masks[1, 50:80, 40:90] = 1
        boxes = torch.tensor([[12.0, 10, 30, 40], [40.0, 50, 90, 80]])
        out.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    return out


def test_registry_names_and_paper_settings() -> None:
    names = list_detectors()
    assert names == sorted(
        f"{a}_mvitv2_{s}" for a in ("maskrcnn", "cascade_maskrcnn") for s in SIZES
    )
    drop_path = {"tiny": 0.2, "small": 0.2, "base": 0.4, "large": 0.5, "huge": 0.6}
    for s in SIZES:
        for arch in ("maskrcnn", "cascade_maskrcnn"):
            cfg = get_detector_config(f"{arch}_mvitv2_{s}")
            assert cfg.backbone_overrides["drop_path_rate"] == drop_path[s]
            assert cfg.backbone_overrides["window_size"] == (56, 28, 14, 7)
            assert cfg.fpn_channels == 256
    cascade = get_detector_config("cascade_maskrcnn_mvitv2_tiny")
    assert cascade.cascade_ious == (0.5, 0.6, 0.7)
    assert cascade.cascade_weights == ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))
    assert (cascade.box_head, cascade.head_norm) == ("4conv1fc", "BN")


def test_overrides_are_validated() -> None:
    with pytest.raises(KeyError, match="unknown detector"):
        create_detector("maskrcnn_mvitv2_tinyy", num_classes=3)
    with pytest.raises(TypeError, match="no_such_option"):
        get_detector_config("maskrcnn_mvitv2_tiny", no_such_option=1)
    with pytest.raises(ValueError, match="box_head"):
        get_detector_config("maskrcnn_mvitv2_tiny", box_head="3conv")
    with pytest.raises(ValueError, match="norm"):
        get_detector_config("maskrcnn_mvitv2_tiny", head_norm="XN")
    with pytest.raises(ValueError, match="num_classes"):
        create_detector("maskrcnn_mvitv2_tiny", num_classes=0, **TINY)
    # Backbone fields go to the backbone, detector fields to the detector.
    cfg = get_detector_config("maskrcnn_mvitv2_tiny", depths=[1, 1, 1, 1], fpn_channels=32)
    assert cfg.backbone_overrides["depths"] == (1, 1, 1, 1)
    assert cfg.backbone_overrides["window_size"] == (56, 28, 14, 7)
    assert cfg.fpn_channels == 32


def test_public_entry_point() -> None:
    model = mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **TINY)
    assert isinstance(model, MViTDetector)
    assert model.num_classes == 3
    assert all(n.startswith("backbone.body.") and "rel_pos" in n for n in model.no_weight_decay())
    assert model.no_weight_decay()


@pytest.mark.parametrize(("name", "params_m", "gflops"), [("maskrcnn_mvitv2_tiny", 44.0, 279.0)])
def test_size_matches_paper(name: str, params_m: float, gflops: float) -> None:
    """Paper: Mask R-CNN + MViTv2-T has 44 M parameters and 279 GFLOPs (COCO, 80 classes)."""
    with torch.device("meta"):
        model = create_detector(name, num_classes=80)
    r = detector_complexity(model, (800, 1333))
    assert r["params"] / 1e6 == pytest.approx(params_m, rel=0.02)
    # The paper counted real val images (fewer than 100 masks each, no padding to 1344): ~3% less.
    assert r["macs"] / 1e9 == pytest.approx(gflops, rel=0.05)
    assert r["macs_backbone"] + r["macs_fpn"] + r["macs_rpn"] < r["macs"]


def test_cascade_has_three_agnostic_stages() -> None:
    model = create_detector("cascade_maskrcnn_mvitv2_tiny", num_classes=5, **TINY)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert [p.bbox_pred.out_features for p in heads.box_predictors] == [4, 4, 4]
    assert [p.cls_score.out_features for p in heads.box_predictors] == [6, 6, 6]
    assert [m.high_threshold for m in heads.stage_matchers] == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.stage_coders] == [
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    ]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in heads.box_heads[0].modules())


@pytest.mark.parametrize("name", ["maskrcnn_mvitv2_tiny", "cascade_maskrcnn_mvitv2_tiny"])
def test_train_step_and_inference(name: str) -> None:
    torch.manual_seed(0)
    model = create_detector(name, num_classes=4, **TINY)
    # Non-square, not multiples of 32: the model resizes and pads.
    images = [torch.rand(3, 100, 120), torch.rand(3, 96, 90)]
    model.train()
    losses = model(images, _targets(images))
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(images)
    for im, det in zip(images, out):
        n = len(det["boxes"])
        assert det["masks"].shape == (n, 1, *im.shape[-2:])
        assert det["scores"].shape == det["labels"].shape == (n,)
        if n:
            assert det["labels"].min() >= 1 and det["labels"].max() <= 4
            assert (det["boxes"][:, 2:] <= torch.tensor([im.shape[2], im.shape[1]])).all()
            assert (det["scores"] >= model.config.score_thresh).all()


def test_shipped_recipes_build() -> None:
    """Every detection recipe parses and names a detector with valid options."""

    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.detect import DetectionDataConfig

    recipes = sorted(RECIPES_DIR.glob("coco_*.yaml"))
    recipes.append(RECIPES_DIR / "digit_scenes.yaml")
    assert len(recipes) >= 3
    for path in recipes:
        cfg = TrainConfig.load(path)
        get_detector_config(cfg.model, **cfg.model_args)
        DetectionDataConfig.from_dict(cfg.data)
