"""Shared fixtures: tiny recipes on sklearn digits, an image folder made from digits, one built bundle."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner

from tests.tiny import TINY

# `make test` runs two pytest-xdist workers on the 2 cores: one thread each for torch (read at its import) and the
# processes the tests start, so the workers do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# every build saves its stages (so the tests exercise the cache) into a directory of this run, never ~/.cache;
# each test gets its own below, so a test's build never reuses another test's stages
os.environ["EDGETL_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgetl-test-cache.")
atexit.register(shutil.rmtree, os.environ["EDGETL_CACHE_DIR"], True)
SESSION_CACHE = os.environ["EDGETL_CACHE_DIR"]  # what session- and module-scoped fixtures build into


def rebuilt_from_cache(recipe, out) -> str:
    """Rebuild ``recipe`` in a fresh interpreter against the fixtures' cache, where no model class was defined
    yet: every stage a fixture built must come back from the cache (unpickled). Returns the build's output."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "edgetl.cli", "build", str(recipe), "--out", str(out)],
        env={**os.environ, "EDGETL_CACHE_DIR": SESSION_CACHE},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("finetune", "export", "verify"):
        assert f"[{stage}] cached (" in proc.stdout, proc.stdout[-3000:]
    assert "not saved" not in proc.stdout
    return proc.stdout


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tiny_raw():
    import copy

    return copy.deepcopy(TINY)


def golden_pngs(bundle_dir, k: int, folder) -> tuple[np.ndarray, list]:
    """The first ``k`` golden images of an image bundle (uint8, as the device prepares them) and PNG files of them."""
    import json

    from PIL import Image

    spec = json.loads((bundle_dir / "golden.json").read_text())
    raw = (bundle_dir / "golden.bin").read_bytes()
    a = spec["inputs"]["images"]
    images = np.frombuffer(raw, np.uint8, int(np.prod(a["shape"])), a["offset"]).reshape(a["shape"])[:k]
    files = []
    for i, im in enumerate(images):
        files.append(folder / f"{i}.png")
        Image.fromarray(im).save(files[-1])
    return images, files


def write_recipe(path, raw) -> str:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    """digits 0, 1, 2 as PNG files in class sub-folders (real decoding through PIL)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "images"
    for cls in (0, 1, 2):
        (root / f"digit{cls}").mkdir(parents=True)
        for j, img in enumerate(d.images[d.target == cls][:30]):
            Image.fromarray((img * 15.9).astype(np.uint8)).save(root / f"digit{cls}" / f"{j}.png")
    return root


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """One real `edgetl build` through the CLI on digits, shared by the bundle/predict/runner tests."""
    from edgetl.cli import main

    tmp = tmp_path_factory.mktemp("bundle")
    recipe = write_recipe(tmp / "tiny.yaml", TINY)
    out = tmp / "tiny"
    result = CliRunner().invoke(main, ["build", recipe, "--out", str(out), "--set", "finetune.epochs=3"])
    assert result.exit_code == 0, result.output
    return out, result.output
