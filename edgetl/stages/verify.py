"""Measure every exported model on the held-out test split and enforce the recipe's gates.

One report row per ONNX model: test accuracy under PyTorch and ORT, top-1 agreement with the fine-tuned
teacher, parameters, MACs, file size, ORT latency p50/p90 at batch 1 after warm-up. A failed gate fails the
build with one line naming the gate, the measured value and the limit.
"""

from __future__ import annotations

import numpy as np

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.pipeline import State, shipped_role


def count_params_macs(model, input_size: int) -> tuple[int, int]:
    import torch
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, 3, input_size, input_size))
    return int(params), int(macs)


def ort_eval(onnx_path, inputs: np.ndarray, labels: np.ndarray, ref_pred: np.ndarray, threads: int,
             n_classes: int, batch: int = 64) -> dict:
    from edgetl.runner import session

    sess = session(onnx_path, threads=max(threads, 2))
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: inputs[i : i + batch]})[0].argmax(-1)
                            for i in range(0, len(inputs), batch)])
    confusion = np.zeros((n_classes, n_classes), dtype=int)  # rows: true class, columns: ORT prediction
    np.add.at(confusion, (labels, preds), 1)
    return {"acc_ort": 100.0 * float((preds == labels).mean()), "agreement": 100.0 * float((preds == ref_pred).mean()),
            "confusion": confusion.tolist()}


def measure(state: State, role: str, model, cfg) -> dict:
    """One report row (accuracy, agreement, size, params, MACs) for the ONNX file of ``role``."""
    import torch

    from edgetl.runner import normalize

    pre = state.backbone.contract.preprocess
    path = state.workdir / state.onnx[role]
    inputs = normalize(state.data.test.images, pre)
    labels = state.data.test.labels

    def predict(m) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([m(torch.from_numpy(inputs[i : i + 64])) for i in range(0, len(inputs), 64)]).argmax(-1)

    row = {"stage": role, "file": path.name, "acc_torch": 100.0 * float((predict(model).numpy() == labels).mean())}
    row.update(ort_eval(path, inputs, labels, predict(state.teacher or model).numpy(), cfg.threads,
                        len(state.data.classes)))
    row["params"], row["macs"] = count_params_macs(model, pre["crop"])
    row["size_mb"] = path.stat().st_size / 1e6
    return row


def add_latency(state: State, rows: list[dict], cfg) -> None:
    """Batch-1 ORT latency of every row, all models measured interleaved so noise hits them alike."""
    from edgetl.runner import feed_for, interleaved_latency, session

    sessions = {r["stage"]: session(state.workdir / r["file"], threads=cfg.threads) for r in rows}
    lat = interleaved_latency(sessions, feed_for(next(iter(sessions.values())), 1), runs=cfg.runs, warmup=cfg.warmup)
    fp32 = lat.get("fp32")
    for r in rows:
        r.update(p50_ms=lat[r["stage"]]["p50_ms"], p90_ms=lat[r["stage"]]["p90_ms"], threads=cfg.threads)
        if fp32:
            r["speedup_vs_fp32"] = fp32["p50_ms"] / r["p50_ms"]


def provider_rows(state: State, path, cfg) -> list[dict]:
    """Latency and parity (against the CPU EP) of the shipped model on every requested provider."""
    from edgetl.runner import BundleError, feed_for, latency, normalize, resolve_providers, session

    try:
        providers = resolve_providers(cfg.providers)
    except BundleError as e:
        raise EdgetlError(f"verify.providers: {e}") from None
    x = normalize(state.data.val.images[:64], state.backbone.contract.preprocess)
    cpu = session(path, cfg.threads, ["cpu"])
    ref = cpu.run(None, {cpu.get_inputs()[0].name: x})[0]
    rows = []
    for provider in providers:
        sess = session(path, cfg.threads, [provider])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        lat = latency(sess, feed_for(sess, 1), runs=cfg.runs, warmup=cfg.warmup)
        rows.append({"provider": provider, "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"],
                     "max_abs_diff_vs_cpu": float(np.abs(got - ref).max()),
                     "top1_agreement_vs_cpu": float((got.argmax(-1) == ref.argmax(-1)).mean())})
    return rows


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
    roles = ["fp32", *[r for r in state.onnx if r != "fp32"]]
    rows = [measure(state, r, state.models.get(r, state.backbone.model), cfg) for r in roles if r in state.onnx]
    add_latency(state, rows, cfg)
    shipped = shipped_role(state)
    for r in rows:
        r["shipped"] = r["stage"] == shipped
    ship_row = next(r for r in rows if r["shipped"])
    providers = provider_rows(state, state.workdir / ship_row["file"], cfg) if set(cfg.providers) != {"cpu"} else []
    reference = state.metrics.get("finetune", {}).get("test_acc")
    results = gates(cfg, rows, ship_row, reference)
    for r in rows:
        print(f"  {r['stage']:>9}: acc torch {r['acc_torch']:.2f}% ort {r['acc_ort']:.2f}%  "
              f"agree {r['agreement']:.1f}%  p50 {r['p50_ms']:.2f} ms  {r['size_mb']:.2f} MB"
              f"{'  <- ships' if r['shipped'] else ''}")
    for p in providers:
        agree = 100 * p["top1_agreement_vs_cpu"]
        print(f"  {p['provider']}: p50 {p['p50_ms']:.2f} ms, top-1 agreement with CPU {agree:.1f}%")
    verify = {"shipped": shipped, "gates": results, "providers": providers}
    state = state.replace(rows=rows, metrics={**state.metrics, "verify": verify})
    failed = [g for g in results if not g["passed"]]
    if failed:
        g = failed[0]
        state.metrics["verify"]["failed"] = True
        from edgetl.stages.bundle import write_report

        write_report(state)  # kept next to the (unpublished) output so the measurements are not lost
        raise EdgetlError(f"gate {g['gate']} failed: measured {g['value']:.3g}, limit {g['limit']:g}")
    return state
