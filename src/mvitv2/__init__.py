"""mvitv2: MViTv2 for image classification, detection and video, with every checkpoint format."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MViT",
    "MViTConfig",
    "Predictor",
    "__version__",
    "create_detector",
    "create_model",
    "get_config",
    "list_models",
    "load_checkpoint",
]

# Everything loads on first use, so `import mvitv2` (and `mvitv2 --help`) does not import torch.
_LAZY = {
    "CheckpointError": "mvitv2.errors",
    "MViT": "mvitv2.models",
    "MViTConfig": "mvitv2.models",
    "create_model": "mvitv2.models",
    "get_config": "mvitv2.models",
    "list_models": "mvitv2.models",
    "load_checkpoint": "mvitv2.weights",
    "create_detector": "mvitv2.detection",
    "Predictor": "mvitv2.predict",
}
_SUBMODULES = (
    "benchmark",
    "data",
    "detection",
    "engine",
    "export",
    "models",
    "predict",
    "tasks",
    "utils",
    "weights",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:  # `import mvitv2; mvitv2.weights.list_weights()`
        value = importlib.import_module(f"mvitv2.{name}")
    else:
        raise AttributeError(f"module 'mvitv2' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
