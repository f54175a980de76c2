"""How the C allocator serves PyTorch's CPU tensors in ``mvitv2`` command-line runs.

PyTorch takes CPU tensor memory from the C library's ``malloc``. glibc serves every block above
its mmap threshold (at most 32 MiB) with fresh pages from the kernel and gives them back on
``free``, so each large activation of each step is page-faulted in and zeroed again. Measured on
an Intel Xeon (model 207, 2 cores; ``mvitv2 benchmark``, docs/benchmarks.md): timm's MViTv2-T
training step runs ~25 % faster when freed memory is kept for reuse, ours ~5-10 % (it allocates
less). So the command line (:func:`keep_freed_memory`, called by :func:`mvitv2.cli.main`) asks
glibc to serve all blocks from its heap and keep freed memory for the next allocation: the
process then holds its peak memory until it exits, as a training run does anyway. The library
itself never changes the allocator of the program that imports it.

``MVITV2_MALLOC=default`` leaves glibc as it is; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

KEEP = "glibc: heap only, freed memory kept (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)"

_setting = "default"


def keep_freed_memory(libc: Any = None) -> str:
    """Make glibc keep freed memory for reuse (see the module docstring); returns
    :func:`allocator_setting`.

    Args:
        libc: the C library to call ``mallopt`` on (default: this process's glibc).
    """
    global _setting
    if os.environ.get("MVITV2_MALLOC", "keep") == "default":
        _setting = "default (MVITV2_MALLOC=default)"
        return _setting
    if libc is None:
        if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
            _setting = "default (not glibc)"
            return _setting
        libc = ctypes.CDLL(None)
    # mallopt returns 1 on success. -1 as the trim threshold turns trimming off.
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    _setting = KEEP if ok else "default (mallopt failed)"
    return _setting


def allocator_setting() -> str:
    """How this process's C allocator was set up by :func:`keep_freed_memory` (``"default"``
    when it was not called: e.g. a library user's program)."""
    return _setting
