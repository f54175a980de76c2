"""More value tests of mvitv2.export, written for the mutants of ``sidecar_path`` ..
``run_export`` that test_values_export.py .. test_values_export3.py left alive."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvitv2 import export as ex
from mvitv2.export import export_checkpoint
from mvitv2.predict import build_model, read_checkpoint
from test_predictor import make_image_checkpoint


@pytest.fixture(scope="module")
def image_info(tmp_path_factory: pytest.TempPathFactory):
    """The tiny image checkpoint read, and its model."""
    info = read_checkpoint(make_image_checkpoint(tmp_path_factory.mktemp("ck4") / "image.pt"))
    return info, build_model(info)


@pytest.mark.parametrize(
    "fmt, suffix, exporter",
    [("onnx", ".onnx", "export_onnx"), ("torch-export", ".pt2", "export_program")],
)
def test_the_default_output_of_a_weights_tag_keeps_the_whole_tag_and_of_a_file_swaps_the_suffix(
    image_info, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, suffix: str, exporter
):
    """``mvitv2_tiny.in1k`` (a registered tag, no such file here) exports to
    ``mvitv2_tiny.in1k.onnx``; a file of that very name, like any file, gets its suffix replaced:
    ``mvitv2_tiny.onnx``, ``runs/best.onnx``. The names are written out by hand."""
    info, model = image_info
    written: list = []
    monkeypatch.setattr(ex, exporter, lambda module, out, **k: written.append(out) or out)
    monkeypatch.chdir(tmp_path)
    tag = "mvitv2_tiny.in1k"
    for checkpoint in (tag, Path("runs/best.pt")):
        export_checkpoint(checkpoint, format=fmt, info=info, model=model)
    Path(tag).write_bytes(b"")  # now a file of the tag's name is here
    export_checkpoint(tag, format=fmt, info=info, model=model)
    assert written == [
        Path(f"mvitv2_tiny.in1k{suffix}"),
        Path(f"runs/best{suffix}"),
        Path(f"mvitv2_tiny{suffix}"),
    ]
