"""Mask R-CNN and Cascade Mask R-CNN with an MViTv2 + FPN backbone, built from torchvision parts.

``backbone (MViT, hybrid window attention) -> FPN P2-P6 -> RPN -> RoI heads (box, mask)``, wrapped
in torchvision's ``GeneralizedRCNN`` (image normalisation, resizing, batching with padding to a
multiple of 32, and pasting masks back into the original image).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead

from mvitv2.detection.backbone import FEATURE_NAMES, MViTFPN, norm_layer
from mvitv2.detection.cascade import AgnosticBoxPredictor, CascadeRoIHeads
from mvitv2.detection.components import (
    DetectionTransform,
    FastRCNNRoIHeads,
    GridAnchorGenerator,
    LevelRoIAlign,
    ProposalNetwork,
)
from mvitv2.errors import UnknownKeyError, UnknownOptionError, UserValueError
from mvitv2.models.config import MViTConfig
from mvitv2.models.registry import create_model, names_matching
from mvitv2.ops import convert_linears
from mvitv2.utils.fields import checked_fields

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything but the backbone architecture of a detector (defaults: detectron2's values).

    Args:
        backbone: registered MViT variant (see ``mvitv2.list_models``).
        backbone_overrides: :class:`~mvitv2.models.MViTConfig` fields for the backbone (windows,
            drop path, and for tests ``depths``/``embed_dim``/...).
        cascade: three-stage Cascade R-CNN box heads instead of one Fast R-CNN head.
        fpn_channels: FPN width. fpn_norm: FPN conv norm (``""``, ``"BN"``, ``"GN"``, ``"LN"``).
        anchor_sizes: one anchor size per level P2-P6 (pixels). aspect_ratios: per location.
        rpn_conv_depth: 3x3 convs in the RPN head (detectron2: 1 for Mask R-CNN, 2 for Cascade).
        rpn_pre_nms_top_n_train/test: proposals kept per level before NMS.
        rpn_post_nms_top_n_train/test: proposals kept per image after NMS.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
        rpn_nms_thresh: RPN NMS IoU.
        box_head: ``"2fc"`` (Mask R-CNN default) or ``"4conv1fc"`` (Cascade default); any
            ``"<n>conv<m>fc"``.
        head_norm: norm of the box/mask head convs (see :func:`~mvitv2.detection.backbone.norm_layer`).
        box_conv_dim, box_fc_dim: widths of the box head convs and fcs.
        box_batch_size_per_image, box_positive_fraction: RoI sampling for the box loss.
        box_fg_iou: foreground IoU of the (single) Fast R-CNN head.
        cascade_ious, cascade_weights: per-stage IoU thresholds and box-coder weights.
        score_thresh, nms_thresh, detections_per_img: test-time filtering.
        mask: build the mask branch. mask_head_dim, mask_head_convs: its 3x3 convs.
        min_size, max_size: test-time resize (shorter side, longer-side cap).
        train_min_size: shorter sides to choose from at random in training; None trains on the
            images as the data pipeline resized them (multi-scale / LSJ there).
        image_mean, image_std: input normalisation of ``[0, 1]`` RGB images.
    """

    backbone: str = "mvitv2_tiny"
    backbone_overrides: Mapping[str, Any] = field(default_factory=dict)
    cascade: bool = False
    fpn_channels: int = 256
    fpn_norm: str = ""
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_conv_depth: int = 1
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    rpn_nms_thresh: float = 0.7
    box_head: str = "2fc"
    head_norm: str = ""
    box_conv_dim: int = 256
    box_fc_dim: int = 1024
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_fg_iou: float = 0.5
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_weights: tuple[tuple[float, ...], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask: bool = True
    mask_head_dim: int = 256
    mask_head_convs: int = 4
    min_size: int = 800
    max_size: int = 1333
    train_min_size: tuple[int, ...] | None = None
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.anchor_sizes) != len(FEATURE_NAMES) + 1:
            raise UserValueError(
                f"anchor_sizes needs one size per level P2-P6, got {self.anchor_sizes}"
            )
        _parse_box_head(self.box_head)
        norm_layer(self.fpn_norm)
        norm_layer(self.head_norm)


def _parse_box_head(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)conv(\d+)fc|(\d+)fc", spec)
    if m is None:
        raise UserValueError(f"box_head must look like '2fc' or '4conv1fc', got {spec!r}")
    if m.group(3) is not None:
        return 0, int(m.group(3))
    return int(m.group(1)), int(m.group(2))


# Backbone variant and detection drop path per size (design doc section 4). The windows are 56,
# 28, 14, 7 tokens of the stage grids; the last block of stages 2-4 attends globally.
_SIZES = {
    "tiny": ("mvitv2_tiny", 0.2, {}),
    "small": ("mvitv2_small", 0.2, {}),
    "base": ("mvitv2_base", 0.4, {}),
    # detectron2's L and H expand width inside attention (their IN-21k checkpoints); pass
    # expand_attn=False to start from the IN-1k MViTv2-L checkpoint instead.
    "large": ("mvitv2_large", 0.5, {"expand_attn": True}),
    "huge": ("mvitv2_huge", 0.6, {}),
}
WINDOWS = (56, 28, 14, 7)


def _variants() -> dict[str, DetectorConfig]:
    out = {}
    for size, (backbone, dpr, extra) in _SIZES.items():
        bb = {"window_size": WINDOWS, "drop_path_rate": dpr, **extra}
        out[f"maskrcnn_mvitv2_{size}"] = DetectorConfig(backbone=backbone, backbone_overrides=bb)
        # detectron2's cascade_mask_rcnn_mvitv2_*: 4conv1fc box heads and mask head with BN
        # (NaiveSyncBatchNorm there), 2-conv RPN head.
        out[f"cascade_maskrcnn_mvitv2_{size}"] = DetectorConfig(
            backbone=backbone,
            backbone_overrides=bb,
            cascade=True,
            box_head="4conv1fc",
            head_norm="BN",
            rpn_conv_depth=2,
        )
    return out


#: Registered detectors: name -> config.
DETECTOR_CONFIGS: dict[str, DetectorConfig] = _variants()


def list_detectors(pattern: str = "") -> list[str]:
    """Names of the registered detectors matching ``pattern`` (a wildcard or a substring)."""
    return names_matching(DETECTOR_CONFIGS, pattern)


def get_detector_config(name: str, **overrides: Any) -> DetectorConfig:
    """The config of detector ``name`` with overrides applied.

    Keys that are :class:`DetectorConfig` fields replace those; any other key must be an
    :class:`~mvitv2.models.MViTConfig` field and is merged into ``backbone_overrides``.
    """
    if name not in DETECTOR_CONFIGS:
        # A user's mistake (`train detect model=...`): one line from the CLI, still a KeyError.
        raise UnknownKeyError(
            f"unknown detector {name!r}; available: {', '.join(list_detectors())}"
        )
    det_fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    mvit_fields = {f.name for f in dataclasses.fields(MViTConfig)}
    unknown = sorted(set(overrides) - det_fields - mvit_fields)
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) for {name}: {unknown}; detector options: {sorted(det_fields)}; "
            "backbone options: any MViTConfig field"
        )
    base = DETECTOR_CONFIGS[name]
    # checked_fields turns lists into tuples, nested ones too, by the fields' types
    det = {k: v for k, v in overrides.items() if k in det_fields}
    det = checked_fields(DetectorConfig, det, f"{name} option")
    bb = {k: _tuplify(v) for k, v in overrides.items() if k not in det_fields}
    det["backbone_overrides"] = {
        **base.backbone_overrides,
        **dict(det.get("backbone_overrides", {})),
        **bb,
    }
    return dataclasses.replace(base, **det)


def _tuplify(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


class MViTDetector(GeneralizedRCNN):
    """Mask R-CNN / Cascade Mask R-CNN on an MViT + FPN backbone (torchvision's calling contract).

    ``model(images, targets)`` in training mode returns a dict of losses; in eval mode
    ``model(images)`` returns one dict per image with ``boxes`` (x1, y1, x2, y2 in input pixels),
    ``labels`` (1..num_classes), ``scores`` and ``masks`` (``(N, 1, H, W)`` probabilities;
    ``>= 0.5`` is detectron2's binary mask). ``images`` is a list of ``(3, H, W)`` RGB tensors,
    float in ``[0, 1]`` or uint8 (resized with PIL, as detectron2's data loader does); targets
    hold ``boxes``, ``labels`` (int64, 1..num_classes) and ``masks`` (``(N, H, W)`` uint8).
    Inference computes what detectron2 computes (:mod:`mvitv2.detection.components`).

    Build it with :func:`create_detector`.
    """

    def __init__(self, config: DetectorConfig, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(
                f"num_classes must be >= 1 (object classes, no background), got {num_classes}"
            )
        cfg = config
        body = create_model(cfg.backbone, features_only=True, **dict(cfg.backbone_overrides))
        backbone = MViTFPN(body, cfg.fpn_channels, cfg.fpn_norm)
        c = cfg.fpn_channels

        anchors = GridAnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios, backbone.strides)
        rpn = ProposalNetwork(
            anchors,
            RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=cfg.rpn_conv_depth),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n={
                "training": cfg.rpn_pre_nms_top_n_train,
                "testing": cfg.rpn_pre_nms_top_n_test,
            },
            post_nms_top_n={
                "training": cfg.rpn_post_nms_top_n_train,
                "testing": cfg.rpn_post_nms_top_n_test,
            },
            nms_thresh=cfg.rpn_nms_thresh,
        )

        n_convs, n_fcs = _parse_box_head(cfg.box_head)
        head_norm = norm_layer(cfg.head_norm)

        def box_head() -> nn.Module:
            return FastRCNNConvFCHead(
                (c, 7, 7), [cfg.box_conv_dim] * n_convs, [cfg.box_fc_dim] * n_fcs, head_norm
            )

        strides = backbone.strides[: len(FEATURE_NAMES)]  # P2-P5 (P6 only feeds the RPN)
        box_pool = LevelRoIAlign(FEATURE_NAMES, 7, strides)
        mask_parts: dict[str, nn.Module | None] = {}
        if cfg.mask:
            dims = [cfg.mask_head_dim] * cfg.mask_head_convs
            mask_parts = {
                "mask_roi_pool": LevelRoIAlign(FEATURE_NAMES, 14, strides),
                "mask_head": MaskRCNNHeads(c, dims, 1, head_norm),
                "mask_predictor": MaskRCNNPredictor(
                    dims[-1] if dims else c, cfg.mask_head_dim, num_classes + 1
                ),
            }
        if cfg.cascade:
            n = len(cfg.cascade_ious)
            roi_heads: RoIHeads = CascadeRoIHeads(
                box_roi_pool=box_pool,
                box_heads=[box_head() for _ in range(n)],
                box_predictors=[
                    AgnosticBoxPredictor(cfg.box_fc_dim, num_classes + 1) for _ in range(n)
                ],
                stage_ious=cfg.cascade_ious,
                stage_weights=cfg.cascade_weights,
                batch_size_per_image=cfg.box_batch_size_per_image,
                positive_fraction=cfg.box_positive_fraction,
                score_thresh=cfg.score_thresh,
                nms_thresh=cfg.nms_thresh,
                detections_per_img=cfg.detections_per_img,
                **mask_parts,
            )
        else:
            roi_heads = FastRCNNRoIHeads(
                box_pool,
                box_head(),
                FastRCNNPredictor(cfg.box_fc_dim, num_classes + 1),
                cfg.box_fg_iou,
                cfg.box_fg_iou,
                cfg.box_batch_size_per_image,
                cfg.box_positive_fraction,
                None,  # (10, 10, 5, 5)
                cfg.score_thresh,
                cfg.nms_thresh,
                cfg.detections_per_img,
                **mask_parts,
            )
        transform = DetectionTransform(
            cfg.train_min_size,
            cfg.min_size,
            cfg.max_size,
            cfg.image_mean,
            cfg.image_std,
            size_divisible=backbone.strides[len(FEATURE_NAMES) - 1],
        )
        # torchvision's box heads and predictors: their linears on our GEMM backend too.
        super().__init__(backbone, rpn, convert_linears(roi_heads), transform)
        self.config = cfg
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        """The backbone's rel-pos tables: the ``pos`` kind of ``TrainConfig.wd_exempt``."""
        return {f"backbone.body.{n}" for n in self.backbone.body.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone block activations in backward."""
        self.backbone.body.set_grad_checkpointing(enable)


def has_mask_branch(model: nn.Module) -> bool:
    """Whether ``model`` predicts masks: a box-only detector (``mask=False``) has none to score."""
    return bool(model.roi_heads.has_mask())


def create_detector(
    name: str,
    *,
    num_classes: int,
    backbone_weights: str | bool | None = None,
    strict: bool = True,
    **overrides: Any,
) -> MViTDetector:
    """Build a registered detector.

    Args:
        name: ``maskrcnn_mvitv2_{tiny,small,base,large,huge}`` or
            ``cascade_maskrcnn_mvitv2_{...}`` (see :func:`list_detectors`).
        num_classes: object classes (background excluded); labels are 1..num_classes.
        backbone_weights: an image checkpoint to initialise the backbone from (a file or URL in
            any format ``mvitv2.load_checkpoint`` reads, a weights tag, or True for the backbone's
            default weights); its classifier and final norm are skipped and the per-stage feature
            norms keep their fresh initialisation.
        strict: fail when backbone keys are missing from the checkpoint.
        **overrides: :class:`DetectorConfig` fields (``fpn_channels``, ``min_size``,
            ``anchor_sizes``, ``box_head``, ...) and backbone :class:`~mvitv2.models.MViTConfig`
            fields (``depths``, ``embed_dim``, ``window_size``, ``drop_path_rate``, ...).
    """
    model = MViTDetector(get_detector_config(name, **overrides), num_classes)
    if backbone_weights:
        load_backbone_weights(model, backbone_weights, strict=strict)
    return model


def load_backbone_weights(model: MViTDetector, source: str | bool, *, strict: bool = True) -> Any:
    """Initialise ``model``'s MViT from an image checkpoint.

    Args:
        model: the detector.
        source: a checkpoint file / URL any format ``mvitv2.load_checkpoint`` reads, a weights tag
            from ``mvitv2.weights.list_weights()``, or True for the backbone variant's default
            released weights.
        strict: fail when backbone keys are missing (the classifier, its norm and the per-stage
            feature norms are never required).

    Returns:
        the :class:`~mvitv2.weights.LoadReport`.
    """
    from mvitv2.weights import list_weights, load_checkpoint, load_pretrained

    body = model.backbone.body
    if source is True or (isinstance(source, str) and source in list_weights()):
        return load_pretrained(body, model.config.backbone, source, strict=strict)
    return load_checkpoint(body, source, strict=strict)
