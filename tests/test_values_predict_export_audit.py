"""Found by a user's audit of ``mvitv2 predict`` / ``mvitv2 export``.

* An output that cannot be written (a path through a file, a read-only folder) was a traceback
  after the export or the model's loading (``FileExistsError``, ``PermissionError``, torch's
  ``RuntimeError`` from the ``.pt2`` writer, torchvision's from ``write_png``); it is one error
  line, exit status 2, before any work, and nothing is created.
* ``export detect --whole-detector`` traced the rel-pos indices and table length of the traced
  image's grid as constants: an image that resized and padded to another size (any other aspect
  ratio) ran in onnxruntime with wrong rel-pos terms, and its detections differed from PyTorch's
  (scores by ~2e-3 on a tiny detector) with no error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mvitv2
import mvitv2.export
from mvitv2.cli import main
from mvitv2.detection import create_detector
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


# ---------------------------------------------------------------------- a traced grid size
class _Maps(nn.Module):
    """A features-only model's maps as a tuple (what the tracer takes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_traced_backbone_computes_the_rel_pos_terms_of_the_grid_it_is_given():
    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_tiny",
        features_only=True,
        depths=[1, 1, 1, 1],
        embed_dim=8,
        num_heads=1,
        img_size=64,
    ).eval()
    with torch.no_grad():
        traced = torch.jit.trace(_Maps(model), torch.randn(1, 3, 64, 64), check_trace=False)
        for size in [(64, 64), (32, 64), (96, 64), (128, 160)]:
            x = torch.randn(1, 3, *size)
            for got, want in zip(traced(x), _Maps(model)(x), strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"{size}")


CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A tiny global-attention Mask R-CNN and its whole-detector ONNX traced at 64x64."""
    from mvitv2.export import export_detector_onnx
    from test_values_detect_task import _TINY_DETECTOR

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **_TINY_DETECTOR).eval()
    path = tmp_path_factory.mktemp("whole") / "d.onnx"
    with pytest.warns():  # the tracer's warnings
        export_detector_onnx(model, path, image_size=(64, 64), metadata={"class_names": CLASSES})
    return model, path


def test_a_whole_detector_onnx_detects_as_pytorch_on_images_padded_to_other_sizes(whole):
    from mvitv2.export import onnx_session

    model, path = whole
    session = onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    # 64x64 (its own padded size), 30x60 -> 32x64, 500x160 -> 64x21 padded to 64x32
    for size in [(48, 48), (30, 60), (500, 160)]:
        image = torch.rand(3, *size)
        with torch.no_grad():
            want = model([image])[0]
        assert len(want["boxes"]) > 0  # random weights still detect
        got = dict(zip(names, session.run(None, {"image": image.numpy()}), strict=True))
        for name in names:  # boxes in pixels of images up to 500 px (the resize's float32)
            atol = 2e-3 if name == "boxes" else 1e-4
            np.testing.assert_allclose(
                got[name], want[name].numpy(), atol=atol, err_msg=f"{name} at {size}"
            )


def test_a_whole_detector_sidecar_says_how_its_labels_name_the_classes(whole):
    from mvitv2.export import onnx_session, read_metadata
    from mvitv2.predict import Predictor

    model, path = whole
    meta = read_metadata(path)
    assert meta["class_names"] == CLASSES
    assert meta["label_names"] == (
        "class_names[label - 1] (labels count from 1; 0, the background, is never output)"
    )
    torch.manual_seed(1)
    image = torch.rand(3, 64, 64)
    _, labels, _, _ = onnx_session(path).run(None, {"image": image.numpy()})
    predictor = Predictor(model, task="detect", class_names=CLASSES, preprocessing={})
    want = predictor(image)["label_names"]
    assert len(want) > 0 and [CLASSES[label - 1] for label in labels] == want


# ---------------------------------------------------------------------- a truncated video
def test_predict_samples_a_truncated_video_within_the_frames_that_decode_as_eval_does(
    tmp_path: Path,
):
    from mvitv2.data.moving_digits import write_video
    from mvitv2.data.video import VideoClipDataset, VideoReader
    from mvitv2.predict import Predictor

    frames = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "long.mp4", frames, faststart=True)
    data = (tmp_path / "long.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # the header's 40 frames, fewer decode
    with VideoReader(cut) as r:
        assert r.num_frames == 40
        r.get_frames([39])
        assert r.truncated and 8 < r.num_frames < 40
    pre = {
        "input_size": [32, 32], "resize_size": 32, "interpolation": "bilinear",
        "mean": [0.45] * 3, "std": [0.225] * 3, "num_frames": 8, "sampling_rate": 4,
        "sampling": "clip", "num_clips": 2, "num_crops": 1, "target_fps": None, "pad": "last",
    }  # fmt: skip
    predictor = Predictor(nn.Identity(), task="video", class_names=["a"], preprocessing=pre)
    (tmp_path / "list.txt").write_text(f"{cut} 0\n")
    ds = VideoClipDataset(
        tmp_path / "list.txt", train=False, num_frames=8, sampling_rate=4, num_clips=2,
        transform=predictor._transform,
    )  # fmt: skip
    want = torch.stack([ds[i][0] for i in range(2)])
    assert ds.skipped["truncated"] >= 1
    torch.testing.assert_close(predictor.preprocess_video(cut), want, atol=0, rtol=0)
