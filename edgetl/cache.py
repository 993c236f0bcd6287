"""Cached, resumable stages.

After every completed stage (bundle excepted: it is seconds and reads the whole recipe) the build saves what the
stage produced: the models (current, teacher, one per exported role), the report rows, history, metrics, the
files written so far (ONNX, ...) and the random-number generators' states. The entry's key hashes everything the
stage's output depends on, chained from the first stage:

    base     = edgetl's own source, every library's version, the recipe's seed / backbone / data / task sections,
               a content hash of the loaded train / val / test splits, and the size and modification time of
               every file under data.path, data.unlabelled_path and a local backbone / weights path
    key(s)   = hash(key(previous stage that runs), s, the recipe sections s reads)   see pipeline._stages()

so a rebuild that changes only ``quantize`` finds fine-tune, prune, distill and export cached and reruns quantize
onwards; one that changes nothing restores verify's results and rewrites the bundle in seconds; a build killed at
any point (``kill -9`` included: every write is a temp file renamed into place) resumes after its last completed
stage. Restored builds end with the same metrics as uninterrupted ones (the RNG states are part of an entry).

Layout: ``$EDGETL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/edgetl/stage-cache``, else ``~/.cache/edgetl/stage-cache``)
holds ``stages/<key>.json`` entries and content-addressed ``blobs/<sha256>`` (files two entries share are stored
once).
The size is bounded by ``$EDGETL_CACHE_MAX_GB`` (default 10): after each save the least recently used entries of
other builds go first. The directory holds pickled models that the build loads, so it must belong to the user and
must not be writable by group or others; edgetl creates it with mode 0700 and refuses one that is not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError

CACHE_ENV = "EDGETL_CACHE_DIR"
MAX_ENV = "EDGETL_CACHE_MAX_GB"
DEFAULT_MAX_GB = 10.0
BASE_SECTIONS = ("seed", "backbone", "data", "task", "train")  # what every stage's output depends on
MACHINE = "machine"  # a dependency that is not a recipe path: the CPU and runtime (stages that measure speed)
_STAMP_LIMIT = 100_000  # files stat'ed per data / weights path


def default_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edgetl" / "stage-cache"


def max_bytes() -> int:
    text = os.environ.get(MAX_ENV, str(DEFAULT_MAX_GB))
    try:
        gb = float(text)
    except ValueError:
        raise EdgetlError(f"{MAX_ENV}={text!r}: expected a size in GB, e.g. {MAX_ENV}=5") from None
    if gb < 0:
        raise EdgetlError(f"{MAX_ENV}={text!r}: expected a size in GB >= 0")
    return int(gb * 1e9)


# ---------------------------------------------------------------------------------------------------------------
# keys


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    """Hash a value by content: arrays by dtype, shape and bytes; containers and dataclasses recursively."""
    import numpy as np

    if isinstance(x, np.ndarray):
        h.update(f"nd:{x.dtype}:{x.shape};".encode())
        if x.dtype == object:  # the bytes would be pointers
            _feed(h, x.tolist())
        elif x.size:
            h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
    elif isinstance(x, (list, tuple)):
        h.update(f"{type(x).__name__}:{len(x)}[".encode())
        for v in x:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(x, dict):
        h.update(f"dict:{len(x)}{{".encode())
        for k in sorted(x, key=repr):
            _feed(h, k)
            _feed(h, x[k])
        h.update(b"}")
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(f"{type(x).__name__}(".encode())
        for f in dataclasses.fields(x):
            _feed(h, f.name)
            _feed(h, getattr(x, f.name))
        h.update(b")")
    elif x is None or isinstance(x, (bool, int, float, str, bytes, Path)):
        h.update(f"{type(x).__name__}:{x!r};".encode())
    elif hasattr(x, "fingerprint"):  # images decoded on demand (edgetl.modalities.stored): items, not pixels
        _feed(h, x.fingerprint())
    elif callable(x):  # Data.spare: its output is covered by the data section, the seed and the file stamps
        h.update(b"callable;")
    else:
        h.update(f"{type(x).__name__}:{x!r};".encode())


FRONT_ENDS = ("cli.py", "search.py")  # no stage imports them: editing them keeps the cache


@functools.cache
def _source_hash() -> str:
    """edgetl's own code (read once per process: an edit during a long search does not split its cache): a changed
    stage invalidates what it cached."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        if p.relative_to(root).as_posix() not in FRONT_ENDS:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def stamp(text: str | None) -> list:
    """(relative path, size, mtime) of every file under a local path named in the recipe; [] for other names."""
    if not text or not isinstance(text, str):
        return []
    from edgetl.data import user_path

    for prefix in ("hf:", "timm:", "torchvision:"):
        text = text.removeprefix(prefix)
    try:
        p = user_path(text)
    except EdgetlError:
        return []
    if not p.exists():
        return []
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())[:_STAMP_LIMIT]
    out = []
    for q in files:
        st = q.stat()
        out.append((q.relative_to(p).as_posix() if q != p else q.name, st.st_size, st.st_mtime_ns))
    return out


def _section(recipe, path: str) -> Any:
    if path == MACHINE:
        from edgetl.runner import device_info

        return device_info()
    value = recipe
    for part in path.split("."):
        value = getattr(value, part) if value is not None else None
    return value


def stage_keys(recipe, data, stages: list[tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """The key of every stage that runs, given the loaded data (``load`` has run) and each stage's dependencies."""
    from edgetl.distributed import world_size
    from edgetl.report import versions

    d = recipe.data
    base = _digest(
        "edgetl-cache-1",
        _source_hash(),
        versions(),
        world_size(),  # N processes train on N shards with N times the batch: another model
        {s: _section(recipe, s) for s in BASE_SECTIONS},
        (data.train, data.val, data.test, data.classes, data.n_spare),
        (stamp(d.path), stamp(d.unlabelled_path), stamp(recipe.backbone.name), stamp(recipe.backbone.pretrained)),
    )
    keys, prev = {}, base
    for name, deps in stages:
        prev = keys[name] = _digest(prev, name, {dep: _section(recipe, dep) for dep in deps})
    return keys


# ---------------------------------------------------------------------------------------------------------------
# the store


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (the owner of a temp file or directory a killed run would leave)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cache:
    """The stage cache in ``root``; ``open_cache`` checks the directory first."""

    def __init__(self, root: Path, limit: int):
        self.root, self.limit = root, limit
        self.stages, self.blobs = root / "stages", root / "blobs"

    # -- reading -------------------------------------------------------------------------------------------------

    def entry(self, key: str) -> dict | None:
        try:
            e = json.loads((self.stages / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        needed = [e.get("state"), *e.get("files", {}).values()]
        return e if all(isinstance(s, str) and (self.blobs / s).is_file() for s in needed) else None

    def entries(self) -> list[dict]:
        out = []
        for p in sorted(self.stages.glob("*.json")):
            e = self.entry(p.stem)
            if e is not None:
                out.append({**e, "key": p.stem})
        return sorted(out, key=lambda e: e.get("last_used", 0), reverse=True)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.blobs.glob("*") if p.is_file())

    def restore(self, key: str, state):
        """The state saved under ``key`` on top of ``state`` (the freshly loaded one), its files in the work dir."""
        import random

        import numpy as np
        import torch

        e = self.entry(key)
        if e is None:
            raise OSError(f"cache entry {key[:12]} is incomplete")
        saved = torch.load(self.blobs / e["state"], map_location="cpu", weights_only=False)
        for rel, sha in e["files"].items():
            dst = state.workdir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.blobs / sha, dst)
        rng = saved.pop("rng")
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        backbone = dataclasses.replace(state.backbone, model=saved.pop("model"))
        self._touch(key, e)
        return state.replace(backbone=backbone, **saved), e

    # -- writing -------------------------------------------------------------------------------------------------

    def _tmp(self, dir: Path) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".tmp.{os.getpid()}.", dir=dir)
        os.close(fd)
        return Path(name)

    def _put_file(self, src: Path) -> str:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        sha = h.hexdigest()
        dst = self.blobs / sha
        if not dst.is_file():
            tmp = self._tmp(self.blobs)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        else:
            os.utime(dst)  # recently used: kept by the clean-up of unreferenced blobs
        return sha

    def _write_json(self, path: Path, obj: dict) -> None:
        tmp = self._tmp(path.parent)
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)

    def _touch(self, key: str, e: dict) -> None:
        try:
            self._write_json(self.stages / f"{key}.json", {**e, "last_used": time.time()})
        except OSError:
            pass

    def save(self, key: str, stage: str, state, keep: set[str], log: Callable[[str], None]) -> str | None:
        """Save what ``stage`` produced under ``key``; a failure (disk full, an unpicklable model) is one log line
        and the build goes on without it: returns why, or None when saved."""
        import random

        import numpy as np
        import torch

        payload = {
            "model": state.backbone.model,
            "teacher": state.teacher,
            "reference": state.reference,
            "history": state.history,
            "rows": state.rows,
            "onnx": state.onnx,
            "models": state.models,
            "metrics": {k: v for k, v in state.metrics.items() if k != "cache"},
            "timings": state.timings,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        tmp = None
        try:
            tmp = self._tmp(self.blobs)
            torch.save(payload, tmp)
            sha = self._put_file(tmp)
            files = {
                p.relative_to(state.workdir).as_posix(): self._put_file(p)
                for p in sorted(state.workdir.rglob("*"))
                if p.is_file()
            }
            now = time.time()
            size = sum((self.blobs / s).stat().st_size for s in {sha, *files.values()})
            self._write_json(
                self.stages / f"{key}.json",
                {
                    "stage": stage,
                    "recipe": state.recipe.name,
                    "created": now,
                    "last_used": now,
                    "state": sha,
                    "files": files,
                    "bytes": size,
                },
            )
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation: the build itself must not fail on it
            reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e)[:120]}"
            log(f"  cache: {stage} not saved ({reason})")
            return reason
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        self.evict(keep, log)
        return None

    # -- bounding ------------------------------------------------------------------------------------------------

    def _clean_tmp(self) -> None:
        for d in (self.stages, self.blobs):
            for p in d.glob(".tmp.*"):
                try:
                    pid = int(p.name.split(".")[2])
                except (IndexError, ValueError):
                    continue
                if not pid_alive(pid):
                    p.unlink(missing_ok=True)

    def _gc(self) -> None:
        """Remove blobs no entry refers to. A concurrent build whose blob goes before its entry is written only loses
        that entry (an entry with a missing blob is a miss)."""
        used = set()
        for p in self.stages.glob("*.json"):
            try:
                e = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            used |= {e.get("state"), *e.get("files", {}).values()}
        for p in self.blobs.iterdir():
            if p.is_file() and not p.name.startswith(".") and p.name not in used:
                p.unlink(missing_ok=True)

    def evict(self, keep: set[str], log: Callable[[str], None] = print) -> None:
        """Least recently used entries not in ``keep`` (this build's) go until the cache fits its bound."""
        try:
            self._gc()
            for e in reversed(self.entries()):  # oldest first
                if self.size() <= self.limit:
                    break
                if e["key"] not in keep:
                    (self.stages / f"{e['key']}.json").unlink(missing_ok=True)
                    self._gc()
        except OSError as e:
            log(f"  cache: clean-up failed ({e.strerror or type(e).__name__})")

    def clear(self) -> tuple[int, int]:
        """Remove every entry and blob, and the images data.decode: disk decoded; returns (entries, bytes) removed."""
        decoded = self.root / "decoded"
        n, size = len(list(self.stages.glob("*.json"))), self.size()
        size += sum(p.stat().st_size for p in decoded.glob("*") if p.is_file())
        for d in (self.stages, self.blobs):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o700)
        shutil.rmtree(decoded, ignore_errors=True)
        return n, size


def open_cache(root: Path | None = None) -> Cache:
    """The cache directory, created (0700) when missing; one that another user owns or that group / others may
    write is refused with one line (it holds pickles the build would load)."""
    root = Path(root) if root is not None else default_dir()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = root.stat()
    except OSError as e:
        raise EdgetlError(
            f"cannot use the stage cache {root}: {e.strerror or type(e).__name__} "
            f"(set {CACHE_ENV} to another directory, or build with --no-cache)"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise EdgetlError(f"the stage cache {root} is not a directory (set {CACHE_ENV}, or build with --no-cache)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise EdgetlError(
            f"the stage cache {root} belongs to another user; refusing to load models from it "
            f"(set {CACHE_ENV} to a directory of yours, or build with --no-cache)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EdgetlError(
            f"the stage cache {root} is writable by group or others; refusing to load models from it "
            f"(chmod 700 {root}, or set {CACHE_ENV}, or build with --no-cache)"
        )
    cache = Cache(root, max_bytes())
    try:
        for d in (cache.stages, cache.blobs):
            d.mkdir(exist_ok=True, mode=0o700)
        cache._clean_tmp()
    except OSError as e:
        raise EdgetlError(f"cannot use the stage cache {root}: {e.strerror or type(e).__name__}") from None
    return cache
