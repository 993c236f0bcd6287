"""Hostile and careless input (issue 15): every refusal is exit code 2 and exactly one ``error:`` line on stderr, no
traceback, no leftovers beside the output, and a bundle already at the output stays byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.config import recipe_from_dict
from edgetl.errors import EdgetlError
from edgetl.runner import Bundle, BundleError, sha256
from tests.conftest import write_recipe


def snapshot(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output


def build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


@pytest.fixture
def old_bundle(bundle, tmp_path):
    """A copy of a real bundle at tmp/out, and its file hashes."""
    out = tmp_path / "out"
    shutil.copytree(bundle[0], out)
    return out, snapshot(out)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# 1. data loss


def test_a_directory_with_someone_elses_manifest_is_never_deleted(tmp_path, tiny_raw):
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "PWA"}')
    (web / "precious.txt").write_text("x")
    before = snapshot(web)
    refused(build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", web), "is not an edgetl bundle")
    assert snapshot(web) == before and leftovers(tmp_path) == []


def test_a_bundle_holding_a_file_edgetl_did_not_write_is_not_replaced(old_bundle, tiny_raw, tmp_path):
    out, _ = old_bundle
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    refused(build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", out), "notes.txt, which edgetl did not write")
    assert snapshot(out) == before


def test_manifest_carries_the_format_marker(bundle):
    manifest = json.loads((bundle[0] / "manifest.json").read_text())
    assert manifest["format"] == "edgetl-bundle" and manifest["format_version"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 2 + 5. checked when the recipe loads, before the first stage


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune=", "'verify.max_accuracy_drop': the drop is measured from the fine-tuned model"),
        ("export.opset=15", "'export.opset': 15 must be >= 17"),
        ("finetune.lr=.inf", "'finetune.lr': expected a finite number"),
        ("finetune.lr=.nan", "'finetune.lr': expected a finite number"),
        ("seed=4294967296", "'seed': 4294967296 must be in [0, 2**32 - 1]"),
        ("verify.min_accuracy=150", "'verify.min_accuracy': 150.0 must be in [0, 100] percent"),
        ("verify.max_accuracy_drop=-1", "'verify.max_accuracy_drop': -1.0 must be in [0, 100] points"),
        ("backbone.input_size=4000", "'backbone.input_size': 4000 must be between 8 and 2048"),
        ("data.kind=csv", "csv is text data but timm:mobilenetv3_small_050 is an image backbone"),
        ("finetune.epochs=[1,", "--set finetune.epochs is not valid YAML"),
    ],
)
def test_bad_values_fail_before_the_first_stage(old_bundle, tiny_raw, tmp_path, override, message):
    out, before = old_bundle
    tiny_raw["verify"]["max_accuracy_drop"] = 2.0
    result = build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", out, "--set", override)
    refused(result, message)
    assert "[load]" not in result.output and snapshot(out) == before and leftovers(tmp_path) == []


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_line(tmp_path):
    bomb = ["name: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        bomb.append(
            f"k{i}: &{chr(ord('a') + i)} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, "
            f"*{prev}, *{prev}]"
        )
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\nbackbone: {name: *j}\n")
    t0 = time.perf_counter()
    result = build(path)
    refused(result, "expands to more than 100,000 values")
    assert time.perf_counter() - t0 < 10 and len(result.stderr) < 300


def test_values_quoted_in_errors_are_truncated(tiny_raw):
    tiny_raw["finetune"]["lr"] = "x" * 100_000
    with pytest.raises(EdgetlError) as e:
        recipe_from_dict(tiny_raw)
    assert len(str(e.value)) < 200


def test_non_utf8_recipe_and_unknown_user_path(tmp_path, tiny_raw):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    refused(build(path), "is not UTF-8")
    tiny_raw["data"] = {"kind": "folder", "path": "~nosuchuser_edgetl/x"}
    refused(build(write_recipe(tmp_path / "r2.yaml", tiny_raw), "--out", tmp_path / "o"), "no such user")


# ---------------------------------------------------------------------------------------------------------------
# 3. manifest path traversal (runner.py; the Node runner has the same test)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "a\\b", "C:x"])
def test_manifest_entries_outside_the_bundle_are_refused(old_bundle, name):
    out, _ = old_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="only plain file names inside the bundle are valid"):
        Bundle(out)
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "bench", "--runs", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "only plain file names" in proc.stderr


def test_a_symlinked_bundle_file_is_refused(old_bundle):
    out, _ = old_bundle
    (out / "labels.json").unlink()
    (out / "labels.json").symlink_to("/etc/hostname")
    with pytest.raises(BundleError, match="labels.json points outside the bundle"):
        Bundle(out)


def _rewrite(out: Path, name: str, content: str) -> None:
    """Change a bundle file and its manifest digest, as a tamperer who knows the format would."""
    (out / name).write_text(content)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = sha256(out / name)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "preprocess.json",
            json.dumps({"kind": "text", "tokenizer": "../../etc/passwd", "max_length": 8, "inputs": ["input_ids"]}),
            "only plain file names",
        ),
        (
            "preprocess.json",
            json.dumps({"kind": "image", "crop": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}),
            "resize must be an integer",
        ),
        (
            "preprocess.json",
            json.dumps({"kind": "image", "resize": 0, "crop": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}),
            "resize must be an integer",
        ),
        ("labels.json", json.dumps(["a", "b"]), "labels.json names 2 classes but the model outputs 10"),
        ("labels.json", json.dumps([str(i) for i in range(11)]), "names 11 classes but the model outputs 10"),
        ("labels.json", json.dumps({"0": "a"}), "labels.json must be a non-empty list"),
        ("labels.json", "[" * 100_000 + "]" * 100_000, "cannot read the bundle's labels"),
        ("manifest.json", "[" * 100_000 + "]" * 100_000, "is not a valid edgetl manifest"),
    ],
)
def test_bad_bundle_files_are_one_error(old_bundle, name, content, message, tmp_path):
    out, _ = old_bundle
    if name == "manifest.json":
        (out / name).write_text(content)
    else:
        _rewrite(out, name, content)
    result = CliRunner().invoke(main, ["predict", str(out), "x.png"])
    refused(result, message)


# ---------------------------------------------------------------------------------------------------------------
# 4 + 6. denial of service and tracebacks in data loading


def test_decompression_bomb_image_is_one_line_in_build_and_predict(bundle, image_folder, tmp_path, tiny_raw):
    from PIL import Image

    bomb = image_folder / "digit0" / "bomb.png"
    Image.new("L", (1, 1)).save(bomb)
    data = bytearray(bomb.read_bytes())  # claim 20000 x 20000 px in the header (IHDR width/height)
    data[16:24] = (20000).to_bytes(4, "big") * 2
    bomb.write_bytes(bytes(data))
    tiny_raw["data"] = {"kind": "folder", "path": str(image_folder)}
    refused(build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", tmp_path / "o"), "cannot read image")
    refused(CliRunner().invoke(main, ["predict", str(bundle[0]), str(bomb)]), "cannot read image")


def test_csv_fields_with_line_breaks_and_unicode_line_ends_are_read_whole(tmp_path):
    from edgetl.config import DataCfg
    from edgetl.data import open_sources

    rows = ["text,label", '"first line\nsecond line",a', '"a\u2028b\u0085c\x0cd",b', '"plain",a', '"x" ,b']
    path = tmp_path / "t.csv"
    path.write_text("\r\n".join(rows) + "\r\n", newline="")
    pools, classes = open_sources(DataCfg(kind="csv", path=str(path)))
    assert classes == ["a", "b"] and len(pools["pool"].items) == 4
    assert pools["pool"].items[0] == "first line\nsecond line" and pools["pool"].items[1] == "a\u2028b\u0085c\x0cd"


def test_huge_csv_field_and_deep_jsonl_are_one_error(tmp_path, tiny_raw):
    from edgetl.config import DataCfg
    from edgetl.data import open_sources

    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",a\nshort,b\n")
    pools, _ = open_sources(DataCfg(kind="csv", path=str(path)))  # 200 KB: over csv's default limit, still read
    assert len(pools["pool"].items[0]) == 200_000
    deep = tmp_path / "t.jsonl"
    deep.write_text('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(EdgetlError, match="line 1: JSON nested too deeply"):
        open_sources(DataCfg(kind="jsonl", path=str(deep)))


def test_class_folder_linking_back_to_the_root_is_refused(image_folder, tmp_path, tiny_raw):
    (image_folder / "loop").symlink_to(image_folder)
    tiny_raw["data"] = {"kind": "folder", "path": str(image_folder)}
    refused(build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", tmp_path / "o"), "links back to")


def test_stratified_split_names_the_class():
    from edgetl.data import stratified_split

    with pytest.raises(EdgetlError, match="class 'cat' has fewer than 2 examples"):
        stratified_split(np.array([0, 0, 0, 1]), 0.5, 0, ["dog", "cat"])


# ---------------------------------------------------------------------------------------------------------------
# 6 + 7. the output directory


def test_bad_output_directories_are_refused_before_the_first_stage(old_bundle, tiny_raw, tmp_path, monkeypatch):
    out, before = old_bundle
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    for target, message in [
        ("", "--out is empty"),
        (".", "not the current directory"),
        (tmp_path / "afile" / "o", "is a file, not a directory"),
        (tmp_path / "afile", "is a file"),
        (tmp_path / "dangling", "is a symbolic link"),
        (tmp_path / "link", "is a symbolic link"),
        (out / "inner", "is inside the edgetl bundle"),
    ]:
        result = build(recipe, "--out", target)
        refused(result, message)
        assert "[load]" not in result.output
    assert snapshot(out) == before and (tmp_path / "afile").read_text() == "x"
    assert leftovers(tmp_path) == []


def test_unwritable_parent_and_a_full_disk_are_one_line_and_publish_nothing(
    old_bundle, tiny_raw, tmp_path, monkeypatch
):
    import errno
    import tempfile

    import edgetl.stages.bundle as bundle_stage

    out, before = old_bundle
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:  # what a read-only parent does (root, as in CI, may write anywhere)
        m.setattr(tempfile, "mkdtemp", denied)
        refused(build(recipe, "--out", out), "cannot write the bundle next to")

    def full(state, recipe):
        (state.workdir / "model.onnx").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_stage, "run", full)
    refused(build(recipe, "--out", out, "--set", "finetune.epochs=1"), "no space left on the device")
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_logs_get_one_line_per_epoch_and_no_known_harmless_warnings(tmp_path, tiny_raw):
    """Not a terminal (CI, | tee): no progress bar redrawn per step, a line per epoch; ORT's optimizer and
    quantizer advice stays out of the log."""
    tiny_raw["quantize"] = {"method": "ptq", "calibration_size": 32, "float_leading_convs": 0}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl.cli", "build", recipe, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "\r" not in log and "step/s" not in log
    assert "finetune (full) epoch 1/2: train loss" in log and "finetune (full) epoch 2/2" in log
    assert "Please consider" not in log and "Serializing optimized model" not in log
    assert len(log.splitlines()) < 80


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_one_line(tmp_path, tiny_raw):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(build(write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", ro / "o"), "cannot write the bundle")
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------------
# 8. leftovers of killed builds


def test_a_killed_builds_leftovers_are_cleaned_and_an_interrupted_publish_restored(old_bundle, tiny_raw, tmp_path):
    from edgetl.pipeline import _clean_leftovers

    out, before = old_bundle
    dead = tmp_path / ".out.999999999.abc.partial"  # no such pid: its build was killed
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}.xyz.partial"  # a build still running
    live.mkdir()
    out.rename(tmp_path / ".out.old")  # killed between the two renames of publish
    _clean_leftovers(out)
    assert not dead.exists() and live.is_dir() and snapshot(out) == before
    assert not (tmp_path / ".out.old").exists()


def test_sigterm_says_what_happened_and_leaves_nothing(tmp_path, tiny_raw):
    tiny_raw["finetune"]["epochs"] = 50
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetl.cli", "build", recipe, "--out", str(tmp_path / "o")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = ""
    while "[finetune]" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "terminated; no bundle was written"
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# 9. usage errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "--bogus"], "No such option '--bogus'"),
        (["build"], "Missing argument 'RECIPE'"),
        (["bench", "x.onnx", "--runs", "0"], "--runs"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    refused(CliRunner().invoke(main, args), message)


def test_runner_usage_errors_are_one_line(bundle):
    proc = subprocess.run(
        [sys.executable, str(bundle[0] / "runner.py"), str(bundle[0]), "bench", "--runs", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --runs must be >= 1 (see: runner.py --help)"
    ]
    proc = subprocess.run([sys.executable, str(bundle[0] / "runner.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# the device side: slim copies, a user's own model file, predict --json, golden-set verification


def _runner(out: Path, *args):
    return subprocess.run([sys.executable, str(out / "runner.py"), str(out), *args], capture_output=True, text=True)


def test_golden_set_passes_on_this_machine_and_is_small(bundle):
    out = bundle[0]
    proc = _runner(out, "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("verify PASS: ") and "golden inputs" in proc.stdout
    result = json.loads(_runner(out, "verify", "--json").stdout)
    assert result["passed"] and result["n"] >= 4 and result["top1_agreement"] == 1.0
    assert result["max_abs_diff"] <= result["tolerance"]
    assert (out / "golden.bin").stat().st_size <= 512 * 1024
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_golden_set_fails_when_the_device_computes_something_else(old_bundle):
    out, _ = old_bundle
    spec = json.loads((out / "golden.json").read_text())["outputs"]
    raw = bytearray((out / "golden.bin").read_bytes())
    first = spec["offset"] + 4 * spec["shape"][-1]  # the first example's outputs, float32
    first_row = np.frombuffer(bytes(raw[spec["offset"] : first]), np.float32)
    raw[spec["offset"] : first] = (-first_row).tobytes()  # what a broken kernel or preprocessing would give
    (out / "golden.bin").write_bytes(bytes(raw))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["golden.bin"] = sha256(out / "golden.bin")
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = _runner(out, "verify")
    assert proc.returncode == 1 and proc.stdout.startswith("verify FAIL: ")
    result = json.loads(_runner(out, "verify", "--json").stdout)
    assert result["passed"] is False and result["max_abs_diff"] > result["tolerance"]


def test_a_slim_device_copy_runs_without_reference_files(old_bundle, tmp_path):
    out, _ = old_bundle
    for name in ("model.fp32.onnx", "report.html", "report.json", "recipe.lock.yaml", "golden.json", "golden.bin"):
        (out / name).unlink(missing_ok=True)
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8), 128).save(png)
    proc = _runner(out, "predict", str(png), "--json")
    assert proc.returncode == 0, proc.stderr
    top = json.loads(proc.stdout)[0]["top"]
    assert len(top) == 3 and abs(sum(t["prob"] for t in top)) <= 1.0 + 1e-6
    proc = _runner(out, "verify")
    assert proc.returncode == 2 and "has no golden.json (it was left out)" in proc.stderr
    (out / "labels.json").unlink()  # needed to run: its absence is an error
    proc = _runner(out, "predict", str(png))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: bundle file missing: labels.json"


def test_a_model_file_the_user_made_runs_marked_unverified(old_bundle):
    out, _ = old_bundle
    from edgetl.stages.ort_format import convert

    convert(out / "model.onnx", out / "model.user.ort")
    proc = _runner(out, "bench", "--model", "model.user.ort", "--runs", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["model"] == "model.user.ort" and stats["model_verified"] is False
    assert json.loads(_runner(out, "bench", "--runs", "3", "--json").stdout)["model_verified"] is True
    proc = _runner(out, "bench", "--model", "../model.onnx")
    assert proc.returncode == 2 and "only plain file names" in proc.stderr
