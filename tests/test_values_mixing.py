"""MixCriterion's mixing probability at its boundary: a batch is mixed exactly when the
uniform draw is below ``prob`` (timm's ``Mixup``: ``np.random.rand() < mix_prob``), so that
P(mixed) = prob for a draw in [0, 1)."""

from __future__ import annotations

import torch

from mvitv2.engine.mixing import MixCriterion


def test_a_batch_is_mixed_only_when_the_draw_is_below_prob():
    """prob set to the very value the draw takes: not below it, the batch is kept; prob one
    float32 step above it: mixed."""
    torch.manual_seed(3)
    draw = torch.rand(())
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4).contiguous()
    labels = torch.tensor([0, 2])
    for prob, mixed in [(draw, False), (torch.nextafter(draw, torch.tensor(1.0)), True)]:
        mix = MixCriterion(4, mixup=1.0, prob=float(prob))
        torch.manual_seed(3)
        out, targets = mix(x.clone(), labels)
        assert torch.equal(out, x) != mixed
        assert torch.equal(targets, mix.soft_targets(labels)) != mixed
