import dataclasses
import gzip

import numpy as np
import pytest

from edgetl.config import DataCfg
from edgetl.data import load_data, read_idx, stratified_split
from edgetl.errors import EdgetlError

PRE = {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    keep, taken = stratified_split(labels, 0.2, seed=0)
    assert len(set(keep) & set(taken)) == 0 and len(keep) + len(taken) == len(labels)
    np.testing.assert_allclose(np.bincount(labels[taken]), [20, 10, 6, 4], atol=1)
    # same seed, same split
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], taken)


def test_digits_splits_are_disjoint_and_stratified():
    d = load_data(DataCfg(kind="digits", val_fraction=0.1, test_fraction=0.2), PRE, seed=0)
    assert d.train.images.shape[1:] == (16, 16, 3) and d.train.images.dtype == np.uint8
    n = len(d.train) + len(d.val) + len(d.test)
    assert n == 1797
    for split in (d.val, d.test):
        frac = np.bincount(split.labels, minlength=10) / len(split)
        assert np.abs(frac - 0.1).max() < 0.03


def test_max_train_subsamples_stratified():
    d = load_data(DataCfg(kind="digits", max_train=200), PRE, seed=0)
    assert len(d.train) == 200
    assert np.bincount(d.train.labels).min() >= 18


def test_image_folder(image_folder):
    d = load_data(DataCfg(kind="folder", path=str(image_folder), test_fraction=0.2), PRE, seed=0)
    assert d.classes == ["digit0", "digit1", "digit2"]
    assert len(d.train) + len(d.val) + len(d.test) == 90
    assert set(d.test.labels) == {0, 1, 2}


def test_given_split_folders(image_folder, tmp_path):
    import shutil

    root = tmp_path / "splits"
    shutil.copytree(image_folder, root / "train")
    shutil.copytree(image_folder, root / "test")
    d = load_data(DataCfg(kind="folder", path=str(root)), PRE, seed=0)
    assert len(d.test) == 90 and len(d.train) + len(d.val) == 90


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "digit1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(EdgetlError, match="broken.png"):
        load_data(DataCfg(kind="folder", path=str(image_folder)), PRE, seed=0)


def test_bad_folders_are_named(image_folder, tmp_path):
    with pytest.raises(EdgetlError, match="not found"):
        load_data(DataCfg(kind="folder", path=str(tmp_path / "missing")), PRE, seed=0)
    (image_folder / "empty_class").mkdir()
    with pytest.raises(EdgetlError, match="empty_class.*no images"):
        load_data(DataCfg(kind="folder", path=str(image_folder)), PRE, seed=0)
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    with pytest.raises(EdgetlError, match="single class"):
        load_data(DataCfg(kind="folder", path=str(single)), PRE, seed=0)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (60, 28, 28)
    d = load_data(DataCfg(kind="fashion_mnist", path=str(tmp_path), val_fraction=0.2), PRE, seed=0)
    assert len(d.test) == 20 and len(d.train) + len(d.val) == 60 and d.classes[0] == "T-shirt/top"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10"))
    with pytest.raises(EdgetlError, match="truncated"):
        load_data(DataCfg(kind="fashion_mnist", path=str(tmp_path)), PRE, seed=0)


def test_spare_examples_are_the_training_pool_left_out_by_max_train():
    from edgetl.data import _array_pool

    n = 600  # image i is one flat colour that encodes i, so decoded examples can be traced back to the pool
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[..., 0], images[..., 1] = (np.arange(n) // 256)[:, None, None], (np.arange(n) % 256)[:, None, None]
    labels = np.arange(n) % 3
    cfg = DataCfg(kind="digits", max_train=100, val_fraction=0.1, test_fraction=0.2)
    d = load_data(cfg, PRE, seed=0, sources=({"pool": _array_pool(images, labels)}, ["a", "b", "c"]))

    def ids(split):
        return set((256 * split.images[:, 0, 0, 0].astype(int) + split.images[:, 0, 0, 1]).tolist())

    used = ids(d.train) | ids(d.val) | ids(d.test)
    assert d.n_spare == n - len(used) and len(used) == len(d.train) + len(d.val) + len(d.test)
    spare = d.spare(50, 1)
    assert len(spare) == 50 and not ids(spare) & used
    assert ids(d.spare(50, 1)) == ids(spare)  # seeded: the same draw as before unlabelled data could join it
    assert ids(spare) == set(np.random.default_rng(1).permutation(np.array(sorted(set(range(n)) - used)))[:50])
    assert len(d.spare(10_000, 1)) == d.n_spare  # asking for more than there is gives all of it


def test_unlabelled_examples_join_the_spare_pool(image_folder, tmp_path):
    from PIL import Image

    unl = tmp_path / "unlabelled"
    (unl / "any" / "depth").mkdir(parents=True)
    for j in range(7):
        Image.fromarray(np.full((8, 8), 40 * j, np.uint8)).save(unl / "any" / "depth" / f"{j}.png")
    (unl / "notes.txt").write_text("not an image")
    (unl / "._7.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    cfg = DataCfg(kind="folder", path=str(image_folder), test_fraction=0.2, max_train=40)
    plain = load_data(cfg, PRE, seed=0)
    d = load_data(dataclasses.replace(cfg, unlabelled_path=str(unl)), PRE, seed=0)
    assert d.n_spare == plain.n_spare + 7
    assert np.array_equal(d.train.images, plain.train.images) and np.array_equal(d.test.labels, plain.test.labels)
    every = d.spare(10_000, 0)
    assert (every.labels == -1).sum() == 7 and (every.labels >= 0).sum() == plain.n_spare
    (unl / "empty").mkdir()
    with pytest.raises(EdgetlError, match="unlabelled_path .*empty has no images"):
        load_data(dataclasses.replace(cfg, unlabelled_path=str(unl / "empty")), PRE, seed=0)
    with pytest.raises(EdgetlError, match="is inside data.path"):
        load_data(dataclasses.replace(cfg, unlabelled_path=str(image_folder / "digit0")), PRE, seed=0)
    (unl / "bad.png").write_bytes(b"not a png")  # found when the data loads, not when distillation decodes it
    with pytest.raises(EdgetlError, match="cannot read image .*bad.png"):
        load_data(dataclasses.replace(cfg, unlabelled_path=str(unl)), PRE, seed=0)
    with pytest.raises(EdgetlError, match="unlabelled_path .*missing: folder not found"):
        load_data(dataclasses.replace(cfg, unlabelled_path=str(unl / "missing")), PRE, seed=0)


def test_unlabelled_texts_from_txt_csv_and_jsonl(tmp_path):
    from edgetl.data import unlabelled_pool

    (tmp_path / "u.txt").write_text("first review\n\n  second review  \n")
    (tmp_path / "u.csv").write_text("review,other\ngreat film,x\nawful film,y\n")
    (tmp_path / "u.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    assert unlabelled_pool(DataCfg(kind="csv", unlabelled_path=str(tmp_path / "u.txt"))).items == [
        "first review",
        "second review",
    ]
    pool = unlabelled_pool(DataCfg(kind="csv", text_column="review", unlabelled_path=str(tmp_path / "u.csv")))
    assert pool.items == ["great film", "awful film"] and (pool.labels == -1).all()
    assert len(unlabelled_pool(DataCfg(kind="jsonl", unlabelled_path=str(tmp_path / "u.jsonl"))).items) == 3
    with pytest.raises(EdgetlError, match="u.csv has no column 'text' \\(columns: review, other\\)"):
        unlabelled_pool(DataCfg(kind="csv", unlabelled_path=str(tmp_path / "u.csv")))
    (tmp_path / "gap.jsonl").write_text('{"text": "one"}\n{"text": ""}\n')
    with pytest.raises(EdgetlError, match="gap.jsonl row 2: empty text"):
        unlabelled_pool(DataCfg(kind="jsonl", unlabelled_path=str(tmp_path / "gap.jsonl")))
    with pytest.raises(EdgetlError, match="unlabelled_path .*missing.txt: file not found"):
        unlabelled_pool(DataCfg(kind="csv", unlabelled_path=str(tmp_path / "missing.txt")))
    with pytest.raises(EdgetlError, match="expected a .txt"):
        unlabelled_pool(DataCfg(kind="csv", unlabelled_path=str(tmp_path)))
    with pytest.raises(EdgetlError, match="sentence-pair"):
        unlabelled_pool(DataCfg(kind="csv", text_pair_column="b", unlabelled_path=str(tmp_path / "u.txt")))
