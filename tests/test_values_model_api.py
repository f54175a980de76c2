"""The library calls a timm user relies on, by value: a new classifier's initialisation and name
matching with and without wildcards."""

from __future__ import annotations

import fnmatch

import torch

import mvitv2
from mvitv2.models.registry import names_matching


def test_reset_classifier_draws_weights_with_std_0_02_and_zero_bias_as_timm():
    """timm's MViTv2 head init: truncated normal with std 0.02 (cut at +-2, far outside), bias 0.
    64 features x 200 classes = 12,800 draws: the sample std is within 1% of 0.02 for a normal."""
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=8, img_size=32)
    model.reset_classifier(200)
    weight, bias = model.head.projection.weight, model.head.projection.bias
    assert weight.shape == (200, 64)
    assert abs(weight.std().item() - 0.02) < 0.001
    assert abs(weight.mean().item()) < 0.001
    assert torch.count_nonzero(bias) == 0


def test_names_matching_is_a_substring_unless_the_pattern_has_a_wildcard():
    """Any pattern without ``*?[`` (letters, digits, ``_``, ``X``) is a plain substring; one with
    them is a shell wildcard over the whole name, compared with ``fnmatch`` name by name."""
    names = ["aXb", "Xc", "d_1", "d_2", "ed"]
    for pattern in ("X", "b", "d_", "Xc", "", "e"):
        assert names_matching(names, pattern) == sorted(n for n in names if pattern in n)
    for pattern in ("X*", "*X*", "d_?", "[de]*"):
        want = [n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern)]
        assert names_matching(names, pattern) == want
    assert names_matching(names, "X*") == ["Xc"] and names_matching(names, "X") == ["Xc", "aXb"]
