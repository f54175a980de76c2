"""Found by a user's audit of ``mvitv2 export image``: an ONNX export is the opset asked for or
an error (the exporter keeps its own opset when it cannot convert, and the sidecar said the
asked one), an output that is a folder is refused before exporting (it was a failed write
after the export), and an input size the model refuses is the model's own error, as with
``--format torch-export``, not the ONNX exporter's wrapped report."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from mvitv2.cli import main
from mvitv2.export import export_onnx, read_metadata, sidecar_path
from test_values_image_cli_audit import tiny_checkpoint


class Pooled(nn.Module):
    """(B, 3, H, W) -> (B, 2); refuses sides that are not multiples of 4, as MViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"input height and width must be multiples of 4, got {x.shape[-2:]}")
        return self.linear(x.mean((2, 3)))


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def test_an_onnx_export_declares_the_opset_its_sidecar_names(tmp_path: Path):
    path = export_onnx(
        Pooled(), tmp_path / "m.onnx", task="image", example_input=torch.zeros(1, 3, 8, 8), opset=20
    )
    assert _opset(path) == read_metadata(path)["opset"] == 20


def test_an_opset_the_exporter_cannot_convert_to_is_an_error_and_leaves_no_file(tmp_path: Path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError) as e:
        export_onnx(Pooled(), path, task="image", example_input=torch.zeros(1, 3, 8, 8), opset=30)
    assert str(e.value) == (
        "opset 30: the ONNX exporter could not convert the model to it and wrote opset 18; "
        "export with opset 18 (--opset 18)"
    )
    assert not path.exists() and not sidecar_path(path).exists()


def test_an_input_size_the_model_refuses_is_its_own_value_error(tmp_path: Path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError) as e:
        export_onnx(Pooled(), path, task="image", example_input=torch.zeros(1, 3, 6, 8))
    assert type(e.value) is ValueError
    assert str(e.value) == "input height and width must be multiples of 4, got torch.Size([6, 8])"
    assert not sidecar_path(path).exists()


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_an_output_folder_is_one_error_line_before_exporting(tmp_path: Path, capsys, fmt: str):
    ckpt = tiny_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["export", "image", "--checkpoint", str(ckpt), "--format", fmt, "--output", str(out)]
    assert main(argv) == 2
    name = "last.onnx" if fmt == "onnx" else "last.pt2"
    assert capsys.readouterr().err == (
        f"mvitv2 export image: error: output {out} is a folder; pass the file to write "
        f"(e.g. {out / name})\n"
    )
    assert list(out.iterdir()) == []
