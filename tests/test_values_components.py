"""Value tests of the detectron2-equivalent detection components against independent references
(naive loops, torchvision's ops and box coder, PIL)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import nms, roi_align

from mvitv2.detection.components import (
    DetectionTransform,
    FastRCNNRoIHeads,
    LevelRoIAlign,
    ProposalNetwork,
    _paste_masks_traced,
    paste_masks,
    pil_resize,
)


def _nms_by_level(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float):
    """Per-group NMS with torchvision's plain ``nms``, merged best first (a naive batched NMS)."""
    kept = []
    for g in groups.unique().tolist():
        idx = torch.where(groups == g)[0]
        kept += idx[nms(boxes[idx], scores[idx], thresh)].tolist()
    kept.sort(key=lambda i: -float(scores[i]))
    return torch.tensor(kept, dtype=torch.int64)


def _random_boxes(n: int, size: float, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 1.2 - size * 0.1
    wh = torch.rand(n, 2, generator=g) * size * 0.4 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_rpn_selects_per_image_per_level_top_k_then_per_level_nms_like_a_naive_loop() -> None:
    """Two images, three levels of different sizes: each image's proposals are its own top-k
    logits per level, clipped to its own size, non-empty, NMS'd per level, best post-k kept."""
    g = torch.Generator().manual_seed(0)
    counts, pre, post, thresh = [9, 6, 4], 4, 7, 0.5
    top_pre, top_post = {"training": pre, "testing": pre}, {"training": post, "testing": post}
    rpn = ProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, top_pre, top_post, thresh).eval()
    n = sum(counts)
    proposals = torch.stack([_random_boxes(n, 60, g) for _ in range(2)])
    logits = torch.randn(2, n, generator=g) * 3
    shapes = [(50, 60), (40, 30)]
    got_boxes, got_scores = rpn.filter_proposals(proposals, logits.reshape(2, n, 1), shapes, counts)
    starts = np.cumsum([0] + counts)
    for b in range(2):
        sel = []
        for lvl, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
            order = sorted(range(s, e), key=lambda i: -float(logits[b, i]))[:pre]
            sel += [(i, lvl) for i in order]
        h, w = shapes[b]
        boxes = proposals[b, [i for i, _ in sel]].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        scores = logits[b, [i for i, _ in sel]]
        lvls = torch.tensor([lvl for _, lvl in sel])
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, lvls = boxes[ok], scores[ok], lvls[ok]
        keep = _nms_by_level(boxes, scores, lvls, thresh)[:post]
        torch.testing.assert_close(got_boxes[b], boxes[keep], atol=0, rtol=0)
        torch.testing.assert_close(got_scores[b], scores[keep], atol=0, rtol=0)


def test_level_roi_align_pools_each_images_boxes_from_its_own_feature_map() -> None:
    """Boxes of two images, of sizes spanning the levels, each pooled with roi_align(aligned=True,
    adaptive sampling) from its own image's map at level floor(4 + log2(sqrt(area) / 224))."""
    g = torch.Generator().manual_seed(1)
    strides = (4, 8, 16, 32)
    feats = {
        f"p{lv}": torch.randn(2, 3, 256 // s, 320 // s, generator=g)
        for lv, s in zip(range(2, 6), strides)
    }
    sides = [[20.0, 130.0, 300.0], [60.0, 250.0]]
    boxes = [
        torch.tensor([[5.0 + k, 7.0, 5.0 + k + s, 7.0 + 0.8 * s] for k, s in enumerate(ss)])
        for ss in sides
    ]
    got = LevelRoIAlign(list(feats), 5, strides, sampling_ratio=2)(feats, boxes, [(256, 320)] * 2)
    want = []
    for img, bs in enumerate(boxes):
        for box in bs:
            side = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
            level = min(max(math.floor(4 + math.log2(side / 224 + 1e-8)), 2), 5)
            feat = feats[f"p{level}"][img : img + 1]
            want.append(roi_align(feat, [box[None]], 5, 1 / 2**level, 2, aligned=True)[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=0)


def test_roi_heads_decode_with_their_weights_softmax_and_filter_each_image_separately() -> None:
    """postprocess_detections: boxes decoded with BoxCoder(10, 10, 5, 5) from each image's
    proposals, softmax scores, then per image: clip, score > thresh, per-class NMS, top-k."""
    g = torch.Generator().manual_seed(2)
    heads = FastRCNNRoIHeads(
        None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.2, 0.5, 4
    )
    proposals = [_random_boxes(5, 50, g), _random_boxes(3, 50, g)]
    classes = 3
    logits = torch.randn(8, classes + 1, generator=g) * 2
    deltas = torch.randn(8, (classes + 1) * 4, generator=g) * 0.3
    shapes = [(40, 50), (45, 35)]
    got = heads.postprocess_detections(logits, deltas, proposals, shapes)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    start = 0
    for i, (props, (h, w)) in enumerate(zip(proposals, shapes)):
        end = start + len(props)
        dec = coder.decode(deltas[start:end], [props]).reshape(len(props), classes + 1, 4)
        probs = torch.exp(logits[start:end]) / torch.exp(logits[start:end]).sum(1, keepdim=True)
        start = end
        cand_b, cand_s, cand_c = [], [], []
        for r in range(len(props)):
            for c in range(1, classes + 1):
                if probs[r, c] > 0.2:
                    x0, y0, x1, y1 = dec[r, c].tolist()
                    cand_b.append(
                        [
                            min(max(x0, 0), w),
                            min(max(y0, 0), h),
                            min(max(x1, 0), w),
                            min(max(y1, 0), h),
                        ]
                    )
                    cand_s.append(float(probs[r, c]))
                    cand_c.append(c)
        cb, cs, cc = torch.tensor(cand_b).reshape(-1, 4), torch.tensor(cand_s), torch.tensor(cand_c)
        keep = _nms_by_level(cb, cs, cc, 0.5)[:4]
        torch.testing.assert_close(got[0][i], cb[keep], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1][i], cs[keep], atol=1e-6, rtol=0)
        assert got[2][i].tolist() == cc[keep].tolist()


def _paste_naive(mask: torch.Tensor, box: list[float], h: int, w: int) -> torch.Tensor:
    """Bilinear sample (zero outside the mask) at pixel centres, in mask cells, zero beyond the
    box grown by one pixel: detectron2's paste_masks_in_image written as a per-pixel loop."""
    m = mask.double()
    size_y, size_x = m.shape
    x0, y0, x1, y1 = box
    out = torch.zeros(h, w, dtype=torch.float64)

    def at(r: int, c: int) -> float:
        return float(m[r, c]) if 0 <= r < size_y and 0 <= c < size_x else 0.0

    for y in range(max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, h)):
        for x in range(max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, w)):
            u = (x + 0.5 - x0) / (x1 - x0) * size_x - 0.5
            v = (y + 0.5 - y0) / (y1 - y0) * size_y - 0.5
            c0, r0 = math.floor(u), math.floor(v)
            fu, fv = u - c0, v - r0
            out[y, x] = (
                at(r0, c0) * (1 - fu) * (1 - fv)
                + at(r0, c0 + 1) * fu * (1 - fv)
                + at(r0 + 1, c0) * (1 - fu) * fv
                + at(r0 + 1, c0 + 1) * fu * fv
            )
    return out


def test_mask_pasting_matches_a_per_pixel_bilinear_loop_on_a_non_square_image() -> None:
    g = torch.Generator().manual_seed(3)
    h, w = 23, 31
    masks = torch.rand(3, 1, 5, 6, generator=g)
    boxes = torch.tensor([[3.3, 2.6, 17.8, 12.2], [0.4, 9.5, 30.7, 22.9], [20.5, 1.2, 26.0, 8.7]])
    want = torch.stack([_paste_naive(m[0], b.tolist(), h, w) for m, b in zip(masks, boxes)])
    for fn in (paste_masks, _paste_masks_traced):
        got = fn(masks, boxes, (h, w))
        assert got.shape == (3, 1, h, w)
        torch.testing.assert_close(got[:, 0].double(), want, atol=1e-5, rtol=0)


def test_pil_resize_is_pils_bilinear_resize_to_height_by_width() -> None:
    g = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (3, 17, 29), dtype=torch.uint8, generator=g)
    got = pil_resize(image, (11, 40))
    arr = np.asarray(
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((40, 11), Image.BILINEAR)
    )
    assert got.dtype == torch.uint8 and got.shape == (3, 11, 40)
    assert torch.equal(got, torch.from_numpy(arr.copy()).permute(2, 0, 1))


def test_uint8_images_are_normalised_with_255_times_mean_and_std_in_float32() -> None:
    t = DetectionTransform(None, 64, 100, (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)).eval()
    image = torch.randint(
        0, 256, (3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    got = t.normalize(image)
    assert got.dtype == torch.float32
    for c, (m, s) in enumerate(((0.4, 0.2), (0.5, 0.25), (0.6, 0.5))):
        want = (image[c].double() - 255 * m) / (255 * s)
        torch.testing.assert_close(got[c].double(), want, atol=1e-5, rtol=0)


def test_test_time_resize_scales_float_images_boxes_and_nearest_masks_per_axis() -> None:
    """Eval: short side to test_size (40 x 60 -> 64 x 96), bilinear for float images; a target's
    boxes scale by the per-axis ratios and masks are resized by nearest neighbour."""
    t = DetectionTransform((32,), 64, 1000, (0.5,) * 3, (0.25,) * 3).eval()
    g = torch.Generator().manual_seed(6)
    image = torch.rand(3, 40, 60, generator=g)
    masks = (torch.rand(2, 40, 60, generator=g) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[3.0, 5.0, 30.0, 20.0], [10.0, 1.0, 60.0, 39.0]])
    out, target = t.resize(image, {"boxes": boxes, "masks": masks})
    assert out.shape == (3, 64, 96)
    want = F.interpolate(image[None], size=(64, 96), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    scale = torch.tensor([96 / 60, 64 / 40, 96 / 60, 64 / 40])
    torch.testing.assert_close(target["boxes"], boxes * scale)
    rows = [math.floor(i * 40 / 64) for i in range(64)]
    cols = [math.floor(j * 60 / 96) for j in range(96)]
    assert target["masks"].dtype == torch.uint8
    assert torch.equal(target["masks"], masks[:, rows][:, :, cols])


def test_postprocess_pastes_the_kept_masks_at_the_scaled_boxes_of_every_image() -> None:
    t = DetectionTransform(None, 64, 100, (0.5,) * 3, (0.25,) * 3).eval()
    g = torch.Generator().manual_seed(7)
    masks = torch.rand(3, 1, 4, 4, generator=g)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 15.0], [30.0, 5.0, 30.0, 9.0], [5.0, 1.0, 12.5, 30.0]])
    preds = [
        {"boxes": boxes, "masks": masks, "scores": torch.tensor([0.9, 0.8, 0.7])},
        {"boxes": boxes[:1] * 2, "masks": masks[:1], "scores": torch.tensor([0.5])},
    ]
    out = t.postprocess(preds, [(32, 40), (32, 40)], [(48, 50), (16, 20)])
    # Image 0: x by 50 / 40, y by 48 / 32; the zero-width box is dropped.
    scaled = boxes[[0, 2]] * torch.tensor([1.25, 1.5, 1.25, 1.5])
    scaled[:, 3] = scaled[:, 3].clamp(max=48)
    torch.testing.assert_close(out[0]["boxes"], scaled)
    torch.testing.assert_close(out[0]["scores"], torch.tensor([0.9, 0.7]))
    want = torch.stack(
        [_paste_naive(masks[i, 0], scaled[k].tolist(), 48, 50) for k, i in enumerate([0, 2])]
    )
    torch.testing.assert_close(out[0]["masks"][:, 0].double(), want, atol=1e-5, rtol=0)
    # Image 1: halved and clipped to 16 x 20.
    box1 = (boxes[0] * 2 * 0.5).clamp(max=torch.tensor([20.0, 16.0, 20.0, 16.0]))
    torch.testing.assert_close(out[1]["boxes"], box1[None])
    want1 = _paste_naive(masks[0, 0], box1.tolist(), 16, 20)
    torch.testing.assert_close(out[1]["masks"][0, 0].double(), want1, atol=1e-5, rtol=0)
