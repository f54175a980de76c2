"""Checkpoint surgery shared by the detectron2 tests."""

from __future__ import annotations

import torch


def three_class_cascade(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cascade detector's state dict cut to three classes: the first three rows of each
    class-score head and background, which detectron2 keeps last (row 80 of 81), and the first
    three mask predictors."""
    three = dict(sd)
    for k in range(3):
        for kind in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{k}.cls_score.{kind}"
            three[key] = sd[key][[0, 1, 2, 80]]
    for kind in ("weight", "bias"):
        key = f"roi_heads.mask_head.predictor.{kind}"
        three[key] = sd[key][:3]
    return three
