"""detectron2's released MViTv2 detectors (``projects/MViTv2``) as ready mvitv2 detectors.

:func:`load_detectron2_detector` reads a detectron2 checkpoint (model-zoo ``.pkl``, ``.pth``,
``.safetensors``, a URL or a weights tag), infers the detector from its tensor shapes (Mask R-CNN
or Cascade, classes, head widths and norms, backbone width and depths), builds it with
:func:`~mvitv2.detection.create_detector`, loads every tensor with
:func:`~mvitv2.weights.load_checkpoint` and returns it with its COCO class names / category ids and
its preprocessing. The detector then computes detectron2's detections (docs/detection.md).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from mvitv2.detection.model import (
    DetectorConfig,
    MViTDetector,
    create_detector,
    get_detector_config,
    list_detectors,
)
from mvitv2.weights.classes import coco_category_ids as _coco_ids
from mvitv2.weights.classes import dataset_classes

#: COCO's 80 object categories in detectron2's contiguous order (label ``i + 1`` here).
COCO_CLASS_NAMES = tuple(dataset_classes("coco") or ())

#: COCO category id of each class above: 1..90 without the ten ids COCO never annotated.
COCO_CATEGORY_IDS = tuple(_coco_ids())


def coco_category_ids(labels: Tensor) -> Tensor:
    """COCO category ids of detector labels ``1..80`` (detectron2's contiguous class + 1)."""
    import torch

    table = torch.tensor((0, *COCO_CATEGORY_IDS), device=labels.device)
    return table[labels.long()]


@dataclass
class Detectron2Detector:
    """A detectron2 detector loaded whole.

    Attributes:
        model: the detector, in eval mode. ``model([image])`` with ``image`` a ``(3, H, W)`` RGB
            uint8 tensor reproduces detectron2's test pipeline exactly (float ``[0, 1]`` images
            are resized by ``F.interpolate`` instead of PIL).
        name: registered detector name (``create_detector(name, num_classes=..., **model_kwargs)``
            rebuilds the architecture).
        model_kwargs: the overrides of ``name``'s config that the checkpoint needs.
        num_classes: object classes (labels ``1..num_classes``).
        class_names: name of label ``i + 1`` (COCO for 80 classes, else None).
        category_ids: COCO category id of label ``i + 1`` (80 classes, else None).
        preprocessing: what the model does to its input (keys as
            :func:`mvitv2.predict.default_preprocessing`, plus ``input_format``, ``resize`` and
            ``input_dtype``: ``uint8``, the images to give it for detectron2's detections).
        report: the :class:`~mvitv2.weights.LoadReport`.
    """

    model: MViTDetector
    name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    category_ids: list[int] | None
    preprocessing: dict[str, Any]
    report: Any = field(repr=False, default=None)

    @property
    def config(self) -> DetectorConfig:
        return self.model.config


def _norm(sd: Mapping[str, Tensor], conv: str) -> str | None:
    """detectron2 norm of ``Conv2d`` ``conv``: ``""`` (none), ``"BN"``, None (GN/LN: ambiguous)."""
    if f"{conv}.norm.running_mean" in sd:
        return "BN"
    return "" if f"{conv}.norm.weight" not in sd else None


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in sd if (m := re.fullmatch(pattern, k))})


def detectron2_detector_config(
    sd: Mapping[str, Tensor], name: str | None = None, **overrides: Any
) -> tuple[str, dict[str, Any], int]:
    """The registered detector, config overrides and class count of a detectron2 state dict.

    Read from the shapes: Mask R-CNN or Cascade (and its stage count), classes, box head
    (``<n>conv<m>fc``, widths, norm), mask head (convs, width, norm), FPN width and norm, RPN
    convs, backbone width and blocks per stage. The variant (heads, windows, rel-pos size) is
    the registered one with that backbone width and depths (T, S, B, L, H), or ``name``.

    Args:
        sd: the detectron2 state dict (detectron2 key names).
        name: registered detector name to start from (required for backbones that are not a
            registered variant; pass e.g. ``num_heads``/``img_size``/``window_size`` then).
        **overrides: :class:`DetectorConfig` or backbone fields; they win over what is inferred.

    Returns:
        ``(name, model_kwargs, num_classes)`` for :func:`create_detector`.
    """
    cascade = bool(_indices(sd, r"roi_heads\.box_predictor\.(\d+)\.cls_score\.bias"))
    pred = "roi_heads.box_predictor.0." if cascade else "roi_heads.box_predictor."
    if pred + "cls_score.bias" not in sd or "backbone.bottom_up.patch_embed.proj.weight" not in sd:
        raise ValueError(
            "not a detectron2 MViT R-CNN detector: expected backbone.bottom_up.patch_embed and "
            f"{pred}cls_score tensors"
        )
    num_classes = len(sd[pred + "cls_score.bias"]) - 1
    head = "roi_heads.box_head.0." if cascade else "roi_heads.box_head."
    convs = _indices(sd, re.escape(head) + r"conv(\d+)\.weight")
    fcs = _indices(sd, re.escape(head) + r"fc(\d+)\.weight")
    inferred: dict[str, Any] = {
        "cascade": cascade,
        "box_head": f"{len(convs)}conv{len(fcs)}fc" if convs else f"{len(fcs)}fc",
        "box_fc_dim": sd[f"{head}fc1.weight"].shape[0],
        "fpn_channels": sd["backbone.fpn_output2.weight"].shape[0],
        "fpn_norm": _norm(sd, "backbone.fpn_output2"),
    }
    if cascade:
        stages = _indices(sd, r"roi_heads\.box_predictor\.(\d+)\.cls_score\.bias")
        if len(stages) != len(DetectorConfig().cascade_ious):
            raise ValueError(
                f"the checkpoint has {len(stages)} cascade stages; pass cascade_ious and "
                "cascade_weights for them"
            )
    norms = set()
    if convs:
        inferred["box_conv_dim"] = sd[f"{head}conv1.weight"].shape[0]
        norms.add(_norm(sd, f"{head}conv1"))
    mask_convs = _indices(sd, r"roi_heads\.mask_head\.mask_fcn(\d+)\.weight")
    inferred["mask"] = "roi_heads.mask_head.deconv.weight" in sd
    if inferred["mask"]:
        inferred["mask_head_convs"] = len(mask_convs)
        inferred["mask_head_dim"] = sd["roi_heads.mask_head.deconv.weight"].shape[1]
        if mask_convs:
            norms.add(_norm(sd, "roi_heads.mask_head.mask_fcn1"))
    if len(norms) > 1 or None in norms or inferred["fpn_norm"] is None:
        if not {"head_norm", "fpn_norm"} & set(overrides):
            raise ValueError(
                f"cannot tell the head / FPN norms from the checkpoint (found {norms}, FPN "
                f"{inferred['fpn_norm']!r}); pass head_norm= and fpn_norm= ('', 'BN', 'GN', 'LN')"
            )
        inferred.pop("fpn_norm")
    elif norms:
        inferred["head_norm"] = norms.pop()
    if "proposal_generator.rpn_head.conv.weight" in sd:
        inferred["rpn_conv_depth"] = 1
    else:
        inferred["rpn_conv_depth"] = len(
            _indices(sd, r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.weight")
        )
    blocks = _indices(sd, r"backbone\.bottom_up\.blocks\.(\d+)\.mlp\.fc2\.weight")
    widths = [sd[f"backbone.bottom_up.blocks.{i}.mlp.fc2.weight"].shape[0] for i in blocks]
    embed_dim = sd["backbone.bottom_up.patch_embed.proj.weight"].shape[0]
    stages: list[int] = []  # blocks per stage: widths embed, 2 embed, 4 embed, ... in order
    for w in widths:
        if stages and w == embed_dim * 2 ** (len(stages) - 1):
            stages[-1] += 1
        elif w == embed_dim * 2 ** len(stages):
            stages.append(1)
        else:
            raise ValueError(f"backbone block widths {widths} do not double stage by stage")
    depths = tuple(stages)

    if name is None:
        prefix = "cascade_maskrcnn_mvitv2_" if cascade else "maskrcnn_mvitv2_"
        matches = [n for n in list_detectors(prefix) if n.startswith(prefix)]
        matches = [n for n in matches if _backbone(n)[:2] == (embed_dim, depths)]
        if not matches:
            raise ValueError(
                f"no registered detector has an MViT of width {embed_dim} and depths {depths}: "
                "pass name='maskrcnn_mvitv2_tiny' (or cascade_...) and the backbone's num_heads, "
                "depths, embed_dim, img_size and window_size"
            )
        name = matches[0]
    base = get_detector_config(name)
    if base.cascade != cascade:
        kind = "Cascade Mask R-CNN" if cascade else "Mask R-CNN"
        raise ValueError(f"the checkpoint is a {kind}; {name!r} is not")
    inferred.update({"embed_dim": embed_dim, "depths": depths})
    det_fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    backbone = _backbone(name)[2]
    kwargs = {}
    for key, value in {**inferred, **overrides}.items():
        default = getattr(base, key) if key in det_fields else backbone.get(key)
        if key in overrides or value != default:
            kwargs[key] = value
    return name, kwargs, num_classes


def _backbone(name: str) -> tuple[int, tuple[int, ...], dict[str, Any]]:
    """(embed_dim, depths, all MViTConfig fields) of a registered detector's backbone."""
    from mvitv2.models import get_config

    det = get_detector_config(name)
    cfg = get_config(det.backbone, **dict(det.backbone_overrides))
    return cfg.embed_dim, tuple(cfg.depths), dataclasses.asdict(cfg)


def load_detectron2_detector(
    source: str | Path | Mapping,
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    strict: bool = True,
    map_location: str = "cpu",
    source_name: str | None = None,
    **overrides: Any,
) -> Detectron2Detector:
    """Build and load a whole detectron2 MViTv2 detector.

    Args:
        source: a detectron2 checkpoint file (model-zoo ``.pkl``, ``.pth``, ``.safetensors``), a
            URL, a weights tag (``mvitv2.weights.list_weights()``, e.g.
            ``"mvitv2_tiny.coco_cascade"``) or a checkpoint dict.
        name: registered detector to build; default: inferred (see
            :func:`detectron2_detector_config`).
        allow_pickle: needed for ``.pkl`` files (pickles can run code: only for trusted files).
        strict: raise when any tensor is missing, unexpected or of another shape.
        map_location: device the tensors are read onto.
        source_name: how errors and the report name the source (default: ``source``, or
            ``"<state dict>"`` for a dict).
        **overrides: :class:`DetectorConfig` / backbone fields (e.g. ``min_size``).

    Returns:
        A :class:`Detectron2Detector` (model in eval mode, class names, preprocessing, report).
    """
    from mvitv2.weights import CheckpointError, get_weights, list_weights, load_checkpoint
    from mvitv2.weights.formats import detect_format, unwrap
    from mvitv2.weights.io import download, is_url, read_checkpoint
    from mvitv2.weights.registry import download_weights

    label = source_name or (source if not isinstance(source, Mapping) else "<state dict>")
    if isinstance(source, str) and source in list_weights():
        w = get_weights(source)
        if not w.detector:
            raise CheckpointError(f"weights {source!r} are not a whole detector")
        if w.needs_pickle and not allow_pickle:
            raise CheckpointError(
                f"weights {w.tag} ({w.url}) are a detectron2 pickle, which can run code when "
                "loaded. If you trust the source, pass allow_pickle=True."
            )
        name = name or w.detector
        source = download_weights(w)
    if isinstance(source, Mapping):
        raw = source
    else:
        path = download(str(source)) if is_url(source) else source
        raw = read_checkpoint(path, map_location=map_location, allow_pickle=allow_pickle)
    try:
        sd, _ = unwrap(raw)
        if detect_format(sd).name != "detectron2":
            raise ValueError("not a detectron2 checkpoint (no backbone.bottom_up.* tensors)")
        name, kwargs, num_classes = detectron2_detector_config(sd, name, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: {e}") from e
    model = create_detector(name, num_classes=num_classes, **kwargs)
    # the file's name in a mismatch error, not the "<state dict>" read from it
    report = load_checkpoint(model, raw, strict=strict, source_name=str(label))
    cfg = model.config
    coco = num_classes == len(COCO_CLASS_NAMES)
    return Detectron2Detector(
        model=model.eval(),
        name=name,
        model_kwargs=kwargs,
        num_classes=num_classes,
        class_names=list(COCO_CLASS_NAMES) if coco else None,
        category_ids=list(COCO_CATEGORY_IDS) if coco else None,
        preprocessing={
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "min_size": cfg.min_size,
            "max_size": cfg.max_size,
            "size_divisible": 32,
            "input_format": "RGB",
            # Feed uint8 pixels: the model then resizes with PIL as detectron2's loader does.
            "input_dtype": "uint8",
            "resize": "shortest edge (detectron2 ResizeShortestEdge): PIL bilinear for uint8 "
            "images, F.interpolate for float [0, 1] images",
        },
        report=report,
    )
