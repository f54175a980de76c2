"""ONNX and torch.export: dynamic batch, parity with PyTorch, metadata sidecar, CLI and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mvitv2 import cli
from mvitv2.export import (
    export_checkpoint,
    load_program,
    onnx_session,
    read_metadata,
    sidecar_path,
    verify_export,
)
from mvitv2.predict import build_model, read_checkpoint
from test_predictor import make_detect_checkpoint, make_image_checkpoint, make_video_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("export_ckpts")
    return {
        "image": make_image_checkpoint(d / "image.pt"),
        "video": make_video_checkpoint(d / "video.pt"),
        "detect": make_detect_checkpoint(d / "detect.pt"),
    }


def _onnx_matches_torch(path: Path, model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Run the ONNX file at batch 1 and 3 and compare every output with PyTorch (1e-4)."""
    session = onnx_session(path)
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic: dynamic batch
    for batch in (1, 3):
        x = torch.randn(batch, *shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", ["image", "video"])
def test_classifier_onnx_parity_dynamic_batch(ckpts: dict[str, Path], task: str, tmp_path: Path):
    path = export_checkpoint(ckpts[task], tmp_path / f"{task}.onnx", format="onnx", task=task)
    meta = read_metadata(path)
    info = read_checkpoint(ckpts[task])
    sample = [3, 4, 64, 64] if task == "video" else [3, 64, 64]
    assert meta["task"] == task and meta["format"] == "onnx" and meta["opset"] == 18
    assert meta["class_names"] == info.class_names
    assert meta["inputs"][0]["shape"] == ["batch", *sample]
    assert meta["preprocessing"] == info.preprocessing
    assert meta["preprocessing"]["input_size"] == [64, 64]
    _onnx_matches_torch(path, build_model(info), tuple(sample))


def test_detector_backbone_fpn_onnx_parity(ckpts: dict[str, Path], tmp_path: Path):
    from mvitv2.export import DetectorFeatures

    path = export_checkpoint(ckpts["detect"], tmp_path / "det.onnx", input_size=(96, 128))
    meta = read_metadata(path)
    assert meta["exported_part"] == "backbone+fpn"
    assert meta["outputs"] == ["p2", "p3", "p4", "p5", "p6"]
    assert meta["inputs"][0]["shape"] == ["batch", 3, 96, 128]
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    features = DetectorFeatures(build_model(read_checkpoint(ckpts["detect"])))
    _onnx_matches_torch(path, features, (3, 96, 128))


def test_whole_detector_onnx_matches_pytorch(ckpts: dict[str, Path], tmp_path: Path, capsys):
    """``--whole-detector``: image in, detections out, in onnxruntime; the same boxes, labels,
    scores and masks as the PyTorch detector, also on an image of another size."""
    out = tmp_path / "whole.onnx"
    argv = ["export", "detect", "--checkpoint", str(ckpts["detect"]), "--output", str(out)]
    assert cli.main([*argv, "--whole-detector", "--input-size", "96", "128", "--verify"]) == 0
    assert "(verified)" in capsys.readouterr().out
    assert read_metadata(out)["exported_part"] == "whole detector"
    model = build_model(read_checkpoint(ckpts["detect"])).eval()
    torch.manual_seed(1)
    image = torch.rand(3, 112, 144)
    with torch.no_grad():
        ref = model([image])[0]
    assert len(ref["boxes"]) > 0  # random weights still detect: the comparison is not vacuous
    got = dict(
        zip(
            ("boxes", "labels", "scores", "masks"),
            onnx_session(out).run(None, {"image": image.numpy()}),
        )
    )
    for name, value in got.items():
        np.testing.assert_allclose(value, ref[name].numpy(), atol=1e-3, err_msg=name)
    # torch.export cannot capture the NMS: a clear error, not a crash
    assert cli.main([*argv, "--whole-detector", "--format", "torch-export"]) == 2
    assert "ONNX only" in capsys.readouterr().err


def test_cli_torch_export_program_roundtrip(ckpts: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "prog" / "video.pt2"
    argv = ["export", "video", "--checkpoint", str(ckpts["video"]), "--format", "torch-export"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert read_metadata(out)["format"] == "torch-export"
    program = load_program(out)
    model = build_model(read_checkpoint(ckpts["video"]))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 4, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), atol=1e-4, rtol=0)
    # verify_export reports a model that is not the exported one.
    other = build_model(read_checkpoint(ckpts["video"]))
    with torch.no_grad():
        other.head.projection.bias.add_(1.0)
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        verify_export(out, other, torch.randn(1, 3, 4, 64, 64))


def test_cli_image_program_default_output(ckpts: dict[str, Path], tmp_path: Path):
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(ckpts["image"].read_bytes())
    argv = ["export", "image", "--checkpoint", str(ckpt), "--format", "torch-export", "--verify"]
    assert cli.main(argv) == 0
    assert ckpt.with_suffix(".pt2").is_file() and sidecar_path(ckpt.with_suffix(".pt2")).is_file()


def test_cli_errors(ckpts: dict[str, Path], tmp_path: Path, capsys):
    assert cli.main(["export", "video", "--checkpoint", str(ckpts["image"])]) == 2
    err = capsys.readouterr().err
    assert "'image' checkpoint, not 'video'" in err and str(ckpts["image"]) in err
    missing = tmp_path / "missing.pt"
    assert cli.main(["export", "image", "--checkpoint", str(missing)]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "image", "--checkpoint", str(ckpts["image"]), "--format", "tflite"])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unsupported export format 'tflite'"):
        export_checkpoint(ckpts["image"], format="tflite")
