"""The defaults of :class:`mvitv2.engine.task.Task` a task inherits: fine-tuning initialisation
by the strict checkpoint loader, and the number of samples in a batch."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from engine_toy import ToyTask, toy_config
from mvitv2.weights import CheckpointMismatchError
from test_values_image_task import TINY

_TINY = {**TINY, "img_size": 32, "num_classes": 3}


def test_finetuning_by_default_loads_every_tensor_and_refuses_a_checkpoint_missing_one(tmp_path):
    task = ToyTask(toy_config(str(tmp_path), "t"))
    source = mvitv2.create_model("mvitv2_tiny", **_TINY)
    torch.save({"model_state": source.state_dict()}, tmp_path / "w.pyth")  # official layout
    model = mvitv2.create_model("mvitv2_tiny", **_TINY)
    assert not torch.equal(
        model.head.projection.weight, source.head.projection.weight
    )  # two random inits
    task.init_weights(model, str(tmp_path / "w.pyth"))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    partial = {k: v for k, v in source.state_dict().items() if k != "norm.weight"}
    torch.save({"model_state": partial}, tmp_path / "p.pyth")
    fresh = mvitv2.create_model("mvitv2_tiny", **_TINY)
    with pytest.raises(CheckpointMismatchError, match="norm.weight"):
        task.init_weights(fresh, str(tmp_path / "p.pyth"))


def test_a_batchs_size_is_the_length_of_its_first_element_or_of_the_batch_itself(tmp_path):
    task = ToyTask(toy_config(str(tmp_path), "t"))
    x, y = torch.zeros(5, 8), torch.arange(5)
    assert task.batch_size((x, y)) == 5
    assert task.batch_size([x, (y, y.flip(0), 0.3)]) == 5  # mixup targets: a 3-tuple
    assert task.batch_size(torch.zeros(6, 8)) == 6  # a batch that is one tensor: its rows
    assert (
        task.batch_size([[torch.zeros(3, 4, 4)] * 2, [{"boxes": 0}] * 2]) == 2
    )  # a list of images
