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

from mvitv2.weights.formats import (
    FORMAT_VERSION,
    FORMATS,
    KeyFormat,
    convert_state_dict,
    detect_format,
    to_official,
)
from mvitv2.weights.io import CheckpointError, cache_dir, download, read_checkpoint
from mvitv2.weights.load import (
    CheckpointMismatchError,
    LoadReport,
    inflate_kernel,
    load_checkpoint,
)
from mvitv2.weights.registry import (
    WEIGHTS,
    Preprocessing,
    Weights,
    download_weights,
    get_weights,
    list_weights,
    load_pretrained,
    register_weights,
)

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "WEIGHTS",
    "CheckpointError",
    "CheckpointMismatchError",
    "KeyFormat",
    "LoadReport",
    "Preprocessing",
    "Weights",
    "cache_dir",
    "convert_state_dict",
    "detect_format",
    "download",
    "download_weights",
    "get_weights",
    "inflate_kernel",
    "list_weights",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "register_weights",
    "to_official",
]
