"""End to end through the CLI: the bundle, its manifest, atomic writes and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.runner import Bundle, sha256, verify_manifest
from tests.conftest import write_recipe

BUNDLE_FILES = {
    "model.onnx",
    "labels.json",
    "preprocess.json",
    "recipe.lock.yaml",
    "report.json",
    "report.html",
    "runner.py",
    "golden.json",
    "golden.bin",
    "manifest.json",
}


def test_build_writes_a_complete_verified_bundle(bundle):
    out, output = bundle
    assert {p.name for p in out.iterdir()} == BUNDLE_FILES
    manifest = verify_manifest(out)
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    assert manifest["files"]["model.onnx"] == sha256(out / "model.onnx")
    report = json.loads((out / "report.json").read_text())
    row = report["rows"][0]
    assert row["file"] == "model.onnx" and row["metric_ort"] > 30  # digits: chance is 10%
    assert abs(row["metric_ort"] - row["metric_torch"]) < 1.0
    assert row["p50_ms"] > 0 and row["params"] > 0 and row["macs"] > 0
    assert report["history"]["finetune"][0]["epoch"] == 1
    lock = (out / "recipe.lock.yaml").read_text()
    assert "epochs: 3" in lock and "onnxruntime:" in lock  # the --set override and the versions are recorded
    assert "bundle:" in output and "ORT parity" in output


def test_onnx_carries_labels_and_preprocessing(bundle):
    out, _ = bundle
    model = onnx.load(str(out / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edgetl.labels"]) == [str(i) for i in range(10)]
    assert json.loads(meta["edgetl.preprocess"])["crop"] == 32
    assert model.opset_import[0].version >= 17
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param  # dynamic batch axis


def test_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle[0], copy)
    with open(copy / "labels.json", "a") as f:
        f.write(" ")
    result = CliRunner().invoke(main, ["predict", str(copy), "x.png"])
    assert result.exit_code == 2 and "(sha256 mismatch): labels.json" in result.output
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["labels.json"]  # a swapped file whose entry was removed from the manifest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["predict", str(copy), "x.png"])
    assert result.exit_code == 2 and "manifest.json does not list labels.json" in result.output
    (copy / "manifest.json").write_text("{not json")
    result = CliRunner().invoke(main, ["predict", str(copy), "x.png"])
    assert result.exit_code == 2 and "is not a valid edgetl manifest" in result.output
    proc = subprocess.run(
        [sys.executable, str(copy / "runner.py"), str(copy), "bench", "--runs", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {copy / 'manifest.json'} is not a valid edgetl manifest (corrupt JSON or no 'files' map)"
    ]


def _png(tmp_path, digit=3):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path / f"digit{digit}.png"
    Image.fromarray((d.images[d.target == digit][0] * 15.9).astype(np.uint8)).save(path)
    return path


def test_predict_cli_and_standalone_runner_agree_without_torch(bundle, tmp_path):
    out, _ = bundle
    img = _png(tmp_path)
    result = CliRunner().invoke(main, ["predict", str(out), str(img), "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    cli_top = json.loads(result.output)[0]["top"]
    assert len(cli_top) == 2 and cli_top[0]["prob"] >= cli_top[1]["prob"]
    # the bundle's runner.py with torch and edgetl made unimportable
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.modules['edgetl'] = None; "
        f"sys.argv = ['runner.py', {str(out)!r}, 'predict', {str(img)!r}, '--top-k', '2']; "
        f"runpy.run_path({str(out / 'runner.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\t")[1].split()[0] == cli_top[0]["label"]


def test_runner_bench_json(bundle):
    out, _ = bundle
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "bench", "--runs", "5", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["p50_ms"] > 0 and stats["p50_ms"] <= stats["p99_ms"] and stats["runs"] == 5 and stats["batch"] == 1
    assert stats["providers"] == ["CPUExecutionProvider"] and stats["model"] == "model.onnx"


def test_bench_command(bundle):
    result = CliRunner().invoke(main, ["bench", str(bundle[0] / "model.onnx"), "--runs", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["p90_ms"] > 0
    bad = bundle[0].parent / "bad.onnx"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(main, ["bench", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("error: ONNX Runtime cannot load")


def test_bundle_runner_matches_edgetl_accuracy(bundle):
    """The device runner's preprocessing is the one accuracy was measured with."""
    from edgetl.config import DataCfg
    from edgetl.data import load_data

    out, _ = bundle
    b = Bundle(out)
    d = load_data(DataCfg(kind="digits"), b.preprocess, seed=0)
    acc = 100 * float((b.logits_from_arrays(d.test.images).argmax(-1) == d.test.labels).mean())
    report = json.loads((out / "report.json").read_text())
    assert acc == pytest.approx(report["rows"][0]["metric_ort"], abs=1e-6)


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["finetune"].update(epochz=1), "unknown recipe key 'finetune.epochz'"),
        (lambda r: r["backbone"].update(name="timm:nonexistent_net"), "unknown timm model"),
        (lambda r: r.update(data={"kind": "folder", "path": "/definitely/missing"}), "data folder not found"),
        (lambda r: r["finetune"].update(lr="fast"), "'finetune.lr'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, tiny_raw, mutate, message):
    mutate(tiny_raw)
    out = tmp_path / "out"
    result = _invoke("build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out))
    assert result.exit_code == 2
    assert message in result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_bad_input_as_a_real_process_prints_one_line(tmp_path, tiny_raw):
    tiny_raw["data"] = {"kind": "folder", "path": str(tmp_path / "nope")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetl.cli",
            "build",
            write_recipe(tmp_path / "r.yaml", tiny_raw),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data folder not found: {tmp_path / 'nope'}"]


def test_failed_build_keeps_the_old_bundle_and_leaves_no_partial(tmp_path, tiny_raw, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    out = tmp_path / "out"
    assert _invoke("build", recipe, "--out", str(out), "--set", "finetune.epochs=1").exit_code == 0
    before = sha256(out / "model.onnx")

    import edgetl.stages.bundle as bundle_stage

    def explode(state, recipe):
        (state.workdir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_stage, "run", explode)
    result = _invoke("build", recipe, "--out", str(out))
    assert result.exit_code != 0
    assert sha256(out / "model.onnx") == before  # the previous bundle is untouched
    verify_manifest(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_gate_fails_the_build_but_keeps_the_measurements(tmp_path, tiny_raw):
    tiny_raw["verify"]["min_accuracy"] = 100.0  # not reached by a tiny net after one epoch
    out = tmp_path / "out"
    result = _invoke(
        "build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out), "--set", "finetune.epochs=1"
    )
    assert result.exit_code == 2
    assert "gate min_accuracy failed" in result.output
    error = result.stderr.strip().splitlines()[-1]  # with the same --set
    assert "to search for a model inside the gates: edgetl search " in error
    assert error.endswith("--set finetune.epochs=1")
    assert not out.exists()
    assert (tmp_path / "out.failed-report.html").is_file()
    report = json.loads((tmp_path / "out.failed-report.json").read_text())
    assert report["metrics"]["verify"]["gates"][0]["passed"] is False and report["rows"]
    result = _invoke(
        "build",
        write_recipe(tmp_path / "r.yaml", tiny_raw),
        "--out",
        str(out),
        "--set",
        "finetune.epochs=1",
        "--set",
        "verify.min_accuracy=",
    )
    assert result.exit_code == 0, result.output  # a later good build removes the stale failed report
    assert not list(tmp_path.glob("out.failed-report.*")) and (out / "manifest.json").is_file()


def test_output_that_is_not_a_bundle_is_refused_before_any_stage(tmp_path, tiny_raw):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _invoke("build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out))
    assert result.exit_code == 2 and "is not an edgetl bundle (" in result.output
    assert "[load]" not in result.output and (out / "notes.txt").read_text() == "mine"


def test_summary_prints_na_where_macs_could_not_be_counted():
    from types import SimpleNamespace

    from edgetl.cli import summary

    row = {
        "stage": "fp32",
        "file": "model.onnx",
        "metric_torch": 90.0,
        "metric_ort": 90.0,
        "agreement": 100.0,
        "p50_ms": 1.0,
        "p90_ms": 1.2,
        "size_mb": 2.0,
        "params": 2_000_000,
        "macs": None,
    }
    text = summary(SimpleNamespace(workdir="out", rows=[row], metrics={}))
    assert text.splitlines()[-1].split()[-2:] == ["2.00M", "n/a"]


def test_help_teaches():
    result = _invoke("--help")
    assert result.exit_code == 0 and "edgetl build" in result.output
    result = _invoke("build", "--help")
    assert "gradual_unfreeze" in result.output and "--set" in result.output
    from edgetl.pipeline import _stages

    assert all(f"  {name} " in result.output for name, *_ in _stages())  # every stage is explained


def test_export_parity_gate_fails_the_build(tmp_path, tiny_raw):
    result = _invoke(
        "build",
        write_recipe(tmp_path / "r.yaml", tiny_raw),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "finetune.epochs=1",
        "--set",
        "export.atol=1e-12",
        "--set",
        "export.rtol=0",
    )
    assert result.exit_code == 2 and "does not match PyTorch" in result.output
    assert "raise export.rtol if predictions agree" in result.output  # the error says what to change


def test_parity_tolerance_scales_with_the_outputs():
    """A 0.00114 difference on logits of magnitude 20 with every top-1 equal is float noise, not a broken export (a
    build failed on that with an absolute tolerance); the same difference on logits of magnitude 0.01 is not."""
    from edgetl.tasks import create_task

    task = create_task("classification", ["a", "b"])
    ref = np.array([[20.0, -3.0], [-5.0, 18.0]], np.float32)
    got = ref + np.float32(0.00114)
    big = task.parity([ref], [got], atol=1e-3, rtol=1e-4)
    assert big.ok and big.agreement == 1.0 and big.tolerance == pytest.approx(1e-3 + 1e-4 * 20.0)
    small = task.parity([ref / 2000], [ref / 2000 + np.float32(0.00114)], atol=1e-3, rtol=1e-4)
    assert not small.ok


def test_ort_mobile_format_is_written_and_loads(tmp_path, tiny_raw):
    import onnxruntime as ort

    tiny_raw["finetune"]["epochs"] = 1
    tiny_raw["export"] = {"ort_format": True}
    out = tmp_path / "o"
    result = _invoke("build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "model.ort" in verify_manifest(out)["files"]
    sess = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 3, 32, 32), np.float32)
    ref = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], ref, atol=1e-4)
    info = json.loads((out / "report.json").read_text())["metrics"]["ort_format"]
    assert info["file"] == "model.ort" and isinstance(info["nnapi_or_coreml_worth_trying"], bool) and info["log"]


def test_missing_execution_provider_is_one_line_listing_available(bundle, tmp_path, tiny_raw):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the missing-provider path cannot be shown")
    result = _invoke("bench", str(bundle[0] / "model.onnx"), "--providers", "cuda")
    assert result.exit_code == 2
    assert result.output.strip() == "error: execution provider 'cuda' is not available here; available: cpu"
    tiny_raw["verify"]["providers"] = ["cpu", "tensorrt"]
    result = _invoke(
        "build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(tmp_path / "o"), "--set", "finetune.epochs=1"
    )
    assert result.exit_code == 2 and "verify.providers: execution provider 'tensorrt' is not available" in result.output
    assert "[load]" not in result.output  # checked before the first stage, not after training


def test_gpu_providers_measure_latency_and_parity(bundle):
    """Runs on a machine with onnxruntime-gpu; elsewhere it says why it is skipped."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider in this onnxruntime build (CPU-only machine)")
    result = _invoke("bench", str(bundle[0] / "model.onnx"), "--providers", "cuda", "--runs", "20", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["providers"][0] == "CUDAExecutionProvider"


def test_runner_bench_reports_memory_and_device(bundle):
    proc = subprocess.run(
        [sys.executable, str(bundle[0] / "runner.py"), str(bundle[0]), "bench", "--runs", "5", "--json"],
        capture_output=True,
        text=True,
    )
    stats = json.loads(proc.stdout)
    assert stats["peak_rss_mb"] > 10 and stats["throughput_per_s"] > 0
    from edgetl.runner import cpu_int8_features

    flags = {f for f, on in cpu_int8_features().items() if on and f != "vnni_or_dot"}
    device = stats["device"]
    assert set(device["int8"]) == flags and device["cores"] == os.cpu_count() and device["cpu"]  # this machine's


def test_provider_rows_measure_latency_and_parity_on_the_cpu_provider(bundle, tmp_path):
    """verify.providers' rows (latency + parity against FP32 on the CPU EP, per precision) run here on the CPU EP
    itself: FP32 against itself agrees exactly, so a broken comparison shows; the FP16 copy (ORT's converter, float32
    inputs and outputs kept) differs a little and decodes the same."""
    from types import SimpleNamespace

    import onnx

    from edgetl.measure import provider_rows
    from edgetl.onnx_export import to_fp16
    from edgetl.runner import session
    from edgetl.tasks import create_task

    task = create_task("classification", [str(i) for i in range(10)])
    feed = {"input": np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)}
    cfg = SimpleNamespace(providers=("cpu",), threads=1, runs=5, warmup=1)
    fp16 = to_fp16(bundle[0] / "model.onnx", tmp_path / "model.fp16.onnx")
    proto = onnx.load(str(fp16))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # apps feed float32 still
    assert {t.data_type for t in proto.graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    rows = provider_rows(
        task, {"fp32": bundle[0] / "model.onnx", "fp16": fp16}, cfg, feed, {"input": feed["input"][:1]}
    )
    assert [(r["provider"], r["precision"]) for r in rows] == [("CPUExecutionProvider", p) for p in ("fp32", "fp16")]
    assert rows[0]["max_abs_diff_vs_cpu_fp32"] == 0.0 and rows[0]["agreement_vs_cpu_fp32"] == 100.0
    scale = float(np.abs(session(bundle[0] / "model.onnx").run(None, feed)[0]).max())
    assert 0 < rows[1]["max_abs_diff_vs_cpu_fp32"] < 0.01 * scale, scale  # float16 keeps ~3 significant digits
    assert rows[1]["agreement_vs_cpu_fp32"] >= 87.5  # at most 1 of 8 random inputs with a near tie decodes apart
    assert rows[1]["p50_ms"] > 0 and rows[1]["file"] == "model.fp16.onnx"
