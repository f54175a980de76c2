"""Counts in a training config (``workers=``, ``threads=``) below what they can be: the user's
mistake, refused before anything runs as one ``error:`` line with exit status 2, not the
DataLoader's traceback (``workers=-1``) or a value silently ignored (``threads=-2``)."""

from __future__ import annotations

import pytest

from mvitv2.cli import main
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError


@pytest.mark.parametrize(
    ("key", "value", "phrase"), [("workers", -1, "workers must be >= 0"), ("threads", -2, "threads must be >= 0")]
)  # fmt: skip
def test_a_training_config_refuses_negative_workers_and_threads(key, value, phrase):
    with pytest.raises(UserValueError, match=f"invalid training config: {phrase}"):
        TrainConfig(**{key: value})
    assert getattr(TrainConfig(**{key: 0}), key) == 0  # 0: the main process / torch's default


@pytest.mark.parametrize("override", ["workers=-1", "threads=-2"])
def test_train_with_a_negative_count_is_one_line_and_exit_2(override, capsys):
    assert main(["train", "video", override, "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    key = override.split("=")[0]
    assert err.splitlines()[-1].startswith(
        f"mvitv2 train video: error: invalid training config: {key} must be >= 0"
    )
