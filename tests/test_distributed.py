"""Several processes, one build: torchrun starts two CPU processes (gloo) and the training stages run in DDP, each
on half the batches; only the main process writes the bundle. Plus the train section in one process (bf16,
gradient accumulation) and the settings this machine refuses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import write_recipe
from tests.tiny import make_tiny_bert, text_recipe, write_reviews


def _torchrun(args: list[str], tmp_path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m edgetl ARGS`` with a private TMPDIR (to see what is left)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "edgetl", *args],
        env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _edgetl(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgetl", *args], env=os.environ, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def text_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    raw = text_recipe(make_tiny_bert(d / "bert"), write_reviews(d / "reviews.csv"))
    raw["data"]["batch_size"] = 16  # per process
    return d, raw


def test_two_processes_share_the_batches_and_the_main_one_writes_the_bundle(text_case, tmp_path):
    d, raw = text_case
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    # one process with a step every 2 batches of 16 = the same effective batch (32) and steps as 2 x 16
    one = _edgetl(["build", recipe, "--out", str(tmp_path / "one"), "--set", "train.gradient_accumulation_steps=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(["build", recipe, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])

    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert r1["metrics"]["train"]["processes"] == 1 and r2["metrics"]["train"]["processes"] == 2
    for stage in ("finetune", "prune", "distill"):  # every training stage ran in both processes
        for a, b in zip(r1["history"][stage], r2["history"][stage], strict=False):
            assert a["processes"] == 1 and b["processes"] == 2
            assert b["batches"] == math.ceil(a["batches"] / 2)  # each process saw half the batches
            assert a["steps"] == math.ceil(a["batches"] / 2)  # accumulation: a step every 2 batches
            assert b["steps"] == b["batches"]
    # the same effective batch and number of steps: the fine-tuned model is as good (the data is easy)
    m1, m2 = r1["metrics"]["finetune"]["test_metric"], r2["metrics"]["finetune"]["test_metric"]
    assert m1 > 80 and abs(m1 - m2) <= 5, (m1, m2)

    # one bundle, written once; the other process printed nothing and left nothing behind
    assert two.stdout.count("[finetune]") == 1 and two.stdout.count("bundle: ") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".two")) == []
    assert list((tmp_path / "tmpdir").glob("edgetl-rank*")) == []  # (torchrun leaves its own torchelastic_*)
    from edgetl.pipeline import is_bundle

    assert is_bundle(tmp_path / "two") is None

    # the main process saved the stages; a rerun with a longer distillation resumes after prune in both processes
    again = _torchrun(["build", recipe, "--out", str(tmp_path / "two"), "--set", "distill.epochs=2"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[finetune] cached (" in again.stdout and "[prune] cached (" in again.stdout
    assert "[distill] cached" not in again.stdout
    r3 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [h["processes"] for h in r3["history"]["distill"]] == [2, 2]
    assert r3["history"]["finetune"] == r2["history"]["finetune"]


def test_processes_that_drift_apart_fail(tmp_path):
    """The weights checksum compared at the end of every fit: a process whose model differs stops the build."""
    script = tmp_path / "drift.py"
    script.write_text(
        "import torch\n"
        "from edgetl import distributed\n"
        "from edgetl.errors import EdgetlError\n"
        "distributed.accelerator()\n"
        "m = torch.nn.Linear(3, 2)\n"
        "torch.nn.init.constant_(m.weight, 1.0)\n"
        "torch.nn.init.zeros_(m.bias)\n"
        "distributed.check_same(m, 'same')\n"
        "if distributed.rank() == 1:\n"
        "    m.weight.data[0, 0] += 1e-3\n"
        "try:\n"
        "    distributed.check_same(m, 'drifted')\n"
        "except EdgetlError as e:\n"
        f"    open(r'{tmp_path}/rank%d.txt' % distributed.rank(), 'w').write(str(e))\n"
        "distributed.finish()\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # (each process writes its own file: the two stdouts interleave)
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert said.startswith("drifted: the 2 processes ended with different weights"), said


def test_bf16_training_exports_an_fp32_model(text_case, tmp_path):
    d, raw = text_case
    raw = {**raw, "prune": None, "distill": None, "quantize": None, "train": {"mixed_precision": "bf16"}}
    proc = _edgetl(["build", write_recipe(tmp_path / "r.yaml", raw), "--out", str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import onnx

    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    bf16 = onnx.TensorProto.BFLOAT16
    assert all(t.data_type != bf16 for t in model.graph.initializer)  # autocast in training only
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["metrics"]["train"]["mixed_precision"] == "bf16"
    assert report["metrics"]["finetune"]["test_metric"] > 80


def test_fp16_without_a_gpu_is_one_line(tiny_raw, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: fp16 is allowed")
    from click.testing import CliRunner

    from edgetl.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", tiny_raw)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", recipe, "--out", str(out), "--set", "train.mixed_precision=fp16"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: train.mixed_precision: fp16 needs a CUDA GPU; on a CPU use bf16 or fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # refused before anything was written
