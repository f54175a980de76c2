"""The trainer's start-up by value, beyond test_values_trainer: what it hands to the loaders on a
CUDA device, where it reads a resumed checkpoint to, and the run folder it creates."""

from __future__ import annotations

import pytest
import torch

from engine_toy import ToyModel, toy_config
from mvitv2.engine import Trainer
from mvitv2.engine import trainer as trainer_module
from mvitv2.engine.distributed import DistInfo
from test_values_trainer import SMALL, Scripted, make


class StaysPut(ToyModel):
    """The toy model, left where it is by ``.to`` (so a run can believe it is on a GPU); the
    arguments of every ``.to`` call are kept in ``moves``."""

    def __init__(self) -> None:
        super().__init__()
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(args)
        return self


class Built(Exception):
    """Stops the start-up once the training loader's arguments are known."""


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_the_model_goes_to_the_runs_device_and_the_loaders_pin_memory_only_for_cuda(
    tmp_path, monkeypatch, device
):
    """The model is moved to this process's device; batches are pinned for an asynchronous copy
    to a GPU, and not on a CPU run."""
    seen, models = [], []

    def build_loader(dataset, **kwargs):
        seen.append(kwargs["pin_memory"])
        raise Built

    class OnDevice(Scripted):
        def build_model(self):
            models.append(StaysPut())
            return models[-1]

    info = DistInfo(device=torch.device(device))
    monkeypatch.setattr(trainer_module, "init_distributed", lambda _: info)
    monkeypatch.setattr(trainer_module, "build_loader", build_loader)
    cfg = toy_config(str(tmp_path), "p", *SMALL)
    with pytest.raises(Built):
        Trainer(OnDevice(cfg), cfg)
    assert models[0].moves == [(torch.device(device),)]
    assert seen == [torch.device(device).type == "cuda"]


def test_a_resume_reads_the_checkpoint_onto_this_runs_device(tmp_path, monkeypatch):
    """A checkpoint written on one device is loaded onto the device of the resuming process
    (``map_location``), not onto the device it was saved from."""
    first, _ = make(tmp_path, "r", "epochs=1")
    first.save()
    seen = []
    real = trainer_module.read_training_checkpoint

    def read(path, map_location=None):
        seen.append((path, map_location))
        return real(path, map_location=map_location)

    monkeypatch.setattr(trainer_module, "read_training_checkpoint", read)
    resumed, _ = make(tmp_path, "r", "epochs=2", resume="auto")
    assert seen == [(first.run_dir / "last.pt", resumed.dist.device)]


def test_the_run_folder_is_created_with_its_missing_parents(tmp_path):
    """``output`` need not exist yet: the run folder and every folder above it are made."""
    output = tmp_path / "not" / "yet"
    cfg = toy_config(str(output), "run", *SMALL)
    trainer = Trainer(Scripted(cfg), cfg)
    assert trainer.run_dir == output / "run" and trainer.run_dir.is_dir()
