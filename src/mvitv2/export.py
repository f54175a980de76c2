"""Export trained models to ONNX and ``torch.export`` programs, with a JSON sidecar of metadata.

Every exported file ``model.onnx`` / ``model.pt2`` gets ``model.onnx.json`` / ``model.pt2.json``
beside it: task, model name, class names, input name/shape/layout and the evaluation
preprocessing (input size, resize, interpolation, mean/std; video: frames, sampling rate, clips).
The exported graph takes the *normalised* input; the batch dimension is dynamic by default.

What is exported per task:

* ``image``: the classifier, ``(B, 3, H, W)`` -> logits ``(B, num_classes)``.
* ``video``: the classifier, ``(B, 3, T, H, W)`` -> logits.
* ``detect``: the backbone and FPN, ``(B, 3, H, W)`` -> P2..P6 maps (``(B, 256, H/s, W/s)``,
  s = 4..64); the RPN, RoI heads and mask paste-back stay in Python (torchvision detection code).
  With ``whole_detector=True`` (``--whole-detector``, ONNX only) the whole detector instead: one
  ``(3, H, W)`` RGB image in ``[0, 1]`` (the graph resizes and normalises it) -> ``boxes (N, 4)``,
  ``labels (N,)`` (1..K: ``class_names[label - 1]``, as the sidecar's ``label_names`` says),
  ``scores (N,)``, ``masks (N, 1, H, W)`` (no ``masks`` for a box-only detector). It uses the
  TorchScript-based exporter, because ``torch.export`` cannot capture the data-dependent NMS.

ONNX uses the ``torch.export``-based exporter (``dynamo=True``) at opset 18, which onnxruntime
runs from 1.14 on. ONNX support is the optional extra ``mvitv2[export]`` (onnx, onnxscript,
onnxruntime for ``--verify``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mvitv2.errors import check_writable_folder
from mvitv2.predict import CheckpointError, CheckpointInfo, build_model, read_checkpoint
from mvitv2.tasks.spec import get_spec
from mvitv2.weights.registry import is_weights_tag

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
# a whole detector's labels are the detector's, 1..K: the sidecar says how they name a class
LABEL_NAMES = "class_names[label - 1] (labels count from 1; 0, the background, is never output)"
DEFAULT_OPSET = 18
#: the whole detector's opset by default (its TorchScript-based exporter; see export_detector_onnx).
WHOLE_DETECTOR_OPSET = 17
# A whole detector's graph outputs, in this order, those its eager forward returns.
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")
_EXTRA_HINT = "install the export extra: pip install 'mvitv2[export]'"


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the metadata of an exported file lives: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar metadata of an exported model file."""
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"no metadata {side} beside exported model {path}")
    return json.loads(side.read_text())


def _write_sidecar(
    path: Path,
    fmt: str,
    task: str,
    example_input: Tensor,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool,
    metadata: dict[str, Any] | None,
    **extra: Any,
) -> Path:
    from mvitv2 import __version__

    shape: list[Any] = list(example_input.shape)
    if dynamic_batch:
        shape[0] = "batch"
    layout = {5: "NCTHW", 4: "NCHW", 3: "CHW"}[example_input.ndim]
    meta = {
        "format": fmt,
        "task": task,
        "inputs": [{"name": input_names[0], "shape": shape, "layout": layout, "dtype": "float32"}],
        "outputs": list(output_names),
        **(metadata or {}),
        **extra,
        "mvitv2_version": __version__,
        "torch_version": torch.__version__,
    }
    side = sidecar_path(path)
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return side


def _batch_example(example_input: Tensor, dynamic_batch: bool) -> Tensor:
    # torch.export specialises a size-1 dimension to the constant 1, so trace with batch 2.
    if dynamic_batch and example_input.shape[0] == 1:
        return example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def _dynamic_shapes(dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_program(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task: str,
    example_input: Tensor,
    dynamic_batch: bool = True,
    metadata: dict[str, Any] | None = None,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
) -> Path:
    """Export ``model`` with ``torch.export`` and save it with ``torch.export.save`` (``.pt2``).

    Args:
        model: the network in eval mode, taking one tensor.
        path: output file; its metadata goes to ``<path>.json``.
        task: ``image``, ``video`` or ``detect`` (recorded in the metadata).
        example_input: an input of the deployed shape (the batch size may differ at run time when
            ``dynamic_batch``; every other dimension is fixed).
        dynamic_batch: make dimension 0 dynamic.
        metadata: extra sidecar entries (class names, preprocessing, model name, ...).
        input_names, output_names: names recorded in the metadata.

    Load it back with :func:`load_program`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _batch_example(example_input, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(
            model.eval(), (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch)
        )
    torch.export.save(program, path)
    _write_sidecar(
        path,
        "torch-export",
        task,
        example_input,
        input_names,
        output_names,
        dynamic_batch,
        metadata,
    )
    return path


def load_program(path: str | os.PathLike) -> nn.Module:
    """A saved ``.pt2`` program as a callable module (``torch.export.load(path).module()``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported program {path} does not exist")
    return torch.export.load(path).module()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    task: str,
    example_input: Tensor,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: dict[str, Any] | None = None,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
) -> Path:
    """Export ``model`` to ONNX (one file; weights over 2 GB go to ``<path>.data``).

    Args:
        model: the network in eval mode, taking one tensor.
        path: output ``.onnx`` file; its metadata goes to ``<path>.json``.
        task: ``image``, ``video`` or ``detect`` (recorded in the metadata).
        example_input: an input of the deployed shape (only the batch may vary when
            ``dynamic_batch``).
        opset: ONNX opset (18 runs on onnxruntime >= 1.14).
        dynamic_batch: make dimension 0 of the input and of every output dynamic.
        metadata: extra sidecar entries (class names, preprocessing, model name, ...).
        input_names, output_names: graph input/output names.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({_EXTRA_HINT}): {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _batch_example(example_input, dynamic_batch)
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with torch.no_grad():
            torch.onnx.export(
                model.eval(),
                (example,),
                path,
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(dynamic_batch),
                external_data=num_bytes > 1.8 * 2**30,  # protobuf's 2 GB limit
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as e:
        # The model refused the example (an input size it cannot take): that ValueError, as
        # the torch-export format gives it, not wrapped in the exporter's report.
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise
    written = _onnx_opset(path)
    if written != opset:
        # The exporter writes its own opset and only tries to convert to another; when that
        # fails it keeps its own (with a logged traceback), which a runtime that needs the
        # asked opset cannot load.
        path.unlink()
        Path(f"{path}.data").unlink(missing_ok=True)
        raise ValueError(
            f"opset {opset}: the ONNX exporter could not convert the model to it and wrote "
            f"opset {written}; export with opset {written} (--opset {written})"
        )
    _write_sidecar(
        path,
        "onnx",
        task,
        example_input,
        input_names,
        output_names,
        dynamic_batch,
        metadata,
        opset=opset,
    )
    return path


def _onnx_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares (its graph, not the external weights)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_detector_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: Sequence[int],
    opset: int = WHOLE_DETECTOR_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export a whole detector (resize, backbone, RPN, RoI heads, NMS, mask paste) to ONNX.

    Args:
        model: a detector from :func:`mvitv2.create_detector` (eval mode is set here).
        path: output ``.onnx`` file; its metadata goes to ``<path>.json``.
        image_size: ``(H, W)`` of the example image the graph is traced with (other sizes run,
            the resize inside the graph follows them).
        opset: ONNX opset of the TorchScript-based exporter.
        metadata: extra sidecar entries.
    """
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx ({_EXTRA_HINT}): {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(3, *image_size)
    with torch.no_grad():
        # The outputs are the ones the detector returns: a box-only one (mask=False) has no masks.
        returned = model.eval()([example])[0]
        names = [n for n in DETECTION_OUTPUTS if n in returned]
        torch.onnx.export(
            model,
            ([example],),
            path,
            input_names=["image"],
            output_names=names,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                **{n: {0: "detections"} for n in names},
            },
        )
    _write_sidecar(
        path,
        "onnx",
        "detect",
        example,
        ["image"],
        names,
        False,
        {
            **(metadata or {}),
            "exported_part": "whole detector",
            "input_range": "[0, 1] RGB",
            "label_names": LABEL_NAMES,
        },
        opset=opset,
    )
    return path


def verify_detector_export(path: str | os.PathLike, model: nn.Module, image: Tensor) -> None:
    """Assert that the ONNX detector finds the same detections as ``model`` on ``image``."""
    with torch.no_grad():
        ref = model.eval()([image])[0]
    got = onnx_session(path).run(None, {"image": image.numpy()})
    for name, value in zip(DETECTION_OUTPUTS, got):
        want = ref[name].numpy()
        if value.shape != want.shape:
            raise AssertionError(f"{name}: shape {value.shape} != PyTorch's {want.shape}")
        err = float(abs(value.astype("float64") - want).max()) if want.size else 0.0
        if err > 1e-3 * max(1.0, float(abs(want).max()) if want.size else 1.0):
            raise AssertionError(f"{name}: max |diff| {err:.2e}")


def onnx_session(path: str | os.PathLike):
    """An onnxruntime CPU session for an exported model."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"running ONNX models needs onnxruntime ({_EXTRA_HINT})") from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(out.values())
    return tuple(out)


@torch.no_grad()
def verify_export(
    path: str | os.PathLike,
    model: nn.Module,
    example_input: Tensor,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
) -> float:
    """Run an exported file (``.onnx`` in onnxruntime, ``.pt2`` through ``torch.export.load``)
    on random inputs at each batch size and compare with ``model``.

    Returns the largest absolute difference over all outputs; raises ``AssertionError`` naming
    the batch size and output when it exceeds ``atol``.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name

        def run(x: Tensor) -> tuple[Tensor, ...]:
            return tuple(torch.from_numpy(o) for o in session.run(None, {name: x.numpy()}))
    else:
        program = load_program(path)

        def run(x: Tensor) -> tuple[Tensor, ...]:
            return _as_tuple(program(x))

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, *example_input.shape[1:], generator=gen)
        expected = _as_tuple(model.eval()(x))
        got = run(x)
        if len(got) != len(expected):
            raise AssertionError(f"{path}: {len(got)} outputs, PyTorch gives {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            if g.shape != e.shape:
                raise AssertionError(
                    f"{path}: output {i} at batch {b} has shape {tuple(g.shape)}, "
                    f"PyTorch {tuple(e.shape)}"
                )
            diff = float((g.float() - e.float()).abs().max())
            worst = max(worst, diff)
            if diff > atol:
                raise AssertionError(
                    f"{path}: output {i} at batch {b} differs from PyTorch by {diff:.2e} > {atol}"
                )
    return worst


# ----------------------------------------------------------------------------- checkpoints
class DetectorFeatures(nn.Module):
    """A detector's backbone + FPN as a module returning a tuple of maps (P2..P6)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(x).values())


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    format: str = "onnx",
    task: str | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_size: Sequence[int] | None = None,
    verify: bool = False,
    whole_detector: bool = False,
    info: CheckpointInfo | None = None,
    model: nn.Module | None = None,
) -> Path:
    """Export a training checkpoint (see the module docstring for what each task exports).

    Args:
        checkpoint: the engine's checkpoint file (or, with ``info``, released weights' tag or
            file).
        output: output file; default: the checkpoint path (or ``<tag>``) with ``.onnx`` /
            ``.pt2``.
        format: ``onnx`` or ``torch-export``.
        task: expected task; a checkpoint of another task raises :class:`CheckpointError`.
        opset: ONNX opset (default: :data:`DEFAULT_OPSET`; the whole detector
            :data:`WHOLE_DETECTOR_OPSET`); ONNX only.
        dynamic_batch: dynamic batch dimension.
        input_size: ``(H, W)`` to export at (default: the checkpoint's evaluation size).
        verify: compare the exported model with PyTorch at batch 1 and 3 (1e-4); a whole
            detector: its detections on one random image.
        whole_detector: detection only: export the whole detector (ONNX), not backbone + FPN.
        info: the checkpoint already read (a detectron2 detector:
            :func:`mvitv2.tasks.detect.read_detector`); default: ``read_checkpoint(checkpoint)``.
        model: the model ``info`` describes, already loaded (released weights, a detectron2
            detector); default: ``build_model(info)``.
    """
    if format not in FORMATS:
        raise ValueError(
            f"unsupported export format {format!r}; choose one of {', '.join(FORMATS)}"
        )
    if opset is not None and format != "onnx":
        raise ValueError(f"--opset applies to ONNX exports, not --format {format}")
    info = info or read_checkpoint(checkpoint, task=task)
    model = model if model is not None else build_model(info)
    suffix = FORMATS[format]
    # a tag keeps its whole name: mvitv2_tiny.in1k.onnx, not mvitv2_tiny.onnx
    tag = is_weights_tag(str(checkpoint))
    default = Path(f"{checkpoint}{suffix}" if tag else Path(checkpoint).with_suffix(suffix))
    output = Path(output or default)
    if output.is_dir():  # before the export's minutes, not a failed write after them
        raise ValueError(
            f"output {output} is a folder; pass the file to write (e.g. {output / default.name})"
        )
    # a read-only folder, or a file where a folder is wanted, before the export too
    check_writable_folder(output.parent, f"output {output}")
    preprocessing = info.preprocessing
    if input_size is not None:  # the sidecar describes the graph's inputs, not the training's
        preprocessing = info.spec.preprocessing_at(preprocessing, input_size)
    metadata = {
        "model_name": info.model_name,
        "model_kwargs": info.model_kwargs,
        "class_names": info.class_names,
        "preprocessing": preprocessing,
    }
    if whole_detector:
        if not info.spec.exports_whole_model or format != "onnx":
            raise ValueError("--whole-detector exports detection checkpoints to ONNX only")
        size = input_size or info.spec.export_size(info.preprocessing)
        opset = WHOLE_DETECTOR_OPSET if opset is None else opset
        path = export_detector_onnx(model, output, image_size=size, opset=opset, metadata=metadata)
        if verify:
            verify_detector_export(path, model, torch.rand(3, *size))
        return path
    inputs = info.spec.export_inputs(model, info.preprocessing, input_size)
    kwargs = dict(
        task=info.task,
        example_input=inputs.example,
        dynamic_batch=dynamic_batch,
        metadata={**metadata, **inputs.metadata},
        input_names=inputs.input_names,
        output_names=inputs.output_names,
    )
    if format == "onnx":
        opset = DEFAULT_OPSET if opset is None else opset
        path = export_onnx(inputs.module, output, opset=opset, **kwargs)
    else:
        path = export_program(inputs.module, output, **kwargs)
    if verify:
        batch_sizes = (1, 3) if dynamic_batch else (1,)
        verify_export(path, inputs.module, inputs.example, batch_sizes=batch_sizes)
    return path


# ----------------------------------------------------------------------------- CLI
def add_export_arguments(parser: argparse.ArgumentParser, task: str | None = None) -> None:
    """Options of ``mvitv2 export <task>`` (``--whole-detector`` only for a task that exports
    its whole model, or when ``task`` is None)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint of `mvitv2 train`, or released weights: a weights tag (`mvitv2 info "
        "--weights`) or a file of them (image, video: with --model; detect: a detectron2 file)",
    )
    parser.add_argument(
        "--format", default="onnx", choices=sorted(FORMATS), help="output format (default: onnx)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="output file (default: the checkpoint, or the weights tag, with .onnx/.pt2)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset (default: {DEFAULT_OPSET}; the whole detector {WHOLE_DETECTOR_OPSET})",
    )
    parser.add_argument(
        "--static-batch", action="store_true", help="fix the batch size to 1 (default: dynamic)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="input height and width (default: the checkpoint's evaluation size)",
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare with PyTorch at batch 1 and 3 after export"
    )
    if task is not None and not get_spec(task).exports_whole_model:
        return
    parser.add_argument(
        "--whole-detector",
        action="store_true",
        help="detect, ONNX: export the whole detector (image in, boxes/labels/scores/masks out) "
        "instead of backbone + FPN",
    )


def run_export(
    task: str,
    args: argparse.Namespace,
    read: Callable[[argparse.Namespace], tuple[CheckpointInfo, nn.Module | None]] | None = None,
) -> int:
    """``mvitv2 export <task>``: export ``args.checkpoint`` (read by ``read(args)`` into its
    info and, when already loaded, its model; default: a checkpoint of ``mvitv2 train <task>``);
    prints the files written."""
    try:
        info, model = read(args) if read is not None else (None, None)
        path = export_checkpoint(
            args.checkpoint,
            args.output,
            format=args.format,
            task=task,
            opset=args.opset,
            dynamic_batch=not args.static_batch,
            input_size=args.input_size,
            verify=args.verify,
            whole_detector=getattr(args, "whole_detector", False),
            info=info,
            model=model,
        )
    except (CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"mvitv2 export {task}: error: {e}", file=sys.stderr)
        return 2
    except AssertionError as e:  # --verify found a mismatch
        print(f"mvitv2 export {task}: verification failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {sidecar_path(path)}" + (" (verified)" if args.verify else ""))
    return 0
