"""mvitv2.export by value: the sidecar's every field against what the model or checkpoint holds,
exported graphs and programs against the eager model (other batch sizes included, a static batch
refusing them), verify_export's and verify_detector_export's returns and failures at their
tolerances, the command line's options, messages and exit statuses.

A tiny convolution stands in for a network where the checkpoint does not matter (its exports take
about a second); the files are exported once per module and shared."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mvitv2
from mvitv2 import cli
from mvitv2 import export as ex
from mvitv2.export import (
    DetectorFeatures,
    add_export_arguments,
    export_checkpoint,
    export_onnx,
    export_program,
    load_program,
    onnx_session,
    read_metadata,
    run_export,
    sidecar_path,
    verify_detector_export,
    verify_export,
)
from mvitv2.predict import CheckpointError, build_model, read_checkpoint
from test_predictor import (
    DETECT_CLASSES,
    IMAGE_CLASSES,
    make_detect_checkpoint,
    make_image_checkpoint,
    make_video_checkpoint,
)
from test_values_engine_cli import _options
from test_values_export2 import ToyDetector

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SHAPE = (3, 8, 8)  # one input of the tiny network
HINT = "install the export extra: pip install 'mvitv2[export]'"
VERSIONS = {"mvitv2_version": mvitv2.__version__, "torch_version": torch.__version__}


class Tiny(nn.Module):
    """(B, 3, 8, 8) -> (B, 4); dropout makes an export in training mode differ from eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x).mean((2, 3)))


class TwoOutputs(Tiny):
    """The tiny network's maps and their means, as a dict (the order of the outputs)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.conv(x)
        return {"maps": maps, "means": self.drop(maps.mean((2, 3)))}


def _shifted(model: nn.Module, by: float) -> nn.Module:
    """A copy of ``model`` whose every output channel is ``by`` larger (the conv's bias)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.conv.bias.add_(by)
    return other.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny network exported in training mode (export must switch to eval): ONNX with a
    dynamic batch (default opset, own names), ONNX with a static batch at opset 20, programs with
    a dynamic and a static batch, and a two-output program; and what the exports printed."""
    d = tmp_path_factory.mktemp("tiny")  # each export creates its folder
    meta = {"model_name": "tiny", "class_names": ["a", "b", "c", "d"]}
    example = torch.randn(1, *SHAPE)
    names = {"input_names": ("pixels",), "output_names": ("scores",)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        files = _export_tiny(d, meta, example, names)
    files["printed"] = printed.getvalue()
    return files


def _files(tiny: dict) -> list[Path]:
    return [v for v in tiny.values() if isinstance(v, Path)]


def _export_tiny(d: Path, meta: dict, example: torch.Tensor, names: dict) -> dict:
    return {
        "onnx": export_onnx(
            Tiny().train(),
            d / "onnx" / "deep" / "tiny.onnx",
            task="image",
            example_input=example,
            metadata=meta,
            **names,
        ),
        "onnx_static": export_onnx(
            Tiny().train(),
            str(d / "onnx" / "static.onnx"),
            task="image",
            example_input=example,
            dynamic_batch=False,
            opset=20,
        ),
        "pt2": export_program(
            Tiny().train(),
            d / "pt2" / "deep" / "tiny.pt2",
            task="image",
            example_input=example,
            metadata=meta,
            **names,
        ),
        "pt2_static": export_program(
            Tiny().train(),
            str(d / "pt2" / "static.pt2"),
            task="image",
            example_input=example,
            dynamic_batch=False,
        ),
        "two": export_program(
            TwoOutputs().train(),
            d / "two" / "two.pt2",
            task="detect",
            example_input=example,
            output_names=("maps", "means"),
        ),
    }


# ----------------------------------------------------------------------------- sidecar
def test_sidecar_path_is_the_file_name_plus_json_and_read_metadata_needs_it(tmp_path: Path):
    assert sidecar_path("runs/a.b/model.onnx") == Path("runs/a.b/model.onnx.json")
    assert sidecar_path(Path("x.v2.pt2")) == Path("x.v2.pt2.json")
    missing = tmp_path / "m.onnx"
    with pytest.raises(FileNotFoundError) as e:
        read_metadata(missing)
    assert str(e.value) == f"no metadata {missing}.json beside exported model {missing}"


def _check_sidecars(tiny: dict) -> None:
    """Format, task, input (name, shape with ``batch`` when dynamic, layout, dtype), outputs,
    the caller's metadata, the opset of ONNX only and the versions; two-space JSON."""
    common = {"task": "image", "outputs": ["scores"], "model_name": "tiny"}
    dynamic_input = {"name": "pixels", "shape": ["batch", *SHAPE], "layout": "NCHW"}
    assert read_metadata(tiny["onnx"]) == {
        "format": "onnx",
        **common,
        "inputs": [{**dynamic_input, "dtype": "float32"}],
        "class_names": ["a", "b", "c", "d"],
        "opset": 18,
        **VERSIONS,
    }
    assert read_metadata(tiny["pt2"]) == {
        "format": "torch-export",
        **common,
        "inputs": [{**dynamic_input, "dtype": "float32"}],
        "class_names": ["a", "b", "c", "d"],
        **VERSIONS,
    }
    static_input = {"name": "input", "shape": [1, *SHAPE], "layout": "NCHW", "dtype": "float32"}
    assert read_metadata(tiny["onnx_static"]) == {
        "format": "onnx",
        "task": "image",
        "inputs": [static_input],
        "outputs": ["logits"],
        "opset": 20,
        **VERSIONS,
    }
    assert read_metadata(tiny["pt2_static"])["inputs"] == [static_input]
    assert read_metadata(tiny["two"])["outputs"] == ["maps", "means"]
    assert tiny["printed"] == ""  # exports are quiet
    for path in _files(tiny):
        text = sidecar_path(path).read_text()
        assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_sidecar_layouts_by_rank_and_extras_after_the_metadata(tmp_path: Path):
    """5 dimensions are NCTHW, 4 NCHW, 3 CHW; entries given as extras win over the metadata's,
    the versions over both."""
    cases = {(2, 3, 4, 8, 8): "NCTHW", (2, 3, 8, 8): "NCHW", (3, 8, 8): "CHW"}
    for i, (shape, layout) in enumerate(cases.items()):
        side = ex._write_sidecar(
            tmp_path / f"{i}.onnx",
            "onnx",
            "video",
            torch.zeros(shape),
            ["x"],
            ["y", "z"],
            False,
            {"opset": 1, "torch_version": "old", "k": [1]},
            opset=7,
        )
        assert side == tmp_path / f"{i}.onnx.json"
        assert json.loads(side.read_text()) == {
            "format": "onnx",
            "task": "video",
            "inputs": [{"name": "x", "shape": list(shape), "layout": layout, "dtype": "float32"}],
            "outputs": ["y", "z"],
            "opset": 7,
            "torch_version": torch.__version__,
            "k": [1],
            "mvitv2_version": mvitv2.__version__,
        }


# ----------------------------------------------------------------------------- exported files
def test_batch_one_examples_are_traced_at_batch_two_only_when_the_batch_is_dynamic():
    """torch.export fixes a size-1 dimension, so a dynamic batch is traced with the example
    repeated; other examples are taken as they are. The batch ranges from 1 to 4096."""
    x = torch.randn(1, *SHAPE)
    two = ex._batch_example(x, True)
    assert two.shape == (2, *SHAPE) and two.is_contiguous()
    assert torch.equal(two[0], x[0]) and torch.equal(two[1], x[0])
    assert ex._batch_example(x, False) is x
    three = torch.randn(3, *SHAPE)
    assert ex._batch_example(three, True) is three
    assert ex._dynamic_shapes(False) is None
    ((only,),) = [tuple(d.values()) for d in ex._dynamic_shapes(True)]
    assert (only.__name__, only.min, only.max) == ("batch", 1, 4096)


def _check_onnx_graphs(tiny: dict) -> None:
    """Input/output names, the batch dimension (symbolic or 1), the opset, no external data."""
    import onnx

    session = onnx_session(tiny["onnx"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    assert session.get_providers() == ["CPUExecutionProvider"]
    batch = session.get_inputs()[0].shape[0]
    assert isinstance(batch, str) and session.get_outputs()[0].shape[0] == batch  # symbolic
    static = onnx_session(tiny["onnx_static"])
    assert static.get_inputs()[0].shape == [1, *SHAPE] and static.get_outputs()[0].shape == [1, 4]
    assert [i.name for i in static.get_inputs()] == ["input"]
    assert [o.name for o in static.get_outputs()] == ["logits"]
    for name, opset in (("onnx", 18), ("onnx_static", 20)):
        versions = {o.domain: o.version for o in onnx.load(tiny[name]).opset_import}
        assert versions[""] == opset
    # small weights stay inside the .onnx file: nothing but the exports and their sidecars
    names = {p.name for p in tiny["onnx"].parent.iterdir()}
    assert names == {"tiny.onnx", "tiny.onnx.json"}
    names = {p.name for p in tiny["onnx_static"].parent.iterdir()}
    assert names == {"deep", "static.onnx", "static.onnx.json"}


def _check_outputs(tiny: dict, kind: str) -> None:
    """The eval model's outputs at batches 1, 2 and 5; a static export refuses batch 2."""
    if kind == "onnx":
        session, static = onnx_session(tiny["onnx"]), onnx_session(tiny["onnx_static"])

        def run(sess, x):
            return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])

        dynamic_run = lambda x: run(session, x)  # noqa: E731
        static_run = lambda x: run(static, x)  # noqa: E731
    else:
        dynamic_run, static_run = load_program(tiny["pt2"]), load_program(str(tiny["pt2_static"]))
    model = Tiny().eval()
    for batch in (1, 2, 5):
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(dynamic_run(x), model(x), atol=1e-5, rtol=0)
    x = torch.randn(1, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(static_run(x), model(x), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match=r"(?i)dimension|size\(\)\[0\] == 1"):  # ORT's, torch's
        static_run(torch.randn(2, *SHAPE))


def test_tiny_exports_sidecars_graphs_and_outputs(tiny: dict):
    """One test for every check of the shared files: mutmut maps the exports a module fixture
    runs to the first test that uses it, so the checks of a mutated export must run there."""
    _check_sidecars(tiny)
    _check_onnx_graphs(tiny)
    _check_outputs(tiny, "onnx")
    _check_outputs(tiny, "pt2")


def test_onnx_sessions_name_the_cpu_provider(tiny: dict, monkeypatch: pytest.MonkeyPatch):
    """onnxruntime's GPU builds refuse a session that names no provider: the CPU one is asked
    for by name (a CPU-only build would choose it anyway)."""
    import onnxruntime as ort

    asked: list = []
    real = ort.InferenceSession
    monkeypatch.setattr(
        ort, "InferenceSession", lambda *a, **k: asked.append(k.get("providers")) or real(*a, **k)
    )
    assert onnx_session(tiny["onnx"]).get_providers() == ["CPUExecutionProvider"]
    assert asked == [["CPUExecutionProvider"]]


def test_load_program_of_a_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"^exported program .*nope\.pt2 does not exist$"):
        load_program(tmp_path / "nope.pt2")


def test_onnx_weights_go_to_external_data_only_above_1_8_gib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Protobuf's 2 GB limit: weights of more than 1.8 GiB go to a separate file (the weights are
    on the meta device here, the exporter records what it is asked)."""
    calls: list[dict] = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(ex, "_onnx_opset", lambda path: ex.DEFAULT_OPSET)  # no file written
    limit = 1.8 * 2**30 / 4  # float32 elements
    for numel, external in ((int(limit), False), (int(limit) + 1, True)):
        model = nn.Module()
        model.weight = nn.Parameter(torch.empty(numel, device="meta"))
        example = torch.zeros(2, *SHAPE)
        export_onnx(model, tmp_path / f"{numel}.onnx", task="image", example_input=example)
        assert calls.pop()["external_data"] is external


def test_a_whole_detector_exports_into_an_existing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Exported again over its earlier file, beside the checkpoint (the exporter is recorded
    here: the real one runs in the whole-detector tests)."""
    traced: list = []
    monkeypatch.setattr(torch.onnx, "export", lambda m, args, path, **k: traced.append(path))
    for _ in range(2):
        path = ex.export_detector_onnx(ToyDetector(), tmp_path / "d.onnx", image_size=(8, 8))
        assert path == tmp_path / "d.onnx" and traced.pop() == path
        assert read_metadata(path)["exported_part"] == "whole detector"


def test_export_errors_name_the_export_extra_when_onnx_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError) as e:
        export_onnx(Tiny(), tmp_path / "a" / "t.onnx", task="image", example_input=torch.zeros(1))
    assert str(e.value).startswith(f"ONNX export needs onnx and onnxscript ({HINT}): ")
    assert not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError) as e:
        ex.export_detector_onnx(Tiny(), tmp_path / "b" / "d.onnx", image_size=(8, 8))
    assert str(e.value).startswith(f"ONNX export needs onnx ({HINT}): ")
    assert not (tmp_path / "b").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as e:
        onnx_session(tmp_path / "t.onnx")
    assert str(e.value) == f"running ONNX models needs onnxruntime ({HINT})"


# ----------------------------------------------------------------------------- verify_export
def test_as_tuple_of_a_tensor_a_dict_and_a_list():
    a, b = torch.zeros(1), torch.ones(2)
    assert ex._as_tuple(a) == (a,)
    got = ex._as_tuple({"b": b, "a": a})
    assert len(got) == 2 and got[0] is b and got[1] is a
    got = ex._as_tuple([a, b])
    assert isinstance(got, tuple) and got[0] is a and got[1] is b


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_verify_export_returns_the_largest_difference_and_fails_beyond_atol(tiny: dict, kind: str):
    path = tiny[kind]
    example = torch.randn(7, *SHAPE)  # only the shape after the batch counts
    assert 0.0 <= verify_export(path, Tiny().train(), example) < 1e-5  # verified in eval mode
    worst = verify_export(path, _shifted(Tiny(), 0.25), example, atol=1.0)
    assert worst == pytest.approx(0.25, abs=1e-5)
    # a difference of exactly atol is within it (the inputs are seeded: the same differences)
    assert verify_export(path, _shifted(Tiny(), 0.25), example, atol=worst) == worst
    message = f"{path}: output 0 at batch 1 differs from PyTorch by 2.50e-01 > 0.1"
    with pytest.raises(AssertionError) as e:
        verify_export(path, _shifted(Tiny(), 0.25), example, atol=0.1)
    assert str(e.value) == message
    # the default tolerance is 1e-4
    assert verify_export(path, _shifted(Tiny(), 5e-5), example) == pytest.approx(5e-5, abs=1e-6)
    with pytest.raises(AssertionError, match=r"by 2\.00e-04 > 0\.0001$"):
        verify_export(path, _shifted(Tiny(), 2e-4), example)


def test_verify_export_runs_seeded_inputs_at_each_batch_size_without_gradients(
    tiny: dict,
):
    """Batches 1 and 3 by default, each ``randn`` from one generator seeded 0; the model runs in
    eval mode with gradients off."""

    class Recording(Tiny):
        def forward(self, x):
            seen.append((x.clone(), self.training, torch.is_grad_enabled()))
            return super().forward(x)

    for batch_sizes in ((1, 3), (2,)):
        seen: list = []
        kwargs = {} if batch_sizes == (1, 3) else {"batch_sizes": batch_sizes}
        verify_export(tiny["pt2"], Recording().train(), torch.zeros(1, *SHAPE), **kwargs)
        gen = torch.Generator().manual_seed(0)  # anew at each call
        assert len(seen) == len(batch_sizes)
        for (x, training, grad), b in zip(seen, batch_sizes):
            assert torch.equal(x, torch.randn(b, *SHAPE, generator=gen))
            assert not training and not grad


def test_verify_export_names_the_output_count_shape_and_index_that_differ(tiny: dict):
    path = tiny["pt2"]
    example = torch.zeros(1, *SHAPE)

    class Twice(Tiny):
        def forward(self, x):
            y = super().forward(x)
            return y, y

    class Fewer(Tiny):
        def forward(self, x):
            return super().forward(x)[:, :3]

    with pytest.raises(AssertionError) as e:
        verify_export(path, Twice(), example)
    assert str(e.value) == f"{path}: 1 outputs, PyTorch gives 2"
    with pytest.raises(AssertionError) as e:
        verify_export(path, Fewer(), example)
    assert str(e.value) == f"{path}: output 0 at batch 1 has shape (1, 4), PyTorch (1, 3)"
    # two outputs, one of them 0.25 off: the largest difference, and the index of the output
    two = tiny["two"]

    class SecondOff(TwoOutputs):
        def forward(self, x):
            out = super().forward(x)
            return {"maps": out["maps"], "means": out["means"] + 0.25}

    class FirstOff(TwoOutputs):
        def forward(self, x):
            out = super().forward(x)
            return {"maps": out["maps"] + 0.25, "means": out["means"]}

    assert verify_export(two, TwoOutputs(), example) < 1e-5
    assert verify_export(two, FirstOff(), example, atol=1) == pytest.approx(0.25, abs=1e-5)
    assert verify_export(two, SecondOff(), example, atol=1) == pytest.approx(0.25, abs=1e-5)
    with pytest.raises(AssertionError, match=r": output 1 at batch 1 differs .* by 2\.50e-01"):
        verify_export(two, SecondOff(), example)


# ----------------------------------------------------------------------------- verify_detector_export
class _FakeDetector(nn.Module):
    """Returns fixed detections; records the image it was given and its mode."""

    def __init__(self, detections: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.detections = detections
        self.calls: list = []

    def forward(self, images):
        self.calls.append((images, self.training, torch.is_grad_enabled()))
        return [self.detections]


def _detections(n: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {
        "boxes": torch.rand(n, 4, generator=g) * scale,
        "labels": torch.arange(n) % 2 + 1,
        "scores": torch.rand(n, generator=g),
        "masks": torch.rand(n, 1, 6, 8, generator=g),
    }


@pytest.fixture
def fake_onnx(monkeypatch: pytest.MonkeyPatch):
    """``onnx_session`` returning a session whose run gives the arrays in ``outputs``."""
    outputs: list[np.ndarray] = []
    feeds: list = []

    class Session:
        def run(self, names, feed):
            feeds.append((names, feed))
            return outputs

    opened: list = []
    monkeypatch.setattr(ex, "onnx_session", lambda path: opened.append(path) or Session())
    return outputs, feeds, opened


def test_verify_detector_export_compares_every_output_relative_to_its_size(fake_onnx):
    outputs, feeds, opened = fake_onnx
    image = torch.rand(3, 6, 8)
    want = _detections(3, scale=100.0)  # boxes up to 100 px: 1e-3 of the largest value
    model = _FakeDetector(want).train()
    outputs[:] = [want[k].numpy().copy() for k in ("boxes", "labels", "scores", "masks")]
    big = float(want["boxes"].max())
    outputs[0][0, 0] += 0.9e-3 * big  # within tolerance
    verify_detector_export("d.onnx", model, image)
    ((images, training, grad),) = model.calls
    assert images[0] is image and not training and not grad
    assert opened == ["d.onnx"]
    ((names, feed),) = feeds
    assert names is None and list(feed) == ["image"] and np.array_equal(feed["image"], image)
    outputs[0][0, 0] += 0.2e-3 * big  # 1.1e-3 of the largest box coordinate
    with pytest.raises(AssertionError, match=r"^boxes: max \|diff\| "):
        verify_detector_export("d.onnx", model, image)
    # values below 1 are compared to 1e-3 absolutely
    outputs[:] = [want[k].numpy().copy() for k in ("boxes", "labels", "scores", "masks")]
    outputs[2][1] += 0.9e-3
    verify_detector_export("d.onnx", model, image)
    outputs[2][1] += 0.2e-3
    with pytest.raises(AssertionError) as e:
        verify_detector_export("d.onnx", model, image)
    assert str(e.value) == "scores: max |diff| 1.10e-03"
    outputs[2][1] -= 1.1e-3
    outputs[3][2, 0, 5, 7] -= 2e-3
    with pytest.raises(AssertionError, match=r"^masks: max \|diff\| 2\.00e-03$"):
        verify_detector_export("d.onnx", model, image)


def test_verify_detector_export_accepts_a_difference_of_exactly_its_tolerance(fake_onnx):
    """1e-3 of the largest value is still within: boxes up to 1000 px may be 1 px off."""
    outputs, _, _ = fake_onnx
    want = _detections(2)
    want["boxes"] = torch.tensor([[0.0, 0.0, 1000.0, 500.0], [10.0, 20.0, 30.0, 40.0]])
    model = _FakeDetector(want)
    outputs[:] = [want[k].numpy().copy() for k in ("boxes", "labels", "scores", "masks")]
    outputs[0][1, 3] += 1.0
    verify_detector_export("d.onnx", model, torch.rand(3, 6, 8))
    outputs[0][1, 3] += 2.0**-10  # 1.001 px off
    with pytest.raises(AssertionError, match=r"^boxes: max \|diff\| 1\.00e\+00$"):
        verify_detector_export("d.onnx", model, torch.rand(3, 6, 8))


def test_verify_detector_export_refuses_other_counts_and_accepts_no_detections(fake_onnx):
    outputs, _, _ = fake_onnx
    want = _detections(2)
    outputs[:] = [_detections(3)[k].numpy() for k in ("boxes", "labels", "scores", "masks")]
    with pytest.raises(AssertionError) as e:
        verify_detector_export("d.onnx", _FakeDetector(want), torch.rand(3, 6, 8))
    assert str(e.value) == "boxes: shape (3, 4) != PyTorch's (2, 4)"
    none = _detections(0)
    outputs[:] = [none[k].numpy() for k in ("boxes", "labels", "scores", "masks")]
    verify_detector_export("d.onnx", _FakeDetector(none), torch.rand(3, 6, 8))


def test_detector_features_are_the_backbone_maps_in_order():
    detector = nn.Module()
    detector.backbone = nn.Identity()
    detector.backbone.forward = lambda x: OrderedDict((k, x + i) for i, k in enumerate("0123"))
    x = torch.randn(1, 2)
    got = DetectorFeatures(detector)(x)
    assert isinstance(got, tuple) and len(got) == 4
    for i, t in enumerate(got):
        assert torch.equal(t, x + i)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("value_export_ckpts")
    return {
        "image": make_image_checkpoint(d / "image.pt"),
        "detect": make_detect_checkpoint(d / "detect.pt"),
    }


def _checkpoint_meta(info) -> dict:
    """The checkpoint's entries of a sidecar, as JSON gives them back."""
    return json.loads(
        json.dumps(
            {
                "model_name": info.model_name,
                "model_kwargs": info.model_kwargs,
                "class_names": info.class_names,
                "preprocessing": info.preprocessing,
            }
        )
    )


def test_a_model_already_loaded_is_exported_as_it_is_not_rebuilt(ckpts, tmp_path):
    """Released weights and detectron2 detectors arrive loaded: export takes that model (one
    copy in memory) rather than building a second from the info's state dict."""
    from mvitv2.export import load_program

    info = read_checkpoint(ckpts["image"])
    model = build_model(info)
    with torch.no_grad():
        model.head.projection.bias.add_(torch.tensor([3.0, -3.0, 0.0]))  # unlike info's weights
    out = tmp_path / "given.pt2"
    export_checkpoint(
        "c.pt", out, format="torch-export", dynamic_batch=False, info=info, model=model
    )
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_program(out)(x), model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(load_program(out)(x), build_model(info)(x), atol=1e-2)


@pytest.fixture(scope="module")
def image_onnx(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The image checkpoint exported to ONNX beside it (the default output) at opset 20,
    verified; the batch sizes verify_export was asked for."""
    ckpt = tmp_path_factory.mktemp("run") / "best.pt"
    ckpt.write_bytes(ckpts["image"].read_bytes())
    asked: list = []
    real = ex.verify_export
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "verify_export", lambda *a, **k: asked.append((a, k)) or real(*a, **k))
        path = export_checkpoint(ckpt, verify=True, opset=20)
    return ckpt, path, asked


def test_checkpoint_onnx_default_path_sidecar_and_verification(image_onnx):
    import onnx

    ckpt, path, asked = image_onnx
    assert path == ckpt.with_suffix(".onnx") and path.is_file()
    info = read_checkpoint(ckpt)
    assert info.class_names == IMAGE_CLASSES and info.model_name == "mvitv2_tiny"
    assert read_metadata(path) == {
        "format": "onnx",
        "task": "image",
        "inputs": [
            {"name": "images", "shape": ["batch", 3, 64, 64], "layout": "NCHW", "dtype": "float32"}
        ],
        "outputs": ["logits"],
        **_checkpoint_meta(info),
        "opset": 20,
        **VERSIONS,
    }
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = build_model(info)(x)
    ((args, kwargs),) = asked  # the file against the checkpoint's model, at batches 1 and 3
    assert args[0] == path and args[2].shape == (1, 3, 64, 64)
    assert kwargs == {"batch_sizes": (1, 3)}
    with torch.no_grad():
        assert torch.equal(args[1](x), want)
    got = onnx_session(path).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def whole_detector(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The detection checkpoint's whole detector at its default size, verified; the images
    verify_detector_export was given."""
    out = tmp_path_factory.mktemp("whole") / "onnx" / "deep" / "det.onnx"  # folders created
    images: list = []
    real = ex.verify_detector_export
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(ex, "verify_detector_export", lambda p, m, x: images.append(x) or real(p, m, x))
        path = export_checkpoint(ckpts["detect"], out, whole_detector=True, verify=True)
    assert printed.getvalue() == ""
    return path, images


def test_whole_detector_default_size_sidecar_and_graph(whole_detector, ckpts):
    import onnx

    path, images = whole_detector
    info = read_checkpoint(ckpts["detect"])
    assert info.class_names == DETECT_CLASSES and info.preprocessing["min_size"] == 128
    assert [tuple(x.shape) for x in images] == [(3, 128, 128)]  # verified once, at that size
    names = ["boxes", "labels", "scores", "masks"]
    assert read_metadata(path) == {
        "format": "onnx",
        "task": "detect",
        "inputs": [{"name": "image", "shape": [3, 128, 128], "layout": "CHW", "dtype": "float32"}],
        "outputs": names,
        **_checkpoint_meta(info),
        "exported_part": "whole detector",
        "input_range": "[0, 1] RGB",
        "label_names": "class_names[label - 1] (labels count from 1; 0, the background, is never output)",
        "opset": 17,
        **VERSIONS,
    }
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 17
    session = onnx_session(path)
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape == [3, "height", "width"]
    assert [o.name for o in session.get_outputs()] == names
    assert [o.shape[0] for o in session.get_outputs()] == ["detections"] * 4
    # an image of another size: the same detections as PyTorch
    torch.manual_seed(3)
    verify_detector_export(path, build_model(info), torch.rand(3, 96, 160))


def test_export_checkpoint_refusals(ckpts: dict[str, Path], tmp_path: Path):
    with pytest.raises(ValueError) as e:
        export_checkpoint(ckpts["image"], tmp_path / "x", format="tflite")
    assert str(e.value) == "unsupported export format 'tflite'; choose one of onnx, torch-export"
    only = "^--whole-detector exports detection checkpoints to ONNX only$"
    with pytest.raises(ValueError, match=only):
        export_checkpoint(ckpts["image"], tmp_path / "i.onnx", whole_detector=True)
    with pytest.raises(ValueError, match=only):
        export_checkpoint(
            ckpts["detect"], tmp_path / "d.pt2", format="torch-export", whole_detector=True
        )
    with pytest.raises(CheckpointError, match="'image' checkpoint, not 'detect'"):
        export_checkpoint(ckpts["image"], tmp_path / "w.onnx", task="detect")
    # the checkpoint already read (``info``) is not read again: the refusal, not a missing file
    with pytest.raises(ValueError, match=only):
        info = read_checkpoint(ckpts["image"])
        export_checkpoint(tmp_path / "gone.pt", tmp_path / "g.onnx", whole_detector=True, info=info)
    assert list(tmp_path.iterdir()) == []


def test_export_checkpoint_verifies_only_when_asked(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Verification needs onnxruntime and runs the model three times: off unless asked."""
    written: list = []
    monkeypatch.setattr(ex, "export_program", lambda m, out, **k: written.append(out) or out)
    asked: list = []
    monkeypatch.setattr(ex, "verify_export", lambda *a, **k: asked.append(k))
    out = tmp_path / "m.pt2"
    assert export_checkpoint(ckpts["image"], out, format="torch-export") == out
    assert written == [out] and asked == []
    export_checkpoint(ckpts["image"], out, format="torch-export", verify=True)
    assert asked == [{"batch_sizes": (1, 3)}]


# ----------------------------------------------------------------------------- command line
def _parser(task: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p")
    add_export_arguments(parser, task)
    return parser


def test_export_options_defaults_and_values():
    defaults = {
        "checkpoint": "c.pt",
        "format": "onnx",
        "output": None,
        "opset": None,  # each exporter's own default
        "static_batch": False,
        "input_size": None,
        "verify": False,
    }
    assert vars(_parser("image").parse_args(["--checkpoint", "c.pt"])) == defaults
    assert vars(_parser("video").parse_args(["--checkpoint", "c.pt"])) == defaults
    for task in ("detect", None):
        parser = _parser(task)
        assert vars(parser.parse_args(["--checkpoint", "c.pt"])) == {
            **defaults,
            "whole_detector": False,
        }
        argv = ["--checkpoint", "c.pt", "--format", "torch-export", "--output", "o.pt2"]
        argv += ["--opset", "20", "--static-batch", "--input-size", "96", "128", "--verify"]
        assert vars(parser.parse_args([*argv, "--whole-detector"])) == {
            "checkpoint": "c.pt",
            "format": "torch-export",
            "output": "o.pt2",
            "opset": 20,
            "static_batch": True,
            "input_size": [96, 128],
            "verify": True,
            "whole_detector": True,
        }
        assert "--input-size H W" in parser.format_usage()


def test_export_options_refused(capsys: pytest.CaptureFixture):
    for argv, phrase in (
        ([], "the following arguments are required: --checkpoint"),
        (["--checkpoint", "c", "--format", "pt"], "(choose from onnx, torch-export)"),
        (["--checkpoint", "c", "--whole-detector"], "unrecognized arguments: --whole-detector"),
        (["--checkpoint", "c", "--input-size", "96"], "expected 2 arguments"),
        (["--checkpoint", "c", "--opset", "x"], "invalid int value: 'x'"),
    ):
        with pytest.raises(SystemExit) as e:
            _parser("image").parse_args(argv)
        assert e.value.code == 2
        assert phrase in capsys.readouterr().err.replace("'onnx'", "onnx").replace(
            "'torch-export'", "torch-export"
        )


def test_export_options_help_lines():
    """What ``mvitv2 export <task> --help`` says of each option (flags, help, metavar, default)."""
    whole = (
        "detect, ONNX: export the whole detector (image in, boxes/labels/scores/masks out) "
        "instead of backbone + FPN"
    )
    assert _options(_parser("detect")) == {
        "checkpoint": (
            ["--checkpoint"],
            "checkpoint of `mvitv2 train`, or released weights: a weights tag (`mvitv2 info "
            "--weights`) or a file of them (image, video: with --model; detect: a detectron2 file)",
            None,
            None,
        ),
        "format": (["--format"], "output format (default: onnx)", None, "onnx"),
        "output": (
            ["--output"],
            "output file (default: the checkpoint, or the weights tag, with .onnx/.pt2)",
            None,
            None,
        ),
        "opset": (["--opset"], "ONNX opset (default: 18; the whole detector 17)", None, None),
        "static_batch": (
            ["--static-batch"],
            "fix the batch size to 1 (default: dynamic)",
            None,
            False,
        ),
        "input_size": (
            ["--input-size"],
            "input height and width (default: the checkpoint's evaluation size)",
            ("H", "W"),
            None,
        ),
        "verify": (
            ["--verify"],
            "compare with PyTorch at batch 1 and 3 after export",
            None,
            False,
        ),
        "whole_detector": (["--whole-detector"], whole, None, False),
    }


def _args(**kw) -> argparse.Namespace:
    args = {"checkpoint": "c.pt", "output": None, "format": "onnx", "opset": 18}
    args |= {"static_batch": False, "input_size": None, "verify": False}
    return argparse.Namespace(**(args | kw))


def test_run_export_passes_each_option_on(monkeypatch: pytest.MonkeyPatch, capsys):
    calls: list = []
    monkeypatch.setattr(ex, "export_checkpoint", lambda *a, **k: calls.append((a, k)) or Path("m"))
    info, model = object(), object()
    args = _args(output="o.pt2", format="torch-export", opset=20, static_batch=True)
    args.input_size, args.verify, args.whole_detector = [96, 128], True, True
    assert run_export("detect", args, lambda a: (a is args and info, model)) == 0
    assert calls.pop() == (
        ("c.pt", "o.pt2"),
        {
            "format": "torch-export",
            "task": "detect",
            "opset": 20,
            "dynamic_batch": False,
            "input_size": [96, 128],
            "verify": True,
            "whole_detector": True,
            "info": info,
            "model": model,
        },
    )
    assert capsys.readouterr().out == "wrote m and m.json (verified)\n"
    assert run_export("image", _args()) == 0  # no whole_detector option: False
    assert calls.pop() == (
        ("c.pt", None),
        {
            "format": "onnx",
            "task": "image",
            "opset": 18,
            "dynamic_batch": True,
            "input_size": None,
            "verify": False,
            "whole_detector": False,
            "info": None,
            "model": None,
        },
    )
    assert capsys.readouterr() == ("wrote m and m.json\n", "")


@pytest.mark.parametrize(
    "error, status, line",
    [
        (CheckpointError("bad file"), 2, "mvitv2 export video: error: bad file"),
        (FileNotFoundError("no file"), 2, "mvitv2 export video: error: no file"),
        (ImportError("no onnx"), 2, "mvitv2 export video: error: no onnx"),
        (ValueError("bad size"), 2, "mvitv2 export video: error: bad size"),
        (AssertionError("off by 1"), 1, "mvitv2 export video: verification failed: off by 1"),
    ],
)
def test_run_export_failures_are_one_line(
    error, status, line, monkeypatch: pytest.MonkeyPatch, capsys
):
    def fail(*a, **k):
        raise error

    monkeypatch.setattr(ex, "export_checkpoint", fail)
    assert run_export("video", _args(verify=True)) == status
    assert capsys.readouterr() == ("", line + "\n")
    # also when reading the checkpoint fails
    monkeypatch.setattr(ex, "export_checkpoint", lambda *a, **k: Path("m"))
    assert run_export("video", _args(verify=True), fail) == status
    assert capsys.readouterr() == ("", line + "\n")


def test_run_export_lets_other_errors_through(monkeypatch: pytest.MonkeyPatch):
    def fail(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(ex, "export_checkpoint", fail)
    with pytest.raises(RuntimeError, match="bug"):
        run_export("image", _args())


def test_cli_user_mistakes_are_one_line_and_exit_2(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """A missing checkpoint, another task's checkpoint, a detection size off the 32 grid, a
    whole detector to torch.export, ONNX without the export extra: one line, exit 2, no file."""
    image, detect = str(ckpts["image"]), str(ckpts["detect"])
    missing = tmp_path / "missing.pt"
    out = ["--output", str(tmp_path / "o.onnx")]
    for argv, line in (
        (["image", "--checkpoint", str(missing)], f"{missing} does not exist"),
        (["detect", "--checkpoint", image], "'image' checkpoint, not 'detect'"),
        (
            ["detect", "--checkpoint", detect, "--input-size", "100", "128"],
            "detection export size must be multiples of 32, got (100, 128)",
        ),
        (
            ["detect", "--checkpoint", detect, "--whole-detector", "--format", "torch-export"],
            "--whole-detector exports detection checkpoints to ONNX only",
        ),
    ):
        assert cli.main(["export", *argv, *out]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert captured.out == "" and "\n" not in err, err
        assert err.startswith(f"mvitv2 export {argv[0]}: error: ") and line in err, err
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert cli.main(["export", "image", "--checkpoint", image, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvitv2 export image: error: ONNX export needs onnx and onnxscript (")
    assert HINT in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_static_program_is_verified_at_batch_one_and_refuses_batch_two(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    asked: list = []
    real = ex.verify_export
    monkeypatch.setattr(ex, "verify_export", lambda *a, **k: asked.append(k) or real(*a, **k))
    out = tmp_path / "p" / "m.pt2"
    argv = ["export", "image", "--checkpoint", str(ckpts["image"]), "--output", str(out)]
    assert cli.main([*argv, "--format", "torch-export", "--static-batch", "--verify"]) == 0
    assert capsys.readouterr() == (f"wrote {out} and {out}.json (verified)\n", "")
    assert asked == [{"batch_sizes": (1,)}]
    info = read_checkpoint(ckpts["image"])
    static_input = {"name": "images", "shape": [1, 3, 64, 64], "layout": "NCHW"}
    assert read_metadata(out) == {
        "format": "torch-export",
        "task": "image",
        "inputs": [{**static_input, "dtype": "float32"}],
        "outputs": ["logits"],
        **_checkpoint_meta(info),
        **VERSIONS,
    }
    program = load_program(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(program(x), build_model(info)(x), atol=1e-4, rtol=0)
    with pytest.raises(Exception, match=r"size\(\)\[0\] == 1"):  # torch.export's guard
        program(torch.randn(2, 3, 64, 64))


def test_the_opset_asked_for_is_the_one_each_export_writes(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``--opset N`` reaches the whole detector's exporter too (it was left at 17); without it
    the classifier gets 18 and the whole detector 17; a ``.pt2`` program has no opset, so asking
    for one there is refused before anything is read."""
    asked: list = []
    monkeypatch.setattr(ex, "export_detector_onnx", lambda *a, **k: asked.append(k["opset"]))
    monkeypatch.setattr(ex, "export_onnx", lambda *a, **k: asked.append(k["opset"]))
    export_checkpoint(ckpts["detect"], tmp_path / "d.onnx", whole_detector=True, opset=16)
    export_checkpoint(ckpts["detect"], tmp_path / "d.onnx", whole_detector=True)
    export_checkpoint(ckpts["image"], tmp_path / "i.onnx")
    export_checkpoint(ckpts["image"], tmp_path / "i.onnx", opset=16)
    assert asked == [16, 17, 18, 16]
    with pytest.raises(
        ValueError, match=r"^--opset applies to ONNX exports, not --format torch-export$"
    ):
        export_checkpoint(tmp_path / "gone.pt", tmp_path / "p.pt2", format="torch-export", opset=16)


def test_an_export_at_another_input_size_describes_that_size_in_its_sidecar(
    ckpts: dict[str, Path], tmp_path: Path
):
    """A 64 px checkpoint (crop_pct 0.8: short side 80) exported at 96 x 96: the sidecar's
    preprocessing says 96 and int(96 / 0.8) = 120, and the predictor built from it makes the
    inputs the graph takes; a video checkpoint's short side scales with the crop (73 -> 110)."""
    from mvitv2.predict import Predictor

    path = export_checkpoint(ckpts["image"], tmp_path / "i.onnx", input_size=(96, 96))
    pre = read_metadata(path)["preprocessing"]
    assert (pre["input_size"], pre["resize_size"], pre["crop_pct"]) == ([96, 96], 120, 0.8)
    info = read_checkpoint(ckpts["image"])
    assert info.preprocessing["input_size"] == [64, 64]  # the checkpoint's own, unchanged
    image = torch.rand(3, 130, 110)
    predictor = Predictor(
        build_model(info), task="image", class_names=IMAGE_CLASSES, preprocessing=pre
    )
    x = predictor.preprocess(image)
    assert tuple(x.shape) == (1, 3, 96, 96)
    got = onnx_session(path).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, predictor.forward(x).numpy(), atol=1e-4, rtol=0)
    video = make_video_checkpoint(tmp_path / "video.pt")
    vinfo = read_checkpoint(video)
    assert (
        vinfo.preprocessing["input_size"] == [64, 64] and vinfo.preprocessing["resize_size"] == 73
    )
    vpath = export_checkpoint(video, tmp_path / "v.onnx", input_size=(96, 96))
    vpre = read_metadata(vpath)["preprocessing"]
    assert (vpre["input_size"], vpre["resize_size"]) == ([96, 96], round(73 * 96 / 64))
