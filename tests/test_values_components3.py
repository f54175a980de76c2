"""More value tests of the detectron2-equivalent detection components, written for the mutants
test_values_components.py and test_values_components2.py left alive."""

from __future__ import annotations

import pytest
import torch

from mvitv2.detection.components import _paste_masks_traced, paste_masks


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for the test (restored after it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_traced_mask_pasting_equals_the_per_box_one_bit_for_bit_whatever_the_default_dtype(
    float64_default, dtype: torch.dtype
) -> None:
    """The whole-image pasting of an exported detector gives the eager detector's masks exactly
    (they are thresholded at 0.5 afterwards, so a last-bit difference can flip a pixel): both
    build their pixel grids in float32 even when the default dtype is float64."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 1, 5, 6, generator=g, dtype=dtype)
    boxes = torch.tensor(
        [[3.3, 2.6, 17.8, 12.2], [0.4, 9.5, 30.7, 22.9], [20.5, 1.2, 26.0, 8.7]],
        dtype=torch.float32,
    )
    traced = _paste_masks_traced(masks, boxes, (23, 31))
    assert traced.dtype == dtype
    torch.testing.assert_close(traced, paste_masks(masks, boxes, (23, 31)), atol=0, rtol=0)
