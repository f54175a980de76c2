"""The CPU a figure was measured on: model, family/model numbers and the flags that decide which
kernels run (AVX-512, its bf16/fp16 extensions, AMX), read from ``/proc/cpuinfo``.

Benchmarks record this beside every figure: the same command gives different ratios on an AMD
EPYC and an Intel Xeon (MKL's and oneDNN's kernels, the fused attention's bf16 path), and the
kernel's own name (``platform.processor()``) is only ``x86_64``.
"""

from __future__ import annotations

import os
import platform

#: The CPU flags that change which GEMM and attention kernels PyTorch runs, in report order.
KERNEL_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def parse_cpuinfo(text: str) -> dict[str, object]:
    """The first processor's ``model name``, ``cpu family`` and ``model`` and which of
    :data:`KERNEL_FLAGS` it has, from the text of ``/proc/cpuinfo`` (x86 Linux).

    Returns ``{"model_name": str, "family": str, "model": str, "flags": [flag, ...]}``; a field
    that is missing reads ``"?"``.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():  # one block per logical processor: the first value counts
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name", "?"),
        "family": fields.get("cpu family", "?"),
        "model": fields.get("model", "?"),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


def cpu_info() -> dict[str, object]:
    """:func:`parse_cpuinfo` of this machine plus its logical CPU count; where there is no
    ``/proc/cpuinfo`` (macOS, Windows) the platform's processor string and no flags."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        name = platform.processor() or platform.machine()
        info = {"model_name": name, "family": "?", "model": "?", "flags": []}
    return {**info, "cpus": os.cpu_count()}


def describe_cpu(info: dict[str, object] | None = None) -> str:
    """One line for a log or a table heading, e.g. ``"AMD EPYC (family 26, model 2), 2 CPUs;
    avx2 avx512f avx512_vnni avx512_bf16; no AMX"``."""
    info = cpu_info() if info is None else info
    flags = list(info["flags"])
    if not flags:
        text = "no kernel flags read"
    else:
        text = " ".join(flags) + ("" if any(f.startswith("amx") for f in flags) else "; no AMX")
    return (
        f"{info['model_name']} (family {info['family']}, model {info['model']}), "
        f"{info['cpus']} CPUs; {text}"
    )
