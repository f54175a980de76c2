"""The digit scenes' drawing by value (gaps left by mutation testing of ``render_scene``): how a
digit is blended over the background and which colours it may take, and that a digit which
does not fit, or is too small to see, costs the scene only that digit."""

from __future__ import annotations

import numpy as np
import pytest

from mvitv2.data import digit_scenes
from mvitv2.data.common import load_digits_arrays
from mvitv2.data.digit_scenes import render_scene

POOL = np.arange(len(load_digits_arrays()[1]))


class _RecordingRng:
    """A ``np.random.Generator`` that records each draw's method and arguments."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        method = getattr(self._rng, name)

        def draw(*args, **kwargs):
            self.calls.append((name, args))
            return method(*args, **kwargs)

        return draw


def _flat_scene(monkeypatch, seed: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One 24 x 24 scene with one 12 px digit, no noise, no shading and a digit whose alpha is
    ``alpha`` everywhere: returns (image as float in [0, 1], the digit's mask)."""

    def flat(image8: np.ndarray, height: int, width: int) -> np.ndarray:
        # The shading is drawn at the canvas size; the digit at its own smaller size.
        return np.full((height, width), 0.0 if (height, width) == (24, 24) else alpha)

    monkeypatch.setattr(digit_scenes, "render_digit", flat)
    image, instances = render_scene(
        np.random.default_rng(seed),
        POOL,
        image_size=(24, 24),
        digits_per_image=(1, 1),
        digit_size=(12, 12),
        noise=0.0,
    )
    assert len(instances) == 1
    return image.astype(np.float64) / 255, instances[0][1]


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_a_digit_is_alpha_blended_over_the_background_in_a_light_colour_legible_on_it(
    monkeypatch, alpha
):
    """With the same draws, a digit of alpha 1 shows its colour c and the background its colour
    b; a digit of alpha a shows ``(1 - a) b + a c`` (to the 8-bit rounding). Every colour
    channel is in [0.55, 1] and the colour's mean is at least 0.4 above the background's: over
    300 scenes, some of whose first colour draws are not, the rule redraws those."""
    step = 1 / 255
    for seed in range(300):
        solid, mask = _flat_scene(monkeypatch, seed, 1.0)
        blended, mask2 = _flat_scene(monkeypatch, seed, alpha)
        assert np.array_equal(mask, mask2)
        b, c = solid[~mask], solid[mask]
        assert np.ptp(b, axis=0).max() == 0 and np.ptp(c, axis=0).max() == 0  # flat colours
        b, c = b[0], c[0]
        np.testing.assert_allclose(blended[~mask], np.broadcast_to(b, blended[~mask].shape))
        np.testing.assert_allclose(blended[mask][0], (1 - alpha) * b + alpha * c, atol=step)
        assert (c >= 0.55 - step / 2).all() and (c <= 1.0).all()
        assert c.mean() - b.mean() >= 0.4 - step / 2
        assert (b <= 0.35 + step / 2).all()


def test_a_digit_that_does_not_fit_is_dropped_and_the_next_ones_are_still_tried():
    """On a 9 x 9 canvas 6-8 px digits fit one at a time (two need 13 px): of 4 digits asked
    for, the first is drawn and each of the other 3 is still drawn a size (and tried) before it
    is dropped."""
    for seed in range(5):
        rng = _RecordingRng(seed)
        _, instances = render_scene(
            rng, POOL, image_size=(9, 9), digits_per_image=(4, 4), digit_size=(6, 8)
        )
        sizes = [c for c in rng.calls if c == ("integers", (6, 9))]
        assert len(instances) == 1 and len(sizes) == 4


def test_a_digit_too_small_to_show_8_stroke_pixels_is_dropped_and_the_next_ones_are_drawn():
    """2 x 4 digits have at most 8 pixels: each one with fewer stroke pixels is dropped, but all
    3 asked for are still drawn a scan, and each scene keeps exactly the ones with 8."""
    kept = []
    for seed in range(10):
        rng = _RecordingRng(seed)
        _, instances = render_scene(
            rng, POOL, image_size=(16, 16), digits_per_image=(3, 3), digit_size=(2, 2)
        )
        scans = [c for c in rng.calls if c[0] == "choice"]
        assert len(scans) == 3
        assert all(mask.sum() == 8 for _, mask in instances)
        kept.append(len(instances))
    assert min(kept) < 3
