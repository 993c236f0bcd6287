"""The stage cache (issue 19, part 1): a rebuild reruns only what changed, a killed build resumes, the cache is
bounded, listed, cleared, refused when unsafe, and every stage's key covers every recipe field the stage reads."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl import config
from edgetl.cli import main
from edgetl.config import recipe_from_dict
from edgetl.pipeline import _stages, build
from tests.conftest import write_recipe

SECTIONS = {  # config class -> the recipe section it is read under
    config.TaskCfg: "task",
    config.BackboneCfg: "backbone",
    config.DataCfg: "data",
    config.AugmentCfg: "data",
    config.FinetuneCfg: "finetune",
    config.PruneCfg: "prune",
    config.DistillCfg: "distill",
    config.QuantizeCfg: "quantize",
    config.ExportCfg: "export",
    config.VerifyCfg: "verify",
}


def every_stage(raw: dict) -> dict:
    """The tiny digits recipe with every stage (ORT PTQ: no QAT epochs)."""
    return {
        **raw,
        "prune": {"ratio": 0.25, "steps": 1, "recovery_epochs": 1},
        "distill": {"epochs": 1},
        "quantize": {"method": "ptq", "require_speedup": False, "calibration_size": 64},
        "export": {"ort_format": True},
    }


def measured(state) -> list[tuple]:
    """What a build measured, latency aside (timing noise): per model the task metric, ORT metric and agreement."""
    return [(r["stage"], r["metric_torch"], r["metric_ort"], r["agreement"], r["size_mb"]) for r in state.rows]


def forbid(monkeypatch, *names: str) -> None:
    """Make the named stages fail if they run (a cached stage must not)."""
    import importlib

    for name in names:
        module = importlib.import_module(f"edgetl.stages.{name}")
        monkeypatch.setattr(module, "run", lambda *a, n=name: pytest.fail(f"stage {n} ran; it was cached"))


@pytest.fixture
def reads(monkeypatch):
    """Record which recipe fields each stage reads: {stage: {(section, field)}}, through __getattribute__."""
    import edgetl.pipeline as pipeline

    seen: dict[str, set] = {}
    current = [None]

    def recorder(cls, section):
        original = cls.__getattribute__

        def get(self, name):
            value = original(self, name)
            if current[0] is not None and not name.startswith("__"):
                if section is None:  # the Recipe: a section (fields recorded below) or a scalar (seed, name)
                    if not dataclasses.is_dataclass(value):
                        seen[current[0]].add((name, None))
                else:
                    seen[current[0]].add((section, name))
            return value

        monkeypatch.setattr(cls, "__getattribute__", get)

    recorder(config.Recipe, None)
    for cls, section in SECTIONS.items():
        recorder(cls, section)
    original_stages = pipeline._stages

    def tracked():
        out = []
        for s in original_stages():

            def run(state, recipe, s=s):
                current[0] = s.name
                seen.setdefault(s.name, set())
                try:
                    return s.run(state, recipe)
                finally:
                    current[0] = None

            out.append(s._replace(run=run))
        return out

    monkeypatch.setattr(pipeline, "_stages", tracked)
    return seen


def test_every_cached_stage_declares_what_it_reads(reads, tiny_raw, tmp_path):
    """Each stage's key must cover every recipe field the stage reads, or a changed field would reuse a stale
    output. Covered: the base sections, and this or an upstream stage's declared dependencies."""
    from edgetl.cache import BASE_SECTIONS

    build(recipe_from_dict(every_stage(tiny_raw)), tmp_path / "out")
    declared: set[str] = set()
    for s in _stages():
        if s.deps is None:  # never cached: load, bundle
            continue
        declared |= set(s.deps)
        for section, field in reads.get(s.name, set()):
            ok = section in BASE_SECTIONS or section in declared or f"{section}.{field}" in declared
            assert ok, f"stage {s.name} reads recipe.{section}{'.' + field if field else ''}, not in its cache key"
    assert {"finetune", "prune", "distill", "export", "quantize", "verify", "ort_format"} <= set(reads)


def test_a_second_build_trains_nothing_and_a_changed_quantize_retrains_nothing(monkeypatch, tiny_raw, tmp_path):
    raw = every_stage(tiny_raw)
    first = build(recipe_from_dict(raw), tmp_path / "a")
    assert first.metrics["cache"]["resumed_after"] is None
    assert set(first.metrics["cache"]["stages"].values()) == {"run"}

    with monkeypatch.context() as m:  # nothing changed: no stage but load and bundle runs
        forbid(m, "finetune", "prune", "distill", "export", "quantize", "verify", "ort_format")
        again = build(recipe_from_dict(raw), tmp_path / "b")
    assert again.metrics["cache"]["resumed_after"] == "ort_format"
    assert measured(again) == measured(first)
    assert [r["p50_ms"] for r in again.rows] == [r["p50_ms"] for r in first.rows]  # verify's results restored
    files = [json.loads((tmp_path / d / "manifest.json").read_text())["files"] for d in "ab"]
    for f in files:  # the report says which stages were restored; every model and asset is the same
        f.pop("report.json"), f.pop("report.html", None)
    assert files[0] == files[1]

    with monkeypatch.context() as m:  # only quantize changed: fine-tune, prune, distill, export are restored
        forbid(m, "finetune", "prune", "distill", "export")
        changed = build(recipe_from_dict(raw, ["quantize.calibration_size=32"]), tmp_path / "c")
    status = changed.metrics["cache"]["stages"]
    assert status == {
        "finetune": "cached",
        "prune": "cached",
        "distill": "cached",
        "export": "cached",
        "quantize": "run",
        "verify": "run",
        "ort_format": "run",
    }
    assert changed.history["finetune"] == first.history["finetune"]
    assert measured(changed)[:3] == measured(first)[:3]  # fp32, pruned, distilled: the same models

    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["metrics"]["cache"]["stages"] == status


def test_changed_data_misses(tiny_raw, tmp_path):
    first = build(recipe_from_dict(tiny_raw), tmp_path / "a")
    second = build(recipe_from_dict(tiny_raw, ["data.max_train=300"]), tmp_path / "b")
    assert first.metrics["cache"]["keys"]["finetune"] != second.metrics["cache"]["keys"]["finetune"]
    assert second.metrics["cache"]["stages"]["finetune"] == "run"


def _run_cli(recipe: str, out: Path, *extra: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgetl.cli", "build", recipe, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def test_a_build_killed_with_sigkill_resumes_and_ends_as_an_uninterrupted_one(tiny_raw, tmp_path):
    raw = {**tiny_raw, "prune": {"ratio": 0.25, "steps": 2, "recovery_epochs": 2}}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = _run_cli(recipe, tmp_path / "out")
    line = ""
    while not line.startswith("[prune]"):  # fine-tune done and saved; kill -9 inside prune
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # what the killed build left

    resumed = build(recipe_from_dict(raw), tmp_path / "out")
    assert resumed.metrics["cache"]["stages"]["finetune"] == "cached"
    assert resumed.metrics["cache"]["stages"]["verify"] == "run"
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # the killed build's temp dir is gone
    cache = Path(os.environ["EDGETL_CACHE_DIR"])
    assert not [p for d in ("stages", "blobs") for p in (cache / d).iterdir() if p.name.startswith(".tmp.")]

    uninterrupted = build(recipe_from_dict(raw), tmp_path / "ref", cache=False)
    assert uninterrupted.metrics["cache"]["stages"] == {
        "finetune": "off",
        "prune": "off",
        "export": "off",
        "verify": "off",
    }
    assert measured(resumed) == measured(uninterrupted)
    assert resumed.history == uninterrupted.history


def test_no_cache_saves_nothing_and_cache_ls_clear(tiny_raw, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    cache = Path(os.environ["EDGETL_CACHE_DIR"])
    result = CliRunner().invoke(main, ["build", recipe, "--out", str(tmp_path / "a"), "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "cached" not in result.output and not list((cache / "stages").glob("*.json"))

    result = CliRunner().invoke(main, ["build", recipe, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    listing = CliRunner().invoke(main, ["cache", "ls"])
    assert listing.exit_code == 0, listing.output
    assert f"{cache}: 3 stages" in listing.output  # finetune, export, verify
    assert all(f" {s} " in listing.output for s in ("finetune", "export", "verify"))
    data = json.loads(CliRunner().invoke(main, ["cache", "ls", "--json"]).output)
    assert {e["stage"] for e in data["entries"]} == {"finetune", "export", "verify"}
    assert all(e["recipe"] == "tiny" and e["bytes"] > 0 for e in data["entries"])

    result = CliRunner().invoke(main, ["build", recipe, "--out", str(tmp_path / "c")])
    assert "[verify] cached" in result.output and "cache: finetune, export, verify restored" in result.output

    cleared = CliRunner().invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 3 cached stages" in cleared.output
    assert not list((cache / "stages").iterdir()) and not list((cache / "blobs").iterdir())
    result = CliRunner().invoke(main, ["build", recipe, "--out", str(tmp_path / "d")])
    assert result.exit_code == 0 and "cached" not in result.output


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_others_may_write_is_refused_in_one_line(tiny_raw, tmp_path, mode):
    cache = Path(os.environ["EDGETL_CACHE_DIR"])
    cache.mkdir()
    cache.chmod(mode)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    for args in (["build", recipe, "--out", str(tmp_path / "o")], ["cache", "ls"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the stage cache") and "writable by group" in lines[0]
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["build", recipe, "--out", str(tmp_path / "o"), "--no-cache"])
    assert result.exit_code == 0, result.output  # --no-cache never opens it


def test_the_cache_is_bounded_least_recently_used_first(tiny_raw, tmp_path, monkeypatch):
    from edgetl.cache import open_cache

    a = build(recipe_from_dict(tiny_raw), tmp_path / "a")
    store = open_cache()
    one_build = store.size()
    monkeypatch.setenv("EDGETL_CACHE_MAX_GB", str(1.5 * one_build / 1e9))  # room for one build's stages
    b = build(recipe_from_dict(tiny_raw, ["seed=1"]), tmp_path / "b")
    left = {e["key"][:16] for e in open_cache().entries()}
    assert set(b.metrics["cache"]["keys"].values()) <= left  # this build's stages stay
    assert a.metrics["cache"]["keys"]["finetune"] not in left  # the least recently used went first
    assert open_cache().size() <= 1.5 * one_build
    monkeypatch.setenv("EDGETL_CACHE_MAX_GB", "lots")
    result = CliRunner().invoke(main, ["cache", "ls"])
    assert result.exit_code == 2 and "EDGETL_CACHE_MAX_GB='lots'" in result.stderr


def test_a_damaged_entry_is_a_miss_not_a_failure(tiny_raw, tmp_path):
    from edgetl.cache import open_cache

    first = build(recipe_from_dict(tiny_raw), tmp_path / "a")
    store = open_cache()
    for e in store.entries():  # truncate every saved state: torch.load fails on each
        (store.blobs / e["state"]).write_bytes(b"not a pickle")
    logged: list[str] = []
    again = build(recipe_from_dict(tiny_raw), tmp_path / "b", log=logged.append)
    assert any("unusable" in line for line in logged)
    assert again.metrics["cache"]["resumed_after"] is None
    assert measured(again) == measured(first)
