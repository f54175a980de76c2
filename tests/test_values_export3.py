"""More value tests of mvitv2.export, written for the mutants test_values_export.py and
test_values_export2.py left alive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mvitv2.export
from mvitv2.export import DEFAULT_OPSET, export_detector_onnx, export_onnx
from test_values_export import SHAPE, Tiny
from test_values_export2 import ToyDetector

pytest.importorskip("onnxscript")


def test_onnx_export_names_its_exporter_the_whole_detector_the_torchscript_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A classifier goes through the ``torch.export``-based exporter and the whole detector
    through the TorchScript one, each asked for by name: the default of ``torch.onnx.export``'s
    ``dynamo`` is False before torch 2.9 (the project supports 2.5 on) and True after."""
    asked: list = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: asked.append(k.get("dynamo", "-")))
    monkeypatch.setattr(mvitv2.export, "_onnx_opset", lambda path: DEFAULT_OPSET)  # no file written
    export_onnx(Tiny(), tmp_path / "t.onnx", task="image", example_input=torch.zeros(2, *SHAPE))
    export_detector_onnx(ToyDetector(), tmp_path / "d.onnx", image_size=(8, 8))
    assert asked == [True, False]
