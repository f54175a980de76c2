"""Suite-wide fixtures."""

from __future__ import annotations

import pytest

from mvitv2.ops import keep_training_choices
from mvitv2.utils import timing


@pytest.fixture(autouse=True)
def _steady_page_faults(request, monkeypatch):
    """Measured choices see no page faults unless a test is marked ``real_page_faults``: many
    tests time real kernels on a fake clock that scripts each call's ticks, and a fault of the
    process would add a warm-up round (:func:`mvitv2.utils.timing.best_ms`) to their script."""
    if request.node.get_closest_marker("real_page_faults") is None:
        monkeypatch.setattr(timing, "_page_faults", lambda: 0)


@pytest.fixture(autouse=True)
def _nothing_kept():
    """Each test starts and ends with no training kernel kept from a checkpoint: a resumed
    ``Trainer`` keeps its checkpoint's choices for the rest of the process
    (:func:`mvitv2.ops.keep_training_choices`), which would replace later tests' measurements."""
    keep_training_choices({}, None)
    yield
    keep_training_choices({}, None)
