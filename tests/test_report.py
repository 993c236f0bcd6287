"""report.html: self-contained (inline PNGs only, nothing fetched), shows gates, classes and every plot, and
renders a report with most keys missing without failing."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgetl.report import write_html

CLASSES = ["cat", "dog", "<bird>"]  # the angle brackets check escaping


def _row(stage: str, shipped: bool, confusion: list, **kw) -> dict:
    row = {
        "stage": stage,
        "file": "model.onnx" if shipped else f"{stage}.onnx",
        "metric_torch": 80.0,
        "metric_ort": 79.5,
        "agreement": 98.0,
        "params": 123456,
        "macs": 7890123,
        "size_mb": 1.5,
        "p50_ms": 1.2,
        "p90_ms": 1.4,
        "threads": 1,
        "speedup_vs_fp32": 1.0,
        "shipped": shipped,
        "confusion": confusion,
    }
    return {**row, **kw}


FULL = {
    "name": "synthetic",
    "backbone": "timm:mobilenetv3_small_050",
    "classes": CLASSES,
    "splits": {"train": 100, "val": 20, "test": 30},
    "rows": [
        _row("fp32", False, [[9, 1, 0], [1, 8, 1], [0, 0, 10]], size_mb=6.0),
        _row("pruned", False, [[8, 2, 0], [1, 8, 1], [0, 1, 9]], size_mb=3.0, p50_ms=0.8, speedup_vs_fp32=1.5),
        _row("qat", True, [[10, 0, 0], [2, 7, 1], [0, 1, 9]], size_mb=0.9, p50_ms=0.5, speedup_vs_fp32=2.4),
    ],
    "history": {
        "finetune": [
            {"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_metric": 60.0},
            {"epoch": 2, "train_loss": 0.7, "val_loss": None, "val_metric": 75.0},
        ],
        "prune": [],
        "qat": [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "val_metric": 78.0}],
    },
    "metrics": {
        "export": {"opset": 17, "fp32": {"max_abs_diff": 4e-7, "agreement": 1.0, "n": 20, "atol": 1e-3}},
        "quantize": {
            "chosen": "qat",
            "speedup_vs_fp32": 2.4,
            "speed_threads": 1,
            "reduce_range": True,
            "float_compute_ops_left": 0,
            "cpu_int8": {"avx2": True, "avx512_vnni": False},
            "notes": ["QAT beat PTQ on validation"],
        },
        "verify": {
            "shipped": "qat",
            "gates": [
                {"gate": "min_accuracy", "value": 79.5, "limit": 70.0, "passed": True},
                {"gate": "max_size_mb", "value": 0.9, "limit": 0.5, "passed": False},
            ],
        },
    },
    "device": {"cpu": "Test CPU", "machine": "x86_64", "cores": 2, "onnxruntime": "1.0", "int8": ["avx2"]},
    "versions": {"edgetl": "0.1.0", "onnxruntime": "1.0"},
}
MINIMAL = {"name": "bare", "rows": [{"stage": "fp32", "file": "model.onnx", "metric_ort": None, "shipped": True}]}


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        self.links += [v for k, v in attrs if k in ("href", "src") and v]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _build(tmp_path: Path, report: dict) -> tuple[Path, _Collect]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "report.json").write_text(json.dumps(report))
    path = write_html(tmp_path)
    assert path == tmp_path / "report.html" and path.is_file()
    html = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(html)
    parser.close()
    assert not re.search(r"https?://", html), "the page must not reference anything on the network"
    assert "not rendered" not in html, "a section failed on a schema-correct report"
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert all(link.startswith("data:") for link in parser.links)
    return path, parser


def test_full_report_is_self_contained_and_complete(tmp_path):
    _, page = _build(tmp_path, FULL)
    text = " ".join(page.text)
    # scatter, training curves, confusion matrix, per-class change
    assert len(page.imgs) == 4
    for needle in ("min_accuracy", "max_size_mb", "PASS", "FAIL", "QAT beat PTQ on validation", "Test CPU", "avx2"):
        assert needle in text
    assert "<bird>" in text  # escaped in the source, the text reads back as written
    assert "<bird>" not in (tmp_path / "report.html").read_text()


def test_missing_keys_still_render(tmp_path):
    _, page = _build(tmp_path / "bare", MINIMAL)
    text = " ".join(page.text)
    assert "bare" in text and "no gates" in text and "no confusion matrix" in text
    # a teacher that ships compares with nothing; null history values and missing confusion are skipped
    partial = copy.deepcopy(FULL)
    partial["rows"][0]["shipped"], partial["rows"][2]["shipped"] = True, False
    del partial["rows"][1]["confusion"]
    partial["history"] = {"finetune": [{"epoch": 1, "train_loss": None, "val_loss": None, "val_metric": None}]}
    del partial["metrics"]["quantize"], partial["device"], partial["classes"]
    _, page = _build(tmp_path / "partial", partial)
    assert len(page.imgs) == 3  # no per-class change: the shipped model is the teacher


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_renders_in_a_browser(tmp_path):
    path, _ = _build(tmp_path, FULL)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
