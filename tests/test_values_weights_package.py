"""mvitv2.weights' lazy names by value: each public name is the object its submodule defines,
loaded on first use and kept as a module attribute; an unknown name is a plain AttributeError."""

from __future__ import annotations

import importlib

import pytest

import mvitv2.weights as weights

# Where the module docstring says each public name lives.
HOMES = {
    "formats": {"FORMATS", "FORMAT_VERSION", "KeyFormat", "convert_state_dict", "detect_format"},
    "io": {"CheckpointError", "cache_dir", "download", "read_checkpoint"},
    "load": {"CheckpointMismatchError", "LoadReport", "inflate_kernel", "load_checkpoint"},
    "registry": {"WEIGHTS", "Weights", "get_weights", "list_weights", "load_pretrained"},
}


@pytest.mark.parametrize(("home", "name"), [(h, n) for h, ns in HOMES.items() for n in sorted(ns)])
def test_each_public_name_is_its_submodules_object_loaded_on_first_use(monkeypatch, home, name):
    module = importlib.import_module(f"mvitv2.weights.{home}")
    monkeypatch.delitem(vars(weights), name, raising=False)  # as if never used
    assert getattr(weights, name) is getattr(module, name)
    assert vars(weights)[name] is getattr(module, name)  # kept: the next use is a plain lookup
    assert name in weights.__all__ and name in dir(weights)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match=r"^module 'mvitv2.weights' has no attribute 'nope'$"):
        weights.nope  # noqa: B018
    assert not hasattr(weights, "load_checkpoints")
    assert {"__getattr__", "__dir__", "importlib"} <= set(dir(weights))
    assert dir(weights) == sorted(dir(weights))
