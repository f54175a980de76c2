"""The one exception type for a user's mistake.

A :class:`UserError` is something the user can fix: a missing or wrong file, a bad option or
config key, data that does not fit the command. The command line prints it as one line
(``mvitv2 <command> <task>: error: <message>``) and exits with status 2. Every other exception is
an internal bug and keeps its traceback.

Subclasses also derive from the built-in type a caller would expect (``FileNotFoundError``,
``ValueError``, ...), so library users can keep catching those.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix; the message says what, where it looked and what to do."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command looks for) does not exist."""


class UserValueError(UserError, ValueError):
    """An option, config value or input that the command cannot use."""


class UnknownOptionError(UserError, TypeError):
    """A keyword option a builder does not take (also a ``TypeError`` for callers)."""


class UnknownKeyError(UserValueError, KeyError):
    """A config or data option name that does not exist (also a ``KeyError`` for callers)."""

    __str__ = Exception.__str__  # KeyError would quote the message


def unknown_names_message(what: str, unknown: Iterable[str], valid: Iterable[str]) -> str:
    """One line naming the ``unknown`` names of ``what`` (e.g. ``"config key"``), with the close
    matches among ``valid`` ("did you mean") or, when none is close, every valid name."""
    valid = sorted(valid)
    parts, suggested = [], False
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        suggested = suggested or bool(close)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    message = f"unknown {what}{'s' if len(parts) > 1 else ''} {', '.join(parts)}"
    return message if suggested else f"{message}; valid: {', '.join(valid)}"
