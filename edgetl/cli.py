"""The ``edgetl`` command: parse, call the library, print. User mistakes print one line and exit 2."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from edgetl.errors import EdgetlError


def friendly(fn):
    """Turn EdgetlError (and a broken bundle) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgetl.runner import BundleError

        try:
            return fn(*args, **kwargs)
        except (EdgetlError, BundleError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no bundle was written" if fn.__name__ == "build" else "interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated; no bundle was written" if fn.__name__ == "build" else "terminated", err=True)
            sys.exit(143)

    return wrapper


class OneLineErrors(click.Group):
    """Click's usage errors (a bad option, a missing argument) as the same one ``error:`` line, exit code 2."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="edgetl")
def main() -> None:
    """edgetl: pretrained backbone + your labelled data -> verified ONNX bundle for an edge device.

    \b
    Quick start:
      edgetl build models/mobilenet_v2_fmnist.yaml          # fine-tune, export, verify, bundle
      edgetl build RECIPE.yaml --set finetune.epochs=1      # override any recipe key
      edgetl predict artifacts/NAME image.png               # top-k labels from a bundle
      edgetl bench artifacts/NAME/model.onnx --threads 1    # ORT latency p50/p90/p99
      edgetl verify artifacts/NAME                          # golden-set parity on this machine
      edgetl advise RECIPE.yaml                             # the fine-tuning strategy for this data
      edgetl cache ls                                       # cached stages (a rebuild reruns only what changed)
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. --set finetune.epochs=1 --set data.max_train=500 (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Bundle directory [default: artifacts/<recipe name>]. Written to a temp dir, renamed when done.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run every stage and save nothing (default: reuse stages whose inputs are unchanged; see edgetl cache).",
)
@friendly
def build(recipe: str, overrides: tuple[str, ...], out: str | None, no_cache: bool) -> None:
    """Run the recipe's pipeline and write a verified bundle.

    \b
    Stages run in order when their recipe section is present:
      load        backbone (torchvision: / timm: / hf: name) + images or texts, stratified train/val/test split
      finetune    transfer learning: linear_probe | freeze | full | gradual_unfreeze
      prune       structured pruning (Torch-Pruning): channels / heads removed, iterative, short recovery
      distill     knowledge distillation from the fine-tuned model into the pruned one
      export      FP32 ONNX, checked against PyTorch under ONNX Runtime
      quantize    INT8: QAT or ORT PTQ (images), ORT dynamic / static (text); never ships slower than FP32
      verify      test accuracy (PyTorch and ORT), agreement, latency p50/p90, size, params, MACs; gates
      ort_format  model.ort for ONNX Runtime Mobile (export.ort_format: true)
      bundle      model.onnx (+ model.fp32.onnx), labels, preprocessing, recipe.lock.yaml, report, manifest
    A failed stage or gate leaves no bundle behind (a failed gate keeps its report beside the output).
    Every completed stage is cached: a rebuild reruns only the stages whose recipe sections, data, code or
    libraries changed (a changed quantize section reruns quantize, verify and bundle), and a killed build
    resumes after its last completed stage. --no-cache runs everything; `edgetl cache ls|clear` manages it.
    Example: edgetl build models/mobilenet_v2_fmnist.yaml --set prune.target_macs=0.3 --set quantize.method=ptq
    """
    import signal

    from edgetl.config import load_recipe
    from edgetl.pipeline import build as run_build

    # a terminated build unwinds like Ctrl-C (its temporary directory is removed too) and says so
    signal.signal(signal.SIGTERM, _terminated)
    from edgetl import distributed
    from edgetl.errors import GateFailed

    if not distributed.is_main():  # under torchrun / accelerate launch the main process prints; the others fail loud
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
    cfg = load_recipe(recipe, overrides)
    try:
        state = run_build(cfg, out, cache=not no_cache)
    except GateFailed as e:  # say where a passing model might be found
        sets = "".join(f" --set {o}" for o in overrides)
        e.args = (f"{e.args[0]}; to search for a model inside the gates: edgetl search {recipe}{sets}",)
        raise
    if state is not None:  # None: a process other than the main one of a distributed build
        click.echo(summary(state))


@main.command("search")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1), help="Trials in this run.")
@click.option("--timeout", "timeout_min", type=click.FloatRange(min=0, min_open=True), help="Stop after MINUTES.")
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage [default: sqlite:///<out>.search.db beside the bundle]; postgresql://... or mysql://... "
    "lets several machines work on one study.",
)
@click.option(
    "--margin",
    default=0.0,
    show_default=True,
    type=float,
    help="Metric points inside the gates a trial must be on validation (room for the test split's noise).",
)
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Bundle directory [default: artifacts/<name>]."
)
@friendly
def search_cmd(
    recipe: str,
    overrides: tuple[str, ...],
    trials: int,
    timeout_min: float | None,
    storage: str | None,
    margin: float,
    out: str | None,
) -> None:
    """Find the fastest model inside the recipe's gates, then build it.

    \b
    Optuna (multi-objective TPE) maximises the validation metric and the speed-up over the fine-tuned FP32 ONNX
    model (ORT, batch 1, verify.threads) over:
      prune.target_macs 0.2-1 (1: none)   prune.importance   prune.round_to (images)   distill.epochs (0 = none)
      prune.recovery_epochs 0-2x the recipe's   quantize.method qat | ptq (images)
    subject to verify.max_metric_drop (or max_accuracy_drop, against the fine-tuned model on validation),
    min_metric, min_speedup and max_size_mb. The fine-tune runs once (the stage cache); trials see validation only.
    The fastest trial of the feasible Pareto front is built as a normal bundle and measured once on test; its
    report.html shows every trial, the front and the budget. The study is stored beside the bundle and resumes:
    run the command again for more trials; a trial whose process was killed is retried once. --margin keeps trials
    that far inside the metric gates on validation, so the test split's noise does not fail the final build.
    Example: edgetl search models/mobilenet_v2_fmnist.yaml --set verify.max_accuracy_drop=1 --trials 30
    """
    import signal

    from edgetl.config import load_recipe
    from edgetl.search import as_overrides, describe, search

    signal.signal(signal.SIGTERM, _terminated)  # a terminated search removes its trial's work directory too
    cfg = load_recipe(recipe, overrides)
    state, result = search(cfg, out, trials, timeout_min, storage, margin=margin)
    click.echo(summary(state))
    chosen = result["chosen_params"]
    click.echo(
        f"search: trial {result['chosen']} ({describe(chosen)}) of {len(result['trials'])}, study {result['study']}"
    )
    click.echo(
        f"the same build: edgetl build {recipe}" + "".join(f" --set {o}" for o in (*overrides, *as_overrides(chosen)))
    )


@main.group("cache")
def cache_cmd() -> None:
    """The stage cache: every completed stage of a build, keyed by what it depends on.

    \b
    Where:  $EDGETL_CACHE_DIR, else $XDG_CACHE_HOME/edgetl/stage-cache, else ~/.cache/edgetl/stage-cache
            (mode 0700: it holds pickled models, so edgetl refuses a directory another user owns or group / others
            may write)
    Size:   $EDGETL_CACHE_MAX_GB (default 10); least recently used entries of other builds go first
    Key:    edgetl's code, library versions, the seed / backbone / data / task sections, a hash of the loaded
            data and the stamps of its files, then per stage its own sections (quantize and verify: the CPU too)
    """


@cache_cmd.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def cache_ls(as_json: bool) -> None:
    """List cached stages, most recently used first."""
    import datetime
    import json

    from edgetl.cache import open_cache

    store = open_cache()
    entries = store.entries()
    if as_json:
        click.echo(json.dumps({"dir": str(store.root), "bytes": store.size(), "entries": entries}, indent=1))
        return
    click.echo(f"{store.root}: {len(entries)} stages, {store.size() / 1e6:.1f} MB (limit {store.limit / 1e9:g} GB)")
    if entries:
        click.echo(f"{'key':<14}{'recipe':<24}{'stage':<12}{'MB':>9}  last used")
    for e in entries:
        used = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{e['key'][:12]:<14}{e['recipe'][:22]:<24}{e['stage']:<12}{e['bytes'] / 1e6:>9.1f}  {used}")


@cache_cmd.command("clear")
@friendly
def cache_clear() -> None:
    """Remove every cached stage (the next build runs them all)."""
    from edgetl.cache import open_cache

    store = open_cache()
    n, size = store.clear()
    click.echo(f"removed {n} cached stages ({size / 1e6:.1f} MB) from {store.root}")


@main.command("advise")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def advise_cmd(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the fine-tuning strategy finetune.strategy auto would choose for RECIPE, without training.

    \b
    It loads the data and the backbone as a build does and measures two things: training examples per class, and
    how much the pretrained features help (a linear probe on them vs on the same architecture with random weights).
    Then the scenario table: small + similar -> linear_probe; small + different -> freeze half the blocks;
    medium + similar -> freeze the first third; medium + different or large -> full (layer-wise LR 0.8, or one LR
    for large data unlike the pretraining).

    Example: edgetl advise models/mobilenet_v2_fmnist.yaml
    """
    import dataclasses

    from edgetl.advise import advise_recipe
    from edgetl.config import load_recipe

    advice = advise_recipe(load_recipe(recipe, overrides))
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(advice), "gain": advice.gain}, indent=2))
    else:
        click.echo(advice.describe())
        click.echo(f"recipe: finetune.strategy={advice.strategy} (or finetune.strategy=auto to let the build choose)")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks clean up before the process exits 143."""


def _terminated(*_) -> None:
    raise Terminated


def summary(state) -> str:
    lines = [f"\nbundle: {state.workdir}"]
    if state.rows:
        metric = state.rows[0].get("metric", "metric")[:8]
        lines.append(
            f"{'model':<10}{'file':<18}{metric + ' pt':>10}{metric + ' ORT':>13}{'agree':>8}{'p50 ms':>8}"
            f"{'p90 ms':>8}{'MB':>7}{'params':>10}{'MMACs':>8}"
        )
        for r in state.rows:
            file = r["file"] if r.get("in_bundle", True) else "-"
            lines.append(
                f"{r['stage']:<10}{file:<18}{r['metric_torch']:>10.2f}{r['metric_ort']:>13.2f}"
                f"{r['agreement']:>7.1f}%{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}{r['size_mb']:>7.2f}"
                f"{_millions(r['params'], 9, 2)}M{_millions(r['macs'], 8, 1)}"
            )
    for role, check in state.metrics.get("export", {}).items():
        if isinstance(check, dict):
            against = f" vs {check['source']} FP32 ONNX" if "source" in check else ""
            lines.append(
                f"ORT parity ({role}{against}): max|diff| {check['max_abs_diff']:.2e} (tolerance "
                f"{check['tolerance']:.2e}), agreement {100 * check['agreement']:.2f}%"
            )
    for note in state.metrics.get("quantize", {}).get("notes", []):
        lines.append(f"note: {note}")
    for g in state.metrics.get("verify", {}).get("gates", []):
        lines.append(f"gate {g['gate']}: {g['value']:.3g} vs {g['limit']:g} {'PASS' if g['passed'] else 'FAIL'}")
    cache = state.metrics.get("cache", {})
    cached = [s for s, how in cache.get("stages", {}).items() if how == "cached"]
    if cached:
        lines.append(f"cache: {', '.join(cached)} restored from {cache['dir']} (--no-cache reruns them)")
    return "\n".join(lines)


def _millions(n, width: int, digits: int) -> str:
    return f"{n / 1e6:>{width}.{digits}f}" if n is not None else f"{'n/a':>{width}}"


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Batch size of the random input."
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="ORT intra-op threads (1 is the fair edge baseline).",
)
@click.option(
    "--seq",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequence length of the random input (text models).",
)
@click.option("--runs", default=200, show_default=True, type=click.IntRange(min=1), help="Timed runs after warm-up.")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option(
    "--providers",
    default="cpu",
    show_default=True,
    help="Comma-separated execution providers in priority order: cpu, cuda, tensorrt (ORT places each "
    "node on the first that can run it); one this onnxruntime lacks is an error.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a line.")
@friendly
def bench(
    model: str, batch: int, threads: int, seq: int, runs: int, warmup: int, providers: str, as_json: bool
) -> None:
    """ORT latency of an ONNX MODEL: p50/p90/p99 over RUNS runs on random input of the model's shape."""
    from edgetl.runner import checked_feed, device_info, feed_for, latency, open_session, peak_rss_mb

    sess = open_session(model, threads, providers.split(","))
    stats = latency(sess, checked_feed(sess, feed_for(sess, batch, seq)), runs, warmup)
    stats.update(
        model=model, threads=threads, providers=sess.get_providers(), peak_rss_mb=peak_rss_mb(), device=device_info()
    )
    if as_json:
        click.echo(json.dumps(stats, indent=2))
    else:
        click.echo(
            f"{model}: p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms  p99 {stats['p99_ms']:.3f} ms"
            f"  ({threads} thread(s), batch {batch}, {runs} runs)"
        )


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, metavar="INPUTS...")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Labels per input, best first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--min-score", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Detection: boxes scoring less."
)
@friendly
def predict(bundle: str, images: tuple[str, ...], top_k: int, as_json: bool, min_score: float) -> None:
    """Top-k labels for image files (or texts, for a text bundle; 'FIRST<TAB>SECOND' for a sentence-pair bundle),
    entities for a NER bundle, boxes for a detection bundle, using only the BUNDLE's files.

    The manifest is checked first. Example: edgetl predict artifacts/minilm_rotten_tomatoes "a warm, funny film"
    """
    from edgetl.runner import Bundle, format_result

    results = Bundle(bundle).predict(list(images), top_k, min_score)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(format_result(r))


@main.command("verify")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default="model.onnx", show_default=True, help="Which of the bundle's models to check.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def verify_cmd(bundle: str, model: str, as_json: bool) -> None:
    """Check this machine computes what the build computed: the BUNDLE's golden set (validation inputs as the device
    prepares them, with the shipped model's outputs at build time) through ONNX Runtime here. Exit 0 on PASS, 1 on
    FAIL. The bundle's runner.py does the same on a device: python runner.py BUNDLE verify
    """
    from edgetl.runner import Bundle, format_verify

    result = Bundle(bundle, model=model).verify_golden()
    click.echo(json.dumps(result, indent=2) if as_json else format_verify(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
