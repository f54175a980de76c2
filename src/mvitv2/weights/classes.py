"""Class names of the datasets the released weights were trained on, in their label order.

The lists live in ``class_lists/`` (one class per line, label 0 first):

* ``imagenet-1k.txt``: ``<wnid> <name>``. The WordNet ids sorted (the order of ImageNet's
  class folders, which every released ImageNet-1k classifier uses), with torchvision's short
  unique names (``torchvision.models._meta._IMAGENET_CATEGORIES``) and timm's synset list
  (``timm/data/_info/imagenet_synsets.txt``).
* ``kinetics-400.txt``: the 400 action names sorted alphabetically, the label order of the
  Kinetics-400 lists SlowFast and torchvision train and evaluate with (torchvision's
  ``_KINETICS400_CATEGORIES``).
* ``coco.txt``: ``<category id> <name>``: COCO's 80 object categories by category id, the
  contiguous order of detectron2's COCO detectors.

ImageNet-21k's 19,168-class order of the official in21k weights is not published: those
weights have no names (:func:`dataset_classes` returns None).
"""

from __future__ import annotations

import functools
from pathlib import Path

_DIR = Path(__file__).with_name("class_lists")
#: the datasets with a list, and whether each line starts with an id (``<id> <name>``).
_LISTS = {"imagenet-1k": True, "kinetics-400": False, "coco": True}


@functools.cache
def _read(dataset: str) -> tuple[tuple[str, str], ...]:
    """``(id, name)`` per line of a list (id ``""`` for a list of names only)."""
    lines = (_DIR / f"{dataset}.txt").read_text(encoding="utf-8").splitlines()
    if not _LISTS[dataset]:
        return tuple(("", line) for line in lines)
    return tuple(tuple(line.split(" ", 1)) for line in lines)  # type: ignore[misc]


def dataset_classes(dataset: str) -> list[str] | None:
    """The class names of ``dataset`` (a :class:`~mvitv2.weights.Weights` ``classes`` value), in
    label order; None for a dataset whose label order is not published (``imagenet-21k``)."""
    if dataset not in _LISTS:
        return None
    return [name for _, name in _read(dataset)]


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's WordNet ids (``n01440764``, ...) in label order: its class folder names."""
    return [wnid for wnid, _ in _read("imagenet-1k")]


def coco_category_ids() -> list[int]:
    """COCO's category id (1..90, ten never annotated) of each of its 80 classes in order."""
    return [int(i) for i, _ in _read("coco")]
