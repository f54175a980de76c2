"""mvitv2.weights.io by value, the case the other loading tests leave open: a ``.safetensors``
file that safetensors cannot read is refused with one error naming the file and safetensors' own
reason (taken from safetensors itself, not from the code under test)."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mvitv2.weights import CheckpointError
from mvitv2.weights.io import read_checkpoint


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_an_unreadable_safetensors_file_names_the_file_and_safetensors_reason(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(6.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not safetensors")
    with pytest.raises(SafetensorError) as raw:  # the reason safetensors itself gives
        load_file(str(path), device="cpu")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value) == f"{path} is not a readable safetensors file: {raw.value}"
    assert e.value.__cause__ is not None and str(e.value.__cause__) == str(raw.value)
