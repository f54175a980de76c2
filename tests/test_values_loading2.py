"""load_checkpoint's rules by value, on the cases mutation testing found unchecked: which
problems make a report not ok, a kernel of another rank refused rather than squeezed, the name a
caller gives a source it read itself.

References are written here: the model's own shapes and the report texts of the loading rules."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.weights import CheckpointMismatchError, load_checkpoint
from mvitv2.weights.load import LoadReport
from test_values_loading import SMALL


@pytest.mark.parametrize(
    "problem",
    [
        {"missing": ["a"]},
        {"unexpected": ["a"]},
        {"shape_conflicts": [("a", (1,), (2,))]},
    ],
)
def test_any_single_kind_of_problem_makes_the_report_not_ok(problem):
    assert LoadReport(loaded=["b"], adapted={"b": "x"}).ok
    assert not LoadReport(loaded=["b"], **problem).ok


def test_a_six_dimensional_kernel_is_a_conflict_not_squeezed_into_a_video_model():
    """Only a 5-D kernel with ``T = 1`` loses its time axis; a 6-D one whose other sizes match
    the video kernel once its third axis is dropped is refused, not squeezed."""
    model = mvitv2.create_model("mvitv2_small_16x4", **SMALL, num_frames=4)
    sd = dict(model.state_dict())
    sd["patch_embed.proj.weight"] = torch.ones(16, 3, 1, 3, 7, 7)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    assert e.value.report.shape_conflicts == [
        ("patch_embed.proj.weight", (16, 3, 1, 3, 7, 7), (16, 3, 3, 7, 7))
    ]
    assert e.value.report.adapted == {}


def test_source_name_names_the_source_in_the_report_and_the_error():
    """A caller that read the file itself names it; the report and a refusal use that name."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL)
    sd = dict(model.state_dict())
    assert load_checkpoint(model, sd, source_name="runs/best.pt").source == "runs/best.pt"
    del sd["blocks.0.norm1.bias"]
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd, source_name="runs/best.pt")
    assert str(e.value).startswith("checkpoint runs/best.pt (detected format: official) does not")
    assert e.value.report.source == "runs/best.pt"
