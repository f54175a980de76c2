"""The precision a resumed run keeps is recorded again as it was read, so a run resumed any
number of times keeps it; an entry written without its reason is still kept."""

from __future__ import annotations

import torch

from mvitv2.utils.precision import kept_precision
from test_values_resume_kernels import CPU, KEPT


def test_a_kept_fp32_precision_is_recorded_again_as_it_was_read():
    """amp=bf16 measured fp32 faster: the resumed run records what its checkpoint did, and a
    second resume from its checkpoint keeps exactly the same."""
    recorded = {
        "precision": "fp32",
        "precision_setting": "bf16",
        "precision_why": "amp=bf16: 2 > 1",
    }
    kept = kept_precision("bf16", CPU, recorded)
    assert kept.metadata() == {**recorded, "precision_why": f"{KEPT} (amp=bf16: 2 > 1)"}
    assert kept_precision("bf16", CPU, kept.metadata()) == kept


def test_an_entry_without_its_reason_keeps_its_precision_and_names_no_measurement():
    kept = kept_precision("bf16", CPU, {"precision": "bf16", "precision_setting": "bf16"})
    assert kept.dtype == torch.bfloat16 and kept.amp == "bf16"
    assert kept.why.removeprefix(KEPT).strip(" ()") == ""
