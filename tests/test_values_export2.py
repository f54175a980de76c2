"""The whole-detector ONNX export by value, on a toy detector that the TorchScript exporter traces in
a fraction of a second: its detections in onnxruntime against hand-computed ones and the eager
model's (an image of another size, another number of detections), the graph's names, dynamic axes
and opset, the sidecar read back, and the output folder created or reused.

The real detector's export (tests/test_values_export.py) takes a checkpoint and seconds each; this
one runs under every mutant of ``export_detector_onnx`` in a second or two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.export import export_detector_onnx, onnx_session, read_metadata, sidecar_path

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

NAMES = ["boxes", "labels", "scores", "masks"]


class ToyDetector(nn.Module):
    """One detection per image row whose brightest grey value exceeds 0.6: box
    ``(0, row, width, row + 1)``, label ``row % 3 + 1``, score that value, mask the pixels within
    0.1 of it. Dropout makes a trace in training mode differ from eval."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        grey = self.drop(images[0]).mean(0)
        best = grey.max(1).values
        rows = torch.nonzero(best > 0.6)[:, 0]  # data-dependent count, as after NMS
        top = rows.to(torch.float32)
        width = torch.ones_like(top) * grey.shape[1]
        masks = grey[None] > best[rows][:, None, None] - 0.1
        return [
            {
                "boxes": torch.stack([top * 0, top, width, top + 1], 1),
                "labels": rows % 3 + 1,
                "scores": best[rows],
                "masks": masks.to(torch.float32)[:, None],
            }
        ]


def _image(height: int, width: int, bright: dict[tuple[int, int], float]) -> torch.Tensor:
    """A dark RGB image with the given grey values at (row, column)."""
    image = torch.full((3, height, width), 0.05)
    for (r, c), v in bright.items():
        image[:, r, c] = v
    return image


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """The toy detector (in training mode: the export must switch to eval) exported at 6 x 8
    into folders that do not exist yet, then again over its own file. Exported anew for each
    test (a third of a second): mutmut runs only the first test of a shared fixture."""
    path = tmp_path / "a" / "b" / "det.onnx"
    for _ in range(2):
        got = export_detector_onnx(
            ToyDetector().train(), path, image_size=(6, 8), metadata={"model_name": "toy"}
        )
        assert got == path
    return path


def test_the_whole_detector_graph_gives_the_eager_detections_at_another_size(toy: Path):
    """A 10 x 5 image (the graph was traced at 6 x 8) with bright pixels in rows 2 and 7: two
    detections, written out by hand, and the same as the eager detector's."""
    image = _image(10, 5, {(2, 1): 0.9, (2, 3): 0.85, (7, 4): 0.7, (9, 0): 0.5})
    got = dict(zip(NAMES, onnx_session(toy).run(None, {"image": image.numpy()})))
    np.testing.assert_allclose(got["boxes"], [[0, 2, 5, 3], [0, 7, 5, 8]])
    assert got["labels"].tolist() == [3, 2]
    np.testing.assert_allclose(got["scores"], [0.9, 0.7], atol=1e-6)
    want_masks = np.zeros((2, 1, 10, 5), np.float32)
    want_masks[0, 0, 2, [1, 3]] = 1  # 0.85 is within 0.1 of 0.9
    want_masks[1, 0, 2, [1, 3]] = 1  # and above 0.7 - 0.1, as is
    want_masks[1, 0, 7, 4] = 1
    np.testing.assert_array_equal(got["masks"], want_masks)
    with torch.no_grad():
        eager = ToyDetector().eval()([image])[0]
    for name in NAMES:
        np.testing.assert_allclose(got[name], eager[name].numpy(), atol=1e-6, err_msg=name)


def test_the_whole_detector_graph_finds_no_detections_in_a_dark_image(toy: Path):
    got = onnx_session(toy).run(None, {"image": _image(4, 12, {}).numpy()})
    assert [g.shape for g in got] == [(0, 4), (0,), (0,), (0, 1, 4, 12)]


def test_the_whole_detector_graph_names_its_dynamic_axes_and_opset_17(toy: Path):
    session = onnx_session(toy)
    ((image,),) = [session.get_inputs()]
    assert (image.name, image.shape) == ("image", [3, "height", "width"])
    assert [o.name for o in session.get_outputs()] == NAMES
    assert [o.shape[0] for o in session.get_outputs()] == ["detections"] * 4
    assert {o.domain: o.version for o in onnx.load(toy).opset_import}[""] == 17
    # the folders were created; small weights stay inside the file
    assert sorted(p.name for p in toy.parent.iterdir()) == ["det.onnx", "det.onnx.json"]


def test_the_whole_detector_sidecar_reads_back_with_the_callers_metadata(toy: Path):
    assert sidecar_path(toy) == toy.parent / "det.onnx.json"
    assert read_metadata(toy) == {
        "format": "onnx",
        "task": "detect",
        "inputs": [{"name": "image", "shape": [3, 6, 8], "layout": "CHW", "dtype": "float32"}],
        "outputs": NAMES,
        "model_name": "toy",
        "exported_part": "whole detector",
        "input_range": "[0, 1] RGB",
        "label_names": "class_names[label - 1] (labels count from 1; 0, the background, is never output)",
        "opset": 17,
        "mvitv2_version": mvitv2.__version__,
        "torch_version": torch.__version__,
    }


def test_a_whole_detector_without_metadata_at_opset_16(tmp_path: Path):
    path = export_detector_onnx(ToyDetector(), tmp_path / "d.onnx", image_size=(4, 4), opset=16)
    meta = read_metadata(path)
    assert (meta["exported_part"], meta["opset"], "model_name" in meta) == (
        "whole detector",
        16,
        False,
    )
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 16
