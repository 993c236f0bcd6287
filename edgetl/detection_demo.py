"""A seeded, honest detection data set from real images: Fashion-MNIST items pasted onto varied canvases.

The items are real photographs' silhouettes at several scales on grey, gradient and noisy backgrounds, with tight
boxes from the pasted pixels, so a detector must localise and classify rather than memorise one layout. Output is
COCO (``images/*.png`` + ``annotations.json``) and byte-identical for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.boxes import write_coco
from edgetl.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from edgetl.errors import EdgetlError

DEFAULT_CLASSES = ["T-shirt/top", "Trouser", "Sneaker", "Bag", "Ankle boot"]
EMPTY_FRACTION = 0.05  # canvases with no objects: a detector must also learn to say "nothing here"
MAX_IOU = 0.3


def _overlaps(a: list[int], b: list[int]) -> bool:
    """IoU >= 0.3, or half of the smaller box covered (a small item hidden under a big one would be a ghost box)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    inter, area_a, area_b = iw * ih, (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter) >= MAX_IOU or inter >= 0.5 * min(area_a, area_b)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: uniform grey, a smooth gradient, or low-amplitude smooth noise."""
    from PIL import Image

    kind = rng.integers(3)
    if kind == 0:
        grey = np.full((size, size), rng.uniform(20, 235), np.float32)
    elif kind == 1:
        a, b = rng.uniform(10, 245, 2)
        t = rng.uniform(0, 2 * np.pi)
        u = np.linspace(0, 1, size, dtype=np.float32)
        ramp = np.cos(t) * u[None, :] + np.sin(t) * u[:, None]
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        grey = a + (b - a) * ramp
    else:
        coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
        grey = rng.uniform(50, 200) + rng.uniform(15, 45) * (smooth - 0.5) + rng.normal(0, 6, (size, size))
    cast = rng.uniform(0.9, 1.1, 3).astype(np.float32)  # a faint colour cast
    return np.clip(grey[:, :, None] * cast, 0, 255).astype(np.float32)


def make(out: Path, n: int, size: int, seed: int, classes: list[str]) -> Path:
    """Write ``n`` canvases of ``size`` px into ``out/images`` and COCO ``out/annotations.json``; returns its path."""
    from PIL import Image

    unknown = [c for c in classes if c not in FASHION_MNIST_CLASSES]
    if unknown or not classes:
        raise EdgetlError(f"unknown Fashion-MNIST classes {unknown}; choose from {FASHION_MNIST_CLASSES}")
    root = Path(FASHION_MNIST_DIR)
    items = read_idx(root / "train-images-idx3-ubyte.gz")
    item_labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    pools = [np.flatnonzero(item_labels == FASHION_MNIST_CLASSES.index(c)) for c in classes]
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    empty = set(rng.permutation(n)[: round(n * EMPTY_FRACTION)].tolist())
    images, boxes = [], []
    for i in range(n):
        canvas = _background(rng, size)
        boxes.append([])
        placed: list[list[int]] = []
        count = 0 if i in empty else int(rng.integers(1, 5))
        for _ in range(count):
            c = int(rng.integers(len(classes)))
            item = items[pools[c][rng.integers(len(pools[c]))]]
            s = int(rng.integers(24, min(72, size) + 1))
            patch = np.asarray(Image.fromarray(item).resize((s, s), Image.BILINEAR), np.float32)
            ys, xs = np.nonzero(patch > 10)
            if xs.size == 0:
                continue
            for _try in range(30):
                ox, oy = (int(v) for v in rng.integers(0, size - s + 1, 2))
                box = [ox + int(xs.min()), oy + int(ys.min()), ox + int(xs.max()) + 1, oy + int(ys.max()) + 1]
                if not any(_overlaps(box, p) for p in placed):
                    break
            else:
                continue
            region = canvas[oy : oy + s, ox : ox + s]
            local = float(region.mean())
            level = rng.uniform(local + 70, 255) if local < 128 else rng.uniform(0, local - 70)
            colour = np.clip(level * rng.uniform(0.75, 1.25, 3), 0, 255).astype(np.float32)
            alpha = np.clip(patch / 255.0 * rng.uniform(1.0, 1.4), 0, 1)[:, :, None]
            shade = 0.6 + 0.4 * (patch / 255.0)[:, :, None]  # keep the item's own texture visible
            region[:] = region * (1 - alpha) + colour * shade * alpha
            placed.append(box)
            x1, y1, x2, y2 = box
            boxes[-1].append((c, x1, y1, x2 - x1, y2 - y1))
        name = f"{i:05d}.png"
        Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)).save(out / "images" / name)
        images.append((name, size, size))
    return write_coco(out / "annotations.json", images, boxes, classes, supercategory="fashion")
