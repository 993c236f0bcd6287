"""Data that need not fit in memory: images decoded per batch (data.decode: lazy) or once into a file (disk), and
Hugging Face datasets directories (data.kind: hf_dataset)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.config import recipe_from_dict
from tests.conftest import write_recipe


def _tiny(raw: dict, **data) -> dict:
    return {**raw, "data": {**raw["data"], **data}}


def test_lazy_and_disk_train_the_same_model_as_memory(tiny_raw, tmp_path, monkeypatch):
    from edgetl.modalities.stored import DiskImages, LazyImages
    from edgetl.pipeline import build

    states = {}
    for mode in ("memory", "lazy", "disk"):  # workers 0: augmentation draws from one generator, as in memory
        states[mode] = build(recipe_from_dict(_tiny(tiny_raw, decode=mode, workers=0)), tmp_path / mode, cache=False)
    assert isinstance(states["memory"].data.train.images, np.ndarray)
    assert isinstance(states["lazy"].data.train.images, LazyImages)
    assert isinstance(states["disk"].data.train.images, DiskImages)
    for mode in ("lazy", "disk"):
        assert states[mode].history == states["memory"].history
        assert [r["metric_ort"] for r in states[mode].rows] == [r["metric_ort"] for r in states["memory"].rows]
        for split in ("train", "val", "test"):
            a, b = states["memory"].data.__dict__[split].images, states[mode].data.__dict__[split].images
            assert b.shape == a.shape and np.array_equal(b[3:7], a[3:7]) and np.array_equal(b[-1], a[-1])

    decoded = sorted((tmp_path / "cache" / "decoded").glob("*.u8"))  # the per-test cache dir (conftest)
    assert len(decoded) == 3  # train, val, test
    assert os.stat(decoded[0].parent).st_mode & 0o077 == 0  # inside the cache directory's 0700 tree
    # a later build reads the decoded files: nothing is decoded again
    monkeypatch.setattr(LazyImages, "_one", lambda self, i: pytest.fail("decoded again"))
    again = build(recipe_from_dict(_tiny(tiny_raw, decode="disk", workers=0)), tmp_path / "again", cache=False)
    assert again.history == states["disk"].history
    from edgetl.cli import main

    assert CliRunner().invoke(main, ["cache", "clear"]).exit_code == 0
    assert not (tmp_path / "cache" / "decoded").exists()  # cache clear removes the decoded images too


def test_lazy_decoding_with_workers_and_no_memory_to_spare(tiny_raw, tmp_path, monkeypatch):
    import edgetl.data as data
    from edgetl.pipeline import build

    monkeypatch.setattr(data, "_available_bytes", lambda: 10_000)  # 10 kB free: decoding into memory is refused
    from edgetl.cli import main

    r = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "more than this machine has free" in r.output
    state = build(recipe_from_dict(_tiny(tiny_raw, decode="lazy", workers=2)), tmp_path / "lazy", cache=False)
    rows = state.history["finetune"]
    assert len(rows) == 2 and state.metrics["verify"]  # trained and verified with 2 decoding workers
    assert state.modality.n_workers() == 2


def test_chained_images_index_like_one_array():
    from edgetl.data import Split, concat
    from edgetl.modalities.stored import LazyImages

    rng = np.random.default_rng(0)
    pics = rng.integers(0, 255, (7, 12, 12, 3), dtype=np.uint8)
    from PIL import Image

    pre = {"crop": 12, "resize": 12, "mean": [0, 0, 0], "std": [1, 1, 1]}
    lazy = LazyImages([(Image.fromarray, p) for p in pics], pre)
    a = Split(labels=np.zeros(4, np.int64), images=LazyImages(lazy.sources[:4], pre))
    b = Split(labels=np.ones(3, np.int64), images=LazyImages(lazy.sources[4:], pre))
    both = concat(a, b)
    assert len(both) == 7 and both.images.shape == (7, 12, 12, 3)
    assert np.array_equal(both.images[2:6], pics[2:6]) and np.array_equal(both.images[-1], pics[6])
    assert np.array_equal(both.images[5], pics[5])


@pytest.fixture(scope="module")
def hf_digits(tmp_path_factory):
    """sklearn digits as a datasets DatasetDict (Image + ClassLabel features), written with save_to_disk."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    images = [Image.fromarray((x * 15.9).astype(np.uint8)) for x in d.images[:500]]
    ds = datasets.Dataset.from_dict({"image": images, "label": d.target[:500].tolist()}, features=features)
    root = tmp_path_factory.mktemp("hf") / "digits"
    ds.train_test_split(test_size=0.2, seed=0).save_to_disk(str(root))
    return root


def test_hf_dataset_directory_of_images(tiny_raw, hf_digits, tmp_path):
    from edgetl.pipeline import build

    raw = _tiny(tiny_raw, kind="hf_dataset", path=str(hf_digits), decode="lazy", workers=0)
    state = build(recipe_from_dict(raw), tmp_path / "b", cache=False)
    assert state.data.classes == list("0123456789")
    assert len(state.data.test) == 100  # the dataset's own test split
    assert len(state.data.train) + len(state.data.val) == 400
    labels = json.loads((tmp_path / "b" / "labels.json").read_text())
    assert labels == list("0123456789")


def test_hf_dataset_of_texts_with_string_labels(tmp_path):
    import datasets

    from edgetl.data import load_data, open_sources
    from tests.tiny import sentences

    rows = sentences(120)
    ds = datasets.Dataset.from_dict({"review": [r["review"] for r in rows], "mood": [r["sentiment"] for r in rows]})
    ds.save_to_disk(str(tmp_path / "t"))
    cfg = recipe_from_dict(
        {
            "name": "t",
            "backbone": {"name": "hf:x"},
            "data": {
                "kind": "hf_dataset",
                "path": str(tmp_path / "t"),
                "text_column": "review",
                "label_column": "mood",
            },
        }
    ).data
    pools, classes = open_sources(cfg)
    assert classes == ["neg", "pos"] and list(pools) == ["pool"]
    assert pools["pool"].items[0] == rows[0]["review"] and pools["pool"].labels[1] == 1
    from edgetl.modalities.text import Text

    data = load_data(cfg, Text({"max_length": 16}, tokenizer=None), 0, (pools, classes))
    assert len(data.train) + len(data.val) + len(data.test) == 120


def test_hf_dataset_mistakes_are_one_line(tiny_raw, hf_digits, tmp_path):
    from edgetl.cli import main

    cases = [
        ({"path": str(tmp_path)}, "not a datasets directory written by save_to_disk"),
        ({"path": str(hf_digits), "label_column": "digit"}, "has no column 'digit' (columns: image, label)"),
        ({"path": str(hf_digits), "image_column": "picture"}, "has no column 'text' (columns: image, label)"),
    ]
    for data, said in cases:
        raw = _tiny(tiny_raw, kind="hf_dataset", **data)
        r = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw), "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and said in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
