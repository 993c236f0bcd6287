"""Object-detection annotation readers: COCO JSON, Pascal VOC XML and YOLO txt, all to one in-memory form.

Every reader checks each box against its image (1 px slack) and raises ``EdgetlError`` naming the file (and the
line or annotation id) so a bad label is fixed at the source instead of silently training on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SLACK = 1.0  # px a box may stick out of its image (rounding in labelling tools)
Read = tuple[list[Path], list["Boxes"], list[str]]


@dataclass(frozen=True)
class Boxes:
    """One image's annotations: ``boxes`` float32 [K, 4] x1, y1, x2, y2 in pixels; ``labels`` int64 [K]."""

    boxes: np.ndarray
    labels: np.ndarray


def _make(rows: list[list[float]], labels: list[int]) -> Boxes:
    return Boxes(np.asarray(rows, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1))


def _check(box: list[float], w: float, h: float, where: str) -> list[float]:
    """Reject degenerate boxes and boxes outside the image; returns the box unchanged."""
    x1, y1, x2, y2 = box
    if not all(np.isfinite(box)):
        raise EdgetlError(f"{where}: box {box} has a non-finite coordinate (fix or delete the box)")
    if x2 <= x1 or y2 <= y1:
        raise EdgetlError(f"{where}: box {_fmt(box)} (x1, y1, x2, y2) has zero or negative width/height (delete it)")
    if x1 < -SLACK or y1 < -SLACK or x2 > w + SLACK or y2 > h + SLACK:
        raise EdgetlError(f"{where}: box {_fmt(box)} (x1, y1, x2, y2) lies outside the {w:g}x{h:g} image (fix it)")
    return box


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise EdgetlError(f"cannot read image {path}: {e} (replace or remove it)") from None


def _find(candidates: list[Path], what: str) -> Path:
    for p in candidates:
        if p.is_file():
            return p
    raise EdgetlError(f"{what}: image file not found (looked for {', '.join(map(str, candidates))})")


def read_coco(json_path: Path, images_root: Path | None = None) -> Read:
    """COCO JSON via pycocotools; class list = categories sorted by id; crowd annotations are skipped."""
    from pycocotools.coco import COCO

    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EdgetlError(f"cannot read {json_path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgetlError(f"{json_path} is not valid JSON ({e}); fix or re-export the annotations") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise EdgetlError(f"{json_path}: not a COCO file (needs 'images' and 'categories' lists)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise EdgetlError(f"{json_path}: an image/annotation/category entry lacks field {e} (fix the file)") from None
    cat_ids = sorted(coco.cats)
    index = {c: i for i, c in enumerate(cat_ids)}
    names = [str(coco.cats[c].get("name", c)) for c in cat_ids]
    known = set(coco.imgs)
    for ann in coco.anns.values():
        if ann.get("image_id") not in known:
            raise EdgetlError(f"{json_path}: annotation id {ann.get('id')} has unknown image_id {ann.get('image_id')}")
    root = Path(images_root) if images_root is not None else json_path.parent
    paths, targets = [], []
    for img_id in sorted(known):
        img = coco.imgs[img_id]
        name = str(img.get("file_name", ""))
        path = _find([root / name, root / "images" / name], f"{json_path}: image id {img_id} ({name!r})")
        if "width" in img and "height" in img:
            w, h = float(img["width"]), float(img["height"])
        else:
            w, h = _image_size(path)
        rows, labels = [], []
        for ann in coco.imgToAnns[img_id]:
            if ann.get("iscrowd", 0):
                continue
            where = f"{json_path}: annotation id {ann.get('id')} (image {name})"
            if ann.get("category_id") not in index:
                raise EdgetlError(f"{where}: unknown category_id {ann.get('category_id')} (categories: {cat_ids})")
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                raise EdgetlError(f"{where}: bbox {bbox!r} is not four numbers [x, y, w, h]")
            x, y, bw, bh = map(float, bbox)
            rows.append(_check([x, y, x + bw, y + bh], w, h, where))
            labels.append(index[ann["category_id"]])
        paths.append(path)
        targets.append(_make(rows, labels))
    return paths, targets, names


def read_voc(folder: Path) -> Read:
    """Pascal VOC: ``Annotations/*.xml`` with images in ``JPEGImages/`` or next to the xml; classes sorted by name."""
    folder = Path(folder)
    xml_dir = folder / "Annotations" if (folder / "Annotations").is_dir() else folder
    files = sorted(xml_dir.glob("*.xml"))
    if not files:
        raise EdgetlError(f"no Pascal VOC .xml files in {xml_dir}")
    parsed = []
    for xml in files:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            raise EdgetlError(f"{xml}: unreadable XML ({e}); fix or re-export it") from None
        name = (root.findtext("filename") or "").strip()
        names = [name] if name else [xml.stem + ext for ext in (".jpg", ".png", ".jpeg")]
        dirs = dict.fromkeys([folder / "JPEGImages", xml.parent, folder])  # ordered, no duplicates
        path = _find([d / n for n in names for d in dirs], str(xml))
        try:
            w, h = float(root.findtext("size/width") or 0), float(root.findtext("size/height") or 0)
            if w <= 0 or h <= 0:
                w, h = _image_size(path)
            objs = []
            for k, obj in enumerate(root.iter("object")):
                cls = (obj.findtext("name") or "").strip()
                if not cls:
                    raise EdgetlError(f"{xml}: object {k} has no <name> (give it a class)")
                box = [float(obj.findtext(f"bndbox/{t}") or "nan") for t in ("xmin", "ymin", "xmax", "ymax")]
                objs.append((cls, _check(box, w, h, f"{xml}: object {k} ({cls})")))
        except ValueError as e:
            raise EdgetlError(f"{xml}: malformed number ({e}); <size> and <bndbox> need numeric values") from None
        parsed.append((path, objs))
    classes = sorted({cls for _, objs in parsed for cls, _ in objs})
    index = {c: i for i, c in enumerate(classes)}
    targets = [_make([b for _, b in objs], [index[c] for c, _ in objs]) for _, objs in parsed]
    return [p for p, _ in parsed], targets, classes


def _yolo_names(folder: Path) -> list[str]:
    if (folder / "classes.txt").is_file():
        return [s.strip() for s in (folder / "classes.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    if (folder / "data.yaml").is_file():
        import yaml

        try:
            names = (yaml.safe_load((folder / "data.yaml").read_text(encoding="utf-8")) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as e:
            raise EdgetlError(f"{folder / 'data.yaml'}: unreadable YAML ({e})") from None
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names, key=int)]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise EdgetlError(f"{folder / 'data.yaml'}: 'names:' must be a list or an {{id: name}} mapping")
    raise EdgetlError(f"{folder}: no classes.txt or data.yaml (with names:) giving the YOLO class names")


def read_yolo(folder: Path) -> Read:
    """YOLO txt: ``images/`` + ``labels/`` (same relative path, .txt); a missing label file means no boxes."""
    folder = Path(folder)
    names = _yolo_names(folder)
    images = sorted(p for p in (folder / "images").rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise EdgetlError(f"no images in {folder / 'images'}")
    targets = []
    for img in images:
        txt = (folder / "labels" / img.relative_to(folder / "images")).with_suffix(".txt")
        rows, labels = [], []
        if txt.is_file():
            w, h = _image_size(img)
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{txt}:{n}"
                parts = line.split()
                try:
                    if len(parts) != 5:
                        raise ValueError
                    cls, (cx, cy, bw, bh) = int(parts[0]), map(float, parts[1:])
                except ValueError:
                    raise EdgetlError(
                        f"{where}: malformed line {line.strip()!r} (expected 'class cx cy w h')"
                    ) from None
                if not 0 <= cls < len(names):
                    raise EdgetlError(f"{where}: unknown class id {cls} (names has {len(names)}: 0..{len(names) - 1})")
                box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                rows.append(_check(box, w, h, where))
                labels.append(cls)
        targets.append(_make(rows, labels))
    return images, targets, names


def write_coco(
    path: Path, images: list[tuple[str, int, int]], boxes: list[list[tuple]], classes: list[str], supercategory=None
) -> Path:
    """COCO JSON at ``path``: ``images`` as (file name, width, height) and per image its ``boxes`` as (class index,
    x, y, width, height) in pixels; categories 1..C in the order of ``classes``."""
    anns = []
    for i, per_image in enumerate(boxes):
        for c, x, y, w, h in per_image:
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x, y, w, h]}
            anns.append({**ann, "area": w * h, "iscrowd": 0})
    categories = [
        {"id": k + 1, "name": name, **({"supercategory": supercategory} if supercategory else {})}
        for k, name in enumerate(classes)
    ]
    entries = [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)]
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}, indent=1) + "\n")
    return path


def read_detection(path: Path, kind: str) -> Read:
    """Dispatch on ``kind``; a COCO directory means its ``annotations.json`` or its only ``*.json``."""
    path = Path(path)
    if not path.exists():
        raise EdgetlError(f"detection data not found: {path}")
    if kind == "coco":
        if path.is_dir():
            found = (
                [path / "annotations.json"] if (path / "annotations.json").is_file() else sorted(path.glob("*.json"))
            )
            if len(found) != 1:
                raise EdgetlError(f"{path}: expected annotations.json or exactly one *.json, found {len(found)}")
            path = found[0]
        return read_coco(path)
    if kind in ("voc", "yolo"):
        if not path.is_dir():
            raise EdgetlError(f"{path}: data kind {kind} needs a folder")
        return read_voc(path) if kind == "voc" else read_yolo(path)
    raise EdgetlError(f"unknown detection data kind {kind!r} (use coco, voc or yolo)")
