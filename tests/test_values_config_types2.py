"""The checks a training config and a dataclass config's field types make, one by one: each
inclusive end of a range is accepted on its own, each out-of-range value is refused with its
own whole message, and a field's annotation decides what is checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError
from mvitv2.utils.fields import checked_fields


@dataclasses.dataclass(frozen=True)
class _Plain:
    table: dict = dataclasses.field(default_factory=dict)
    folder: Path = Path("runs")


def test_a_bare_dict_field_takes_a_mapping_and_other_annotations_are_left_to_the_config():
    """``dict`` without item types is a mapping as ``dict[str, Any]`` is; an annotation the
    checker does not know (a Path) passes its value through as given."""
    with pytest.raises(UserValueError) as e:
        checked_fields(_Plain, {"table": [1, 2]}, "plain option")
    assert str(e.value) == "plain option table: expected a mapping, got [1, 2]"
    given = {"table": {"a": 1}, "folder": "runs/a"}
    assert checked_fields(_Plain, given, "plain option") == given


@pytest.mark.parametrize(
    "override",
    ["mix_prob=0", "mix_prob=1", "switch_prob=0", "switch_prob=1", "momentum=0", "lr_gamma=1e-9"]
    + ["mixup=0", "cutmix=0", "eval_every=0", "ckpt_every_steps=0", "weight_decay=0", "min_lr=0"]
    + ["warmup_lr=0"],
)
def test_each_inclusive_end_of_a_training_range_is_accepted_on_its_own(override):
    """One override a config (the shared test gives several, where the last of a name wins)."""
    name, text = override.split("=")
    assert getattr(TrainConfig.load(None, [override]), name) == float(text)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("min_lr=-1e-6", "min_lr and warmup_lr must be >= 0"),
        ("lr_gamma=-0.5", "lr_gamma must be > 0"),
        ("lr_steps=[3, -1]", "lr_steps must be epochs >= 0"),
        ("weight_decay=-0.05", "weight_decay must be >= 0"),
        ("momentum=1.5", "momentum must be in [0, 1)"),
        ("cutmix=-1", "mixup and cutmix must be >= 0 (0: off)"),
        ("mix_prob=1.01", "mix_prob must be in [0, 1]"),
        ("switch_prob=-0.1", "switch_prob must be in [0, 1]"),
        ("eval_every=-2", "eval_every must be >= 0 (0: the last epoch only)"),
        ("ckpt_every_steps=-1", "ckpt_every_steps must be >= 0 (0: epoch ends only)"),
    ],
)
def test_each_out_of_range_training_option_is_refused_with_its_whole_message(override, message):
    """The whole line the user reads: the range and what 0 means, nothing more."""
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(None, [override])
    assert str(e.value) == f"invalid training config: {message}"
