"""``is_weights_tag`` by value: a name is read as a released tag only when it is registered and no
file of that name is here (a file of that name is what ``load_checkpoint`` reads).

References: the registered tags as ``list_weights`` lists them and ``os.path.exists``, checked
name by name; which of two distinct state dicts ``load_checkpoint`` put into the model."""

from __future__ import annotations

import os

import torch

from mvitv2.weights import load_checkpoint, registry
from test_values_weights_registry import _entry, _randomized, _same_weights, _tiny, hub, own_tables

__all__ = ["hub", "own_tables"]  # fixtures shared with test_values_weights_registry

_NAMES = ["mvitv2_tiny.in1k", "mvitv2_small_16x4.k400_tv", "mvitv2_tiny.in22k", "w.pth"]


def _expected(name: str) -> bool:
    return name in set(registry.list_weights()) and not os.path.exists(name)


def test_a_registered_tag_is_a_tag_only_while_no_file_of_that_name_is_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = {name: registry.is_weights_tag(name) for name in _NAMES}
    assert got == {name: _expected(name) for name in _NAMES}
    assert got == {
        "mvitv2_tiny.in1k": True,
        "mvitv2_small_16x4.k400_tv": True,
        "mvitv2_tiny.in22k": False,  # not registered
        "w.pth": False,
    }
    for name in _NAMES:  # now each name is also a file here
        (tmp_path / name).write_bytes(b"")
    got = {name: registry.is_weights_tag(name) for name in _NAMES}
    assert got == {name: _expected(name) for name in _NAMES} == dict.fromkeys(_NAMES, False)


def test_load_checkpoint_reads_a_file_named_like_a_tag_and_fetches_the_tag_otherwise(
    tmp_path, monkeypatch, hub, own_tables
):
    """A file here wins over the registered tag of the same name; without it the tag's URL is
    fetched into the cache."""
    monkeypatch.chdir(tmp_path)
    published, local = _randomized(0), _randomized(1)
    torch.save(published.state_dict(), tmp_path / "published.pth")
    registry.register_weights(_entry((tmp_path / "published.pth").as_uri()))  # mvitv2_tiny.test

    fetched = _tiny()
    load_checkpoint(fetched, "mvitv2_tiny.test")
    assert _same_weights(fetched, published) and (hub / "published.pth").is_file()

    torch.save(local.state_dict(), tmp_path / "mvitv2_tiny.test")
    read_here = _tiny()
    load_checkpoint(read_here, "mvitv2_tiny.test")
    assert _same_weights(read_here, local)
