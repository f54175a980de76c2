"""Data and model options are checked against their fields' types before a config is built: a
wrong type is one error line naming the option (``data.img_size=abc`` was a ``TypeError``
traceback from a transform), lists become tuples, YAML's ``224.0`` an integer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import mvitv2
from mvitv2.cli import main
from mvitv2.data.image import ImageDataConfig
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError
from mvitv2.utils.fields import checked_fields


@dataclass(frozen=True)
class Options:
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    fps: float | None = None
    size: int | tuple[int, int] = 8
    sizes: tuple[int, ...] = (1,)
    pair: tuple[float, float] = (0.0, 1.0)
    windows: tuple[int, ...] | None = None
    extra: dict[str, Any] | None = None


@pytest.mark.parametrize(
    ("name", "value", "kept"),
    [
        ("flag", True, True),
        ("count", 3, 3),
        ("count", 224.0, 224),  # YAML's whole float
        ("rate", 2, 2),  # an integer is a number
        ("rate", 0.25, 0.25),
        ("name", "bicubic", "bicubic"),
        ("fps", None, None),
        ("fps", 7.5, 7.5),
        ("size", 16, 16),
        ("size", [16, 24], (16, 24)),
        ("sizes", [1, 2, 3], (1, 2, 3)),
        ("sizes", [], ()),
        ("pair", [0.1, 2], (0.1, 2)),
        ("windows", None, None),
        ("windows", [7, 14.0], (7, 14)),
        ("extra", {"a": 1}, {"a": 1}),
    ],
)
def test_a_value_of_its_fields_type_is_kept_as_the_field_keeps_it(name, value, kept):
    got = checked_fields(Options, {name: value}, "test option")[name]
    assert got == kept and type(got) is type(kept)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("flag", 1, "true or false"),
        ("flag", "yes", "true or false"),
        ("count", True, "an integer"),
        ("count", 2.5, "an integer"),
        ("count", "abc", "an integer"),
        ("count", None, "an integer"),
        ("rate", False, "a number"),
        ("rate", "0.5x", "a number"),
        ("name", 3, "a string"),
        ("fps", "fast", "a number or null"),
        ("size", [16], "an integer or a list of 2 integers"),
        ("size", [16, "a"], "an integer or a list of 2 integers"),
        ("sizes", 3, "a list of integers"),
        ("pair", [0.1, 0.2, 0.3], "a list of 2 numbers"),
        ("windows", [7, None], "a list of integers or null"),
        ("extra", [1], "a mapping or null"),
    ],
)
def test_a_value_of_another_type_is_one_line_naming_the_option_and_its_type(name, value, expected):
    with pytest.raises(UserValueError) as e:
        checked_fields(Options, {name: value}, "test option")
    assert str(e.value) == f"test option {name}: expected {expected}, got {value!r}"


def test_the_image_data_and_model_options_are_checked_before_anything_runs(capsys):
    assert ImageDataConfig.from_dict({"img_size": 64.0}).img_size == 64
    for override, line in (
        ("data.img_size=abc", "data option img_size: expected an integer, got 'abc'"),
        ("data.mean=[1,2]", "data option mean: expected a list of 3 numbers, got [1, 2]"),
        (
            "model_args.embed_dim=abc",
            "mvitv2_tiny option embed_dim: expected an integer, got 'abc'",
        ),
        ("model_args.depths=3", "mvitv2_tiny option depths: expected a list of integers, got 3"),
    ):
        assert main(["train", "image", override, "epochs=1"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"mvitv2 train image: error: {line}"
    with pytest.raises(ValueError, match="^mvitv2_tiny option embed_dim: expected an integer"):
        mvitv2.create_model("mvitv2_tiny", embed_dim="96")


def test_training_lists_are_read_as_numbers_and_a_python_config_is_checked_as_well():
    """``lr_steps=[0, 2.5]`` is two epochs (the ends of each range: test_values_config_types2);
    a config built in Python is checked as an override is."""
    assert TrainConfig.load(None, ["lr_steps=[0, 2.5]"]).lr_steps == (0, 2.5)
    with pytest.raises(UserValueError, match=r"^invalid training config: betas must be two"):
        TrainConfig(betas=(0.9,))
