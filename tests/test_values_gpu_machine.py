"""What ``benchmarks/gpu.sh`` needs of a lent GPU machine, which has a CUDA build of torch 2.11,
torchvision and timm in its python3, but no uv, no PyAV and no pycocotools (see docs/gpu.md):
the model, the detector and the benchmark import without those two, and the kernels' autocast
check stays traceable by that torch's dynamo (``fullgraph=True``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mvitv2
import mvitv2.detection
from mvitv2.ops import context
from test_detection import TINY as TINY_DETECTOR

SRC = Path(__file__).resolve().parents[1] / "src"


def test_the_library_detector_is_the_detection_package_s_not_the_task_layer_s():
    assert mvitv2.create_detector is mvitv2.detection.create_detector


def test_model_detector_and_benchmark_run_without_pyav_and_pycocotools():
    """In a fresh process where importing ``av`` or ``pycocotools`` fails, as on the GPU machine:
    a tiny classifier and a tiny Mask R-CNN run a forward, and the benchmark module imports."""
    code = f"""
import sys
sys.modules["av"] = sys.modules["pycocotools"] = None  # ImportError on import, as if absent
import torch, mvitv2, mvitv2.benchmark
model = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=16, img_size=32,
                            num_classes=3).eval()
det = mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=4, **{TINY_DETECTOR!r}).eval()
with torch.no_grad():
    print(tuple(model(torch.rand(2, 3, 32, 32)).shape), sorted(det([torch.rand(3, 64, 48)])[0]))
print(sorted(m for m in ("av", "pycocotools", "mvitv2.tasks.detect") if sys.modules.get(m)))
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        # MVITV2_GEMM=aten: no first-use GEMM measurement, which this test is not about
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "MVITV2_GEMM": "aten"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["(2, 3) ['boxes', 'labels', 'masks', 'scores']", "[]"]


def test_autocast_dtype_on_cpu_and_cuda_does_not_call_is_autocast_available(monkeypatch):
    """torch 2.11's dynamo cannot trace ``torch.amp.is_autocast_available`` (a compiled
    ``fullgraph`` forward failed there): for cpu and cuda the answer comes from
    ``is_autocast_enabled`` / ``get_autocast_dtype`` alone; other device types still ask it."""
    asked = []

    def untraceable(device_type: str) -> bool:
        asked.append(device_type)
        return device_type != "meta"

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    assert context.autocast_dtype("cpu") is None
    assert context.autocast_dtype("cuda") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert context.autocast_dtype("cpu") == torch.bfloat16
        assert context.autocast_dtype("cuda") is None
    assert asked == []
    assert context.autocast_dtype("meta") is None and asked == ["meta"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_is_the_active_autocast_dtype(dtype):
    with torch.autocast("cpu", dtype=dtype):
        assert context.autocast_dtype("cpu") == dtype
    assert context.autocast_dtype("cpu") is None
