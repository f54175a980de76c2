"""torchvision detection components configured or subclassed to compute what detectron2 computes.

detectron2's released MViTv2 detectors (``projects/MViTv2``) are built from its own R-CNN parts;
torchvision's equivalents differ in details that move boxes and change which ones survive. Each
class here keeps torchvision's interface (so ``GeneralizedRCNN``/``RoIHeads`` and training work
unchanged) and replaces only the step that differs (docs/detection.md lists every difference):

* :class:`GridAnchorGenerator`: cell anchors are not rounded to integers and the strides are the
  feature strides (4..64), not ``padded image size // feature size``;
* :class:`ProposalNetwork`: per-level top-k and per-level NMS on the objectness *logits*, after
  removing non-finite and empty (not ``< 1e-3``) boxes;
* :class:`LevelRoIAlign`: ``roi_align(aligned=True)`` with adaptive sampling (ROIAlignV2) and
  detectron2's FPN level formula;
* :func:`fast_rcnn_inference` / :class:`FastRCNNRoIHeads`: no small-box removal before NMS;
* :class:`DetectionTransform`: detectron2's resize (``ResizeShortestEdge``: its rounding, and PIL
  for uint8 images), normalisation after resizing, and its output postprocessing (clip, drop
  empty boxes, paste masks with ``grid_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops

# --------------------------------------------------------------------------- anchors


class GridAnchorGenerator(AnchorGenerator):
    """detectron2's ``DefaultAnchorGenerator`` (offset 0) on torchvision's interface.

    Each level has one size ``s``; its cell anchors, one per aspect ratio ``r`` (height / width),
    are ``(-w/2, -h/2, w/2, h/2)`` with ``w = sqrt(s^2 / r)``, ``h = r w`` (torchvision rounds them
    to integers), placed at ``(x, y) = (j * stride, i * stride)`` with the level's feature stride
    (torchvision derives the stride as ``padded image size // feature size``, which is not the
    stride when the P6 map has an odd size). Anchors are float32 and ordered location-major,
    ratio-minor, levels concatenated.

    Args:
        sizes: anchor size per level.
        aspect_ratios: ratios (height / width) at every location.
        strides: feature stride per level.
    """

    def __init__(
        self, sizes: Sequence[int], aspect_ratios: Sequence[float], strides: Sequence[int]
    ) -> None:
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per stride, got {sizes} and {strides}")
        super().__init__(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.strides = tuple(strides)

    def generate_anchors(
        self,
        scales: Sequence[int],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        cells = []
        for size in scales:
            area = float(size) ** 2
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                cells.append([-w / 2, -h / 2, w / 2, h / 2])
        return torch.tensor(cells, dtype=dtype, device=device)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)
        levels = []
        for fmap, stride, cell in zip(feature_maps, self.strides, self.cell_anchors):
            h, w = fmap.shape[-2:]
            ys = torch.arange(h, dtype=torch.float32, device=device) * stride
            xs = torch.arange(w, dtype=torch.float32, device=device) * stride
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            levels.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in image_list.image_sizes]


# --------------------------------------------------------------------------- RPN


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with detectron2's proposal selection (``find_top_rpn_proposals``).

    Per image: the ``pre_nms_top_n`` highest objectness logits of every level, non-finite boxes
    and scores removed (an error in training), boxes clipped to the image, empty boxes (width or
    height <= 0) removed, NMS per level on the logits, the ``post_nms_top_n`` best kept.
    torchvision instead removes boxes narrower than 1e-3 px and runs NMS on sigmoid
    probabilities (which tie at 1.0 for logits above ~17 in float32).
    """

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [
                torch.full((n,), i, dtype=torch.int64, device=device)
                for i, n in enumerate(num_anchors_per_level)
            ]
        )
        levels = levels.reshape(1, -1).expand_as(objectness)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        rows = torch.arange(num_images, device=device)[:, None]
        objectness, levels, proposals = (
            objectness[rows, top],
            levels[rows, top],
            proposals[rows, top],
        )

        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(proposals, objectness, levels, image_shapes):
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if self.training and not bool(valid.all()):
                raise FloatingPointError("RPN boxes or scores are not finite: training diverged")
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)
            keep = keep[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


# --------------------------------------------------------------------------- RoI pooling


def fpn_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_size: float, canonical_level: int
) -> Tensor:
    """detectron2's ``assign_boxes_to_levels``: level index (0 = ``min_level``) of each box,
    ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))`` clamped to the levels."""
    sizes = torch.sqrt(box_ops.box_area(boxes))
    level = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return level.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


class LevelRoIAlign(MultiScaleRoIAlign):
    """detectron2's ``ROIPooler(pooler_type="ROIAlignV2", sampling_ratio=0)`` for FPN maps.

    Each box is pooled from the level :func:`fpn_levels` assigns (canonical box 224 px at level
    4), with ``roi_align(aligned=True)`` (pixel centres at +0.5) and an adaptive number of
    samples per bin. torchvision's ``MultiScaleRoIAlign`` uses ``aligned=False`` and its own
    level mapper (``+ 1e-6`` after the log) with scales inferred from the feature sizes.

    Args:
        featmap_names: the feature maps to pool from, finest first.
        output_size: pooled size (7 for boxes, 14 for masks).
        strides: stride of each map (powers of two, doubling).
        sampling_ratio: samples per bin along each axis, 0 = adaptive.
        canonical_size, canonical_level: the FPN level formula's constants.
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        strides: Sequence[int],
        sampling_ratio: int = 0,
        canonical_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__(
            list(featmap_names),
            output_size,
            sampling_ratio,
            canonical_scale=canonical_size,
            canonical_level=canonical_level,
        )
        if len(strides) != len(featmap_names):
            raise ValueError(f"one stride per feature map, got {strides} for {featmap_names}")
        self.strides = tuple(strides)
        self.min_level = int(math.log2(strides[0]))
        self.max_level = int(math.log2(strides[-1]))

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        # Sizes from .shape, not len(): an ONNX trace keeps them dynamic (len() is a constant).
        rois = torch.cat(
            [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)]
        )
        levels = fpn_levels(
            rois[:, 1:],
            self.min_level,
            self.max_level,
            self.canonical_scale,
            self.canonical_level,
        )
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(
                feat,
                rois[idx].to(feat.dtype),
                self.output_size,
                1.0 / stride,
                self.sampling_ratio,
                aligned=True,
            )
            out = out.index_put((idx,), pooled.to(out.dtype))
        return out


# --------------------------------------------------------------------------- box inference


def fast_rcnn_inference(
    boxes: Tensor,
    scores: Tensor,
    image_shape: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """detectron2's ``fast_rcnn_inference_single_image`` for one image.

    Args:
        boxes: ``(R, C, 4)`` decoded boxes, ``C`` = classes + 1 (class-specific, background
            first) or 1 (class-agnostic).
        scores: ``(R, classes + 1)`` probabilities, background first.
        image_shape: ``(H, W)`` the boxes are clipped to.
        score_thresh: keep (RoI, class) pairs scoring above this.
        nms_thresh: per-class NMS IoU.
        topk: detections kept (the highest scoring after NMS); < 0 keeps all.

    Returns:
        ``(boxes (N, 4), scores (N,), labels (N,) in 1..classes)``, best first. Unlike
        torchvision's ``postprocess_detections`` no box is dropped for being small.
    """
    valid = torch.isfinite(boxes).flatten(1).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid]
    boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
    scores = scores[:, 1:]
    rows, cls = torch.nonzero(scores > score_thresh).unbind(1)
    # Class c (0-based, background excluded) has its box in column c + 1, or in the only one.
    boxes = boxes[rows, (cls + 1).clamp(max=boxes.shape[1] - 1)]
    scores = scores[rows, cls]
    keep = box_ops.batched_nms(boxes, scores, cls, nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    return boxes[keep], scores[keep], cls[keep] + 1


class FastRCNNRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with detectron2's test-time box filtering
    (:func:`fast_rcnn_inference`)."""

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        counts = [p.shape[0] for p in proposals]  # shape, not len(): traced as dynamic
        boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        scores = F.softmax(class_logits, -1).split(counts)
        out_boxes, out_scores, out_labels = [], [], []
        for b, s, shape in zip(boxes, scores, image_shapes):
            b, s, lab = fast_rcnn_inference(
                b, s, shape, self.score_thresh, self.nms_thresh, self.detections_per_img
            )
            out_boxes.append(b)
            out_scores.append(s)
            out_labels.append(lab)
        return out_boxes, out_scores, out_labels


# --------------------------------------------------------------------------- input / output


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: scale the shorter side to ``short``,
    then the longer one down to ``max_size`` if it is longer; each side rounded half up
    (torchvision floors ``side * min(short / min, max / max)``)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def _traced_shortest_edge_size(hw: Tensor, short: int, max_size: int) -> Tensor:
    """:func:`shortest_edge_size` in float32 tensor ops (ONNX tracing: the size follows the
    input)."""
    new = hw * (short / hw.min())
    new = torch.where(new.max() > max_size, new * (max_size / new.max()), new)
    return torch.floor(new + 0.5)


def pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a ``(3, H, W)`` uint8 RGB image with PIL's bilinear filter, as detectron2's
    ``ResizeTransform`` does for uint8 images (antialiased when shrinking; torchvision's uint8
    kernel differs from PIL by one grey level on a few pixels)."""
    from PIL import Image

    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(image.device)


def paste_masks(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """detectron2's ``paste_masks_in_image`` (CPU path) before its 0.5 threshold.

    Each ``(M, M)`` mask is sampled bilinearly (``grid_sample``, zero padding) at the pixel
    centres of its box, within the box grown by one pixel (zero elsewhere).

    Args:
        masks: ``(N, 1, M, M)`` probabilities.
        boxes: ``(N, 4)`` boxes in image pixels.
        image_shape: ``(H, W)``.

    Returns:
        ``(N, 1, H, W)`` probabilities; ``>= 0.5`` gives detectron2's binary masks.
    """
    if torchvision._is_tracing():
        return _paste_masks_traced(masks, boxes, image_shape)
    h, w = image_shape
    out = masks.new_zeros((len(masks), 1, h, w))
    for i in range(len(masks)):
        box = boxes[i : i + 1]
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        x0i, y0i = (box[0, :2].floor() - 1).clamp(min=0).to(torch.int32).tolist()
        x1i = int(box[0, 2].ceil().add(1).clamp(max=w))
        y1i = int(box[0, 3].ceil().add(1).clamp(max=h))
        ys = torch.arange(y0i, y1i, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0i, x1i, device=masks.device, dtype=torch.float32) + 0.5
        ys = (ys - y0) / (y1 - y0) * 2 - 1
        xs = (xs - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(
            [
                xs[:, None, :].expand(1, ys.shape[1], xs.shape[1]),
                ys[:, :, None].expand(1, ys.shape[1], xs.shape[1]),
            ],
            dim=3,
        )
        pasted = F.grid_sample(masks[i : i + 1], grid.to(masks.dtype), align_corners=False)
        out[i, :, y0i:y1i, x0i:x1i] = pasted[0]
    return out


def _paste_masks_traced(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """:func:`paste_masks` over the whole image at once (traceable), zero outside each box's
    one-pixel-grown region as in the per-box version."""
    h, w = image_shape
    n = masks.shape[0]
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    gy = ((ys + 0.5) - y0) / (y1 - y0) * 2 - 1
    gx = ((xs + 0.5) - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack(
        [
            gx[:, None, :].expand(n, gy.shape[1], gx.shape[1]),
            gy[:, :, None].expand(n, gy.shape[1], gx.shape[1]),
        ],
        dim=3,
    )
    pasted = F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)
    inside_y = (ys >= torch.floor(y0) - 1) & (ys < torch.ceil(y1) + 1)
    inside_x = (xs >= torch.floor(x0) - 1) & (xs < torch.ceil(x1) + 1)
    region = inside_y[:, :, None] & inside_x[:, None, :]
    return pasted * region[:, None].to(pasted.dtype)


class DetectionTransform(GeneralizedRCNNTransform):
    """Resize, normalise and batch images; map detections back (detectron2's test pipeline).

    * Resize (``ResizeShortestEdge``): shorter side to ``test_size`` (or a random one of
      ``train_sizes`` in training; None trains on the images as given), longer side at most
      ``max_size``, sides rounded half up. uint8 images are resized by PIL's bilinear filter (what
      detectron2's data loader does: its models see PIL-resized uint8 images), float images by
      ``F.interpolate`` (bilinear, ``align_corners=False``: detectron2's path for float images).
    * Normalise after resizing: float images in ``[0, 1]`` with ``mean``/``std``; uint8 images in
      ``[0, 255]`` with ``255 * mean``/``255 * std`` (detectron2's ``pixel_mean``/``pixel_std``).
    * Pad with zeros (after normalisation) to a multiple of ``size_divisible``.
    * Postprocess: boxes scaled to the input image (x by ``W / w``, y by ``H / h``), clipped,
      empty boxes (width or height 0) dropped, masks pasted with :func:`paste_masks`.

    Args:
        train_sizes: shorter sides to draw from in training; None: no resize in training.
        test_size: shorter side at test time.
        max_size: cap on the longer side.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB images.
        size_divisible: padding multiple (the FPN's coarsest stride).
    """

    def __init__(
        self,
        train_sizes: Sequence[int] | None,
        test_size: int,
        max_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        size_divisible: int = 32,
    ) -> None:
        super().__init__(
            test_size,
            max_size,
            list(mean),
            list(std),
            size_divisible=size_divisible,
            _skip_resize=train_sizes is None,
        )
        self.train_sizes = list(train_sizes or (test_size,))
        self.test_size = test_size

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        images = list(images)
        if targets is not None:
            targets = [dict(t) for t in targets]
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(
                    f"images must be (C, H, W) tensors, got shape {tuple(image.shape)}"
                )
            target = targets[i] if targets is not None else None
            image, target = self.resize(image, target)
            images[i] = self.normalize(image)
            if targets is not None and target is not None:
                targets[i] = target
        image_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        batched = self.batch_images(images, size_divisible=self.size_divisible)
        return ImageList(batched, image_sizes), targets

    def normalize(self, image: Tensor) -> Tensor:
        scale = 1.0 if image.is_floating_point() else 255.0
        dtype = image.dtype if image.is_floating_point() else torch.float32
        mean = torch.tensor([m * scale for m in self.image_mean], dtype=dtype, device=image.device)
        std = torch.tensor([s * scale for s in self.image_std], dtype=dtype, device=image.device)
        return (image.to(dtype) - mean[:, None, None]) / std[:, None, None]

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.training:
            if self._skip_resize:
                return image, target
            short = self.torch_choice(self.train_sizes)
        else:
            short = self.test_size
        h, w = image.shape[-2:]
        if torchvision._is_tracing():
            from torch.onnx import operators

            hw = operators.shape_as_tensor(image)[-2:].to(torch.float32)
            new = _traced_shortest_edge_size(hw, short, self.max_size)
            # recompute_scale_factor: output side = floor(side * factor) = the rounded side, and
            # the interpolation then uses in/out, as with an explicit size.
            factor = (new + 0.5) / hw
            image = F.interpolate(
                image[None],
                scale_factor=(factor[0], factor[1]),
                mode="bilinear",
                recompute_scale_factor=True,
                align_corners=False,
            )[0]
            return image, target
        size = shortest_edge_size(int(h), int(w), short, self.max_size)
        if image.dtype == torch.uint8:
            image = pil_resize(image, size)
        else:
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(size))
            if "masks" in target:
                masks = target["masks"][:, None].float()
                target["masks"] = F.interpolate(masks, size=size)[:, 0].byte()
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for i, (pred, size, orig) in enumerate(zip(result, image_shapes, original_image_sizes)):
            boxes = pred["boxes"]
            # out / in: a python float (double) as in detectron2, multiplied in the boxes' dtype
            # (0-d tensors when traced, so the graph follows the image size).
            sy, sx = orig[0] / size[0], orig[1] / size[1]
            boxes = torch.stack(
                (boxes[:, 0] * sx, boxes[:, 1] * sy, boxes[:, 2] * sx, boxes[:, 3] * sy), dim=1
            )
            boxes = box_ops.clip_boxes_to_image(boxes, orig)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out = {k: v[keep] for k, v in pred.items()}
            out["boxes"] = boxes[keep]
            if "masks" in out:
                out["masks"] = paste_masks(out["masks"], out["boxes"], orig)
            result[i] = out
        return result
