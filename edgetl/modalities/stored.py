"""Decoded images that are not all in memory: ``data.decode: lazy`` (decoded when a batch asks, in DataLoader workers)
and ``disk`` (decoded once into a file of rows under the cache directory, read back a batch at a time with
``os.pread``, so nothing stays resident). Both are array-likes a ``Split`` holds in place of its uint8 array:
``len``, ``shape``, an int index (one H x W x 3 image) and a slice (a stacked batch), which is all the loaders,
feeds and reports use. Decoding is the device runner's ``prepare`` either way."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from edgetl.runner import prepare


class LazyImages:
    """Images decoded with ``prepare`` each time they are indexed. ``sources``: (load, item) pairs."""

    dtype = np.dtype(np.uint8)

    def __init__(self, sources: list, pre: dict):
        self.sources, self.pre = list(sources), pre
        c = pre["crop"]
        self.shape = (len(self.sources), c, c, 3)

    def __len__(self) -> int:
        return len(self.sources)

    def _one(self, i: int) -> np.ndarray:
        load, item = self.sources[i]
        image = prepare(load(item), self.pre)
        return image if image.flags.writeable else image.copy()  # (a view of the PIL image otherwise)

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            return self._one(int(k))
        rows = range(len(self))[k]
        if not len(rows):
            return np.zeros((0, *self.shape[1:]), np.uint8)
        return np.stack([self._one(i) for i in rows])

    def fingerprint(self):
        """What the stage cache hashes instead of pixels: the items (their files' size and mtime are in the key's
        stamps) and the preprocessing."""
        return ("lazy", [repr(item) for _, item in self.sources], self.pre)


class DiskImages:
    """``n`` prepared images stored as rows of a uint8 file, read with ``os.pread`` (not mapped: pages read are the
    kernel's cache, not this process's memory)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, n: int, crop: int, key: str):
        self.path, self.key = Path(path), key
        self.shape = (n, crop, crop, 3)
        self.row = crop * crop * 3
        self._fd = None

    def __getstate__(self):  # DataLoader workers started with spawn open the file themselves
        return {**self.__dict__, "_fd": None}

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = bytearray(os.pread(self._fd, count * self.row, start * self.row))  # writable (torch.from_numpy)
        if len(buf) != count * self.row:
            raise OSError(f"{self.path}: decoded images file is shorter than expected (changed since it was written?)")
        return np.frombuffer(buf, np.uint8).reshape(count, *self.shape[1:])

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            i = int(k) + (len(self) if k < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(k)
            return self._read(i, 1)[0]
        rows = range(len(self))[k]
        if rows.step == 1:
            return self._read(rows.start, len(rows)) if len(rows) else np.zeros((0, *self.shape[1:]), np.uint8)
        return np.stack([self[i] for i in rows]) if len(rows) else np.zeros((0, *self.shape[1:]), np.uint8)

    def fingerprint(self):
        return ("disk", self.key)


class Chained:
    """Several image array-likes one after the other (the distillation transfer set: the training split + spares)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            i = int(k) + (len(self) if k < 0 else 0)
            p = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[p][i - int(self.starts[p])]
        rows = range(len(self))[k]
        return np.stack([self[i] for i in rows]) if len(rows) else np.zeros((0, *self.shape[1:]), np.uint8)

    def fingerprint(self):
        return ("chained", [p.fingerprint() if hasattr(p, "fingerprint") else p for p in self.parts])


def decode_key(sources: list, pre: dict, source_id) -> str:
    """The decoded file's name: the items, each file's size and mtime, the preprocessing, and the source."""
    h = hashlib.sha256(repr((source_id, pre)).encode())
    for _, item in sources:
        h.update(repr(item).encode())
        if isinstance(item, Path):
            st = item.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def decode_to_disk(lazy: LazyImages, root: Path, key: str, desc: str, workers: int) -> DiskImages:
    """Decode every image of ``lazy`` once into ``root/<key>.u8`` (written to a temp file, renamed when complete;
    an existing complete file is reused) and return it as ``DiskImages``."""
    import sys

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n, crop = len(lazy), lazy.shape[1]
    path = root / f"{key}.u8"
    row = crop * crop * 3
    if path.is_file() and path.stat().st_size == n * row:
        return DiskImages(path, n, crop, key)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = root / f".{key}.{os.getpid()}.tmp"

    class _One(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.from_numpy(lazy[i])

    # its own generator: iterating a loader draws from the global one otherwise (and a build must train the same
    # whether or not its images were decoded before)
    loader = DataLoader(_One(), batch_size=64, num_workers=workers, generator=torch.Generator())
    try:
        with open(tmp, "wb") as f:
            for batch in tqdm(loader, desc=f"decode {desc} to disk", leave=False, disable=not sys.stderr.isatty()):
                f.write(batch.numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return DiskImages(path, n, crop, key)
