"""Cascade R-CNN heads by value: each stage's labels, regression targets and losses, and the
test-time score averaging and box refinement, against the box formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mvitv2.detection.cascade import (
    AgnosticBoxPredictor,
    CascadeRoIHeads,
    _scale_grad,
    agnostic_box_loss,
)

WEIGHTS = [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]


class BoxesAsFeatures(nn.Module):
    """RoI "pooling" that returns each RoI's box (x1, y1, x2, y2) as its feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.gain = nn.Parameter(torch.ones(()))  # to see the gradient that reaches the pooler

    def forward(self, features, boxes, image_shapes):
        self.seen.append(torch.cat(boxes).detach().clone())
        return torch.cat(boxes) * self.gain


class Fixed(nn.Module):
    """A stage predictor: logits ``base + 0.01 * x1 * (0, 1, -1)`` (so RoIs score differently)
    and constant deltas."""

    def __init__(self, base: list[float], delta: list[float]) -> None:
        super().__init__()
        self.base, self.delta = torch.tensor(base), torch.tensor(delta)

    def forward(self, x):
        logits = self.base + 0.01 * x[:, :1] * torch.tensor(SLOPE)
        return logits, self.delta.expand(len(x), 4) + 0 * x


LOGITS = [[0.0, 2.0, 1.0], [1.0, 0.0, 3.0], [0.5, 0.5, 0.0]]
SLOPE = [0.0, 1.0, -1.0]
DELTAS = [[5.0, -2.0, 1.0, 0.5], [8.0, 4.0, -1.0, 1.0], [-3.0, 6.0, 1.5, -1.5]]


def _heads(
    score_thresh=0.0,
    nms_thresh=1.0,
    detections=100,
    ious=(0.5, 0.6, 0.7),
    pool: nn.Module | None = None,
    predictors: list[nn.Module] | None = None,
    **mask,
) -> CascadeRoIHeads:
    """Three stages on ``pool`` (default :class:`BoxesAsFeatures`) and ``predictors`` (default
    :class:`Fixed` at LOGITS and DELTAS), identity box heads, WEIGHTS."""
    return CascadeRoIHeads(
        box_roi_pool=BoxesAsFeatures() if pool is None else pool,
        box_heads=[nn.Identity() for _ in range(3)],
        box_predictors=predictors or [Fixed(lg, d) for lg, d in zip(LOGITS, DELTAS)],
        stage_ious=list(ious),
        stage_weights=WEIGHTS,
        batch_size_per_image=512,
        positive_fraction=0.25,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections,
        **mask,
    )


def _decode(box: list[float], d: list[float], w: tuple[float, ...]) -> list[float]:
    """R-CNN box decoding written out: shift the centre by d * size / weight, scale by exp."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    cx, cy = x1 + bw / 2 + d[0] / w[0] * bw, y1 + bh / 2 + d[1] / w[1] * bh
    nw, nh = bw * math.exp(d[2] / w[2]), bh * math.exp(d[3] / w[3])
    return [cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2]


def _encode(gt: list[float], box: list[float], w: tuple[float, ...]) -> list[float]:
    gw, gh, bw, bh = gt[2] - gt[0], gt[3] - gt[1], box[2] - box[0], box[3] - box[1]
    return [
        w[0] * ((gt[0] + gw / 2) - (box[0] + bw / 2)) / bw,
        w[1] * ((gt[1] + gh / 2) - (box[1] + bh / 2)) / bh,
        w[2] * math.log(gw / bw),
        w[3] * math.log(gh / bh),
    ]


def _clip(box: list[float], h: int, w: int) -> list[float]:
    return [
        min(max(box[0], 0), w),
        min(max(box[1], 0), h),
        min(max(box[2], 0), w),
        min(max(box[3], 0), h),
    ]


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _reference_inference(props: list[list[float]], h: int, w: int):
    """Per RoI: the stage boxes (each stage refines the clipped previous one) and the mean of
    the stages' softmax scores."""
    out = []
    for box in props:
        scores = [0.0, 0.0, 0.0]
        stage_boxes = [box]
        for k in range(3):
            probs = _softmax([b + 0.01 * box[0] * m for b, m in zip(LOGITS[k], SLOPE)])
            scores = [s + p / 3 for s, p in zip(scores, probs)]
            box = _decode(box, DELTAS[k], WEIGHTS[k])
            if k < 2:
                box = _clip(box, h, w)
            stage_boxes.append(box)
        out.append((_clip(box, h, w), scores, stage_boxes))
    return out


def test_cascade_inference_averages_stage_scores_and_refines_boxes_stage_by_stage():
    props = [[10.0, 10.0, 30.0, 40.0], [60.0, 50.0, 95.0, 90.0], [20.0, 30.0, 50.0, 45.0]]
    heads = _heads().eval()
    with torch.no_grad():
        (det,), losses = heads({}, [torch.tensor(props)], [(100, 120)])
    assert losses == {}
    ref = _reference_inference(props, 100, 120)
    # Stage k pools the boxes stage k - 1 regressed (clipped to the image).
    for k, seen in enumerate(heads.box_roi_pool.seen):
        assert torch.allclose(seen, torch.tensor([r[2][k] for r in ref]), atol=1e-4), k
    want = sorted(
        ((s[c], c, b) for b, s, _ in ref for c in (1, 2)), key=lambda t: -t[0]
    )  # every (RoI, class) pair scores above 0; nothing overlaps enough to be suppressed
    assert det["labels"].tolist() == [c for _, c, _ in want]
    assert torch.allclose(det["scores"], torch.tensor([s for s, _, _ in want]), atol=1e-6)
    assert torch.allclose(det["boxes"], torch.tensor([b for _, _, b in want]), atol=1e-4)
    assert heads.box_roi_pool.seen[2][1, 2] == 120  # the second box was clipped at the edge


def test_cascade_inference_filters_by_score_and_keeps_the_best_detections():
    props = [[10.0, 10.0, 30.0, 40.0], [60.0, 50.0, 95.0, 90.0], [20.0, 30.0, 50.0, 45.0]]
    ref = _reference_inference(props, 100, 120)
    pairs = sorted((s[c] for _, s, _ in ref for c in (1, 2)), reverse=True)
    thresh = (pairs[2] + pairs[3]) / 2  # keeps exactly the 3 best pairs
    heads = _heads(score_thresh=thresh).eval()
    with torch.no_grad():
        (det,), _ = heads({}, [torch.tensor(props)], [(100, 120)])
    assert torch.allclose(det["scores"], torch.tensor(pairs[:3]), atol=1e-6)
    heads = _heads(detections=2).eval()
    with torch.no_grad():
        (det,), _ = heads({}, [torch.tensor(props)], [(100, 120)])
    assert torch.allclose(det["scores"], torch.tensor(pairs[:2]), atol=1e-6)


def test_each_stage_labels_rois_at_its_own_iou_threshold_and_encodes_with_its_weights():
    heads = _heads()
    gt = [0.0, 0.0, 10.0, 10.0]
    # IoU with the ground truth: 1.0, 0.7, 0.65, 0.55, 0.4.
    props = [[0.0, 0.0, 10.0, 10.0], [0, 0, 10, 7], [0, 0, 10, 6.5], [0, 0, 10, 5.5], [0, 0, 10, 4]]
    labels32 = torch.tensor([3, 1], dtype=torch.int32)  # any integer type becomes int64
    target = {"boxes": torch.tensor([gt, [50.0, 50, 60, 60]]), "labels": labels32}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    p = torch.tensor(props, dtype=torch.float32)
    want_labels = [[3, 3, 3, 3, 0], [3, 3, 3, 0, 0], [3, 3, 0, 0, 0]]
    for k in range(3):
        labels, reg = heads._label_stage(k, [p[:2], p], [empty, target])
        assert labels[0].tolist() == [0, 0]  # an image without objects: all background
        assert labels[1].tolist() == want_labels[k], k
        assert labels[0].dtype == labels[1].dtype == torch.int64
        ref = torch.tensor([_encode(gt, b, WEIGHTS[k]) for b in props])
        pos = labels[1] > 0
        assert torch.allclose(reg[1][pos], ref[pos], atol=1e-4), k


def test_stage_labels_follow_the_rois_dtype_and_device_whatever_the_ground_truths():
    """Float64 ground truth (from numpy) is matched and encoded in the RoIs' float32, as
    torchvision's sampling does; an image without objects gets its background labels on the
    RoIs' device (meta stands in for a GPU)."""
    heads = _heads()
    gt = [0.0, 0.0, 10.0, 10.0]
    props = torch.tensor([[0.0, 0.0, 10.0, 7.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 4.0]])
    target = {"boxes": torch.tensor([gt], dtype=torch.float64), "labels": torch.tensor([1])}
    labels, reg = heads._label_stage(1, [props], [target])
    assert labels[0].tolist() == [1, 1, 0]  # IoU 0.7, 0.82, 0.4 at the stage's 0.6
    assert reg[0].dtype == torch.float32
    want = torch.tensor([_encode(gt, b, WEIGHTS[1]) for b in props.tolist()])
    torch.testing.assert_close(reg[0][:2], want[:2])
    meta = {"boxes": torch.zeros(0, 4, device="meta"), "labels": torch.zeros(0, device="meta")}
    labels, reg = heads._label_stage(2, [torch.zeros(3, 4, device="meta")], [meta])
    assert labels[0].device.type == reg[0].device.type == "meta"
    assert labels[0].dtype == torch.int64 and labels[0].shape == (3,)


def test_the_first_stage_pools_the_proposals_as_given_and_the_next_their_clipped_refinement():
    """As in detectron2, only the regressed boxes that later stages pool are clipped to the
    image; the proposals reach the first stage unchanged, even where they leave it."""
    props = torch.tensor([[-5.0, 10.0, 30.0, 40.0], [60.0, 50.0, 130.0, 90.0]])
    heads = _heads().eval()
    with torch.no_grad():
        heads({}, [props], [(100, 120)])
    seen = heads.box_roi_pool.seen
    assert torch.equal(seen[0], props)
    want = [_clip(_decode(b, DELTAS[0], WEIGHTS[0]), 100, 120) for b in props.tolist()]
    torch.testing.assert_close(seen[1], torch.tensor(want))


def test_agnostic_box_loss_is_cross_entropy_plus_smooth_l1_on_foreground_over_all_rois():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    deltas = torch.randn(5, 4, generator=g)
    targets = torch.randn(5, 4, generator=g) * 0.2
    labels = [torch.tensor([0, 2, 1]), torch.tensor([0, 3])]
    cls_loss, box_loss = agnostic_box_loss(logits, deltas, labels, [targets[:3], targets[3:]])
    flat = [0, 2, 1, 0, 3]
    ce = (
        sum(
            math.log(sum(math.exp(v) for v in row)) - row[y]
            for row, y in zip(logits.tolist(), flat)
        )
        / 5
    )
    beta = 1 / 9

    def smooth_l1(d: float) -> float:
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    sl1 = (
        sum(
            smooth_l1(a - b)
            for i, y in enumerate(flat)
            if y > 0
            for a, b in zip(deltas[i].tolist(), targets[i].tolist())
        )
        / 5
    )
    assert cls_loss.item() == pytest.approx(ce, rel=1e-5)
    assert box_loss.item() == pytest.approx(sl1, rel=1e-5)
    _, none = agnostic_box_loss(logits[:2], deltas[:2], [torch.tensor([0, 0])], [targets[:2]])
    assert none.item() == 0.0
    one_cls, one_box = agnostic_box_loss(
        logits[1:2], deltas[1:2], [torch.tensor([2])], [targets[1:2]]
    )
    want = sum(smooth_l1(a - b) for a, b in zip(deltas[1].tolist(), targets[1].tolist()))
    assert one_box.item() == pytest.approx(want, rel=1e-5)  # a single RoI: divided by 1


def test_stage_gradient_scale_is_identity_forward_and_scaled_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = _scale_grad(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.25, 0.5, 0.75]))


def test_cascade_training_relabels_each_stages_refined_boxes_and_reports_its_losses():
    torch.manual_seed(0)
    heads = _heads().train()
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    props = torch.tensor(
        [[10.0, 10.0, 40.0, 40.0], [12.0, 8.0, 44.0, 36.0], [60.0, 60.0, 90.0, 80.0]]
    )
    _, losses = heads({}, [props], [(100, 100)], [{"boxes": gt, "labels": torch.tensor([2])}])
    assert set(losses) == {
        f"loss_{n}_stage{k}" for n in ("classifier", "box_reg") for k in range(3)
    }
    seen = heads.box_roi_pool.seen
    for k in range(1, 3):
        # The boxes of stage k are stage k - 1's decoded with its weights, clipped to the image.
        ref = torch.tensor(
            [
                _clip(_decode(b, DELTAS[k - 1], WEIGHTS[k - 1]), 100, 100)
                for b in seen[k - 1].tolist()
            ]
        )
        assert torch.allclose(seen[k], ref, atol=1e-4), k
    for k in range(3):
        boxes = seen[k].tolist()
        labels = []
        for b in boxes:
            ix = max(0.0, min(b[2], 40) - max(b[0], 10)) * max(0.0, min(b[3], 40) - max(b[1], 10))
            iou = ix / ((b[2] - b[0]) * (b[3] - b[1]) + 900 - ix)
            labels.append(2 if iou >= (0.5, 0.6, 0.7)[k] else 0)
        logits = torch.tensor(
            [[v + 0.01 * b[0] * m for v, m in zip(LOGITS[k], SLOPE)] for b in boxes]
        )
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        assert losses[f"loss_classifier_stage{k}"].item() == pytest.approx(ce.item(), rel=1e-5), k
        reg = sum(
            abs(d - t) - 0.5 / 9 if abs(d - t) >= 1 / 9 else 4.5 * (d - t) ** 2
            for b, y in zip(boxes, labels)
            if y
            for d, t in zip(DELTAS[k], _encode([10.0, 10.0, 40.0, 40.0], b, WEIGHTS[k]))
        ) / len(boxes)
        assert losses[f"loss_box_reg_stage{k}"].item() == pytest.approx(reg, rel=1e-4, abs=1e-6), k
    # The stages share the pooled features: each stage's gradient reaches them divided by 3.
    sum(losses.values()).backward()
    want = 0.0
    for k in range(3):
        g = torch.ones((), requires_grad=True)
        labels = heads._label_stage(k, [seen[k]], [{"boxes": gt, "labels": torch.tensor([2])}])[0]
        logits = torch.tensor(LOGITS[k]) + 0.01 * (seen[k][:, :1] * g) * torch.tensor(SLOPE)
        torch.nn.functional.cross_entropy(logits, labels[0]).backward()
        want += g.grad.item() / 3
    assert heads.box_roi_pool.gain.grad.item() == pytest.approx(want, rel=1e-4)


def test_each_stage_is_trained_by_its_own_losses_only():
    """The next stage pools this stage's regressed boxes detached (detectron2's Cascade R-CNN):
    a stage's predictor gets the gradient of its own classification and box losses, computed
    here from the boxes it saw, and nothing from the later stages."""
    torch.manual_seed(0)
    preds = [AgnosticBoxPredictor(4, 3) for _ in range(3)]
    for p in preds:  # deltas that move with the box, so later stages could see a gradient
        nn.init.normal_(p.bbox_pred.weight, std=0.01)
        nn.init.normal_(p.cls_score.weight, std=0.05)
    heads = _heads(predictors=preds).train()
    gt = [10.0, 10.0, 40.0, 40.0]
    props = torch.tensor([[10.0, 10.0, 40.0, 40.0], [12.0, 8.0, 44.0, 36.0], [9, 14, 38, 46]])
    target = {"boxes": torch.tensor([gt]), "labels": torch.tensor([2])}
    _, losses = heads({}, [props], [(100, 100)], [target])
    sum(losses.values()).backward()
    for k, seen in enumerate(heads.box_roi_pool.seen):
        ref = AgnosticBoxPredictor(4, 3)
        ref.load_state_dict(preds[k].state_dict())
        boxes = seen.tolist()
        labels = torch.tensor([2 if _iou(b, gt) >= (0.5, 0.6, 0.7)[k] else 0 for b in boxes])
        logits, deltas = ref(seen)
        fg = labels > 0
        assert fg.any(), k
        reg = torch.tensor([_encode(gt, b, WEIGHTS[k]) for b in boxes])
        box = torch.nn.functional.smooth_l1_loss(
            deltas[fg], reg[fg], beta=1 / 9, reduction="sum"
        ) / len(boxes)
        (torch.nn.functional.cross_entropy(logits, labels) + box).backward()
        for (name, got), want in zip(preds[k].named_parameters(), ref.parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_cascade_runs_on_torchvisions_roi_pooler_and_matches_a_stage_loop_with_its_box_coders():
    """torchvision's MultiScaleRoIAlign (which reads the image sizes for its scales) as box and
    mask pooler; the detections against a loop over the stages written with torchvision's
    BoxCoder at each stage's weights: scores the mean of the stages' softmax, boxes the last
    stage's, masks from the final boxes at the detected class."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image

    torch.manual_seed(0)
    feats = {"p2": torch.randn(1, 2, 16, 16), "p3": torch.randn(1, 2, 8, 8)}
    preds = [AgnosticBoxPredictor(8, 3) for _ in range(3)]
    for p in preds:
        nn.init.normal_(p.cls_score.weight, std=1.0)
        nn.init.normal_(p.bbox_pred.weight, std=1.0)
    mask_predictor = nn.Conv2d(2, 3, 1)
    heads = _heads(
        pool=MultiScaleRoIAlign(["p2", "p3"], 2, 2),
        predictors=preds,
        mask_roi_pool=MultiScaleRoIAlign(["p2", "p3"], 2, 2),
        mask_head=nn.Identity(),
        mask_predictor=mask_predictor,
    ).eval()
    props = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
    with torch.no_grad():
        (det,), _ = heads(feats, [props], [(64, 64)])
        pool = MultiScaleRoIAlign(["p2", "p3"], 2, 2)
        boxes, scores = props, 0
        for k in range(3):
            logits, deltas = preds[k](pool(feats, [boxes], [(64, 64)]))
            scores = scores + torch.softmax(logits, 1) / 3
            boxes = clip_boxes_to_image(
                BoxCoder(WEIGHTS[k]).decode(deltas, [boxes])[:, 0], (64, 64)
            )
        want = sorted(
            ((float(scores[r, c]), c, boxes[r]) for r in range(2) for c in (1, 2)),
            key=lambda t: -t[0],
        )
        masks = torch.sigmoid(mask_predictor(pool(feats, [det["boxes"]], [(64, 64)])))
    assert det["labels"].tolist() == [c for _, c, _ in want]
    torch.testing.assert_close(det["scores"], torch.tensor([s for s, _, _ in want]))
    torch.testing.assert_close(det["boxes"], torch.stack([b for _, _, b in want]))
    torch.testing.assert_close(det["masks"], masks[torch.arange(4), det["labels"]][:, None])


def test_agnostic_predictor_starts_small_and_outputs_one_box_per_roi():
    torch.manual_seed(0)
    p = AgnosticBoxPredictor(256, 5)
    logits, deltas = p(torch.randn(3, 256, 1, 1))
    assert logits.shape == (3, 5) and deltas.shape == (3, 4)
    assert abs(p.cls_score.weight.std().item() - 0.01) < 0.001
    assert abs(p.bbox_pred.weight.std().item() - 0.001) < 0.0001
    assert not p.cls_score.bias.any() and not p.bbox_pred.bias.any()
    with pytest.raises(
        ValueError, match="^cascade needs one head, predictor, IoU and weight set per stage$"
    ):
        CascadeRoIHeads(
            box_roi_pool=BoxesAsFeatures(),
            box_heads=[nn.Identity()] * 2,
            box_predictors=[Fixed(LOGITS[0], DELTAS[0])] * 3,
            stage_ious=[0.5, 0.6, 0.7],
            stage_weights=WEIGHTS,
            batch_size_per_image=8,
            positive_fraction=0.25,
            score_thresh=0.0,
            nms_thresh=0.5,
            detections_per_img=10,
        )


# ---------------------------------------------------------------------- detector assembly
# One block per stage, narrow FPN and heads: small enough for a CPU test.
_TINY = dict(
    depths=(1, 1, 1, 1),
    embed_dim=16,
    img_size=64,
    fpn_channels=24,
    box_fc_dim=40,
    box_conv_dim=20,
    mask_head_dim=12,
    anchor_sizes=(8, 16, 32, 64, 128),
)


def _tiny_detector(name: str, num_classes: int = 4, **kw):
    from mvitv2.detection import create_detector

    return create_detector(name, num_classes=num_classes, **_TINY, **kw)


def test_mask_rcnn_is_assembled_with_the_configured_and_detectron2_default_values():
    from torch.nn import BatchNorm2d, Conv2d, Linear

    m = _tiny_detector(
        "maskrcnn_mvitv2_tiny",
        fpn_norm="BN",
        mask_head_convs=2,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=200,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        rpn_nms_thresh=0.65,
        box_head="1conv2fc",
        box_batch_size_per_image=96,
        box_positive_fraction=0.3,
        box_fg_iou=0.55,
        score_thresh=0.2,
        nms_thresh=0.45,
        detections_per_img=33,
        min_size=96,
        max_size=160,
        train_min_size=(64, 80),
        aspect_ratios=(0.5, 2.0),
        image_mean=(0.4, 0.5, 0.6),
        image_std=(0.1, 0.2, 0.3),
    )
    rpn, heads, tf = m.rpn, m.roi_heads, m.transform
    # RPN: detectron2's IoU 0.7 / 0.3 and half positive anchors; the configured counts.
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert rpn.fg_bg_sampler.batch_size_per_image == 64
    assert rpn.fg_bg_sampler.positive_fraction == 0.5
    assert rpn._pre_nms_top_n == {"training": 300, "testing": 150}
    assert rpn._post_nms_top_n == {"training": 200, "testing": 100}
    assert rpn.nms_thresh == 0.65 and len(rpn.head.conv) == 1
    assert rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 2.0),) * 5
    assert rpn.head.cls_logits.out_channels == 2 and rpn.head.conv[0][0].in_channels == 24
    # Box head "1conv2fc": one 3x3 conv of box_conv_dim, two fcs of box_fc_dim.
    convs = [x for x in heads.box_head.modules() if isinstance(x, Conv2d)]
    fcs = [x for x in heads.box_head.modules() if isinstance(x, Linear)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(24, 20)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(20 * 7 * 7, 40), (40, 40)]
    assert heads.box_predictor.cls_score.out_features == 5  # 4 classes + background
    assert heads.box_predictor.bbox_pred.out_features == 20
    assert heads.proposal_matcher.high_threshold == heads.proposal_matcher.low_threshold == 0.55
    assert heads.fg_bg_sampler.batch_size_per_image == 96
    assert heads.fg_bg_sampler.positive_fraction == 0.3
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.2, 0.45, 33)
    assert heads.box_roi_pool.output_size == (7, 7) and heads.mask_roi_pool.output_size == (14, 14)
    assert heads.box_roi_pool.strides == heads.mask_roi_pool.strides == (4, 8, 16, 32)
    mask_convs = [x for x in heads.mask_head.modules() if isinstance(x, Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in mask_convs] == [(24, 12), (12, 12)]
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert heads.mask_predictor.conv5_mask.out_channels == 12
    # Input pipeline.
    assert (tf.test_size, tf.max_size, tf.train_sizes) == (96, 160, [64, 80])
    assert tf.image_mean == [0.4, 0.5, 0.6] and tf.image_std == [0.1, 0.2, 0.3]
    assert tf.size_divisible == 32 and not tf._skip_resize
    assert _tiny_detector("maskrcnn_mvitv2_tiny").transform._skip_resize  # no train_min_size
    assert m.backbone.out_channels == 24 and m.num_classes == 4
    body = m.backbone.body.cfg  # the backbone gets the overrides and the paper's windows
    assert (body.embed_dim, tuple(body.depths)) == (16, (1, 1, 1, 1))
    assert tuple(body.window_size) == (56, 28, 14, 7) and body.drop_path_rate == 0.2
    assert any(isinstance(x, BatchNorm2d) for x in m.backbone.fpn.modules())  # fpn_norm="BN"
    assert not any(isinstance(x, BatchNorm2d) for x in m.roi_heads.modules())  # head_norm=""
    one = _tiny_detector("maskrcnn_mvitv2_tiny", num_classes=1)  # a single object class
    assert one.roi_heads.box_predictor.cls_score.out_features == 2
    assert not any(isinstance(x, Conv2d) for x in one.roi_heads.box_head.modules())  # "2fc"
    assert [f.out_features for f in one.roi_heads.box_head.modules() if isinstance(f, Linear)] == [
        40,
        40,
    ]
    one.set_grad_checkpointing()  # on by default
    assert one.backbone.body.grad_checkpointing is True
    one.set_grad_checkpointing(False)
    assert one.backbone.body.grad_checkpointing is False


def test_cascade_is_assembled_with_one_head_per_stage_and_the_configured_values():
    from torch.nn import BatchNorm2d, Linear

    m = _tiny_detector(
        "cascade_maskrcnn_mvitv2_tiny",
        cascade_ious=(0.4, 0.8),
        mask=False,
        cascade_weights=((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)),
        box_batch_size_per_image=48,
        box_positive_fraction=0.4,
        score_thresh=0.3,
        nms_thresh=0.6,
        detections_per_img=21,
    )
    heads = m.roi_heads
    assert heads.num_stages == 2 and not heads.has_mask()
    assert [x.high_threshold for x in heads.stage_matchers] == [0.4, 0.8]
    assert [x.low_threshold for x in heads.stage_matchers] == [0.4, 0.8]
    assert [c.weights for c in heads.stage_coders] == [(1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0)]
    assert heads.proposal_matcher.high_threshold == 0.4  # the first stage samples the RoIs
    assert heads.box_coder.weights == (1.0, 2.0, 3.0, 4.0)
    assert heads.fg_bg_sampler.batch_size_per_image == 48
    assert heads.fg_bg_sampler.positive_fraction == 0.4
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.6, 21)
    for head, pred in zip(heads.box_heads, heads.box_predictors):
        assert sum(isinstance(x, BatchNorm2d) for x in head.modules()) == 4  # 4conv1fc, BN
        assert [f.out_features for f in head.modules() if isinstance(f, Linear)] == [40]
        assert (pred.cls_score.in_features, pred.cls_score.out_features) == (40, 5)
        assert pred.bbox_pred.out_features == 4
    assert heads.box_heads[0] is not heads.box_heads[1]
    assert len(m.rpn.head.conv) == 2  # detectron2's cascade configs: 2-conv RPN head


def test_each_registered_detector_uses_its_sizes_backbone_and_detectron2_head_layout():
    from mvitv2.detection import get_detector_config

    for size in ("tiny", "small", "base", "large", "huge"):
        plain = get_detector_config(f"maskrcnn_mvitv2_{size}")
        cascade = get_detector_config(f"cascade_maskrcnn_mvitv2_{size}")
        assert plain.backbone == cascade.backbone == f"mvitv2_{size}"
        assert plain.backbone_overrides == cascade.backbone_overrides
        assert plain.backbone_overrides.get("expand_attn", False) == (size == "large")
        assert (plain.cascade, plain.box_head, plain.head_norm, plain.rpn_conv_depth) == (
            False,
            "2fc",
            "",
            1,
        )
        assert (cascade.cascade, cascade.box_head, cascade.head_norm, cascade.rpn_conv_depth) == (
            True,
            "4conv1fc",
            "BN",
            2,
        )


def test_cascade_mask_branch_and_config_are_kept_on_the_model():
    from torch.nn import BatchNorm2d, Conv2d

    from mvitv2.detection import get_detector_config

    m = _tiny_detector("cascade_maskrcnn_mvitv2_tiny", mask_head_convs=2)
    heads = m.roi_heads
    assert heads.has_mask() and heads.box_roi_pool.output_size == (7, 7)
    assert heads.mask_roi_pool.output_size == (14, 14)
    convs = [x for x in heads.mask_head.modules() if isinstance(x, Conv2d)]
    assert [(c.in_channels, c.out_channels, c.dilation) for c in convs] == [
        (24, 12, (1, 1)),
        (12, 12, (1, 1)),
    ]
    assert sum(isinstance(x, BatchNorm2d) for x in heads.mask_head.modules()) == 2  # BN heads
    assert heads.mask_predictor.conv5_mask.in_channels == 12
    assert m.config == get_detector_config(
        "cascade_maskrcnn_mvitv2_tiny", **_TINY, mask_head_convs=2
    )
    with pytest.raises(KeyError, match="available: cascade_maskrcnn_mvitv2_base, cascade_"):
        get_detector_config("maskrcnn_mvitv2_tinyy")


def test_backbone_weights_initialise_the_detector_backbone_strictly_by_default(tmp_path):
    from mvitv2 import create_model
    from mvitv2.weights import CheckpointMismatchError

    src = create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=16, img_size=64, num_classes=3)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    torch.save(src.state_dict(), tmp_path / "cls.pth")
    m = _tiny_detector("maskrcnn_mvitv2_tiny", backbone_weights=str(tmp_path / "cls.pth"))
    body = dict(m.backbone.body.named_parameters())
    same = [k for k, v in src.named_parameters() if k in body and "rel_pos" not in k]
    assert len(same) > 20  # all but the head, the final norm and the (resized) rel-pos tables
    for k in same:
        assert torch.equal(body[k], dict(src.named_parameters())[k]), k
    partial = {k: v for k, v in src.state_dict().items() if k != "blocks.0.mlp.fc1.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match="blocks.0.mlp.fc1.weight"):
        _tiny_detector("maskrcnn_mvitv2_tiny", backbone_weights=str(tmp_path / "partial.pth"))
    loose = _tiny_detector(
        "maskrcnn_mvitv2_tiny", backbone_weights=str(tmp_path / "partial.pth"), strict=False
    )
    lb = dict(loose.backbone.body.named_parameters())
    assert torch.equal(lb["blocks.0.mlp.fc2.weight"], src.blocks[0].mlp.fc2.weight)


def test_backbone_weights_by_tag_or_true_load_the_registered_file_strictly_by_default(
    tmp_path, monkeypatch
):
    from mvitv2 import create_model
    from mvitv2.detection import load_backbone_weights
    from mvitv2.weights import CheckpointMismatchError, registry
    from test_values_weights_registry import _register_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(registry, "WEIGHTS", dict(registry.WEIGHTS))
    monkeypatch.setattr(registry, "DEFAULT_WEIGHTS", dict(registry.DEFAULT_WEIGHTS))
    src = create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=16, img_size=64, num_classes=3)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    want = dict(src.named_parameters())
    torch.save(src.state_dict(), tmp_path / "full.pth")
    partial = {k: v for k, v in src.state_dict().items() if k != "blocks.0.mlp.fc1.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    _register_file(tmp_path / "full.pth", "mvitv2_tiny.dettest", num_classes=3)
    _register_file(tmp_path / "partial.pth", "mvitv2_tiny.dettest_partial", num_classes=3)
    registry.DEFAULT_WEIGHTS["mvitv2_tiny"] = "mvitv2_tiny.dettest"  # what True selects

    for source in ("mvitv2_tiny.dettest", True):
        m = _tiny_detector("maskrcnn_mvitv2_tiny")
        report = load_backbone_weights(m, source)
        assert report.notes[0].startswith("weights mvitv2_tiny.dettest ("), source
        assert m.backbone.body.pretrained_cfg.tag == "mvitv2_tiny.dettest"
        body = dict(m.backbone.body.named_parameters())
        same = [k for k in want if k in body and "rel_pos" not in k]
        assert len(same) > 20
        assert all(torch.equal(body[k], want[k]) for k in same), source

    # A registered file that lacks a backbone tensor: strict unless asked otherwise.
    m = _tiny_detector("maskrcnn_mvitv2_tiny")
    with pytest.raises(CheckpointMismatchError, match="blocks.0.mlp.fc1.weight"):
        load_backbone_weights(m, "mvitv2_tiny.dettest_partial")
    with pytest.raises(CheckpointMismatchError, match="blocks.0.mlp.fc1.weight"):
        load_backbone_weights(m, str(tmp_path / "partial.pth"))  # a file: strict too
    report = load_backbone_weights(m, "mvitv2_tiny.dettest_partial", strict=False)
    assert "blocks.0.mlp.fc1.weight" in report.missing
    fc2 = dict(m.backbone.body.named_parameters())["blocks.0.mlp.fc2.weight"]
    assert torch.equal(fc2, want["blocks.0.mlp.fc2.weight"])


def test_a_mask_head_without_convs_feeds_the_pooled_fpn_features_to_the_mask_predictor():
    """detectron2's ``ROI_MASK_HEAD.NUM_CONV: 0``: the deconv reads the 14x14 RoI features."""
    from torch.nn import Conv2d

    m = _tiny_detector("maskrcnn_mvitv2_tiny", mask_head_convs=0)
    heads = m.roi_heads
    assert not any(isinstance(x, Conv2d) for x in heads.mask_head.modules())
    x = torch.randn(2, 24, 14, 14)
    assert torch.equal(heads.mask_head(x), x)
    conv5 = heads.mask_predictor.conv5_mask
    assert (conv5.in_channels, conv5.out_channels) == (24, 12)  # fpn_channels -> mask_head_dim
    assert heads.mask_predictor(x).shape == (2, 5, 28, 28)


def test_images_are_padded_to_a_multiple_of_the_p5_stride_of_the_backbone():
    """The batch is padded to the coarsest box level's stride (detectron2's size divisibility),
    which follows the patch stride: 2 * 2**3 = 16 here, so each level tiles the padded image."""
    m = _tiny_detector(
        "maskrcnn_mvitv2_tiny", patch_stride=(1, 2, 2), min_size=100, max_size=150
    ).eval()
    assert m.backbone.strides == [2, 4, 8, 16, 32]
    images, _ = m.transform([torch.rand(3, 90, 110)])
    (h, w), hp, wp = images.image_sizes[0], *images.tensors.shape[-2:]
    assert (h, w) == (100, round(110 * 100 / 90))
    assert (hp, wp) == (-(-h // 16) * 16, -(-w // 16) * 16) == (112, 128)
    with torch.no_grad():
        features = m.backbone(images.tensors)
    for (name, f), stride in zip(features.items(), m.backbone.strides[:4]):
        assert f.shape[-2:] == (hp // stride, wp // stride), name


class MaskPool(nn.Module):
    """Mask RoI "pooling": each RoI's box as a (4, 2, 2) feature map; records the boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, features, boxes, image_shapes):
        self.seen.append(torch.cat(boxes).detach().clone())
        return torch.cat(boxes)[:, :, None, None].expand(-1, 4, 2, 2) / 100


class MaskLogits(nn.Module):
    """Per-class mask logits (3 classes incl. background) from the pooled box features."""

    def forward(self, x):
        return torch.stack([x[:, 0] - x[:, 1], x[:, 2] - 0.5, x[:, 3] * 2 - 1], dim=1)


def _mask_heads(**kw) -> CascadeRoIHeads:
    return _heads(
        mask_roi_pool=MaskPool(), mask_head=nn.Identity(), mask_predictor=MaskLogits(), **kw
    )


def test_cascade_masks_are_predicted_on_the_final_boxes_at_the_detected_class():
    props = [[10.0, 10.0, 30.0, 40.0], [60.0, 50.0, 95.0, 90.0], [20.0, 30.0, 50.0, 45.0]]
    heads = _mask_heads(detections=4).eval()
    with torch.no_grad():
        (det,), _ = heads({}, [torch.tensor(props)], [(100, 120)])
    assert torch.equal(heads.mask_roi_pool.seen[0], det["boxes"])  # the final, filtered boxes
    logits = MaskLogits()(torch.cat([det["boxes"]])[:, :, None, None].expand(-1, 4, 2, 2) / 100)
    want = torch.sigmoid(logits[torch.arange(4), det["labels"]])[:, None]
    assert det["masks"].shape == (4, 1, 2, 2) and torch.allclose(det["masks"], want)


def test_cascade_mask_loss_uses_the_first_stages_foreground_rois_and_their_objects():
    from torchvision.models.detection.roi_heads import maskrcnn_loss

    torch.manual_seed(0)
    heads = _mask_heads().train()
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]])
    masks = torch.zeros(2, 100, 100)
    masks[0, 10:40, 10:25] = 1
    masks[1, 70:90, 60:90] = 1
    target = {"boxes": gt, "labels": torch.tensor([2, 1]), "masks": masks}
    props = torch.tensor(
        [
            [10.0, 10.0, 40.0, 40.0],
            [12.0, 8.0, 44.0, 36.0],
            [62.0, 58.0, 88.0, 92.0],
            [0.0, 50.0, 20.0, 90.0],
        ]
    )
    dets, losses = heads({}, [props], [(100, 100)], [target])
    assert dets == []
    stage0 = heads.box_roi_pool.seen[0]  # the sampled RoIs (proposals and ground truth)
    ious = torch.tensor([[_iou(b, g) for g in gt.tolist()] for b in stage0.tolist()])
    best, matched = ious.max(1)
    fg = best >= 0.5
    assert torch.equal(heads.mask_roi_pool.seen[0], stage0[fg])
    pooled = stage0[fg][:, :, None, None].expand(-1, 4, 2, 2) / 100
    want = maskrcnn_loss(
        MaskLogits()(pooled), [stage0[fg]], [masks], [target["labels"]], [matched[fg]]
    )
    assert losses["loss_mask"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="^targets are required in training mode$"):
        heads({}, [props], [(100, 100)])


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix)


def test_detector_options_merge_into_the_backbone_and_are_validated_with_clear_messages():
    from mvitv2.detection import get_detector_config

    cfg = get_detector_config(
        "maskrcnn_mvitv2_small", backbone_overrides={"depths": [1, 1, 1, 1]}, embed_dim=16
    )
    assert cfg.backbone_overrides == {
        "window_size": (56, 28, 14, 7),
        "drop_path_rate": 0.2,
        "depths": [1, 1, 1, 1],
        "embed_dim": 16,
    }
    with pytest.raises(TypeError, match="backbone options: any MViTConfig field$"):
        get_detector_config("maskrcnn_mvitv2_tiny", bogus=1)
    with pytest.raises(
        ValueError, match=r"^anchor_sizes needs one size per level P2-P6, got \(8, 16\)$"
    ):
        get_detector_config("maskrcnn_mvitv2_tiny", anchor_sizes=(8, 16))
