"""The implicit contexts a kernel consults: tracing (compile/export), an intercepting dispatch
mode (e.g. FLOP counting) and the autocast dtype."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def tracing() -> bool:
    """True while compiling, exporting or tracing (keep to out-of-place standard ops there)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def intercepted() -> bool:
    """True while a Python dispatch mode sees every op (``FlopCounterMode``, a debug mode): a
    timing made there would be wrong and its extra calls would be counted."""
    return _get_current_dispatch_mode() is not None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None (meta tensors have no autocast)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
