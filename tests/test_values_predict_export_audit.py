"""Found by a user's audit of ``mvitv2 predict`` / ``mvitv2 export``: an output that cannot be
written (a path through a file, a read-only folder) was a traceback after the export or the
model's loading (``FileExistsError``, ``PermissionError``, torch's ``RuntimeError`` from the
``.pt2`` writer, torchvision's from ``write_png``); it is one error line, exit status 2, before
any work, and nothing is created."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mvitv2.export
from mvitv2.cli import main
from test_values_image_cli_audit import tiny_checkpoint


def _no_export(*args: object, **kwargs: object) -> None:
    raise AssertionError("exported although the output cannot be written")


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_export_to_a_path_through_a_file_is_one_error_line_before_exporting(
    tmp_path: Path, capsys, monkeypatch, fmt: str
):
    ckpt = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(mvitv2.export, "export_onnx", _no_export)
    monkeypatch.setattr(mvitv2.export, "export_program", _no_export)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub" / "m.onnx"
    argv = ["export", "image", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"mvitv2 export image: error: output {out}: {blocker} is a file, not a folder; "
        "pass another path\n"
    )


def test_export_to_a_read_only_folder_is_one_error_line_naming_it(
    tmp_path: Path, capsys, monkeypatch
):
    ckpt = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(mvitv2.export, "export_onnx", _no_export)

    def read_only(*args: object, dir: str, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(Path(dir) / "tmpxyz"))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # root writes through chmod 555
    out = tmp_path / "ro" / "deeper" / "m.onnx"
    assert main(["export", "image", "--checkpoint", str(ckpt), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"mvitv2 export image: error: output {out}: cannot write in {tmp_path} "
        "(Permission denied); pass a path you can write\n"
    )
    assert not (tmp_path / "ro").exists()  # nothing made on the way


def test_predict_detect_output_dir_through_a_file_is_refused_before_the_model_loads(
    tmp_path: Path, capsys
):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["predict", "detect", str(image), "--checkpoint", str(tmp_path / "none.pt")]
    assert main([*argv, "--output-dir", str(image / "preds")]) == 2
    assert capsys.readouterr().err == (
        f"mvitv2 predict detect: error: --output-dir {image / 'preds'}: {image} is a file, not "
        "a folder; pass another path\n"
    )
