"""Measure every exported model on the held-out test split and enforce the recipe's gates.

One report row per ONNX model: test accuracy under PyTorch and ORT, top-1 agreement with the fine-tuned
teacher, parameters, MACs, file size, ORT latency p50/p90 at batch 1 after warm-up. A failed gate fails the
build with one line naming the gate, the measured value and the limit.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from edgetl.config import Recipe
from edgetl.errors import EdgetlError, GateFailed
from edgetl.pipeline import State, shipped_role


def count_params_macs(model, example: int | dict) -> tuple[int, int | None]:
    """Parameters and multiply-accumulates for one example: an image side length or an ONNX-style feed."""
    import torch
    import torch_pruning as tp

    if isinstance(example, int):
        example = {"input": np.zeros((1, 3, example, example), np.float32)}
    inputs = {k: torch.from_numpy(v[:1]) for k, v in example.items()}
    args = inputs["input"] if list(inputs) == ["input"] else inputs
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "no positional inputs" notice for keyword inputs
            macs, params = tp.utils.count_ops_and_params(model.eval(), args)
    except Exception:  # noqa: BLE001 - the op counter cannot trace every model; the parameter count still holds
        return sum(p.numel() for p in model.parameters()), None
    return int(params), int(macs)


def predictions(run, batches: list[dict]) -> np.ndarray:
    """Top-1 class per example of ``run(feed) -> logits`` over all batches."""
    return np.concatenate([np.asarray(run(feed)).argmax(-1) for feed in batches])


def ort_predictions(onnx_path, batches: list[dict], threads: int = 2) -> np.ndarray:
    """Top-1 class per example under ONNX Runtime (CPU, full graph optimisation, at least 2 threads: accuracy
    does not depend on the thread count, wall time does)."""
    from edgetl.runner import session

    sess = session(onnx_path, threads=max(threads, 2))
    return predictions(lambda feed: sess.run(None, feed)[0], batches)


def ort_accuracy(onnx_path, batches: list[dict], labels: np.ndarray) -> float:
    return 100.0 * float((ort_predictions(onnx_path, batches) == labels).mean())


def ort_eval(onnx_path, batches: list[dict], labels: np.ndarray, ref_pred: np.ndarray, threads: int,
             n_classes: int) -> dict:
    preds = ort_predictions(onnx_path, batches, threads)
    confusion = np.zeros((n_classes, n_classes), dtype=int)  # rows: true class, columns: ORT prediction
    np.add.at(confusion, (labels, preds), 1)
    return {"acc_ort": 100.0 * float((preds == labels).mean()), "agreement": 100.0 * float((preds == ref_pred).mean()),
            "confusion": confusion.tolist()}


def torch_predictions(model, batches: list[dict]) -> np.ndarray:
    import torch

    from edgetl.data import torch_forward

    with torch.inference_mode():
        return predictions(lambda feed: torch_forward(model, feed).numpy(), batches)


def measure(state: State, role: str, model, cfg, batches: list[dict], teacher_pred: np.ndarray) -> dict:
    """One report row (accuracy, agreement, size, params, MACs) for the ONNX file of ``role``."""
    path = state.workdir / state.onnx[role]
    labels = state.data.test.labels
    acc_torch = 100.0 * float((torch_predictions(model, batches) == labels).mean())
    row = {"stage": role, "file": path.name, "acc_torch": acc_torch}
    row.update(ort_eval(path, batches, labels, teacher_pred, cfg.threads, len(state.data.classes)))
    row["params"], row["macs"] = count_params_macs(model, batches[0])
    row["size_mb"] = path.stat().st_size / 1e6
    return row


def latency_feed(state: State) -> dict:
    """One real test example (text: padded to max_length, the worst case a device sees)."""
    from edgetl.data import feeds

    pre = state.backbone.contract.preprocess
    return feeds(state.data.test, pre, state.tokenizer, batch=1, limit=1, pad_to=pre.get("max_length"))[0]


def add_latency(state: State, rows: list[dict], cfg) -> None:
    """Batch-1 ORT latency of every row, all models measured interleaved so noise hits them alike."""
    from edgetl.runner import interleaved_latency, session

    sessions = {r["stage"]: session(state.workdir / r["file"], threads=cfg.threads) for r in rows}
    lat = interleaved_latency(sessions, latency_feed(state), runs=cfg.runs, warmup=cfg.warmup)
    fp32 = lat.get("fp32")
    for r in rows:
        r.update(p50_ms=lat[r["stage"]]["p50_ms"], p90_ms=lat[r["stage"]]["p90_ms"], threads=cfg.threads)
        if fp32:
            r["speedup_vs_fp32"] = fp32["p50_ms"] / r["p50_ms"]


def verify_providers(cfg) -> list[str]:
    """verify.providers as ORT names; one this onnxruntime lacks is a one-line error naming the key."""
    from edgetl.runner import BundleError, resolve_providers

    try:
        return resolve_providers(cfg.providers)
    except BundleError as e:
        raise EdgetlError(f"verify.providers: {e}") from None


def provider_rows(state: State, path, cfg) -> list[dict]:
    """Latency and parity (against the CPU EP) of the shipped model on every requested provider."""
    from edgetl.data import feeds
    from edgetl.runner import latency, session

    providers = verify_providers(cfg)
    feed = feeds(state.data.val, state.backbone.contract.preprocess, state.tokenizer, limit=64)[0]
    ref = session(path, cfg.threads, ["cpu"]).run(None, feed)[0]
    rows = []
    for provider in providers:
        sess = session(path, cfg.threads, [provider])
        got = sess.run(None, feed)[0]
        lat = latency(sess, latency_feed(state), runs=cfg.runs, warmup=cfg.warmup)
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
    from edgetl.data import feeds

    batches = feeds(state.data.test, state.backbone.contract.preprocess, state.tokenizer)
    teacher_pred = torch_predictions(state.teacher or state.backbone.model, batches)
    rows = [measure(state, r, state.models.get(r, state.backbone.model), cfg, batches, teacher_pred)
            for r in roles if r in state.onnx]
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
        raise GateFailed(f"gate {g['gate']} failed: measured {g['value']:.3g}, limit {g['limit']:g}")
    return state
