"""Embedded detection / instance-segmentation data: scenes of real handwritten digits.

Each scene is a small canvas with a few of scikit-learn's 8x8 digit scans, upscaled to random
sizes and placed without overlap on a noisy background. Instance masks are the thresholded strokes.
The scenes are written as a genuine COCO dataset (PNG files plus ``instances_{split}.json``), so
the embedded default goes through exactly the same reader, transforms and COCOeval as real COCO.
Half of the images carry polygon segmentations and half compressed RLE, so both decoding paths run.
Validation scenes use digit scans that never appear in training scenes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mvitv2.data.common import build_cached, default_data_dir, load_digits_arrays, render_digit
from mvitv2.data.common import split_digit_indices as _split

__all__ = ["DigitScenes", "make_digit_scenes", "mask_to_polygon", "render_scene"]

_VERSION = 1
STROKE_THRESHOLD = 0.3  # alpha above which a pixel belongs to the digit's mask


@dataclass(frozen=True)
class DigitScenes:
    """Paths of a generated digit-scene COCO dataset.

    Attributes:
        root: dataset directory.
        train_images, val_images: image folders.
        train_json, val_json: COCO instances files.
        class_names: category names in label order ("0".."9", category ids 1..10).
    """

    root: Path
    train_images: Path
    val_images: Path
    train_json: Path
    val_json: Path
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))

    def split(self, name: str) -> tuple[Path, Path]:
        """``(image_folder, instances_json)`` of split ``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r}; expected 'train' or 'val'")
        return (
            (self.train_images, self.train_json)
            if name == "train"
            else (
                self.val_images,
                self.val_json,
            )
        )


def mask_to_polygon(mask: np.ndarray) -> list[list[float]]:
    """Exact COCO polygon of a binary mask, holes included.

    The boundary is traced along pixel edges (vertices on pixel corners), split into closed
    rings, and all rings are joined into ONE polygon through zero-width bridges. pycocotools fills
    a polygon by parity, so the bridges cancel and holes stay holes: decoding the result with
    ``frPyObjects`` gives back exactly ``mask``.

    Args:
        mask: (H, W) boolean/0-1 array with at least one foreground pixel.
    Returns:
        ``[[x0, y0, x1, y1, ...]]`` (a list with one flat polygon), or ``[]`` for an empty mask.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    # Horizontal edges on row line y between columns x and x+1; vertical ones on column line x.
    hy, hx = np.nonzero(m[:-1, 1:-1] != m[1:, 1:-1])
    vy, vx = np.nonzero(m[1:-1, :-1] != m[1:-1, 1:])
    if len(hy) == 0:
        return []
    edges = [((x, y), (x + 1, y)) for y, x in zip(hy.tolist(), hx.tolist())]
    edges += [((x, y), (x, y + 1)) for y, x in zip(vy.tolist(), vx.tolist())]
    adj: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(edges):
        adj.setdefault(a, []).append(i)
        adj.setdefault(b, []).append(i)
    used = [False] * len(edges)
    rings = []
    for start_edge in range(len(edges)):
        if used[start_edge]:
            continue
        # Every vertex of the crack graph has even degree, so a walk can only close at its start.
        start, cur = edges[start_edge]
        used[start_edge] = True
        ring = [start, cur]
        while cur != start:
            nxt = next(e for e in adj[cur] if not used[e])
            used[nxt] = True
            a, b = edges[nxt]
            cur = b if a == cur else a
            ring.append(cur)
        rings.append(_drop_collinear(ring[:-1]))
    anchor = rings[0][0]
    pts = list(rings[0]) + [anchor]
    for ring in rings[1:]:
        pts += list(ring) + [ring[0], anchor]  # bridge in, go round, bridge back out
    return [[float(c) for p in pts for c in p]]


def _drop_collinear(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    n = len(ring)
    keep = []
    for i in range(n):
        (ax, ay), (bx, by), (cx, cy) = ring[i - 1], ring[i], ring[(i + 1) % n]
        if (bx - ax) * (cy - by) - (by - ay) * (cx - bx) != 0:
            keep.append(ring[i])
    return keep or ring


def render_scene(
    rng: np.random.Generator,
    digit_pool: np.ndarray,
    *,
    image_size: tuple[int, int] = (128, 128),
    digits_per_image: tuple[int, int] = (2, 5),
    digit_size: tuple[int, int] = (16, 48),
    noise: float = 0.03,
    margin: int = 1,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one scene.

    Args:
        rng: random generator (the scene is a pure function of its state).
        digit_pool: indices into ``load_digits_arrays()`` the digits are drawn from.
        image_size: (height, width) of the canvas.
        digits_per_image: inclusive range of the number of digits attempted.
        digit_size: inclusive range of the digit height in pixels (width is 0.75-1.0 of it).
        noise: std of the per-pixel background noise.
        margin: minimum gap in pixels between the boxes of two digits.
    Returns:
        ``(image, instances)``: uint8 (H, W, 3) array and a list of ``(digit, mask)`` with
        boolean (H, W) masks (non-empty, non-overlapping).
    """
    images8, labels = load_digits_arrays()
    h, w = image_size
    # Background: a random dark colour, a smooth low-frequency shading and pixel noise.
    base = rng.uniform(0.0, 0.35, size=3)
    shade = render_digit(rng.uniform(0, 1, size=(8, 8)), h, w)[..., None] * rng.uniform(0, 0.2)
    img = base + shade + rng.normal(0.0, noise, size=(h, w, 3))
    boxes: list[tuple[int, int, int, int]] = []
    instances = []
    for _ in range(int(rng.integers(digits_per_image[0], digits_per_image[1] + 1))):
        dh = int(rng.integers(digit_size[0], digit_size[1] + 1))
        dw = max(4, round(dh * rng.uniform(0.75, 1.0)))
        dh, dw = min(dh, h), min(dw, w)
        for _attempt in range(50):
            y0, x0 = int(rng.integers(0, h - dh + 1)), int(rng.integers(0, w - dw + 1))
            if all(
                x0 >= bx1 + margin
                or bx0 >= x0 + dw + margin
                or y0 >= by1 + margin
                or by0 >= y0 + dh + margin
                for bx0, by0, bx1, by1 in boxes
            ):
                break
        else:
            continue  # canvas too crowded for this digit: the scene gets fewer digits
        k = int(rng.choice(digit_pool))
        alpha = render_digit(images8[k], dh, dw)
        mask = alpha >= STROKE_THRESHOLD
        if mask.sum() < 8:
            continue
        boxes.append((x0, y0, x0 + dw, y0 + dh))
        colour = rng.uniform(0.55, 1.0, size=3)
        while colour.mean() - base.mean() < 0.4:  # keep every digit legible
            colour = rng.uniform(0.55, 1.0, size=3)
        region = img[y0 : y0 + dh, x0 : x0 + dw]
        a = alpha[..., None]
        img[y0 : y0 + dh, x0 : x0 + dw] = region * (1 - a) + colour * a
        full = np.zeros((h, w), dtype=bool)
        full[y0 : y0 + dh, x0 : x0 + dw] = mask
        instances.append((int(labels[k]), full))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), instances


def _write_split(
    out: Path, split: str, num_images: int, pool: np.ndarray, seed: int, cfg: dict
) -> None:
    img_dir = out / split
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    split_id = {"train": 0, "val": 1}[split]
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_id, i])
        img, instances = render_scene(rng, pool, **cfg)
        image_id = i + 1
        file_name = f"{i:06d}.png"
        Image.fromarray(img).save(img_dir / file_name)
        h, w = img.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for digit, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
            if image_id % 2 == 0:
                segmentation = mask_to_polygon(mask)
            else:
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": bbox,
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
    dataset = {
        "info": {"description": "mvitv2 embedded digit scenes (scikit-learn digits)"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def make_digit_scenes(
    root: str | Path | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 250,
    image_size: int | tuple[int, int] = 128,
    digits_per_image: tuple[int, int] = (2, 5),
    digit_size: tuple[int, int] = (16, 48),
    noise: float = 0.03,
    seed: int = 0,
) -> DigitScenes:
    """Generate (or reuse) the embedded digit-scene COCO dataset.

    Args:
        root: output directory; default ``default_data_dir("digit_scenes")``.
        num_train, num_val: number of scenes per split.
        image_size: canvas side, or (height, width).
        digits_per_image: inclusive range of digits attempted per scene.
        digit_size: inclusive range of digit heights in pixels.
        noise: std of the background pixel noise (images in [0, 1]).
        seed: generation seed; the same arguments always give the same files.
    Returns:
        A :class:`DigitScenes` with the split paths. Generation is skipped when ``root``
        already holds a dataset made with the same arguments.
    """
    root = Path(root) if root is not None else default_data_dir("digit_scenes")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    cfg = {
        "image_size": size,
        "digits_per_image": tuple(digits_per_image),
        "digit_size": tuple(digit_size),
        "noise": noise,
    }
    params = {"version": _VERSION, "num_train": num_train, "num_val": num_val, "seed": seed, **cfg}

    def build(out: Path) -> None:
        _, labels = load_digits_arrays()
        train_pool, val_pool = _split(labels, val_fraction=0.25, seed=seed)
        _write_split(out, "train", num_train, train_pool, seed, cfg)
        _write_split(out, "val", num_val, val_pool, seed, cfg)

    build_cached(root, params, build)
    return DigitScenes(
        root=root,
        train_images=root / "train",
        val_images=root / "val",
        train_json=root / "annotations" / "instances_train.json",
        val_json=root / "annotations" / "instances_val.json",
    )
