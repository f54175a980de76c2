"""The implicit contexts a kernel consults: tracing (compile/export), an intercepting dispatch
mode (e.g. FLOP counting) and the autocast dtype."""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def tracing() -> bool:
    """True while compiling, exporting or tracing (keep to out-of-place standard ops there)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _in_onnx_export()


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, reading its two flags from where torch 2.15 keeps
    them: the public function imports both at every call (2.3 us; :func:`tracing` runs ~450
    times per MViTv2-S forward)."""
    flags = _onnx_export_flags()
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    exporter_flags, globals_ = flags
    return bool(globals_.in_onnx_export or exporter_flags._is_onnx_exporting)


@functools.cache
def _onnx_export_flags() -> tuple[object, object] | None:
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # moved in another torch version: the public function, slower
        return None
    return _flags, GLOBALS


def intercepted() -> bool:
    """True while a Python dispatch mode sees every op (``FlopCounterMode``, a debug mode): a
    timing made there would be wrong and its extra calls would be counted."""
    return _get_current_dispatch_mode() is not None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (meta tensors have no autocast)."""
    # Known types first: dynamo cannot trace torch.amp.is_autocast_available in torch 2.11, so a
    # compiled forward (fullgraph) on cpu or cuda must not reach it.
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
