"""Training checkpoints at their edges: an interrupt that lands just after the atomic rename, and
``--resume auto`` reading a candidate's config and metadata through a memory map (the weights
stay on disk) rather than loading it whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mvitv2.engine.checkpoint import find_resume, save_checkpoint


def test_an_interrupt_just_after_the_rename_propagates_and_keeps_the_new_checkpoint(
    tmp_path, monkeypatch
):
    """The temp file is already gone when the interrupt arrives: the cleanup must not replace the
    user's KeyboardInterrupt with a FileNotFoundError, and the new file is complete."""
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, target)
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, target)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"epoch": 2}


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc maps")
def test_resume_auto_memory_maps_each_candidate_instead_of_reading_its_weights(tmp_path):
    """While a candidate's metadata is looked at, the checkpoint file is mapped into memory (its
    tensors are views of the file, not copies read into RAM)."""
    run = tmp_path / "run"
    path = save_checkpoint(
        {"model": {"w": torch.ones(4096)}, "config": {"seed": 1}, "meta": {"task": "toy"}},
        run / "last.pt",
    )
    mapped = []

    def upgrade(state):
        maps = Path("/proc/self/maps").read_text()
        mapped.append(str(path.resolve()) in maps)
        return state["meta"]

    found = find_resume("auto", tmp_path, "", {"seed": 1}, {"task": "toy"}, upgrade)
    assert found is not None and found.path == path and found.differences == []
    assert mapped == [True]
