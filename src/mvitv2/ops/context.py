"""The implicit contexts a kernel consults: tracing (compile/export) and the autocast dtype."""

from __future__ import annotations

import torch


def tracing() -> bool:
    """True while compiling, exporting or tracing (keep to out-of-place standard ops there)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (meta tensors have no autocast)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
