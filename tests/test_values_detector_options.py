"""``get_detector_config`` by value: where each override goes, and the exact lines a misspelt
detector or option gives (a user reads them to find the right name)."""

from __future__ import annotations

import dataclasses

import pytest

from mvitv2.detection.model import DETECTOR_CONFIGS, DetectorConfig, get_detector_config


def test_backbone_overrides_given_as_such_merge_into_the_variant_s_and_a_field_wins():
    """``backbone_overrides={...}`` adds to the registered ones (the windows and drop path stay);
    a backbone field passed by name overrides both."""
    base = dict(DETECTOR_CONFIGS["maskrcnn_mvitv2_tiny"].backbone_overrides)
    cfg = get_detector_config(
        "maskrcnn_mvitv2_tiny", backbone_overrides={"embed_dim": 48, "num_heads": 2}, num_heads=3
    )
    assert dict(cfg.backbone_overrides) == {**base, "embed_dim": 48, "num_heads": 3}
    assert cfg.backbone_overrides["window_size"] == (56, 28, 14, 7)


def test_an_unknown_detector_lists_every_registered_one_comma_separated():
    with pytest.raises(KeyError) as err:
        get_detector_config("maskrcnn_mvitv2_tinyy")
    assert str(err.value) == (
        "unknown detector 'maskrcnn_mvitv2_tinyy'; available: "
        + ", ".join(sorted(DETECTOR_CONFIGS))
    )


def test_an_unknown_option_lists_the_detector_fields_and_says_any_backbone_field_goes():
    fields = sorted(f.name for f in dataclasses.fields(DetectorConfig))
    with pytest.raises(TypeError) as err:
        get_detector_config("maskrcnn_mvitv2_tiny", zz=1, foo=2)
    assert str(err.value) == (
        f"unknown option(s) for maskrcnn_mvitv2_tiny: ['foo', 'zz']; detector options: {fields}; "
        "backbone options: any MViTConfig field"
    )
