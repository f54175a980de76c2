"""The one exception type for a user's mistake.

A :class:`UserError` is something the user can fix: a missing or wrong file, a bad option or
config key, data that does not fit the command. The command line prints it as one line
(``mvitv2 <command> <task>: error: <message>``) and exits with status 2. Every other exception is
an internal bug and keeps its traceback.

Subclasses also derive from the built-in type a caller would expect (``FileNotFoundError``,
``ValueError``, ...), so library users can keep catching those.

A user error raised inside a DataLoader worker process reaches the main process as the same one
line: torch re-creates it there from a message holding the worker's traceback, which
:class:`UserError` reduces to the original message. Other exceptions keep that traceback.

:class:`CheckpointError` is the one family of checkpoint problems (released weights, training
checkpoints, predictor checkpoints); :class:`UserCheckpointError` is its user-mistake branch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path

# How torch's DataLoader re-raises a worker's exception in the main process (ExceptionWrapper):
# "Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback (most recent call last):..."
_FROM_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(text: str) -> str:
    """The original message of an exception re-raised from a DataLoader worker (``text`` is
    torch's wrapper message), or ``text`` itself when it is not one."""
    found = _FROM_WORKER.match(text)
    if found is None:
        return text
    # The traceback ends with "<module>.<Type>: <message>"; the message may span lines.
    lines = text.rstrip("\n").split("\n")
    head = re.compile(rf"^(?:[\w.]+\.)?{found.group(1)}: ")
    for i in range(len(lines) - 1, 0, -1):
        if head.match(lines[i]):
            return "\n".join([head.sub("", lines[i], count=1), *lines[i + 1 :]])
    return text


class UserError(Exception):
    """A mistake the user can fix; the message says what, where it looked and what to do."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0]),)
        super().__init__(*args)
        self.args = args  # OSError subclasses keep the arguments given to __new__ otherwise


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command looks for) does not exist."""


class UserValueError(UserError, ValueError):
    """An option, config value or input that the command cannot use."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, downloaded, verified or used (the message says which and
    why). Catch this one for every checkpoint problem; ``mvitv2.CheckpointError``."""


class UserCheckpointError(CheckpointError, UserValueError):
    """A checkpoint problem the user fixes (a wrong or unreadable file, another task's checkpoint):
    one line from the command line, exit 2."""


class CheckpointNotFoundError(UserCheckpointError, UserFileNotFoundError):
    """A checkpoint path that names no file (also a ``FileNotFoundError``)."""


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


def check_writable_folder(folder: Path, what: str) -> None:
    """Check that ``folder`` could be created (when missing) and written in, without creating it,
    so that a command whose output goes there (``what``: ``--output-dir preds``, ...) fails in
    one line before its work rather than with a traceback after it.

    Raises:
        UserValueError: a path through a file, a read-only folder, no permission.
    """
    import tempfile

    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserValueError(f"{what}: {existing} is a file, not a folder; pass another path")
    try:  # a file made and removed: the permission bits do not tell root or a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserValueError(
            f"{what}: cannot write in {existing} ({e.strerror or e}); pass a path you can write"
        ) from None
