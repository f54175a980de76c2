"""Classification metrics shared by the image and video tasks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from mvitv2.engine.distributed import DistInfo
from mvitv2.engine.trainer import to_device


def evaluate_classifier(model: nn.Module, loader: DataLoader, dist: DistInfo) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and count over all processes' shards.

    Args:
        model: a classifier returning logits ``(B, num_classes)``.
        loader: yields ``(inputs, labels)`` (or None for a batch whose samples were all skipped).
        dist: combines the processes' sums, so every process returns the same numbers.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            inputs, labels = to_device(batch, dist.device, non_blocking=True)
            logits = model(inputs).double()  # float64 sums: exact counts, loss to ~1e-15
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels[:, None]
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums += torch.tensor(
                [hit[:, 0].sum().item(), hit.any(1).sum().item(), loss.item(), len(labels)],
                dtype=torch.float64,
            )
    s = dist.all_reduce_sum(sums).tolist()
    n = max(1.0, s[3])
    return {"top1": 100 * s[0] / n, "top5": 100 * s[1] / n, "loss": s[2] / n, "count": int(s[3])}
