"""Option values from a recipe, an override or a checkpoint, checked against a dataclass config's
field types before the config is built, so that ``data.img_size=abc`` is one error line naming the
option rather than a ``TypeError`` deep in a transform or a layer; and the command line's count
options (:func:`at_least`). No torch here: ``mvitv2 --help`` imports it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from mvitv2.errors import UserValueError


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a count option: an integer of at least ``minimum``, so that a
    0 batch size or -1 threads is argparse's error line (exit 2), not a traceback later."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return count


#: How an error names each scalar type a config field can have.
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def checked_fields(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``values`` for the dataclass ``cls``, each checked against its field's type: lists become
    tuples, a whole float an integer where the field is an integer (YAML's ``224.0``).

    Args:
        cls: a dataclass type; its known field names only (unknown ones are the caller's check).
        values: option name -> value.
        what: how the options are named in the error, e.g. ``"image data option"``.

    Raises:
        UserValueError: ``<what> <name>: expected <type>, got <value>``.
    """
    hints = _hints(cls)
    out = {}
    for name, value in values.items():
        ok, converted = _convert(hints[name], value)
        if not ok:
            raise UserValueError(f"{what} {name}: expected {_describe(hints[name])}, got {value!r}")
        out[name] = converted
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)  # once per class: it evaluates every annotation
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(hint: Any, value: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits ``hint``, the value as the field keeps it)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _convert(arg, value)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        converted = [_convert(a, v) for a, v in zip(items, value)]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str | os.PathLike), value
    if origin is dict or hint is dict:
        return isinstance(value, Mapping), value
    return True, value  # other annotations: the config's own checks


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin is dict or hint is dict:
        return "a mapping"
    return TYPE_WORDS.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(
        hint, str(hint)
    )
