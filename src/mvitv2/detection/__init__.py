"""Detection and instance segmentation: MViTv2 + FPN with Mask R-CNN and Cascade Mask R-CNN."""

from mvitv2.detection.backbone import MViTFPN, norm_layer
from mvitv2.detection.cascade import CascadeRoIHeads
from mvitv2.detection.detectron2 import (
    COCO_CATEGORY_IDS,
    COCO_CLASS_NAMES,
    Detectron2Detector,
    coco_category_ids,
    detectron2_detector_config,
    load_detectron2_detector,
)
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
    "COCO_CATEGORY_IDS",
    "COCO_CLASS_NAMES",
    "DETECTOR_CONFIGS",
    "CascadeRoIHeads",
    "DetectorConfig",
    "Detectron2Detector",
    "MViTDetector",
    "MViTFPN",
    "coco_category_ids",
    "create_detector",
    "detectron2_detector_config",
    "get_detector_config",
    "list_detectors",
    "load_backbone_weights",
    "load_detectron2_detector",
    "norm_layer",
]
