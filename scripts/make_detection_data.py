"""Write the seeded Fashion-MNIST detection demo set (COCO): ``python scripts/make_detection_data.py --out DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from edgetl.detection_demo import DEFAULT_CLASSES, make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output folder (images/ and annotations.json)")
    ap.add_argument("--n", type=int, default=600, help="number of canvases")
    ap.add_argument("--size", type=int, default=160, help="canvas side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default=",".join(DEFAULT_CLASSES), help="comma-separated Fashion-MNIST class names")
    args = ap.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    path = make(args.out, args.n, args.size, args.seed, classes)
    data = json.loads(path.read_text())
    counts = Counter(a["category_id"] for a in data["annotations"])
    per_class = ", ".join(f"{c['name']}={counts[c['id']]}" for c in data["categories"])
    print(f"wrote {len(data['images'])} images, {len(data['annotations'])} boxes ({per_class}) to {path}")


if __name__ == "__main__":
    main()
