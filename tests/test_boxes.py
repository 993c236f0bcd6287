"""Detection annotation readers (COCO / VOC / YOLO) and the seeded Fashion-MNIST detection demo set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.boxes import Boxes, read_coco, read_detection, read_voc, read_yolo
from edgetl.data import FASHION_MNIST_DIR
from edgetl.detection_demo import DEFAULT_CLASSES, make
from edgetl.errors import EdgetlError

pytest.importorskip("pycocotools")
needs_fmnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)
SIZE = 96


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """20 canvases (one of them empty) written once for the module."""
    return make(tmp_path_factory.mktemp("demo"), n=20, size=SIZE, seed=3, classes=DEFAULT_CLASSES)


def to_voc(ann_path: Path, out: Path) -> Path:
    data = json.loads(ann_path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    for img in data["images"]:
        (out / "JPEGImages" / img["file_name"]).write_bytes(
            (ann_path.parent / "images" / img["file_name"]).read_bytes()
        )
        objs = ""
        for a in data["annotations"]:
            if a["image_id"] == img["id"]:
                x, y, w, h = a["bbox"]
                objs += (
                    f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox><xmin>{x}</xmin>"
                    f"<ymin>{y}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                )
        xml = (
            f"<annotation><filename>{img['file_name']}</filename><size><width>{img['width']}</width>"
            f"<height>{img['height']}</height><depth>3</depth></size>{objs}</annotation>"
        )
        (out / "Annotations" / (Path(img["file_name"]).stem + ".xml")).write_text(xml)
    return out


def to_yolo(ann_path: Path, out: Path) -> Path:
    data = json.loads(ann_path.read_text())
    cats = [c["id"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    (out / "classes.txt").write_text(
        "".join(c["name"] + "\n" for c in sorted(data["categories"], key=lambda c: c["id"]))
    )
    for img in data["images"]:
        (out / "images" / img["file_name"]).write_bytes((ann_path.parent / "images" / img["file_name"]).read_bytes())
        W, H = img["width"], img["height"]
        lines = [
            f"{cats.index(a['category_id'])} {(x + w / 2) / W:.4f} {(y + h / 2) / H:.4f} {w / W:.4f} {h / H:.4f}"
            for a in data["annotations"]
            if a["image_id"] == img["id"]
            for x, y, w, h in [a["bbox"]]
        ]
        if lines:  # an empty image gets no label file at all
            (out / "labels" / (Path(img["file_name"]).stem + ".txt")).write_text("\n".join(lines) + "\n")
    return out


@needs_fmnist
def test_demo_is_deterministic_and_valid_coco(tmp_path):
    a = make(tmp_path / "a", n=6, size=SIZE, seed=7, classes=["Trouser", "Bag"])
    b = make(tmp_path / "b", n=6, size=SIZE, seed=7, classes=["Trouser", "Bag"])
    c = make(tmp_path / "c", n=6, size=SIZE, seed=8, classes=["Trouser", "Bag"])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    data = json.loads(a.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2]
    assert {x["iscrowd"] for x in data["annotations"]} == {0}
    assert all(x["area"] == x["bbox"][2] * x["bbox"][3] > 0 for x in data["annotations"])
    paths, targets, names = read_coco(a)
    assert names == ["Trouser", "Bag"] and len(paths) == len(targets) == 6
    assert sum(len(t.labels) for t in targets) == len(data["annotations"]) > 0
    for p, t in zip(paths, targets, strict=True):
        assert Image.open(p).size == (SIZE, SIZE)
        assert t.boxes.dtype == np.float32 and t.labels.dtype == np.int64 and t.boxes.shape == (len(t.labels), 4)
        assert (t.boxes[:, :2] >= 0).all() and (t.boxes[:, 2:] <= SIZE).all()
        assert ((t.boxes[:, 2:] - t.boxes[:, :2]) >= 10).all()  # items are >= 24 px canvases, boxes tight but real
        assert set(t.labels.tolist()) <= {0, 1}


@needs_fmnist
def test_demo_boxes_are_tight_on_the_pasted_items(demo):
    paths, targets, _ = read_coco(demo)
    bg_diff, in_diff = [], []
    for p, t in zip(paths, targets, strict=True):
        im = np.asarray(Image.open(p).convert("L"), np.float32)
        for x1, y1, x2, y2 in t.boxes.astype(int):
            box = im[y1:y2, x1:x2]
            in_diff.append(np.abs(box - np.median(im)).mean())
        bg_diff.append(np.abs(im[:4, :4] - np.median(im)).mean())
    assert np.mean(in_diff) > 3 * np.mean(bg_diff)  # boxes sit on the objects, not on empty background


@needs_fmnist
def test_coco_voc_yolo_read_back_the_same(demo, tmp_path):
    cp, ct, cn = read_detection(demo.parent, "coco")
    vp, vt, vn = read_detection(to_voc(demo, tmp_path / "voc"), "voc")
    yp, yt, yn = read_detection(to_yolo(demo, tmp_path / "yolo"), "yolo")
    assert cn == yn == DEFAULT_CLASSES and vn == sorted(DEFAULT_CLASSES)
    assert [p.name for p in cp] == [p.name for p in vp] == [p.name for p in yp]
    assert sum(len(t.labels) == 0 for t in ct) == 1  # ~5% empty canvases are kept, with K=0
    remap = np.array([vn.index(c) for c in cn])  # VOC sorts class names
    for c, v, y in zip(ct, vt, yt, strict=True):
        assert c.boxes.shape == v.boxes.shape == y.boxes.shape
        np.testing.assert_allclose(v.boxes, c.boxes, atol=1e-3)
        np.testing.assert_allclose(y.boxes, c.boxes, atol=0.01 * SIZE)
        assert np.array_equal(y.labels, c.labels) and np.array_equal(v.labels, remap[c.labels])


def test_empty_images_kept_and_one_pixel_slack(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "b.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}, {"id": 2, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [-0.5, 2, 65, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 0, 0], "iscrowd": 1},  # crowd: skipped
        ],
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
    }
    (tmp_path / "x.json").write_text(json.dumps(coco))
    paths, targets, names = read_detection(tmp_path, "coco")
    assert names == ["a", "b"] and paths == [tmp_path / "a.png", tmp_path / "b.png"]
    np.testing.assert_allclose(targets[0].boxes, [[-0.5, 2, 64.5, 12]])
    assert targets[0].labels.tolist() == [1]
    assert isinstance(targets[1], Boxes) and targets[1].boxes.shape == (0, 4) and targets[1].labels.shape == (0,)


def _coco(tmp: Path, ann: dict | None = None, file_name: str = "a.png") -> Path:
    Image.new("RGB", (64, 48)).save(tmp / "a.png")
    base = {"id": 5, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0}
    data = {
        "images": [{"id": 1, "file_name": file_name, "width": 64, "height": 48}],
        "annotations": [base | (ann or {})],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp / "ann.json").write_text(json.dumps(data))
    return tmp / "ann.json"


def _yolo(tmp: Path, line: str) -> Path:
    (tmp / "images").mkdir()
    (tmp / "labels").mkdir()
    Image.new("RGB", (64, 48)).save(tmp / "images" / "a.png")
    (tmp / "classes.txt").write_text("cat\ndog\n")
    (tmp / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    return tmp


def _voc(tmp: Path, body: str) -> Path:
    (tmp / "Annotations").mkdir()
    Image.new("RGB", (64, 48)).save(tmp / "a.jpg")
    (tmp / "Annotations" / "a.xml").write_text(body)
    return tmp


VOC_OBJ = "<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>{}</annotation>"
ANN5 = ("ann.json", "annotation id 5")
BAD = {
    "coco box outside image": (lambda t: read_coco(_coco(t, {"bbox": [50, 30, 20, 10]})), *ANN5, "outside"),
    "coco zero-area box": (lambda t: read_coco(_coco(t, {"bbox": [5, 5, 0, 8]})), *ANN5, "zero or negative"),
    "coco unknown category": (lambda t: read_coco(_coco(t, {"category_id": 9})), *ANN5, "unknown category_id"),
    "coco missing image": (lambda t: read_coco(_coco(t, file_name="gone.png")), "ann.json", "not found"),
    "broken json": (lambda t: (t / "b.json").write_text('{"images": [') and read_coco(t / "b.json"), "b.json", "JSON"),
    "yolo unknown class": (lambda t: read_yolo(_yolo(t, "2 0.5 0.5 0.1 0.1")), "a.txt:2", "unknown class id 2"),
    "yolo malformed line": (lambda t: read_yolo(_yolo(t, "1 0.5 0.5 0.1")), "a.txt:2", "malformed"),
    "yolo bad number": (lambda t: read_yolo(_yolo(t, "1 0.5 x 0.1 0.1")), "a.txt:2", "malformed"),
    "yolo box outside": (lambda t: read_yolo(_yolo(t, "1 0.95 0.5 0.3 0.1")), "a.txt:2", "outside"),
    "voc box outside": (
        lambda t: read_voc(_voc(t, VOC_OBJ.format("<object><name>c</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                                                  "<xmax>70</xmax><ymax>9</ymax></bndbox></object>"))),
        "a.xml", "outside",
    ),
    "voc broken xml": (lambda t: read_voc(_voc(t, "<annotation><filename>")), "a.xml", "XML"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_annotations_name_the_file(tmp_path, case):
    fn, *parts = BAD[case]
    with pytest.raises(EdgetlError) as e:
        fn(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and all(part in msg for part in parts), msg


def test_read_detection_rejects_unknown_kind_and_ambiguous_folder(tmp_path):
    with pytest.raises(EdgetlError, match="unknown detection data kind"):
        read_detection(tmp_path, "kitti")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(EdgetlError, match="exactly one"):
        read_detection(tmp_path, "coco")
