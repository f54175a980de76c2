"""Detection and instance segmentation: MViTv2 + FPN with Mask R-CNN and Cascade Mask R-CNN."""

from mvitv2.detection.backbone import MViTFPN, norm_layer
from mvitv2.detection.cascade import CascadeRoIHeads
from mvitv2.detection.model import (
    DETECTOR_CONFIGS,
    DetectorConfig,
    MViTDetector,
    create_detector,
    get_detector_config,
    list_detectors,
    load_backbone_weights,
)

__all__ = [
    "DETECTOR_CONFIGS",
    "CascadeRoIHeads",
    "DetectorConfig",
    "MViTDetector",
    "MViTFPN",
    "create_detector",
    "get_detector_config",
    "list_detectors",
    "load_backbone_weights",
    "norm_layer",
]
