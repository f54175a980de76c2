"""Parameters and FLOPs of the MViTv2 detectors against the MViTv2 paper's table.

Runs on the meta device (no memory, about a second per model):

    uv run python benchmarks/detection_flops.py [--size 800 1333] [--classes 80]

FLOPs are multiply-accumulates (the papers' "FLOPs"), for one image resized to ``--size`` and
padded to a multiple of 32, with the test-time RPN's 1000 proposals in the box head(s) and 100
detections in the mask head. See docs/detection.md for why the figures differ from the paper's.
"""

from __future__ import annotations

import argparse

import torch

from mvitv2.detection import create_detector, list_detectors
from mvitv2.detection.flops import detector_complexity

#: (params M, GFLOPs) from the MViTv2 paper (Mask R-CNN T from the design doc, section 4;
#: Cascade T from the paper's COCO table).
PAPER = {
    "maskrcnn_mvitv2_tiny": (44.0, 279.0),
    "cascade_maskrcnn_mvitv2_tiny": (76.0, 701.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=80, help="object classes (COCO: 80)")
    parser.add_argument("--models", nargs="*", default=list_detectors())
    args = parser.parse_args()
    print(f"input {args.size[0]}x{args.size[1]} (padded to /32), {args.classes} classes")
    head = f"{'model':32s} {'params M':>9s} {'backbone M':>10s} {'GFLOPs':>8s}  "
    head += "(backbone / fpn / rpn / box / mask)   paper"
    print(head)
    for name in args.models:
        with torch.device("meta"):
            model = create_detector(name, num_classes=args.classes)
        r = detector_complexity(model, tuple(args.size))
        parts = " / ".join(
            f"{r[k] / 1e9:.0f}"
            for k in ("macs_backbone", "macs_fpn", "macs_rpn", "macs_box", "macs_mask")
        )
        paper = PAPER.get(name)
        ref = f"{paper[0]:.0f} M, {paper[1]:.0f} G" if paper else "-"
        print(
            f"{name:32s} {r['params'] / 1e6:9.2f} {r['params_backbone'] / 1e6:10.2f} "
            f"{r['macs'] / 1e9:8.1f}  ({parts})   {ref}"
        )


if __name__ == "__main__":
    main()
