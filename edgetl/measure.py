"""Measurements the stages share: parameters and MACs, a task's metric and agreement under PyTorch and ONNX Runtime,
batch-1 latency (interleaved, so noise hits every model alike) and execution-provider rows.

Everything task-specific goes through the task object (``decode``, ``score``, ``agreement``, ``details``) and
everything input-specific through the modality, so this module knows neither classes nor images.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError


def count_params_macs(model, example: dict | int) -> tuple[int, int | None]:
    """Parameters and multiply-accumulates for one example: an ONNX-style feed (only its first row is used), or an
    image side length (benchmarks) for a zero NCHW image."""
    import torch
    import torch_pruning as tp

    if isinstance(example, int):
        example = {"input": np.zeros((1, 3, example, example), np.float32)}
    inputs = {k: torch.from_numpy(v[:1]) for k, v in model_inputs(example).items()}
    args = inputs["input"] if list(inputs) == ["input"] else inputs
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "no positional inputs" notice for keyword inputs
            macs, params = tp.utils.count_ops_and_params(model.eval(), args)
    except Exception:  # noqa: BLE001 - the op counter cannot trace every model; the parameter count still holds
        return sum(p.numel() for p in model.parameters()), None
    return int(params), int(macs)


def model_inputs(feed: dict) -> dict:
    """A feed without its annotations (keys starting with "_", e.g. which tokens start a word): what a model takes."""
    return {k: v for k, v in feed.items() if not k.startswith("_")}


def torch_forward(model, feed: dict):
    """Run a PyTorch model on an ONNX-style feed (image models take one positional tensor)."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in model_inputs(feed).items()}
    return model(tensors["input"]) if list(tensors) == ["input"] else model(**tensors)


def torch_outputs(model, batches: list[dict]) -> list[np.ndarray]:
    """The model's (first) output per batch, as numpy."""
    import torch

    model.eval()
    with torch.inference_mode():
        return [torch_forward(model, feed).numpy() for feed in batches]


def ort_outputs(onnx_path, batches: list[dict], threads: int = 2) -> list[np.ndarray]:
    """The ONNX model's first output per batch (CPU, full graph optimisation, at least 2 threads: outputs do not
    depend on the thread count, wall time does)."""
    from edgetl.runner import run_batch, session

    sess = session(onnx_path, threads=max(threads, 2))
    return [run_batch(sess, model_inputs(feed)) for feed in batches]


def flatten(per_batch: list):
    """Per-batch results as one per-example sequence: an array when every batch gives a 1-D array (class ids),
    else a list (per-example arrays of different lengths: batches padded to different lengths)."""
    if all(isinstance(d, np.ndarray) and d.ndim == 1 for d in per_batch):
        return np.concatenate(per_batch)
    return list(itertools.chain.from_iterable(per_batch))


def predictions(task, outputs: list[np.ndarray], batches: list[dict], params=None):
    """Per-example predictions over all batches (each batch is decoded on its own, with its feed; ``params``: what
    decoding needs beyond the outputs, e.g. a CRF's transition scores)."""
    return flatten([task.decode(o, feed, params) for o, feed in zip(outputs, batches, strict=True)])


def onnx_metadata(onnx_path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def torch_predictions(task, model, batches: list[dict]):
    return predictions(task, torch_outputs(model, batches), batches, task.decode_params(model=model))


def ort_predictions(task, onnx_path, batches: list[dict], threads: int = 2):
    params = task.decode_params(metadata=onnx_metadata(onnx_path))
    return predictions(task, ort_outputs(onnx_path, batches, threads), batches, params)


def ort_metric(task, onnx_path, batches: list[dict], targets):
    """The task's metric of an ONNX model on ``batches``."""
    return task.score(ort_predictions(task, onnx_path, batches), targets)


def measure_row(task, path, model, batches: list[dict], targets, teacher_pred, threads: int) -> dict:
    """One report row for an ONNX file: the metric under PyTorch and ORT, agreement with the teacher, the task's
    extras (a confusion matrix ...), parameters, MACs, size."""
    torch_metric = task.score(torch_predictions(task, model, batches), targets)
    preds = ort_predictions(task, path, batches, threads)
    ort = task.score(preds, targets)
    row = {
        "file": path.name,
        "metric": ort.name,
        "higher_is_better": ort.higher_is_better,
        "metric_torch": torch_metric.value,
        "metric_ort": ort.value,
        "agreement": task.agreement(preds, teacher_pred, targets),
        **task.details(preds, targets),
    }
    if getattr(task, "generates", False):  # MACs per generated token depend on the output: parameters only
        row["params"], row["macs"] = sum(p.numel() for p in model.parameters()), None
    else:
        row["params"], row["macs"] = count_params_macs(model, batches[0])
    from edgetl.runner import model_files

    files = model_files(path)  # a seq2seq model: encoder + decoder
    row["size_mb"] = sum(f.stat().st_size for f in files) / 1e6
    if len(files) > 1:
        row["component_mb"] = {"encoder": files[0].stat().st_size / 1e6, "decoder": files[1].stat().st_size / 1e6}
    return row


def add_latency(rows: list[dict], workdir, feed: dict, threads: int, runs: int, warmup: int) -> None:
    """Batch-1 ORT latency of every row, all models measured interleaved so noise hits them alike."""
    from edgetl.runner import Generator, interleaved_latency, session

    sessions = {r["stage"]: session(workdir / r["file"], threads=threads) for r in rows}
    lat = interleaved_latency(sessions, feed, runs=runs, warmup=warmup)
    fp32 = lat.get("fp32")
    for r in rows:
        r.update(p50_ms=lat[r["stage"]]["p50_ms"], p90_ms=lat[r["stage"]]["p90_ms"], threads=threads)
        if fp32:
            r["speedup_vs_fp32"] = fp32["p50_ms"] / r["p50_ms"]
    if all(isinstance(s, Generator) for s in sessions.values()):  # seq2seq: time to first token, tokens per second
        n = GENERATED_TOKENS
        first = interleaved_latency({k: s.fixed(1) for k, s in sessions.items()}, feed, runs=runs, warmup=2)
        full = interleaved_latency({k: s.fixed(n) for k, s in sessions.items()}, feed, runs=max(runs // 4, 3), warmup=1)
        for r in rows:
            r["ttft_ms"] = first[r["stage"]]["p50_ms"]
            r["tokens_per_s"] = n * 1e3 / full[r["stage"]]["p50_ms"]
            r["generated_tokens"] = n


GENERATED_TOKENS = 32  # seq2seq tokens per second: the time of this many decoder steps at batch 1


def speedup(fp32, int8, feed: dict, runs: int = 60, threads: int = 1) -> float:
    """p50(FP32) / p50(INT8) at batch 1, measured interleaved."""
    from edgetl.runner import interleaved_latency, session

    lat = interleaved_latency(
        {"fp32": session(fp32, threads), "int8": session(int8, threads)}, feed, runs=runs, warmup=5
    )
    return lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"]


def verify_providers(cfg) -> list[str]:
    """verify.providers as ORT names; one this onnxruntime lacks is a one-line error naming the key."""
    from edgetl.runner import BundleError, resolve_providers

    try:
        return resolve_providers(cfg.providers)
    except BundleError as e:
        raise EdgetlError(f"verify.providers: {e}") from None


def provider_rows(task, models: dict, cfg, feed: dict, latency_feed: dict) -> list[dict]:
    """Every model in ``models`` (precision -> ONNX path, FP32 first) on every provider in ``cfg.providers``: latency
    p50/p90 and parity (max |diff| and decoded agreement) against the FP32 model on the CPU EP."""
    from edgetl.runner import latency, run_batch, session

    feed = model_inputs(feed)
    reference = next(iter(models.values()))
    ref = run_batch(session(reference, cfg.threads, ["cpu"]), feed)
    ref_decoded = task.decode(ref, feed, task.decode_params(metadata=onnx_metadata(reference)))
    rows = []
    for provider in verify_providers(cfg):
        for precision, path in models.items():
            sess = session(path, cfg.threads, [provider])
            got = run_batch(sess, feed)
            lat = latency(sess, latency_feed, runs=cfg.runs, warmup=cfg.warmup)
            decoded = task.decode(got, feed, task.decode_params(metadata=onnx_metadata(path)))
            rows.append(
                {
                    "provider": provider,
                    "precision": precision,
                    "file": Path(path).name,
                    "p50_ms": lat["p50_ms"],
                    "p90_ms": lat["p90_ms"],
                    "max_abs_diff_vs_cpu_fp32": _diff(task, ref, got),
                    "agreement_vs_cpu_fp32": task.agreement(decoded, ref_decoded),
                }
            )
    return rows


def _diff(task, ref: np.ndarray, got: np.ndarray) -> float:
    """max |difference| of one output against its reference, as the task compares them (a two-stage detector's
    final boxes: matched; generated ids: as they are)."""
    if getattr(task, "generates", False):
        return float(np.abs(got.astype(np.float32) - ref).max())
    return task.parity([ref], [got.astype(np.float32)], 0.0, 0.0).max_abs_diff
