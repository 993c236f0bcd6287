"""Measure every exported model on the held-out test split and enforce the recipe's gates.

One report row per ONNX model: test accuracy under PyTorch and ORT, top-1 agreement with the fine-tuned
teacher, parameters, MACs, file size, ORT latency p50/p90 at batch 1 after warm-up. A failed gate fails the
build with one line naming the gate, the measured value and the limit.
"""

from __future__ import annotations

import numpy as np

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.pipeline import State

SHIP_ORDER = ("int8", "fp32")  # the first role present is what ships as model.onnx


def count_params_macs(model, input_size: int) -> tuple[int, int]:
    import torch
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, 3, input_size, input_size))
    return int(params), int(macs)


def ort_eval(onnx_path, inputs: np.ndarray, labels: np.ndarray, ref_pred: np.ndarray, threads: int, batch: int = 64):
    from edgetl.runner import session

    sess = session(onnx_path, threads=max(threads, 2))
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: inputs[i : i + batch]})[0].argmax(-1)
                            for i in range(0, len(inputs), batch)])
    return {"acc_ort": 100.0 * float((preds == labels).mean()), "agreement": 100.0 * float((preds == ref_pred).mean())}


def measure(state: State, role: str, model, cfg) -> dict:
    """One report row for the ONNX file of ``role``, with ``model`` its PyTorch counterpart."""
    import torch

    from edgetl.runner import feed_for, latency, normalize, session

    pre = state.backbone.contract.preprocess
    path = state.workdir / state.onnx[role]
    inputs = normalize(state.data.test.images, pre)
    labels = state.data.test.labels
    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(inputs[i : i + 64])) for i in range(0, len(inputs), 64)])
        teacher = state.teacher or model
        t_logits = [teacher(torch.from_numpy(inputs[i : i + 64])) for i in range(0, len(inputs), 64)]
        t_pred = torch.cat(t_logits).argmax(-1)
    acc_torch = 100.0 * float((logits.argmax(-1).numpy() == labels).mean())
    row = {"stage": role, "file": path.name, "acc_torch": acc_torch}
    row.update(ort_eval(path, inputs, labels, t_pred.numpy(), cfg.threads))
    row["params"], row["macs"] = count_params_macs(model, pre["crop"])
    row["size_mb"] = path.stat().st_size / 1e6
    sess = session(path, threads=cfg.threads)
    lat = latency(sess, feed_for(sess, 1), runs=cfg.runs, warmup=cfg.warmup)
    row.update(p50_ms=lat["p50_ms"], p90_ms=lat["p90_ms"], threads=cfg.threads)
    return row


def gates(cfg, rows: list[dict], shipped: dict, reference_acc: float | None) -> list[dict]:
    """Evaluate every configured gate; each result has name, value, limit, passed."""
    out = []
    fp32 = next((r for r in rows if r["stage"] == "fp32"), None)
    if cfg.max_accuracy_drop is not None and reference_acc is not None:
        drop = reference_acc - shipped["acc_ort"]
        out.append({"gate": "max_accuracy_drop", "value": drop, "limit": cfg.max_accuracy_drop,
                    "passed": drop <= cfg.max_accuracy_drop})
    if cfg.min_accuracy is not None:
        out.append({"gate": "min_accuracy", "value": shipped["acc_ort"], "limit": cfg.min_accuracy,
                    "passed": shipped["acc_ort"] >= cfg.min_accuracy})
    if cfg.min_speedup is not None and fp32 is not None:
        speedup = fp32["p50_ms"] / shipped["p50_ms"]
        out.append({"gate": "min_speedup", "value": speedup, "limit": cfg.min_speedup,
                    "passed": speedup >= cfg.min_speedup})
    if cfg.max_size_mb is not None:
        out.append({"gate": "max_size_mb", "value": shipped["size_mb"], "limit": cfg.max_size_mb,
                    "passed": shipped["size_mb"] <= cfg.max_size_mb})
    return out


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.verify
    rows = []
    for role in ("fp32", *[r for r in state.onnx if r != "fp32"]):
        if role in state.onnx:
            rows.append(measure(state, role, state.models.get(role, state.backbone.model), cfg))
    shipped_role = next(r for r in SHIP_ORDER if r in state.onnx)
    shipped = next(r for r in rows if r["stage"] == shipped_role)
    reference = state.metrics.get("finetune", {}).get("test_acc")
    results = gates(cfg, rows, shipped, reference)
    for r in rows:
        print(f"  {r['stage']:>6}: acc torch {r['acc_torch']:.2f}% ort {r['acc_ort']:.2f}%  "
              f"agree {r['agreement']:.1f}%  p50 {r['p50_ms']:.2f} ms  {r['size_mb']:.2f} MB")
    state = state.replace(rows=rows, metrics={**state.metrics, "verify": {"shipped": shipped_role, "gates": results}})
    failed = [g for g in results if not g["passed"]]
    if failed:
        g = failed[0]
        state.metrics["verify"]["failed"] = True
        from edgetl.stages.bundle import write_report

        write_report(state)  # kept next to the (unpublished) output so the measurements are not lost
        raise EdgetlError(f"gate {g['gate']} failed: measured {g['value']:.3g}, limit {g['limit']:g}")
    return state
