"""``edgetl search``: the fastest model inside the recipe's budget, found by Optuna over the compression settings.

Every trial is the recipe with a point of the search space (prune depth ``prune.target_macs``, ``prune.round_to``
and ``prune.importance``, image classifiers' input resolution ``prune.input_size``, the prune recovery and
distillation epochs, the distillation transfer set, ``quantize.method``), run up to quantize through the stage
cache, so the fine-tune (whose key does not depend on those settings) runs once and every trial starts from it.
Trials are judged on the validation split only: the shipped model's metric under ONNX Runtime, its speed-up over
the fine-tuned FP32 ONNX model (batch 1, at ``verify.threads``, measured interleaved), and its size. The budget is
the recipe's gates, as Optuna constraints: ``max_metric_drop`` (/ ``max_accuracy_drop``) against the fine-tuned
model's validation metric, ``min_metric``, ``min_speedup``, ``max_size_mb``. Optuna's multi-objective sampler
(TPE) maximises the metric and the speed-up; of the feasible Pareto front the fastest trial is then built as a
normal bundle, measured once on test (its gates apply) with the search in its report. Once a trial is inside the
budget, a later point is timed right after pruning (``speed_bound``) and not trained further when its layers
cannot come within ``SPEED_SLACK`` of that trial's speed-up.

The study lives in an Optuna storage, by default ``<out>.search.db`` (SQLite) beside the output, so a search
resumes after an interruption; an RDB URL (``postgresql://...``) lets several machines work on one study.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from edgetl.config import Recipe, recipe_from_dict, recipe_to_dict
from edgetl.errors import EdgetlError, GateFailed

SEARCHED = (
    "prune.target_macs",
    "prune.input_size",
    "prune.round_to",
    "prune.importance",
    "prune.recovery_epochs",
    "distill.epochs",
    "distill.transfer_size",
    "quantize.method",
)
HEARTBEAT_S, GRACE_S = 60, 180  # a trial whose process stopped beating for GRACE_S (killed) is failed and retried
SPEED_SLACK = 0.1  # a point is trained unless its layers' speed-up is this far under the fastest feasible trial's
MACS_RANGE = (0.2, 1.0, 0.05)  # prune.target_macs: low, high, step (a repeated point is a cache hit); 1.0: no pruning
# prune.input_size: these fractions of the input side (multiples of 8), besides the full size
SCALES = (5 / 6, 2 / 3, 1 / 2)


def input_sizes(recipe: Recipe) -> tuple:
    """The input resolutions searched (None: the fine-tuned model's); image classifiers with a set
    backbone.input_size only (the pretrained default size is known only once the backbone is loaded)."""
    side = recipe.backbone.input_size
    if side is None or recipe.backbone.name.startswith("hf:") or recipe.task.kind != "classification":
        return (None,)
    return (None, *sorted({int(round(side * f / 8)) * 8 for f in SCALES} - {side}, reverse=True))


def space(recipe: Recipe) -> dict:
    """The search space for this recipe: {recipe key: (kind, choices or (low, high, step))}."""
    image = not recipe.backbone.name.startswith("hf:")  # transformer encoders prune heads / neurons
    d = recipe.distill.epochs if recipe.distill else 2
    r = recipe.prune.recovery_epochs if recipe.prune else 1
    out = {
        "prune.target_macs": ("float", MACS_RANGE),  # the top of the range, 1.0, is "no pruning"
        "prune.importance": ("categorical", ("magnitude", "taylor", "lamp") if image else ("magnitude", "taylor")),
        # the training budget is searched too: a deeper prune may stay inside the budget with more recovery
        "prune.recovery_epochs": ("int", (0, max(2 * r, 1), 1)),
        "distill.epochs": ("int", (0, max(d, 1), 1)),  # 0: no distillation
    }
    t = recipe.distill.transfer_size if recipe.distill else 0
    if t:  # the recipe's transfer set is the ceiling: with it or without (each epoch then costs that much more)
        out["distill.transfer_size"] = ("categorical", (0, t))
    if image:
        out["prune.round_to"] = ("categorical", (8, 16))
        out["quantize.method"] = ("categorical", ("qat", "ptq"))
    if len(input_sizes(recipe)) > 1:  # a lower resolution inside the model, learnt from the teacher
        out["prune.input_size"] = ("categorical", input_sizes(recipe))
    return out


def recipe_point(recipe: Recipe, sp: dict) -> dict:
    """The recipe's own settings as a point of the space ``sp``: the keys whose value the space holds (a ``ratio``
    without ``target_macs`` has no MACs value: the sampler draws that one)."""
    p, d = recipe.prune, recipe.distill
    have = {
        "prune.target_macs": 1.0 if p is None else p.target_macs,
        "prune.input_size": None if p is None else p.input_size,
        "prune.importance": None if p is None else p.importance,
        "prune.round_to": None if p is None else p.round_to,
        "prune.recovery_epochs": None if p is None else p.recovery_epochs,
        "distill.epochs": 0 if d is None else d.epochs,
        "distill.transfer_size": None if d is None else d.transfer_size,
        "quantize.method": recipe.quantize.method if recipe.quantize else None,
    }
    out = {}
    for key, (kind, arg) in sp.items():
        v = have.get(key)
        if kind == "categorical" and v in arg and (v is not None or key == "prune.input_size"):
            out[key] = v
        elif kind in ("int", "float") and v is not None:
            low, high, step = arg
            v = round(low + round((min(max(v, low), high) - low) / step) * step, 4)
            out[key] = int(v) if kind == "int" else v
    return out


def _prune_section(current: dict | None, params: dict) -> dict | None:
    """The prune section of a point: None (no pruning), channels and / or a lower input size. Settings that a point
    makes moot (how channels are ranked when none are removed) keep the recipe's values, so such points share the
    stage cache."""
    chosen = {k.split(".")[1]: v for k, v in params.items() if k.startswith("prune.")}
    if not chosen:
        return current
    channels = chosen.get("target_macs", 0.0) < 1.0
    if not channels and chosen.get("input_size") is None:
        return None
    if not channels:
        chosen = {
            "ratio": 0.0,
            "target_macs": None,
            **{k: chosen[k] for k in ("input_size", "recovery_epochs") if k in chosen},
        }
    return {**(current or {}), **chosen}


def trial_recipe(recipe: Recipe, params: dict) -> Recipe:
    """The recipe with one point of the space (prune / distill / quantize sections added with their defaults when
    the recipe has none)."""
    raw = recipe_to_dict(recipe)
    raw["prune"] = _prune_section(raw.get("prune"), params)
    for key, value in params.items():
        section, field = key.split(".")
        if section == "prune" or (section == "distill" and params.get("distill.epochs") == 0):
            continue
        raw[section] = {**(raw.get(section) or {}), field: value}
    if params.get("distill.epochs") == 0:
        raw["distill"] = None
    if raw.get("quantize") is None:  # INT8 is part of every point (text: ORT dynamic / static, chosen on val)
        raw["quantize"] = {}
    return recipe_from_dict(raw)


def budget(recipe: Recipe, margin: float = 0.0) -> dict:
    """The recipe's gates that a trial must meet on validation (None: not set), the metric's ``margin`` inside them
    (the chosen trial is measured once more on test, where the gates apply as written)."""
    v = recipe.verify
    if v is None:
        return {}
    drop = v.max_accuracy_drop if v.max_accuracy_drop is not None else v.max_metric_drop
    least = v.min_accuracy if v.min_accuracy is not None else v.min_metric
    if margin and drop is not None:
        drop -= margin
    if margin and least is not None:
        least += margin if recipe_direction(recipe) else -margin
    out = {"max_metric_drop": drop, "min_metric": least, "min_speedup": v.min_speedup, "max_size_mb": v.max_size_mb}
    return {k: x for k, x in out.items() if x is not None}


def recipe_direction(recipe: Recipe) -> bool:
    """Whether the recipe's task metric is better higher (every edgetl metric is today)."""
    from edgetl.tasks import create_task

    return create_task(recipe.task.kind, [], recipe.task).higher_is_better


def open_storage(url: str, grace_s: float | None = None):
    """An Optuna storage with heartbeats for a database URL: a trial whose process was killed (its heartbeat stops
    for ``grace_s``) is marked failed when any worker next starts a trial, and its point is queued again once."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if "://" not in url:
        return url  # let Optuna say what is wrong
    grace = GRACE_S if grace_s is None else grace_s
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: a warning on every search
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=max(1, min(HEARTBEAT_S, int(grace / 2))),
            grace_period=int(max(grace, 1)),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def judge(state, threads: int, runs: int, warmup: int) -> dict:
    """The shipped model of a trial on validation: metric (ORT), the fine-tuned FP32 model's, speed-up, size."""
    from edgetl.measure import add_latency, ort_metric
    from edgetl.runner import model_files
    from edgetl.state import shipped_role

    mod, task, val = state.modality, state.task, state.data.val
    batches, targets = mod.feeds(val, annotate=True), mod.targets(val)
    role = shipped_role(state)
    fp32 = ort_metric(task, state.workdir / state.onnx["fp32"], batches, targets)
    got = ort_metric(task, state.workdir / state.onnx[role], batches, targets)
    rows = [{"stage": "fp32", "file": state.onnx["fp32"]}, {"stage": "shipped", "file": state.onnx[role]}]
    add_latency(rows, state.workdir, mod.latency_feed(val), threads, runs, warmup)
    size = sum(f.stat().st_size for f in model_files(state.workdir / state.onnx[role])) / 1e6
    return {
        "metric": got.name,
        "higher_is_better": got.higher_is_better,
        "val_metric": got.value,
        "val_metric_fp32": fp32.value,
        "val_drop": got.drop_from(fp32),
        "speedup": rows[0]["p50_ms"] / rows[1]["p50_ms"],
        "p50_ms": rows[1]["p50_ms"],
        "size_mb": size,
        "shipped": role,
        "val_size": len(val),
    }


def fastest_feasible(study, limits: dict) -> tuple[int, float] | None:
    """(number, speed-up) of the fastest measured trial inside the budget so far, or None."""
    from optuna.trial import TrialState

    inside = [
        (t.number, t.user_attrs["measured"]["speedup"])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("measured") and all(c <= 0 for c in constraints(t.user_attrs["measured"], limits).values())
    ]
    return max(inside, key=lambda x: x[1], default=None)


def speed_bound(state, threads: int, runs: int, warmup: int) -> float | None:
    """The speed-up over the fine-tuned FP32 model that a trial's layers allow, measured right after pruning, before
    distillation: latency depends on the layers, not on the weights that training will change. The pruned model
    as exported and as ORT static INT8 (every Conv, calibrated on two batches), the faster of the two; None where
    INT8 is not static QDQ (text: the quantize stage chooses)."""
    from edgetl.compress.ort_quant import quantize_onnx
    from edgetl.config import QuantizeCfg
    from edgetl.measure import add_latency
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import cpu_int8_features

    mod = state.modality
    if not getattr(mod, "static_int8", False) or state.teacher is None:
        return None
    feed, contract = mod.latency_feed(state.data.val), state.backbone.contract
    with tempfile.TemporaryDirectory(prefix="edgetl-bound.") as tmp:
        d = Path(tmp)
        export_onnx(state.teacher, contract, d / "fp32.onnx", feed, 17)
        pruned = export_onnx(state.backbone.model, contract, d / "pruned.onnx", feed, 17)
        calib = mod.calibration(state.data.train, 32)
        reduce_range = not cpu_int8_features()["vnni_or_dot"]
        quantize_onnx(pruned, d / "int8.onnx", calib, QuantizeCfg(float_leading_convs=0), reduce_range)
        rows = [{"stage": s, "file": f"{s}.onnx"} for s in ("fp32", "pruned", "int8")]
        add_latency(rows, d, feed, threads, runs, warmup)
    return max(r["speedup_vs_fp32"] for r in rows[1:])


def constraints(measured: dict, limits: dict) -> dict:
    """Optuna constraint values (feasible when <= 0) of one trial."""
    sign = 1 if measured["higher_is_better"] else -1
    out = {}
    if "max_metric_drop" in limits:
        out["max_metric_drop"] = measured["val_drop"] - limits["max_metric_drop"]
    if "min_metric" in limits:
        out["min_metric"] = sign * (limits["min_metric"] - measured["val_metric"])
    if "min_speedup" in limits:
        out["min_speedup"] = limits["min_speedup"] - measured["speedup"]
    if "max_size_mb" in limits:
        out["max_size_mb"] = measured["size_mb"] - limits["max_size_mb"]
    return out


def study_name(recipe: Recipe, margin: float = 0.0) -> str:
    """The recipe name and a hash of everything but the searched keys: a changed recipe, budget or margin (the gates
    are the trials' constraints) starts a new study; the stage cache keeps repeated points cheap."""
    from edgetl.cache import _digest

    raw = recipe_to_dict(recipe)
    for key in SEARCHED:
        section, field = key.split(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(field, None)
    return f"{recipe.name}-{_digest(raw)[:10]}" + (f"-margin{margin:g}" if margin else "")


def default_storage(out: Path) -> str:
    return f"sqlite:///{out.with_name(out.name + '.search.db').resolve()}"


def _suggest(trial, sp: dict) -> dict:
    params = {}
    for key, (kind, arg) in sp.items():
        if kind == "float":
            params[key] = trial.suggest_float(key, arg[0], arg[1], step=arg[2])
        elif kind == "int":
            params[key] = trial.suggest_int(key, arg[0], arg[1], step=arg[2])
        else:
            params[key] = trial.suggest_categorical(key, list(arg))
    return tidy(params)


def earlier_point(study, trial):
    """A completed, measured trial of ``study`` at the same point as ``trial`` (its parameters), or None."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and tidy(t.params) == tidy(trial.params) and t.user_attrs.get("measured"):
            return t
    return None


def tidy(params: dict) -> dict:
    """Optuna's stepped floats (0.45000000000000007) rounded, so a trial's recipe, its cache keys and the final
    build's are the same."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in params.items()}


def describe(params: dict) -> str:
    return " ".join(f"{k.split('.')[1]}={v}" for k, v in tidy(params).items())


def trial_rows(study) -> list[dict]:
    """Every finished trial as a report row."""
    import optuna

    rows = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            error = t.user_attrs.get("error")
            rows.append({"number": t.number, "state": t.state.name, "params": tidy(t.params), "error": error})
            continue
        cons = t.constraints or {}
        cons = list(cons.values()) if isinstance(cons, dict) else list(cons)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": tidy(t.params),
                **t.user_attrs["measured"],
                "feasible": all(c <= 0 for c in cons),
            }
        )
    return rows


def _clean_trial_dirs(parent: Path) -> None:
    """Work directories of trials whose search was killed (their pid is gone)."""
    import shutil

    from edgetl.cache import pid_alive

    for d in parent.glob(".edgetl-trial.*"):
        try:
            pid = int(d.name.split(".")[2])
        except (IndexError, ValueError):
            continue
        if d.is_dir() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def search(
    recipe: Recipe,
    out: str | Path | None,
    trials: int,
    timeout_min: float | None = None,
    storage: str | None = None,
    log: Callable[[str], None] = print,
    margin: float = 0.0,
):
    """Run (or resume) the study, then build the chosen trial as the bundle at ``out``; returns the build's state."""
    import optuna

    from edgetl.cache import open_cache
    from edgetl.pipeline import build, check_output, run_stages

    if recipe.finetune is None:
        raise EdgetlError("edgetl search needs a finetune section: every trial starts from the one fine-tuned model")
    out = check_output(out, recipe.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_trial_dirs(out.parent)
    storage = storage or default_storage(out)
    store = open_cache()  # the shared fine-tune is the point: the search always uses the cache
    if margin < 0:
        raise EdgetlError("--margin must be 0 or more (metric points inside the gates)")
    sp, limits = space(recipe), budget(recipe, margin)
    threads = recipe.verify.threads if recipe.verify else 1
    runs, warmup = (recipe.verify.runs, recipe.verify.warmup) if recipe.verify else (100, 10)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is one line of ours, not a traceback
    try:
        study = optuna.create_study(
            storage=open_storage(storage),
            study_name=study_name(recipe, margin),
            directions=["maximize", "maximize"],  # the task metric (sign-adjusted), the speed-up
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=recipe.seed, n_startup_trials=min(10, max(trials // 2, 1))),
        )
    except Exception as e:  # noqa: BLE001 - a bad URL / unreachable database: one line
        raise EdgetlError(f"cannot open the search storage {storage}: {type(e).__name__}: {str(e)[:200]}") from None
    study.sampler = optuna.samplers.TPESampler(  # a resumed study does not redraw the first session's points
        seed=recipe.seed + len(study.trials), n_startup_trials=min(10, max(trials // 2, 1))
    )
    if not study.trials:  # a new study starts from the recipe's own settings: nothing worse ships inside the budget
        study.enqueue_trial(recipe_point(recipe, sp))
    earlier = sum(t.state.is_finished() for t in study.trials)  # not counting points waiting in the queue
    log(f"search: study {study.study_name} in {storage}, {earlier} earlier trials; budget {limits or 'none'}")

    def objective(trial):
        params = _suggest(trial, sp)
        log(f"[trial {trial.number}] {describe(params)}")
        seen = earlier_point(study, trial)
        if seen is not None:  # TPE proposes a point again: judging it again would only re-measure noise
            m = seen.user_attrs["measured"]
            trial.set_user_attr("repeat_of", seen.number)
            log(f"  the same point as trial {seen.number}: its measurements reused")
        else:
            try:
                r = trial_recipe(recipe, params)
            except EdgetlError as e:
                trial.set_user_attr("error", str(e))
                raise
            with tempfile.TemporaryDirectory(prefix=f".edgetl-trial.{os.getpid()}.", dir=out.parent) as tmp:
                try:
                    fastest = fastest_feasible(study, limits)
                    if fastest is not None and r.prune is not None:  # can its layers beat the fastest so far?
                        pruned = run_stages(r, Path(tmp), store, log=lambda line: None, until="prune")
                        bound = speed_bound(pruned, threads, runs, warmup)
                        if bound is not None and bound < fastest[1] * (1 - SPEED_SLACK):
                            why = (
                                f"skipped before distillation: its layers run about {bound:.2f}x FP32, under trial "
                                f"{fastest[0]}'s {fastest[1]:.2f}x inside the budget"
                            )
                            trial.set_user_attr("error", why)
                            log(f"  {why}")
                            raise optuna.TrialPruned(why)
                    state = run_stages(r, Path(tmp), store, log=lambda line: None, until="quantize")
                except EdgetlError as e:
                    trial.set_user_attr("error", str(e))
                    log(f"  failed: {e}")
                    raise
                m = judge(state, threads, runs, warmup)
        trial.set_user_attr("measured", m)
        for key, value in constraints(m, limits).items():
            trial.set_constraint(key, value)
        ok = all(c <= 0 for c in constraints(m, limits).values())
        log(
            f"  val {m['metric']} {m['val_metric']:.2f} ({-m['val_drop']:+.2f} vs fine-tuned), "
            f"{m['speedup']:.2f}x FP32, {m['size_mb']:.2f} MB  {'within budget' if ok else 'over budget'}"
        )
        sign = 1 if m["higher_is_better"] else -1
        return sign * m["val_metric"], m["speedup"]

    study.optimize(objective, n_trials=trials, timeout=timeout_min * 60 if timeout_min else None, catch=(EdgetlError,))
    front = [t for t in study.best_trials if t.user_attrs.get("measured")]
    rows = trial_rows(study)
    if not front:
        done = [r for r in rows if r["state"] == "COMPLETE"]
        closest = min(done, key=lambda r: max(constraints(r, limits).values() or [0]), default=None)
        hint = f"; closest: trial {closest['number']} ({describe(closest['params'])})" if closest else ""
        raise EdgetlError(
            f"no trial of {len(rows)} met the budget {limits}{hint}; run more trials (the study resumes) or "
            "relax the gates"
        )
    best = max(front, key=lambda t: (t.user_attrs["measured"]["speedup"], t.values[0]))
    params = tidy(best.params)
    log(f"search: {len(rows)} trials, {len(front)} on the feasible front; building trial {best.number}")
    summary = {
        "study": study.study_name,
        "storage": storage,
        "space": {k: list(v[1]) for k, v in sp.items()},
        "budget": limits,
        "margin": margin,
        "threads": threads,
        "trials": rows,
        "front": sorted(t.number for t in front),
        "chosen": best.number,
        "chosen_params": params,
    }
    try:
        state = build(trial_recipe(recipe, params), out, log=log, metrics={"search": summary})
    except GateFailed as e:  # judged on validation, measured once on test: say which split disagreed
        m = best.user_attrs["measured"]
        e.args = (
            f"{e.args[0]}; trial {best.number} was inside the budget on validation ({m['metric']} "
            f"{-m['val_drop']:+.2f} vs the fine-tuned model on {m['val_size']} examples) but not on test: judge trials "
            "on more validation examples (data.max_val, data.val_fraction) or keep a margin below the gate",
        )
        raise
    return state, summary


def as_overrides(params: dict) -> list[str]:
    """The chosen point as --set arguments for edgetl build."""
    out = []
    prune = _prune_section({}, params)
    if any(k.startswith("prune.") for k in params):
        out += (
            ["prune=null"] if prune is None else [f"prune.{k}={'null' if v is None else v}" for k, v in prune.items()]
        )
    if params.get("distill.epochs") == 0:
        out.append("distill=null")
    for k, v in params.items():
        if not (k.startswith("prune.") or (k.startswith("distill.") and params.get("distill.epochs") == 0)):
            out.append(f"{k}={v}")
    return out
