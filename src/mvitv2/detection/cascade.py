"""Cascade R-CNN box heads (Cai & Vasconcelos) on torchvision's RoIHeads machinery.

Three stages re-pool the boxes the previous stage regressed; each stage has its own IoU threshold
(0.5/0.6/0.7), box-coder weights ((10,10,5,5), (20,20,10,10), (30,30,15,15)), 4conv1fc head and a
class-agnostic regressor. At test time the class scores are averaged over the stages and the boxes
come from the last stage; the mask head runs on those final boxes. Matching, sampling, box coding,
RoIAlign, NMS and the mask loss are torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

from mvitv2.detection.components import fast_rcnn_inference


class AgnosticBoxPredictor(nn.Module):
    """Class scores (background at index 0) and one class-agnostic box delta per RoI.

    Args:
        in_channels: width of the box head output.
        num_classes: classes including background.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        # detectron2's FastRCNNOutputLayers init: small weights so early deltas stay near zero.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def agnostic_box_loss(
    class_logits: Tensor, box_deltas: Tensor, labels: list[Tensor], targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over classes and smooth-L1 (beta 1/9) on foreground deltas, as torchvision's
    ``fastrcnn_loss`` but with one box per RoI."""
    labels_t = torch.cat(labels)
    targets_t = torch.cat(targets)
    cls_loss = F.cross_entropy(class_logits, labels_t)
    pos = torch.where(labels_t > 0)[0]
    box_loss = F.smooth_l1_loss(box_deltas[pos], targets_t[pos], beta=1 / 9, reduction="sum") / max(
        labels_t.numel(), 1
    )
    return cls_loss, box_loss


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient times ``scale`` (each stage shares the pooled features)."""
    return x * scale + x.detach() * (1.0 - scale)


class CascadeRoIHeads(RoIHeads):
    """Cascade box stages + a Mask R-CNN mask branch.

    Args:
        box_roi_pool: the RoI pooler shared by the stages (:class:`LevelRoIAlign`).
        box_heads: one head per stage (RoI features -> vector).
        box_predictors: one :class:`AgnosticBoxPredictor` per stage.
        stage_ious: IoU threshold of each stage's matcher (foreground at or above).
        stage_weights: ``BoxCoder`` weights of each stage.
        batch_size_per_image, positive_fraction: sampling of the first stage's RoIs; later stages
            relabel the refined versions of the same RoIs without resampling.
        score_thresh, nms_thresh, detections_per_img: test-time filtering.
        mask_roi_pool, mask_head, mask_predictor: the mask branch (trained on the first stage's
            foreground RoIs, run on the final boxes at test time), or None for boxes only.
    """

    def __init__(
        self,
        *,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        stage_ious: Sequence[float],
        stage_weights: Sequence[Sequence[float]],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        if not (len(box_heads) == len(box_predictors) == len(stage_ious) == len(stage_weights)):
            raise ValueError("cascade needs one head, predictor, IoU and weight set per stage")
        super().__init__(
            box_roi_pool,
            None,
            None,
            stage_ious[0],
            stage_ious[0],
            batch_size_per_image,
            positive_fraction,
            tuple(stage_weights[0]),
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        del self.box_head, self.box_predictor
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.stage_matchers = [
            det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in stage_ious
        ]
        self.stage_coders = [det_utils.BoxCoder(tuple(w)) for w in stage_weights]

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def _label_stage(
        self, k: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Labels and regression targets of stage ``k``'s RoIs under its own IoU threshold."""
        labels, matched_gt = [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].to(props.dtype)
            if gt.numel() == 0:
                labels.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                matched_gt.append(torch.zeros_like(props))
                continue
            idx = self.stage_matchers[k](box_ops.box_iou(gt, props))
            lab = t["labels"][idx.clamp(min=0)].to(torch.int64)
            labels.append(torch.where(idx < 0, torch.zeros_like(lab), lab))
            matched_gt.append(gt[idx.clamp(min=0)])
        return labels, list(self.stage_coders[k].encode(matched_gt, proposals))

    def _postprocess(
        self, scores: Tensor, boxes: Tensor, counts: list[int], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """detectron2's test-time filtering of the class-agnostic final boxes, per image."""
        results = []
        for sc, bx, shape in zip(scores.split(counts), boxes.split(counts), image_shapes):
            bx, sc, labels = fast_rcnn_inference(
                bx[:, None], sc, shape, self.score_thresh, self.nms_thresh, self.detections_per_img
            )
            results.append({"boxes": bx, "labels": labels, "scores": sc})
        return results

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Same contract as torchvision's ``RoIHeads.forward``: (detections, losses)."""
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, reg_targets = self.select_training_samples(
                proposals, targets
            )
            first_stage = (proposals, matched_idxs, labels)
        counts = [p.shape[0] for p in proposals]  # shape, not len(): traced as dynamic
        boxes = proposals
        stage_scores = []
        refined = torch.cat(proposals)  # each stage's regressed boxes feed the next one
        for k in range(self.num_stages):
            if k > 0:
                boxes = [
                    box_ops.clip_boxes_to_image(b, s)
                    for b, s in zip(refined.detach().split(counts), image_shapes)
                ]
                if self.training:
                    labels, reg_targets = self._label_stage(k, boxes, targets)
            feats = self.box_roi_pool(features, boxes, image_shapes)
            if self.training:
                feats = _scale_grad(feats, 1.0 / self.num_stages)
            logits, deltas = self.box_predictors[k](self.box_heads[k](feats))
            if self.training:
                cls_loss, box_loss = agnostic_box_loss(logits, deltas, labels, reg_targets)
                losses[f"loss_classifier_stage{k}"] = cls_loss
                losses[f"loss_box_reg_stage{k}"] = box_loss
            else:
                stage_scores.append(F.softmax(logits, -1))
            refined = self.stage_coders[k].decode(deltas, boxes).reshape(-1, 4)

        result: list[dict[str, Tensor]] = []
        if not self.training:
            # detectron2: sum(stage scores) * (1 / stages), in this order.
            scores = sum(stage_scores) * (1.0 / self.num_stages)
            result = self._postprocess(scores, refined, counts, image_shapes)

        if self.has_mask():
            if self.training:
                props, matched, labs = first_stage
                pos = [torch.where(lab > 0)[0] for lab in labs]
                mask_boxes = [p[i] for p, i in zip(props, pos)]
                pos_matched = [m[i] for m, i in zip(matched, pos)]
            else:
                mask_boxes = [r["boxes"] for r in result]
            x = self.mask_roi_pool(features, mask_boxes, image_shapes)
            mask_logits = self.mask_predictor(self.mask_head(x))
            if self.training:
                losses["loss_mask"] = maskrcnn_loss(
                    mask_logits,
                    mask_boxes,
                    [t["masks"] for t in targets],
                    [t["labels"] for t in targets],
                    pos_matched,
                )
            else:
                probs = maskrcnn_inference(mask_logits, [r["labels"] for r in result])
                for prob, r in zip(probs, result):
                    r["masks"] = prob
        return result, losses
