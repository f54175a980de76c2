"""The training loop's helpers and steps by value, beyond test_values_trainer: what each case
passes on, checked against a spy or a hand computation."""

from __future__ import annotations

import pytest
import torch

from mvitv2.engine import trainer as trainer_module
from mvitv2.engine.trainer import to_device
from test_values_trainer import Scripted, make, records, schedule


def test_to_device_passes_non_blocking_into_the_values_of_a_dict(monkeypatch):
    """A batch that is a dict of tensors (detection targets) is copied asynchronously when
    asked, like a list or tuple."""
    seen = []
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device({"x": torch.ones(2), "boxes": [torch.zeros(1)]}, torch.device("meta"), True)
    assert seen == [True, True]


def test_each_training_batch_goes_to_the_runs_device_without_blocking(tmp_path, monkeypatch):
    """Every micro-batch is moved to the run's device (CUDA in a real run), asynchronously."""
    seen = []
    real = trainer_module.to_device

    def spy(obj, device, non_blocking=False):
        seen.append((device, non_blocking))
        return real(obj, device, non_blocking)

    monkeypatch.setattr(trainer_module, "to_device", spy)
    trainer, _ = make(tmp_path, "d", "epochs=1", "batch_size=8", "accum_steps=2")
    trainer.fit()
    assert seen and set(seen) == {
        (trainer.dist.device, True)
    }  # to_device's own calls on nested items included


def test_a_model_with_one_parameter_group_trains_and_reports_its_lr(tmp_path):
    """A model without biases, norms or tables has no weight-decay-exempt group: the optimizer
    holds one group, whose lr each step and epoch report."""

    class OneGroup(Scripted):
        def build_model(self):
            return torch.nn.Linear(8, 3, bias=False)

    trainer, _ = make(tmp_path, "g", "epochs=2", task=OneGroup)
    assert len(trainer.optimizer.param_groups) == 1
    trainer.fit()
    assert [r["lr"] for r in records(trainer)] == pytest.approx([schedule(3, 2), schedule(6, 2)])
