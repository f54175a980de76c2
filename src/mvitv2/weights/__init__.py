"""Checkpoints: every released format, conversion to mvitv2's names, loading, released weights.

* :func:`load_checkpoint` reads a file / URL / state dict in any supported layout (official image,
  SlowFast video, detectron2, timm, torchvision, mvitv2), fits it to a model (kernel squeeze or
  image->video inflation, rel-pos and abs-pos interpolation, head reset) and loads it, or raises
  an error listing what does not fit.
* :func:`convert_state_dict` only detects and renames; :func:`to_official` writes our weights in
  the official layout.
* :func:`list_weights` / :func:`get_weights` / :func:`load_pretrained`: the registry of released
  weights, downloaded through torch.hub's cache.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so that listing the released weights (`WEIGHTS`, `list_weights`) imports
# neither the model code (`load`) nor torchvision.
_LAZY = {
    "FORMATS": "formats",
    "FORMAT_VERSION": "formats",
    "KeyFormat": "formats",
    "convert_state_dict": "formats",
    "detect_format": "formats",
    "to_official": "formats",
    "CheckpointError": "io",
    "cache_dir": "io",
    "download": "io",
    "read_checkpoint": "io",
    "CheckpointMismatchError": "load",
    "LoadReport": "load",
    "inflate_kernel": "load",
    "load_checkpoint": "load",
    "WEIGHTS": "registry",
    "Preprocessing": "registry",
    "Weights": "registry",
    "download_weights": "registry",
    "get_weights": "registry",
    "list_weights": "registry",
    "load_pretrained": "registry",
    "register_weights": "registry",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mvitv2.weights' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mvitv2.weights.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
