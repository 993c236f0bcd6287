"""Measure every exported model on the held-out test split and enforce the recipe's gates.

One report row per ONNX model: the task's metric under PyTorch and ORT, agreement with the fine-tuned teacher, the
task's extras, parameters, MACs, file size, ORT latency p50/p90 at batch 1 after warm-up (``edgetl.measure``). A
failed gate fails the build with one line naming the gate, the measured value and the limit.
"""

from __future__ import annotations

from edgetl.config import Recipe
from edgetl.errors import GateFailed
from edgetl.measure import add_latency, measure_row, ort_predictions, provider_rows, torch_predictions
from edgetl.report import write_report
from edgetl.state import FLOAT_ROLES, State, float_role, shipped_role


def gates(cfg, rows: list[dict], shipped: dict, reference) -> list[dict]:
    """Every configured gate; each result has name, value, limit, passed. ``reference`` is the fine-tuned model's
    test metric (a ``Metric``) or None."""
    from edgetl.tasks.base import Metric

    out = []
    fp32 = next((r for r in rows if r["stage"] == "fp32"), None)
    got = Metric(shipped["metric"], shipped["metric_ort"], shipped["higher_is_better"])
    drop_key = "max_accuracy_drop" if cfg.max_accuracy_drop is not None else "max_metric_drop"
    min_key = "min_accuracy" if cfg.min_accuracy is not None else "min_metric"
    if getattr(cfg, drop_key) is not None and reference is not None:
        drop = got.drop_from(reference)
        out.append(
            {"gate": drop_key, "value": drop, "limit": getattr(cfg, drop_key), "passed": drop <= getattr(cfg, drop_key)}
        )
    if getattr(cfg, min_key) is not None:
        limit = getattr(cfg, min_key)
        out.append(
            {
                "gate": min_key,
                "value": got.value,
                "limit": limit,
                "passed": got.value >= limit if got.higher_is_better else got.value <= limit,
            }
        )
    if cfg.min_speedup is not None and fp32 is not None:
        gain = fp32["p50_ms"] / shipped["p50_ms"]
        out.append({"gate": "min_speedup", "value": gain, "limit": cfg.min_speedup, "passed": gain >= cfg.min_speedup})
    if cfg.max_size_mb is not None:
        out.append(
            {
                "gate": "max_size_mb",
                "value": shipped["size_mb"],
                "limit": cfg.max_size_mb,
                "passed": shipped["size_mb"] <= cfg.max_size_mb,
            }
        )
    return out


def by_precision(state: State, ship_row: dict) -> dict:
    """The models execution providers are measured on: the shipped float model in FP32 (or the FP16 copy's
    source), its FP16 copy where export.fp16 made one, and the shipped INT8 model."""
    fp16 = state.metrics.get("export", {}).get("fp16")
    source = fp16["source"] if fp16 else float_role(state)
    out = {"fp32": state.workdir / state.onnx[source]}
    if fp16:
        out["fp16"] = state.workdir / fp16["file"]
    if ship_row["stage"] not in FLOAT_ROLES:
        out["int8"] = state.workdir / ship_row["file"]
    return out


def run(state: State, recipe: Recipe) -> State:
    cfg, mod, task = recipe.verify, state.modality, state.task
    roles = ["fp32", *[r for r in state.onnx if r != "fp32"]]
    batches = mod.feeds(state.data.test, annotate=True)
    targets = mod.targets(state.data.test)
    teacher_pred = torch_predictions(task, state.teacher or state.backbone.model, batches)
    rows = []
    for role in (r for r in roles if r in state.onnx):
        row = {
            "stage": role,
            **measure_row(
                task,
                state.workdir / state.onnx[role],
                state.models.get(role, state.backbone.model),
                batches,
                targets,
                teacher_pred,
                cfg.threads,
            ),
        }
        rows.append(row)
    add_latency(rows, state.workdir, mod.latency_feed(state.data.test), cfg.threads, cfg.runs, cfg.warmup)
    shipped = shipped_role(state)
    for r in rows:
        r["shipped"] = r["stage"] == shipped
    ship_row = next(r for r in rows if r["shipped"])
    providers = []
    precisions = by_precision(state, ship_row)
    if set(cfg.providers) != {"cpu"} or "fp16" in precisions:
        providers = provider_rows(
            task, precisions, cfg, mod.feeds(state.data.val, limit=64)[0], mod.latency_feed(state.data.test)
        )
        role_of = {name: role for role, name in state.onnx.items()}
        for p in providers:  # file names change in the bundle: the model is named by its stage
            p["model"] = role_of.get(p.pop("file"), "fp16 copy")
    results = gates(cfg, rows, ship_row, state.reference)
    examples = []
    if task.n_examples:  # a few test examples with the shipped model's predictions, for the report
        preds = ort_predictions(task, state.workdir / ship_row["file"], batches, cfg.threads)
        test = state.data.test
        examples = task.examples(test.texts if test.texts is not None else test.images, preds, targets, task.n_examples)
    for r in rows:
        print(
            f"  {r['stage']:>9}: {r['metric']} torch {r['metric_torch']:.2f} ort {r['metric_ort']:.2f}  "
            f"agree {r['agreement']:.1f}%  p50 {r['p50_ms']:.2f} ms  {r['size_mb']:.2f} MB"
            + (f"  first token {r['ttft_ms']:.2f} ms  {r['tokens_per_s']:.0f} tokens/s" if "ttft_ms" in r else "")
            + f"{'  <- ships' if r['shipped'] else ''}"
        )
    for p in providers:
        print(
            f"  {p['provider']} {p['precision']}: p50 {p['p50_ms']:.2f} ms, agreement with FP32 on the CPU EP "
            f"{p['agreement_vs_cpu_fp32']:.1f}%"
        )
    verify = {"shipped": shipped, "gates": results, "providers": providers, "examples": examples}
    state = state.replace(rows=rows, metrics={**state.metrics, "verify": verify})
    failed = [g for g in results if not g["passed"]]
    if failed:
        g = failed[0]
        state.metrics["verify"]["failed"] = True
        write_report(state)  # kept next to the (unpublished) output so the measurements are not lost
        raise GateFailed(f"gate {g['gate']} failed: measured {g['value']:.3g}, limit {g['limit']:g}")
    return state
