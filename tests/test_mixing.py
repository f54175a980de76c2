"""MixCriterion by value: label smoothing, mixup and cutmix on image batches and video clips
(one coefficient and one box for every frame of a clip), the op choice, the mixing probability
and the soft-target loss, each against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mvitv2.engine.mixing import MixCriterion

K, S = 5, 0.1  # classes, label smoothing
OFF, ON = S / K, 1 - S + S / K  # smoothed one-hot values, written out by hand
SHAPES = {"image": (4, 3, 8, 12), "clip": (4, 3, 3, 8, 12)}  # (B, C, H, W) / (B, C, T, H, W)


def _batch(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose samples differ everywhere (sample b holds values in [b, b + 0.5)), and
    labels that differ between neighbours, so that every mixed value and weight is visible."""
    b = shape[0]
    x = torch.arange(b, dtype=torch.float32).view(-1, *[1] * (len(shape) - 1))
    return x + 0.5 * torch.rand(shape), torch.tensor([0, 3, 1, 4][:b])


def _weights(targets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(own, partner) share of every sample, read back from smoothed targets:
    target[i, y] = OFF + share * (1 - S) for the label of i and of its partner i - 1."""
    own = (targets[torch.arange(len(labels)), labels] - OFF) / (1 - S)
    partner = (targets[torch.arange(len(labels)), labels.roll(1)] - OFF) / (1 - S)
    return own, partner


def test_label_smoothing_values():
    labels = torch.tensor([2, 0, 4])
    t = MixCriterion(K, label_smoothing=S).soft_targets(labels)
    expected = torch.full((3, K), OFF)
    expected[0, 2] = expected[1, 0] = expected[2, 4] = ON
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(
        MixCriterion(K).soft_targets(labels), F.one_hot(labels, K).float(), rtol=0, atol=0
    )


@pytest.mark.parametrize("kind", SHAPES)
def test_mixup_mixes_each_sample_with_its_neighbour_by_one_coefficient(kind):
    mix = MixCriterion(K, mixup=0.8, label_smoothing=S)
    for seed in range(5):
        torch.manual_seed(seed)
        x, labels = _batch(SHAPES[kind])
        out, targets = mix(x.clone(), labels)
        assert type(out) is torch.Tensor and out.shape == x.shape
        own, partner = _weights(targets, labels)
        lam = own[0]
        torch.testing.assert_close(own, lam.expand(4))  # one coefficient for the batch
        torch.testing.assert_close(partner, 1 - own)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # every frame, pixel and channel of sample i: lam * x[i] + (1 - lam) * x[i - 1]
        torch.testing.assert_close(out, lam * x + (1 - lam) * x.roll(1, 0))


@pytest.mark.parametrize("kind", SHAPES)
def test_cutmix_pastes_one_box_on_every_frame_and_weighs_targets_by_its_area(kind):
    mix = MixCriterion(K, cutmix=1.0, label_smoothing=S)
    boxes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        x, labels = _batch(SHAPES[kind])
        out, targets = mix(x.clone(), labels)
        assert type(out) is torch.Tensor and out.shape == x.shape
        pasted = out == x.roll(1, 0)
        assert torch.equal(pasted | (out == x), torch.ones_like(pasted))  # nothing blended
        box = pasted.flatten(0, -3)  # every (sample, channel, frame): (N, H, W)
        assert torch.equal(box, box[:1].expand_as(box))  # the same box on each of them
        rows, cols = box[0].any(1), box[0].any(0)
        assert torch.equal(box[0], rows[:, None] & cols[None, :])  # a rectangle
        area = box[0].float().mean()
        own, partner = _weights(targets, labels)
        torch.testing.assert_close(partner, area.expand(4))
        torch.testing.assert_close(own, 1 - area.expand(4))
        boxes.add((int(rows.sum()), int(cols.sum())))
    assert len(boxes) > 3  # boxes of several sizes were drawn (not always empty or full)


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_mixed_targets_are_the_naive_loops_blend_of_each_sample_and_its_neighbours_labels(op):
    """Every entry of the targets, neighbours with equal labels included: sample i's smoothed
    one-hot weighted by its share lam (mixup: read from the pixels; cutmix: 1 - the pasted
    box's area) plus sample i - 1's weighted by 1 - lam, built class by class in a loop."""
    mix = MixCriterion(K, **{op: 1.0}, label_smoothing=S)
    labels = torch.tensor([2, 2, 0, 4])  # samples 0 and 1 share a label
    for seed in range(3):
        torch.manual_seed(seed)
        x, _ = _batch(SHAPES["image"])
        out, targets = mix(x.clone(), labels)
        if op == "mixup":  # out = lam x + (1 - lam) x_prev, at one pixel of samples 1 and 0
            lam = float((out[1, 0, 0, 0] - x[0, 0, 0, 0]) / (x[1, 0, 0, 0] - x[0, 0, 0, 0]))
        else:
            lam = 1 - float((out[0, 0] != x[0, 0]).float().mean())
        want = torch.zeros(4, K)
        for i in range(4):
            for c in range(K):
                own = ON if c == labels[i] else OFF
                partner = ON if c == labels[i - 1] else OFF
                want[i, c] = lam * own + (1 - lam) * partner
        torch.testing.assert_close(targets, want)


@pytest.mark.parametrize("switch_prob, op", [(0.0, "mixup"), (1.0, "cutmix")])
def test_switch_prob_chooses_between_mixup_and_cutmix(switch_prob, op):
    mix = MixCriterion(K, mixup=1.0, cutmix=1.0, switch_prob=switch_prob, label_smoothing=S)
    for seed in range(6):
        torch.manual_seed(seed)
        x, labels = _batch(SHAPES["clip"])
        out, targets = mix(x.clone(), labels)
        kept_or_pasted = (out == x) | (out == x.roll(1, 0))
        assert bool(kept_or_pasted.all()) == (op == "cutmix")


def test_by_default_every_batch_is_mixed_half_by_cutmix():
    mix = MixCriterion(K, mixup=1.0, cutmix=1.0)  # prob 1, switch_prob 0.5
    torch.manual_seed(0)
    cut = 0
    for _ in range(40):
        x, labels = _batch(SHAPES["image"])
        out, _ = mix(x.clone(), labels)
        assert not torch.equal(out, x)
        cut += bool(((out == x) | (out == x.roll(1, 0))).all())
    assert 8 <= cut <= 32


@pytest.mark.parametrize("op, switch_prob", [("mixup", 1.0), ("cutmix", 0.0)])
def test_a_single_op_ignores_switch_prob(op, switch_prob):
    mix = MixCriterion(K, **{op: 1.0}, switch_prob=switch_prob)
    for seed in range(4):
        torch.manual_seed(seed)
        x, labels = _batch(SHAPES["clip"])
        out, _ = mix(x.clone(), labels)
        assert not torch.equal(out, x)
        assert bool(((out == x) | (out == x.roll(1, 0))).all()) == (op == "cutmix")


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_alpha_shapes_the_mixing_coefficient(op):
    """lam ~ Beta(alpha, alpha): a small alpha often keeps a sample nearly whole (lam near 1),
    a large one rarely. Seen as how often the partner's share of the targets is under 5%
    (Beta(1, 1) is uniform: about 5% for mixup, a little more for cutmix's clipped boxes)."""
    small = {}
    for alpha in (0.1, 1.0, 8.0):
        mix = MixCriterion(K, **{op: alpha})
        torch.manual_seed(0)
        shares = []
        for _ in range(150):
            x, labels = _batch((4, 3, 2, 16, 16))
            _, targets = mix(x, labels)
            shares.append(_weights(targets, labels)[1][0])
        small[alpha] = float((torch.stack(shares) < 0.05).float().mean())
    assert small[0.1] > 0.3 and 0.02 < small[1.0] < 0.25 and small[8.0] < 0.02, small


def test_soft_targets_stay_on_the_labels_device():
    labels = torch.tensor([1, 0], device="meta")
    assert MixCriterion(K, label_smoothing=S).soft_targets(labels).device.type == "meta"


def test_mix_prob_decides_how_many_batches_are_mixed():
    torch.manual_seed(0)
    x, labels = _batch(SHAPES["clip"])
    plain = MixCriterion(K, label_smoothing=S).soft_targets(labels)
    for prob, lo, hi in [(0.0, 0, 0), (0.2, 8, 32), (0.5, 25, 75), (1.0, 100, 100)]:
        mix = MixCriterion(K, mixup=1.0, prob=prob, label_smoothing=S)
        assert mix.active == (prob > 0)
        mixed = 0
        for _ in range(100):
            out, targets = mix(x.clone(), labels)
            unchanged = torch.equal(out, x)
            assert unchanged == torch.equal(targets, plain)
            mixed += not unchanged
        assert lo <= mixed <= hi, (prob, mixed)


def test_no_mixing_configured_gives_smoothed_targets_only():
    mix = MixCriterion(K, mixup=0.0, cutmix=0.0, label_smoothing=S)
    assert not mix.active
    x, labels = _batch(SHAPES["clip"])
    out, targets = mix(x, labels)
    assert out is x
    torch.testing.assert_close(targets, mix.soft_targets(labels))


def test_soft_target_loss_is_the_cross_entropy_with_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(6, K)
    targets = torch.softmax(torch.randn(6, K), -1)
    by_hand = -(targets * torch.log_softmax(logits.double(), -1)).sum(-1).mean()
    loss = MixCriterion.loss(logits, targets)
    torch.testing.assert_close(loss.double(), by_hand)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    # bf16 logits (autocast) are scored in float32
    assert MixCriterion.loss(logits.bfloat16(), targets).dtype == torch.float32
