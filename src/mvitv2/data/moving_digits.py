"""Embedded video-classification data: real handwritten digits moving across the frame, written
as MP4 files with a Kinetics-style list file.

The label is (digit, direction). Each digit moves in a straight line and stays whole inside the
frame; its start is uniform over the positions that keep the whole path inside. Hence a clip moving
one way is exactly the time-reversal of an equally likely clip moving the opposite way (see
:func:`render_clip`), and the frames of a video, pooled over time, have the same distribution
whatever the direction. A model that ignores frame order can therefore not separate opposite
directions: it is capped at 50% on those pairs, while order-aware models can reach 100%.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from mvitv2.data.common import (
    build_cached,
    default_data_dir,
    load_digits_arrays,
    render_digit,
    split_digit_indices,
)

__all__ = [
    "DIRECTIONS",
    "MovingDigits",
    "make_moving_digits",
    "render_clip",
    "sample_clip_params",
    "write_video",
]

# The dataset's generation version (in its cache stamp): 3 since x264 runs cpu-independent,
# so a cached dataset of earlier, machine-dependent bytes is rebuilt once.
_VERSION = 3

#: direction name -> (dx, dy) unit step in pixels (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "up_left": (-1, -1),
    "up_right": (1, -1),
    "down_left": (-1, 1),
    "down_right": (1, 1),
}


@dataclass(frozen=True)
class MovingDigits:
    """Paths of a generated moving-digit video dataset.

    Attributes:
        root: dataset directory (also the video root the list paths are relative to).
        train_list, val_list: Kinetics-style list files (``relative/path.mp4 label``).
        classes_file: class names, one per line, line i = label i.
        class_names: ``"<digit>_<direction>"`` in label order (label = digit_pos * D + dir_pos).
        num_frames, size: frames per video and frame side in pixels.
    """

    root: Path
    train_list: Path
    val_list: Path
    classes_file: Path
    class_names: tuple[str, ...]
    num_frames: int
    size: int

    def split(self, name: str) -> Path:
        """List file of split ``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}; expected 'train' or 'val'")
        return self.train_list if name == "train" else self.val_list


def sample_clip_params(
    rng: np.random.Generator,
    digit_scan: int,
    *,
    direction: str | tuple[int, int],
    num_frames: int,
    size: int = 64,
    digit_size: tuple[int, int] = (24, 36),
    speed: tuple[int, int] = (1, 3),
    noise: float = 0.03,
) -> dict:
    """Random appearance, speed and start of one clip moving in ``direction``.

    Args:
        rng: random generator.
        digit_scan: index into ``load_digits_arrays()`` of the digit to draw.
        direction: a name from :data:`DIRECTIONS` or a (dx, dy) step.
        num_frames: frames of the video; the digit stays whole inside the frame for all of them.
        size: frame side.
        digit_size: inclusive range of the digit height in pixels.
        speed: inclusive range of the speed in whole pixels per frame.
        noise: std of the static background noise.
    Returns:
        Keyword arguments for :func:`render_clip` (``alpha``, ``colour``, ``background``,
        ``start``, ``speed``).
    Raises:
        ValueError: if the largest digit moving at the highest speed cannot stay inside the frame.
    """
    dx, dy = DIRECTIONS[direction] if isinstance(direction, str) else direction
    travel = (num_frames - 1) * speed[1]
    if digit_size[1] + travel > size:
        raise ValueError(
            f"a {digit_size[1]} px digit moving {speed[1]} px/frame for {num_frames} frames "
            f"leaves a {size} px frame; lower digit_size, speed or num_frames"
        )
    images8, _ = load_digits_arrays()
    dh = int(rng.integers(digit_size[0], digit_size[1] + 1))
    dw = max(4, round(dh * rng.uniform(0.75, 1.0)))
    alpha = np.zeros((size, size), np.float32)
    alpha[:dh, :dw] = render_digit(images8[digit_scan], dh, dw)
    base = rng.uniform(0.0, 0.35, size=3)
    shade = render_digit(rng.uniform(0, 1, size=(8, 8)), size, size)[..., None] * rng.uniform(
        0, 0.2
    )
    background = np.clip(base + shade + rng.normal(0, noise, (size, size, 3)), 0, 1)
    colour = rng.uniform(0.55, 1.0, size=3)
    while colour.mean() - base.mean() < 0.4:  # keep the digit legible
        colour = rng.uniform(0.55, 1.0, size=3)
    v = int(rng.integers(speed[0], speed[1] + 1))
    path = (num_frames - 1) * v

    def start(step: int, extent: int) -> int:
        # Uniform over the starts whose whole path stays inside [0, size - extent]; the ranges
        # of +step and -step are each other's end points, which makes them time-reversals.
        lo, hi = (0, size - extent - path) if step > 0 else (path, size - extent)
        return int(rng.integers(lo, hi + 1)) if step else int(rng.integers(0, size - extent + 1))

    return {
        "alpha": alpha,
        "colour": colour.astype(np.float32),
        "background": background.astype(np.float32),
        "start": (start(dx, dw), start(dy, dh)),
        "speed": v,
    }


def render_clip(
    alpha: np.ndarray,
    colour: np.ndarray,
    background: np.ndarray,
    start: tuple[int, int],
    speed: int,
    direction: str | tuple[int, int],
    num_frames: int,
) -> np.ndarray:
    """Render a digit moving in a straight line.

    Frame t shows the digit layer shifted by ``start + t * speed * direction`` over a static
    background (a shift past the border wraps around; :func:`sample_clip_params` never asks for
    one). Hence, with ``d`` and ``-d`` opposite directions and
    ``end = start + (num_frames - 1) * speed * d``::

        render_clip(..., start=end, direction=-d) == render_clip(..., start=start, direction=d)[::-1]

    Args:
        alpha: (S, S) digit opacity in [0, 1], the digit at the top-left corner.
        colour: (3,) digit colour in [0, 1].
        background: (S, S, 3) static background in [0, 1].
        start: (x, y) shift of the first frame.
        speed: pixels per frame.
        direction: a name from :data:`DIRECTIONS` or a (dx, dy) step.
        num_frames: number of frames.
    Returns:
        uint8 array (num_frames, S, S, 3).
    """
    dx, dy = DIRECTIONS[direction] if isinstance(direction, str) else direction
    frames = np.empty((num_frames, *background.shape), np.uint8)
    for t in range(num_frames):
        shift = (start[1] + t * speed * dy, start[0] + t * speed * dx)
        a = np.roll(alpha, shift, axis=(0, 1))[..., None]
        frames[t] = (np.clip(background * (1 - a) + colour * a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return frames


def write_video(
    path: str | Path,
    frames: np.ndarray,
    *,
    fps: int = 16,
    codec: str = "libx264",
    crf: int = 18,
    gop: int = 8,
    faststart: bool = False,
) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) into a video file with PyAV.

    Args:
        path: output file (the container follows the suffix, e.g. ``.mp4``).
        frames: the frames; H and W must be even for yuv420p.
        fps: frame rate.
        codec: encoder (``libx264`` for H.264, or ``mpeg4``).
        crf: H.264 quality (lower = better; ignored by other encoders).
        gop: frames between keyframes (small values make seeking matter in tests).
        faststart: put the MP4 index before the data (streamable; a file cut short then keeps
            its decodable beginning instead of becoming unreadable).
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec in ("libx264", "h264"):
            # cpu-independent: x264's default CPU-specific macroblock-tree code gave the same
            # frames different bytes from one build to the next in one process (7 of 16 clips
            # over 16 builds here); with it, 0 (and the same bytes on any CPU).
            stream.options = {
                "crf": str(crf),
                "preset": "veryfast",
                "g": str(gop),
                "x264-params": "cpu-independent=1",
            }
        else:
            stream.codec_context.bit_rate = 2_000_000
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def make_moving_digits(
    root: str | Path | None = None,
    *,
    num_train_per_class: int = 40,
    num_val_per_class: int = 10,
    digits: Sequence[int] = tuple(range(10)),
    directions: Sequence[str] = ("up", "down", "left", "right"),
    num_frames: int = 8,
    size: int = 32,
    digit_size: tuple[int, int] = (14, 18),
    speed: tuple[int, int] = (1, 2),
    fps: int = 16,
    codec: str = "libx264",
    seed: int = 0,
) -> MovingDigits:
    """Generate (or reuse) the embedded moving-digit MP4 dataset.

    Args:
        root: output directory; default ``default_data_dir("moving_digits")``.
        num_train_per_class, num_val_per_class: clips per class and split.
        digits: which digits are used (fewer digits = fewer classes).
        directions: names from :data:`DIRECTIONS` (at least two; opposite pairs make time matter).
        num_frames: frames per video.
        size: frame side in pixels (even).
        digit_size: inclusive range of digit heights.
        speed: inclusive range of speeds in pixels per frame. The largest digit must stay inside
            the frame for the whole video: ``digit_size[1] + (num_frames - 1) * speed[1] <= size``.
        fps: frame rate written to the files.
        codec: PyAV encoder name.
        seed: generation seed; the same arguments give the same clips.
    Returns:
        A :class:`MovingDigits` describing the files. Validation clips use digit scans never seen
        in training clips.
    """
    root = Path(root) if root is not None else default_data_dir("moving_digits")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected one of {sorted(DIRECTIONS)}")
    if size % 2:
        raise ValueError(f"size must be even for yuv420p video, got {size}")
    digits, directions = [int(d) for d in digits], list(directions)
    class_names = tuple(f"{d}_{direc}" for d in digits for direc in directions)
    params = {
        "version": _VERSION,
        "num_train_per_class": num_train_per_class,
        "num_val_per_class": num_val_per_class,
        "digits": digits,
        "directions": directions,
        "num_frames": num_frames,
        "size": size,
        "digit_size": list(digit_size),
        "speed": list(speed),
        "fps": fps,
        "codec": codec,
        "seed": seed,
    }

    def build(out: Path) -> None:
        _, labels = load_digits_arrays()
        pools = dict(zip(("train", "val"), split_digit_indices(labels, 0.25, seed)))
        counts = {"train": num_train_per_class, "val": num_val_per_class}
        (out / "classes.txt").write_text("\n".join(class_names) + "\n")
        jobs = []  # (split_id, label, i): one clip each, seeded by its own key
        for split_id, split in enumerate(("train", "val")):
            for label, name in enumerate(class_names):
                (out / split / name).mkdir(parents=True)
                jobs += [(split_id, label, i) for i in range(counts[split])]

        def write_one(job: tuple[int, int, int]) -> str:
            split_id, label, i = job
            split, name = ("train", "val")[split_id], class_names[label]
            direction = directions[label % len(directions)]
            pool = pools[split][labels[pools[split]] == digits[label // len(directions)]]
            rng = np.random.default_rng([seed, split_id, label, i])
            p = sample_clip_params(
                rng,
                int(rng.choice(pool)),
                direction=direction,
                num_frames=num_frames,
                size=size,
                digit_size=digit_size,
                speed=speed,
            )
            rel = f"{split}/{name}/{i:04d}.mp4"
            frames = render_clip(**p, direction=direction, num_frames=num_frames)
            write_video(out / rel, frames, fps=fps, codec=codec)
            return f"{rel} {label}"

        # The encoder releases the GIL: threads write clips ~4x faster than one loop (measured).
        with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool_ex:
            lines = list(pool_ex.map(write_one, jobs))
        for split_id, split in enumerate(("train", "val")):
            split_lines = [ln for ln, job in zip(lines, jobs) if job[0] == split_id]
            (out / f"{split}.txt").write_text("\n".join(split_lines) + "\n")

    build_cached(root, params, build)
    return MovingDigits(
        root=root,
        train_list=root / "train.txt",
        val_list=root / "val.txt",
        classes_file=root / "classes.txt",
        class_names=class_names,
        num_frames=num_frames,
        size=size,
    )
