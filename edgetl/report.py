"""Render a bundle's report.json as one self-contained HTML page: plots are inline base64 PNGs, styles are inline,
nothing is fetched, so the file can be mailed or opened offline next to the bundle.

Every key except ``name`` and ``rows`` is optional (a build without finetune has no history, older reports have
no confusion matrices): sections render what exists and say what is missing. The task adds its own sections
(classification: the confusion matrix and the per-class change), found by the report's ``task``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

COLUMNS = {
    "stage": "stage",
    "file": "file",
    "metric_torch": "{metric} PyTorch",
    "metric_ort": "{metric} ORT",
    "agreement": "agrees w/ teacher %",
    "params": "params",
    "macs": "MACs",
    "size_mb": "size MB",
    "p50_ms": "p50 ms",
    "p90_ms": "p90 ms",
    "speedup_vs_fp32": "speed-up vs fp32",
    "ttft_ms": "first token ms",
    "tokens_per_s": "tokens / s",
    "shipped": "ships",
}
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:92%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3;font-size:90%}td:first-child,th:first-child{text-align:left}tr.ship{background:#e8f4ff;font-weight:600}
.pass{color:#16794a;font-weight:600}.fail{color:#b3261e;font-weight:600}.muted{color:#777}
img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
    "torch-pruning",
    "numpy",
    "scikit-learn",
    "transformers",
    "optimum",
    "optimum-onnx",
    "tokenizers",
)


def versions() -> dict:
    """edgetl's, Python's and every library's version (each artifact carries them)."""
    import platform
    from importlib import metadata

    from edgetl import __version__

    out = {"edgetl": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_report(state) -> Path:
    """report.json in the state's work dir: every row, history, stage metric, timing, the machine and versions."""
    from edgetl.runner import device_info

    task = state.task
    report = {
        "name": state.recipe.name,
        "task": task.name if task else None,
        "metric": {"name": task.metric_name, "higher_is_better": task.higher_is_better} if task else None,
        "backbone": state.recipe.backbone.name,
        "classes": state.data.classes if state.data else None,
        "splits": {s: len(getattr(state.data, s)) for s in ("train", "val", "test")} if state.data else None,
        "rows": state.rows,
        "history": state.history,
        "metrics": state.metrics,
        "timings_s": state.timings,
        "device": device_info(),
        "versions": versions(),
    }
    path = state.workdir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def write_html(bundle_dir: str | Path) -> Path:
    """Read ``bundle_dir/report.json``, write ``bundle_dir/report.html`` beside it and return its path."""
    bundle_dir = Path(bundle_dir)
    report = json.loads((bundle_dir / "report.json").read_text())
    path = bundle_dir / "report.html"
    path.write_text(render(report), encoding="utf-8")
    return path


def render(report: dict) -> str:
    """The whole page as a string; a section that cannot be drawn shows a note instead of failing the build."""
    name = escape(str(report.get("name", "edgetl bundle")))
    from edgetl.tasks import report_sections

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: edgetl report</title>"
        f"<style>{CSS}</style></head><body>"
    ]
    sections = SECTIONS[:4] + report_sections(report.get("task")) + SECTIONS[4:]
    for title, section in sections:
        try:
            body = section(report)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
            body = f"<p class='muted'>not rendered: {escape(type(e).__name__)}: {escape(str(e))}</p>"
        if body:
            parts.append((f"<h2>{escape(title)}</h2>" if title else "") + body)
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}"
    return escape(str(v))


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
        for i, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Any) -> str:
    """A matplotlib Figure as an inline <img> (data: URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _figure(w: float, h: float, ncols: int = 1) -> tuple[Any, Any]:
    # Figure + Agg directly, not pyplot: no global backend switch, no GUI, safe inside any process
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(1, ncols)


def _shipped(report: dict) -> dict | None:
    return next((r for r in report.get("rows") or [] if r.get("shipped")), None)


def _row(report: dict, stage: str) -> dict | None:
    return next((r for r in report.get("rows") or [] if r.get("stage") == stage), None)


def _classes(report: dict, n: int) -> list[str]:
    classes = report.get("classes") or []
    return [str(c) for c in classes] if len(classes) == n else [str(i) for i in range(n)]


def _rotation(names: list[str]) -> dict:
    """Slanted tick labels only when class names are long enough to collide."""
    return {"rotation": 45, "ha": "right"} if max(map(len, names), default=0) > 3 else {}


def _metric_name(report: dict) -> str:
    return str((report.get("metric") or {}).get("name") or "metric")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


# ---------------------------------------------------------------------------------------------------------------
# sections: each takes the report and returns HTML ("" = nothing to show)


def header(report: dict) -> str:
    m = report.get("metrics") or {}
    ship = _shipped(report)
    shipped = (
        ship["stage"] if ship else ((m.get("bundle") or {}).get("shipped") or (m.get("verify") or {}).get("shipped"))
    )
    splits = report.get("splits") or {}
    failed = (m.get("verify") or {}).get("failed")
    classes = [str(c) for c in report.get("classes") or []]
    names = ", ".join(classes[:30]) + (", ..." if len(classes) > 30 else "")
    items = [
        ("backbone", report.get("backbone")),
        ("classes", f"{len(classes)} ({names})" if classes else None),
        ("train / val / test", " / ".join(_fmt(splits.get(s)) for s in ("train", "val", "test")) if splits else None),
        ("would ship" if failed else "ships", f"{shipped} ({ship.get('file')})" if ship else shipped),
        ("training", _training(m.get("train"))),
        ("input resolution", _resized((m.get("prune") or {}).get("input_size"))),
    ]
    lines = "".join(f"<li><b>{escape(k)}</b>: {escape(str(v))}</li>" for k, v in items if v is not None)
    banner = "<p class='fail'>BUILD FAILED: a gate was not met, nothing was shipped</p>" if failed else ""
    return f"<h1>{escape(str(report.get('name', '')))}</h1>{banner}<ul>{lines}</ul>"


def _resized(size: int | None) -> str | None:
    if size is None:
        return None
    return f"{size} px, resized inside the model (prune.input_size); the bundle's input keeps the fine-tuned size"


def _training(train: dict | None) -> str | None:
    """How the training stages ran: processes, device, precision, accumulation (older reports have none)."""
    if not train:
        return None
    n = train.get("processes", 1)
    parts = [f"{n} processes (DDP)" if n > 1 else "1 process", f"device {train.get('device', 'auto')}"]
    if train.get("mixed_precision", "fp32") != "fp32":
        parts.append(f"{train['mixed_precision']} mixed precision")
    if train.get("gradient_accumulation_steps", 1) > 1:
        parts.append(f"a step every {train['gradient_accumulation_steps']} batches")
    return ", ".join(parts)


def models_table(report: dict) -> str:
    rows = report.get("rows") or []
    if not rows:
        return "<p class='muted'>no models were measured</p>"
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c)) if c != "file" or r.get("in_bundle", True) else "-" for c in cols] for r in rows]
    note = (
        "<p class='muted'>test set; agreement = predictions equal to the fine-tuned teacher's; latency at batch 1; "
        "file - = measured during the build, not shipped in the bundle</p>"
    )
    header = [COLUMNS[c].format(metric=_metric_name(report)) for c in cols]
    return _table(header, cells, ["ship" if r.get("shipped") else "" for r in rows]) + note


def tradeoff_plot(report: dict) -> str:
    pts = [r for r in report.get("rows") or [] if r.get("metric_ort") is not None and r.get("p50_ms") is not None]
    if not pts:
        return ""
    fig, ax = _figure(7, 4.2)
    biggest = max(r.get("size_mb") or 0 for r in pts) or 1.0
    for i, r in enumerate(pts):
        size = 40 + 600 * (r.get("size_mb") or 0) / biggest
        ax.scatter(
            r["p50_ms"],
            r["metric_ort"],
            s=size,
            alpha=0.6,
            edgecolors="black" if r.get("shipped") else "none",
            linewidths=2,
        )
        label = r["stage"] + (" (ships)" if r.get("shipped") else "")
        ax.annotate(label, (r["p50_ms"], r["metric_ort"]), textcoords="offset points", xytext=(8, 6 if i % 2 else -12))
    metric = _metric_name(report)
    ax.set(
        xlabel="ORT p50 latency, batch 1 (ms)",
        ylabel=f"test {metric}, ORT",
        title=f"{metric} vs latency (marker area ~ model size)",
    )
    ax.margins(0.2)
    ax.grid(alpha=0.3)
    return _png(fig)


def search_section(report: dict) -> str:
    """edgetl search: every trial (validation metric vs speed-up, size as marker), the feasible Pareto front, the
    budget line and the shipped trial; a table of the front."""
    found = (report.get("metrics") or {}).get("search")
    if not found:
        return ""
    done = [t for t in found["trials"] if t.get("state") == "COMPLETE"]
    metric = _metric_name(report)
    fig, ax = _figure(7, 4.2)
    biggest = max((t["size_mb"] for t in done), default=1.0) or 1.0
    front = [t for t in done if t["number"] in found["front"]]
    for group, color, label in (
        ([t for t in done if not t["feasible"]], "#bbbbbb", "over budget"),
        ([t for t in done if t["feasible"] and t not in front], "#6aa0d8", "within budget"),
        (front, "#1f5fa8", "feasible Pareto front"),
    ):
        if group:
            ax.scatter(
                [t["speedup"] for t in group],
                [t["val_metric"] for t in group],
                s=[30 + 300 * t["size_mb"] / biggest for t in group],
                c=color,
                alpha=0.8,
                label=label,
            )
    line = sorted(front, key=lambda t: t["speedup"])
    if len(line) > 1:
        ax.plot([t["speedup"] for t in line], [t["val_metric"] for t in line], c="#1f5fa8", lw=1)
    chosen = next((t for t in done if t["number"] == found["chosen"]), None)
    if chosen:
        ax.scatter([chosen["speedup"]], [chosen["val_metric"]], marker="*", s=350, c="#d62728", label="shipped")
    if done and "max_metric_drop" in found["budget"]:
        sign = 1 if done[0]["higher_is_better"] else -1
        ax.axhline(
            done[0]["val_metric_fp32"] - sign * found["budget"]["max_metric_drop"],
            ls="--",
            c="#d62728",
            lw=1,
            label="budget (max drop)",
        )
    if "min_speedup" in found["budget"]:
        ax.axvline(found["budget"]["min_speedup"], ls=":", c="#d62728", lw=1, label="budget (min speed-up)")
    ax.set(
        xlabel=f"speed-up over FP32 ONNX (ORT p50, {found.get('threads', 1)} thread(s))",
        ylabel=f"validation {metric}, ORT",
        title=f"{len(found['trials'])} trials (marker area ~ model size)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rows = [
        [
            t["number"],
            escape(" ".join(f"{k.split('.')[1]}={v}" for k, v in t["params"].items())),
            f"{t['val_metric']:.2f}",
            f"{-t['val_drop']:+.2f}",
            f"{t['speedup']:.2f}x",
            f"{t['size_mb']:.2f}",
            "ships" if t["number"] == found["chosen"] else "",
        ]
        for t in sorted(front, key=lambda t: -t["speedup"])
    ]
    table = _table(["trial", "settings", f"val {metric}", "vs fine-tuned", "speed-up", "MB", ""], rows)
    failed = sum(t.get("state") == "FAIL" for t in found["trials"])
    note = (
        f"<p>Study <code>{escape(found['study'])}</code> in <code>{escape(found['storage'])}</code>; budget "
        f"{escape(str(found['budget'] or 'none'))}; {len(done)} trials measured"
        + (f", {failed} failed" if failed else "")
        + ". Trials are judged on validation; the shipped model's test rows are above.</p>"
    )
    return note + _png(fig) + "<p>The feasible Pareto front:</p>" + table


def training_curves(report: dict) -> str:
    history = {k: v for k, v in (report.get("history") or {}).items() if v}
    if not history:
        return ""
    fig, (loss, acc) = _figure(11, 3.8, ncols=2)
    x0 = 0  # stages follow each other on one axis, in pipeline order, so the build reads left to right
    for i, (stage, epochs) in enumerate(history.items()):
        xs = list(range(x0 + 1, x0 + len(epochs) + 1))
        color = f"C{i % 10}"
        loss.plot(xs, [_num(e.get("train_loss")) for e in epochs], "o-", color=color, label=f"{stage} train")
        loss.plot(xs, [_num(e.get("val_loss")) for e in epochs], "s--", color=color, label=f"{stage} val")
        acc.plot(xs, [_num(e.get("val_metric")) for e in epochs], "o-", color=color, label=stage)
        x0 += len(epochs)
    loss.set(xlabel="epoch (all stages in order)", ylabel="loss", title="loss (solid: train, dashed: val)")
    acc.set(
        xlabel="epoch (all stages in order)",
        ylabel=f"val {_metric_name(report)}",
        title=f"validation {_metric_name(report)}",
    )
    for ax in (loss, acc):
        ax.grid(alpha=0.3)
    fig.legend(*acc.get_legend_handles_labels(), loc="lower center", ncols=len(history), bbox_to_anchor=(0.5, -0.14))
    return _png(fig)


def parity(report: dict) -> str:
    export = (report.get("metrics") or {}).get("export") or {}
    roles = {k: v for k, v in export.items() if isinstance(v, dict)}
    if not roles:
        return ""
    rows = [
        [
            escape(k if "source" not in v else f"{k} (vs the {v['source']} FP32 ONNX model)"),
            _fmt(v.get("max_abs_diff")),
            _fmt(v.get("tolerance")),
            _fmt(v.get("agreement")),
            _fmt(v.get("n")),
        ]
        for k, v in roles.items()
    ]
    opset = f"<p>ONNX opset {_fmt(export.get('opset'))}</p>" if "opset" in export else ""
    return opset + _table(["model", "max |ORT - PyTorch|", "tolerance", "agreement", "inputs"], rows)


def gates(report: dict) -> str:
    found = ((report.get("metrics") or {}).get("verify") or {}).get("gates") or []
    if not found:
        return "<p class='muted'>no gates set in the recipe</p>"
    rows = [
        [
            escape(str(g.get("gate"))),
            _fmt(g.get("value")),
            _fmt(g.get("limit")),
            "<span class='pass'>PASS</span>" if g.get("passed") else "<span class='fail'>FAIL</span>",
        ]
        for g in found
    ]
    return _table(["gate", "value", "limit", "result"], rows)


def quantize_notes(report: dict) -> str:
    q = (report.get("metrics") or {}).get("quantize")
    if not q:
        return ""
    facts = [
        ("chosen INT8 model", (q.get("chosen") or "none (FP32 ships)") if "chosen" in q else None),
        (f"INT8 speed-up vs FP32, {q.get('speed_threads', 1)} thread(s)", q.get("speedup_vs_fp32")),
        ("7-bit weights (reduce_range)", q.get("reduce_range")),
        ("CPU int8 features", ", ".join(k for k, v in (q.get("cpu_int8") or {}).items() if v) or None),
        ("leading Convs kept FP32", q.get("float_leading_convs")),
        ("float compute ops left", q.get("float_compute_ops_left")),
    ]
    items = "".join(
        f"<li><b>{escape(k)}</b>: {_fmt(v) if not isinstance(v, bool) else str(v)}</li>"
        for k, v in facts
        if v is not None
    )
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in q.get("notes") or [])
    return f"<h2>Quantization</h2><ul>{items}</ul>" + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "")


def providers(report: dict) -> str:
    """verify.providers x precision: latency and agreement with the FP32 model on the CPU EP."""
    found = ((report.get("metrics") or {}).get("verify") or {}).get("providers") or []
    if not found:
        return ""
    rows = [
        [
            escape(str(r["provider"]).replace("ExecutionProvider", "")),
            escape(r.get("precision", "")),
            escape(r.get("model", "")),
            _fmt(r["p50_ms"]),
            _fmt(r["p90_ms"]),
            _fmt(r.get("agreement_vs_cpu_fp32")),
            _fmt(r.get("max_abs_diff_vs_cpu_fp32")),
        ]
        for r in found
    ]
    header = ["provider", "precision", "model", "p50 ms", "p90 ms", "agreement with FP32 on CPU %", "max |diff|"]
    return _table(header, rows) + "<p class='muted'>batch 1, validation inputs for parity, test input for latency</p>"


def machine(report: dict) -> str:
    device, versions = report.get("device") or {}, report.get("versions") or {}
    threads = sorted({r["threads"] for r in report.get("rows") or [] if r.get("threads") is not None})
    items = [(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in device.items()]
    items += [("threads used for latency", ", ".join(map(str, threads)))] if threads else []
    out = "".join(f"<li><b>{escape(str(k))}</b>: {escape(str(v))}</li>" for k, v in items)
    vers = _table(["library", "version"], [[escape(str(k)), escape(str(v))] for k, v in versions.items()])
    return (f"<ul>{out}</ul>" if out else "") + (vers if versions else "")


SECTIONS: list[tuple[str, Callable[[dict], str]]] = [  # the task's sections go after the first four
    ("", header),
    ("Models", models_table),
    ("Metric vs latency", tradeoff_plot),
    ("Compression search", search_section),
    ("Training curves", training_curves),
    ("Export parity (ONNX Runtime vs PyTorch)", parity),
    ("Gates", gates),
    ("", quantize_notes),
    ("Execution providers", providers),
    ("Machine", machine),
]
