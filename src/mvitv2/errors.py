"""The one exception type for a user's mistake.

A :class:`UserError` is something the user can fix: a missing or wrong file, a bad option or
config key, data that does not fit the command. The command line prints it as one line
(``mvitv2 <command> <task>: error: <message>``) and exits with status 2. Every other exception is
an internal bug and keeps its traceback.

Subclasses also derive from the built-in type a caller would expect (``FileNotFoundError``,
``ValueError``, ...), so library users can keep catching those.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what, where it looked and what to do."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a command looks for) does not exist."""


class UserValueError(UserError, ValueError):
    """An option, config value or input that the command cannot use."""
