"""A process-wide named setting with a fixed set of valid values (attention path, GEMM backend)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Choice:
    """Holds one of ``valid``; :meth:`set` validates and returns the previous value, :meth:`using`
    sets it for a ``with`` block.

    Args:
        what: what the value names, for the error message (``"GEMM backend"``).
        valid: the accepted values.
        value: the initial value (validated).
    """

    def __init__(self, what: str, valid: tuple[str, ...], value: str) -> None:
        self.what, self.valid = what, valid
        self.value = self.check(value)

    def check(self, name: str) -> str:
        """``name`` if valid, else a ``ValueError`` listing the valid values."""
        if name not in self.valid:
            raise ValueError(f"unknown {self.what} {name!r}; valid: {self.valid}")
        return name

    def set(self, name: str) -> str:
        """Set the value to ``name``; returns the previous value."""
        previous, self.value = self.value, self.check(name)
        return previous

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Context manager: the value is ``name`` inside the ``with`` block."""
        previous = self.set(name)
        try:
            yield
        finally:
            self.set(previous)
