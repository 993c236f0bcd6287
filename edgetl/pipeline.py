"""The pipeline: an ordered list of stages, each ``run(state, recipe) -> state`` (``State`` is in ``edgetl.state``;
stages import no other stage, only the library modules).

A stage whose recipe section is absent is skipped. ``build`` runs them in a temporary directory next to the
output and renames it into place only when every stage (gates included) passed, so a failed build never
leaves a half-written bundle.

Under torchrun / ``accelerate launch`` every process runs ``build``: the training stages run in all of them
(``edgetl.distributed``), and only the main process (rank 0) runs the rest, writes the bundle and uses the cache.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from edgetl.config import Recipe
from edgetl.errors import EdgetlError, GateFailed
from edgetl.state import State


class Stage(NamedTuple):
    name: str
    run: Callable[[State, Recipe], State]
    wanted: Callable[[Recipe], bool]  # the recipe condition under which it runs
    # what its output depends on besides the upstream stages' outputs: recipe paths ("quantize", "verify.threads")
    # and "machine" (the CPU, for stages that measure speed); None: never cached (load always runs: the data, task
    # and tokenizer come from it; bundle is seconds and reads the whole recipe)
    deps: tuple[str, ...] | None


def _stages() -> list[Stage]:
    """The one ordered list of stages."""
    from edgetl.stages import bundle, distill, export, finetune, load, ort_format, prune, quantize, verify

    return [  # the export section is always present (the recipe loader refuses export: null)
        Stage("load", load.run, lambda r: True, None),
        Stage("finetune", finetune.run, lambda r: r.finetune is not None, ("finetune",)),
        Stage("prune", prune.run, lambda r: r.prune is not None, ("prune",)),
        Stage("distill", distill.run, lambda r: r.distill is not None, ("distill",)),
        Stage("export", export.run, lambda r: True, ("export", "name")),  # the name is in the ONNX metadata
        Stage("quantize", quantize.run, lambda r: r.quantize is not None, ("quantize", "verify.threads", "machine")),
        Stage("verify", verify.run, lambda r: r.verify is not None, ("verify", "machine")),
        Stage("ort_format", ort_format.run, lambda r: r.export.ort_format, ()),
        Stage("bundle", bundle.run, lambda r: True, None),
    ]


def build(
    recipe: Recipe,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    cache: bool = True,
    metrics: dict | None = None,
) -> State | None:
    """Run every stage the recipe asks for and publish the bundle at ``out`` (default artifacts/<name>); with
    ``cache`` (edgetl.cache) stages whose inputs are unchanged since an earlier build are restored, not rerun.
    ``metrics``: extra report sections (``edgetl search``'s trials), added before the bundle is written.
    In a process other than the main one of a distributed build: its share of the training, then None."""
    import errno

    from edgetl import distributed
    from edgetl.cache import open_cache
    from edgetl.measure import verify_providers

    out = check_output(out, recipe.name)  # before the first stage, not after an hour of training
    if recipe.verify is not None:  # a provider this onnxruntime lacks fails now, not after training
        verify_providers(recipe.verify)
    distributed.check(recipe.train)
    if not distributed.is_main():
        return _follow(recipe)
    store = open_cache() if cache else None  # a refused cache directory fails now too
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise EdgetlError(f"cannot write the bundle next to {out}: {e.strerror or type(e).__name__}") from None
    try:
        state = run_stages(recipe, tmp, store, log, metrics=metrics)
        _publish(tmp, out)
    except GateFailed as e:  # keep what was measured, publish no bundle
        kept = _keep_failed_report(tmp, out)
        e.args = (f"{e.args[0]} (measurements in {kept})",)
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EdgetlError(
                f"no space left on the device holding {out.parent} (nothing was published; the "
                "previous bundle, if any, is unchanged)"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once published (renamed); removed on any failure
        distributed.finish()
    return state.replace(workdir=out)


def _follow(recipe: Recipe) -> None:
    """A process other than the main one: the training stages with the others, in a private temp dir (the main
    process writes the bundle and the cache, and prints)."""
    from edgetl import distributed

    tmp = Path(tempfile.mkdtemp(prefix=f"edgetl-rank{distributed.rank()}."))
    try:
        run_stages(recipe, tmp, None, lambda line: None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        distributed.finish()


def run_stages(
    recipe: Recipe,
    workdir: Path,
    store,
    log: Callable[[str], None] = print,
    until: str | None = None,
    metrics: dict | None = None,
) -> State:
    """Run the recipe's stages in ``workdir`` (every one, or up to and including ``until``), restoring what the
    cache ``store`` (an ``edgetl.cache.Cache`` or None) holds and saving what runs."""
    import torch

    from edgetl import distributed

    distributed.set_alone(False)
    if distributed.distributed():  # the process group, on the recipe's device, before anything talks across it
        distributed.accelerator(recipe.train)
    torch.manual_seed(recipe.seed)
    state = State(recipe=recipe, workdir=workdir)
    stages = [s for s in _stages() if s.wanted(recipe)]
    if until is not None:
        stages = stages[: [s.name for s in stages].index(until) + 1]
    state = _run(stages[0], state, recipe, log)  # load
    start, keys, status = 1, {}, {s.name: "off" for s in stages if s.deps is not None}
    if store is not None:
        keys = stage_keys_for(recipe, state, stages)
        state, start = _resume(store, keys, stages, state, log)
        status = {s.name: ("cached" if i < start else "run") for i, s in enumerate(stages) if s.name in keys}
    if distributed.distributed():  # every process goes on from where the main one resumed
        state, start = _share_resume(state, start, stages)
    cache_info = _cache_report(store, keys, status, stages, start)
    train = {
        **dataclasses.asdict(recipe.train),
        "device": distributed.device_name(recipe.train),
        "processes": distributed.world_size(),
    }
    state = state.replace(metrics={**state.metrics, **(metrics or {}), "cache": cache_info, "train": train})
    for stage in stages[start:]:
        if distributed.distributed() and stage.name not in distributed.TRAINING_STAGES:
            if not distributed.is_main():
                break  # this process's part is done
            distributed.set_alone(True)
        state = _run(stage, state, recipe, log)
        if store is not None and stage.name in keys:
            why = store.save(keys[stage.name], stage.name, state, set(keys.values()), log)
            if why is not None:  # in the report: a build that can never resume should say so
                info = state.metrics["cache"]
                info = {**info, "unsaved": {**info.get("unsaved", {}), stage.name: why}}
                state = state.replace(metrics={**state.metrics, "cache": info})
    return state


_RESTORED = ("teacher", "reference", "history", "rows", "onnx", "models", "metrics", "timings")


def _share_resume(state: State, start: int, stages: list[Stage]) -> tuple[State, int]:
    """The main process's resume point, and what it restored when the other processes still have training to do."""
    import torch

    from edgetl import distributed

    restored = None
    if distributed.is_main() and 1 < start < len(stages) and stages[start].name in distributed.TRAINING_STAGES:
        restored = {"model": state.backbone.model, "rng": torch.get_rng_state()}
        restored.update({f: getattr(state, f) for f in _RESTORED})
    start, restored = distributed.share((start, restored))
    if not distributed.is_main() and restored is not None:
        torch.set_rng_state(restored.pop("rng"))
        state = state.replace(backbone=dataclasses.replace(state.backbone, model=restored.pop("model")), **restored)
    return state, start


def _run(stage: Stage, state: State, recipe: Recipe, log: Callable[[str], None]) -> State:
    log(f"[{stage.name}]")
    t0 = time.perf_counter()
    state = stage.run(state, recipe)
    return state.replace(timings={**state.timings, stage.name: round(time.perf_counter() - t0, 2)})


def stage_keys_for(recipe: Recipe, state: State, stages: list[Stage]) -> dict[str, str]:
    """The cache key of every cached stage that runs (``load`` has run: the data fingerprint is part of them)."""
    from edgetl.cache import stage_keys

    return stage_keys(recipe, state.data, [(s.name, s.deps) for s in stages if s.deps is not None])


def _resume(store, keys: dict[str, str], stages: list[Stage], state: State, log) -> tuple[State, int]:
    """Restore the latest stage that has a cache entry (all before it are implied); returns (state, next index)."""
    import datetime

    for i in range(len(stages) - 1, 0, -1):
        key = keys.get(stages[i].name)
        if key is None or store.entry(key) is None:
            continue
        try:
            restored, entry = store.restore(key, state)
        except Exception as e:  # noqa: BLE001 - a damaged entry is a miss, not a failed build
            log(f"  cache: entry {key[:12]} of {stages[i].name} unusable ({type(e).__name__}); running it")
            for p in state.workdir.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            continue
        for s in stages[1 : i + 1]:
            if s.name in keys:  # each stage's own entry when it has one (it may have been saved by another build)
                created = (store.entry(keys[s.name]) or entry)["created"]
                saved = datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")
                log(f"[{s.name}] cached ({keys[s.name][:12]}, saved {saved})")
        return restored, i + 1
    return state, 1


def _cache_report(store, keys, status, stages, start) -> dict:
    return {
        "dir": str(store.root) if store is not None else None,
        "resumed_after": stages[start - 1].name if store is not None and start > 1 else None,
        "stages": status,
        "keys": {k: v[:16] for k, v in keys.items()},
    }


def check_output(out: str | Path | None, name: str) -> Path:
    """The output directory, refused with one line unless it is free or an edgetl bundle edgetl may replace."""
    if out is None:
        out = Path("artifacts") / name
    elif str(out).strip() == "":
        raise EdgetlError("--out is empty: give a directory (or leave --out out for artifacts/<name>)")
    out = Path(out)
    if (
        out.name in ("", ".", "..")
        or out.resolve() == Path.cwd().resolve()
        or Path.cwd().resolve().is_relative_to(out.resolve())
    ):
        raise EdgetlError(f"--out {out}: give a new or bundle directory, not the current directory or its parent")
    if out.is_symlink():
        raise EdgetlError(f"--out {out} is a symbolic link; give the real directory it should be")
    for parent in out.resolve().parents:  # a bundle inside a bundle would change the outer one's files
        if (parent / "manifest.json").is_file() and is_bundle(parent) is None:
            raise EdgetlError(f"--out {out} is inside the edgetl bundle {parent}; choose a directory outside it")
        if parent.exists() and not parent.is_dir():
            raise EdgetlError(f"--out {out}: {parent} is a file, not a directory")
    _check_replaceable(out)
    return out


def is_bundle(path: Path) -> str | None:
    """None when ``path`` is a bundle edgetl wrote and nobody changed since; else why not (its manifest has
    edgetl's format marker, every listed file is present and unchanged, and nothing else is in it)."""
    from edgetl.runner import MANIFEST, BundleError, verify_manifest

    try:
        manifest = verify_manifest(path, required=())
    except BundleError as e:
        return str(e)
    if "format" not in manifest:
        return f"{MANIFEST} has no edgetl format marker"
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if not p.is_dir() and p.relative_to(path).as_posix() not in listed
    )
    return f"it holds {extra[0]}, which edgetl did not write" if extra else None


def _check_replaceable(out: Path) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise EdgetlError(f"output {out} exists and is not a directory; refusing to replace it")
        if not any(out.iterdir()):
            return  # an empty directory holds nothing to lose
        why = is_bundle(out)
        if why is not None:
            raise EdgetlError(f"output {out} exists and is not an edgetl bundle ({why}); refusing to replace it")


def _owner_alive(tmp: Path) -> bool:
    """Whether the build that made ``.<name>.<pid>.<random>.partial`` still runs (a killed one left it)."""
    from edgetl.cache import pid_alive

    try:
        return pid_alive(int(tmp.name.split(".")[-3]))
    except (ValueError, IndexError):
        return False


def _clean_leftovers(out: Path) -> None:
    """What a killed build left beside ``out``: its temp dirs (removed) and an interrupted publish (the old bundle
    parked at ``.<name>.old`` with nothing at ``out``: put back)."""
    for tmp in out.parent.glob(f".{out.name}.*.partial"):
        if tmp.is_dir() and not _owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    old = out.with_name(f".{out.name}.old")
    if old.is_dir():
        if not out.exists() and is_bundle(old) is None:
            old.rename(out)
        elif out.exists():
            shutil.rmtree(old, ignore_errors=True)


def _failed_reports(out: Path) -> list[Path]:
    return [out.with_name(f"{out.name}.failed-report.{ext}") for ext in ("json", "html")]


def _keep_failed_report(tmp: Path, out: Path) -> Path:
    from edgetl.report import write_html

    kept_json, kept_html = _failed_reports(out)
    shutil.copyfile(tmp / "report.json", kept_json)
    shutil.copyfile(write_html(tmp), kept_html)
    return kept_json


def _publish(tmp: Path, out: Path) -> None:
    """Atomically put ``tmp`` at ``out``, replacing an older bundle only once the new one is complete; the old
    bundle comes back if the rename fails, and an earlier failed build's report beside ``out`` is removed."""
    _check_replaceable(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            try:
                old.rename(out)  # put the previous bundle back
            except OSError:
                pass  # it stays at .<name>.old; the next build puts it back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in _failed_reports(out):
        stale.unlink(missing_ok=True)
