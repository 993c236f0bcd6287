"""edgetl search (issue 19, part 2): Optuna over the compression settings, one shared fine-tune, validation-only
trials, the fastest feasible trial shipped as a normal bundle, a resumable study, an unreachable budget refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.config import recipe_from_dict
from tests.conftest import write_recipe


@pytest.fixture
def searchable(tiny_raw):
    """The digits recipe with the searched sections cheap: one recovery epoch, one QAT epoch."""
    return {
        **tiny_raw,
        "prune": {"steps": 1, "recovery_epochs": 1},
        "quantize": {"epochs": 1, "calibration_size": 64, "require_speedup": False},
        "verify": {**tiny_raw["verify"], "max_accuracy_drop": 50.0},
    }


def test_search_fine_tunes_once_and_ships_the_fastest_trial_inside_the_budget(searchable, tmp_path, monkeypatch):
    import edgetl.search as search_module
    import edgetl.stages.finetune as finetune
    from edgetl.search import search, space

    runs = []
    original = finetune.run
    monkeypatch.setattr(finetune, "run", lambda state, recipe: runs.append(1) or original(state, recipe))
    # every point trained (skipping on timed layers depends on timing noise; it has its own test below)
    monkeypatch.setattr(search_module, "speed_bound", lambda *a: None)
    out = tmp_path / "out"
    recipe = recipe_from_dict(searchable)
    state, result = search(recipe, out, trials=3)
    assert len(runs) == 1  # every trial and the final build start from the one cached fine-tune

    rows = result["trials"]
    assert len(rows) == 3 and set(rows[0]["params"]) == set(space(recipe))
    # a point the model cannot reach (a MACs target below what this tiny net can lose) fails with its one-line
    # reason and the study goes on; the seeded sampler draws one such point here
    failed = [t for t in rows if t["state"] != "COMPLETE"]
    assert all(t["state"] == "FAIL" and "out of reach" in t["error"] and "\n" not in t["error"] for t in failed)
    trials = [t for t in rows if t["state"] == "COMPLETE"]
    assert len(trials) >= 2 and rows[0] in trials
    assert all(0 < t["speedup"] and t["size_mb"] > 0 and t["feasible"] == (t["val_drop"] <= 50.0) for t in trials)
    chosen = next(t for t in trials if t["number"] == result["chosen"])
    assert chosen["number"] in result["front"] and chosen["feasible"]
    assert chosen["speedup"] == max(t["speedup"] for t in trials if t["number"] in result["front"])
    p = chosen["params"]  # the bundle is that trial's recipe, measured on test by verify
    if p["prune.target_macs"] < 1.0:
        assert state.recipe.prune.target_macs == p["prune.target_macs"]
        assert state.recipe.prune.importance == p["prune.importance"]
    else:  # the top of the range: no pruning
        assert state.recipe.prune is None
    assert state.recipe.quantize.method == p["quantize.method"]
    assert (state.recipe.distill.epochs if state.recipe.distill else 0) == p["distill.epochs"]
    assert state.metrics["cache"]["stages"]["finetune"] == "cached"
    assert state.metrics["cache"]["stages"]["verify"] == "run"

    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["search"]["chosen"] == result["chosen"] and report["rows"]
    html = (out / "report.html").read_text()
    assert "Compression search" in html and "feasible Pareto front" in html and "not rendered" not in html
    assert (tmp_path / "out.search.db").is_file()

    # the study resumes: one more trial joins the three, still without a second fine-tune; it is trial 0's point
    # again (enqueued, as TPE sometimes proposes one), so trial 0's measurements are reused, nothing is judged again
    import optuna

    optuna.load_study(study_name=result["study"], storage=result["storage"]).enqueue_trial(trials[0]["params"])
    monkeypatch.setattr(search_module, "judge", lambda *a: pytest.fail("a repeated point was judged again"))
    result = CliRunner().invoke(
        main, ["search", write_recipe(tmp_path / "r.yaml", searchable), "--out", str(out), "--trials", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "3 earlier trials" in result.output and "of 4, study tiny-" in result.output
    assert "the same build: edgetl build " in result.output and "--set prune.target_macs=" in result.output
    assert "the same point as trial 0: its measurements reused" in result.output
    assert len(runs) == 1


def test_a_point_whose_layers_cannot_beat_the_fastest_feasible_trial_is_not_trained(searchable, tmp_path, monkeypatch):
    import edgetl.search as search_module
    import edgetl.stages.distill as distill

    bounds, distilled = [], []
    real = search_module.speed_bound
    monkeypatch.setattr(search_module, "speed_bound", lambda *a: bounds.append(real(*a)) or 0.01)
    original = distill.run
    monkeypatch.setattr(distill, "run", lambda state, recipe: distilled.append(1) or original(state, recipe))
    searchable["distill"] = {"epochs": 1}
    state, result = search_module.search(recipe_from_dict(searchable), tmp_path / "out", trials=4)
    rows = result["trials"]
    first = next(t for t in rows if t["state"] == "COMPLETE" and t["feasible"])
    later = [t for t in rows if t["number"] > first["number"]]
    pruned = [t for t in later if t["params"]["prune.target_macs"] < 1 or t["params"].get("prune.input_size")]
    assert pruned and bounds and all(b > 0 for b in bounds)  # measured on the real pruned layers
    for t in pruned:  # measured after pruning, not trained further
        assert t["state"] == "PRUNED" and t["error"].startswith("skipped before distillation: its layers run")
    assert len(distilled) <= len(rows) - len(pruned) + 1  # the final build may distil once more


def test_a_budget_no_trial_meets_is_one_line_and_no_bundle(searchable, tmp_path):
    searchable["verify"]["max_size_mb"] = 1e-6
    recipe = write_recipe(tmp_path / "r.yaml", searchable)
    result = CliRunner().invoke(main, ["search", recipe, "--out", str(tmp_path / "out"), "--trials", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no trial of 1 met the budget"), result.stderr
    assert "closest: trial 0" in lines[0] and not (tmp_path / "out").exists()


def test_search_needs_a_finetune_and_a_reachable_storage(searchable, tmp_path):
    del searchable["finetune"]
    recipe = write_recipe(tmp_path / "r.yaml", searchable)
    result = CliRunner().invoke(main, ["search", recipe, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs a finetune section" in result.stderr
    searchable["finetune"] = {"epochs": 1}
    recipe = write_recipe(tmp_path / "r.yaml", searchable)
    result = CliRunner().invoke(main, ["search", recipe, "--out", str(tmp_path / "o"), "--storage", "nosuch://x"])
    assert result.exit_code == 2 and "cannot open the search storage nosuch://x" in result.stderr


def test_a_point_of_the_space_is_a_valid_recipe_and_the_budget_names_the_study(searchable):
    from edgetl.search import as_overrides, study_name, trial_recipe

    recipe = recipe_from_dict(searchable)
    point = {"prune.target_macs": 1.0, "prune.importance": "lamp", "distill.epochs": 0, "quantize.method": "ptq"}
    r = trial_recipe(recipe, point)  # the top of the MACs range is "no pruning"; 0 epochs is "no distillation"
    assert r.prune is None and r.distill is None and r.quantize.method == "ptq"
    assert as_overrides(point) == ["prune=null", "distill=null", "quantize.method=ptq"]
    # a lower input resolution without channel pruning keeps a prune section that removes no channels
    low = trial_recipe(recipe, {**point, "prune.input_size": 24})
    assert (low.prune.input_size, low.prune.ratio, low.prune.target_macs, low.prune.importance) == (
        24,
        0.0,
        None,
        recipe.prune.importance,  # moot without channels: the recipe's, so such points share the stage cache
    )
    assert as_overrides({**point, "prune.input_size": 24})[:3] == [  # the same recipe as edgetl build arguments
        "prune.ratio=0.0",
        "prune.target_macs=null",
        "prune.input_size=24",
    ]
    assert recipe_from_dict(searchable, as_overrides({**point, "prune.input_size": 24})).prune == low.prune
    assert trial_recipe(recipe, {**point, "prune.input_size": None}).prune is None
    assert trial_recipe(recipe, {**point, "distill.transfer_size": 100}).distill is None  # moot without distillation
    assert as_overrides({**point, "distill.transfer_size": 100}) == [
        "prune=null",
        "distill=null",
        "quantize.method=ptq",
    ]
    # a new study's first trial is the recipe's own settings, on the space's grid; a ratio has no MACs value
    from edgetl.search import recipe_point, space

    own = recipe_from_dict(
        searchable, ["prune.target_macs=0.43", "prune.input_size=24", "distill.epochs=1", "quantize.method=ptq"]
    )
    first = recipe_point(own, space(own))
    assert (first["prune.target_macs"], first["prune.input_size"], first["distill.epochs"]) == (0.45, 24, 1)
    assert first["quantize.method"] == "ptq" and first["prune.recovery_epochs"] == 1
    assert "prune.target_macs" not in recipe_point(recipe, space(recipe))
    assert recipe_point(recipe_from_dict(searchable, ["prune=null"]), space(recipe))["prune.target_macs"] == 1.0
    r = trial_recipe(recipe, {**point, "prune.target_macs": 0.35, "distill.epochs": 2})
    assert (r.prune.target_macs, r.prune.importance, r.distill.epochs) == (0.35, "lamp", 2)
    assert r.prune.steps == 1  # the recipe's own prune settings stay
    searched = recipe_from_dict(searchable, ["prune.target_macs=0.5", "quantize.method=qat"])
    assert study_name(searched) == study_name(recipe)  # the searched keys are the study's variables, not its name
    tighter = recipe_from_dict(searchable, ["verify.max_accuracy_drop=1"])
    assert study_name(tighter) != study_name(recipe)  # stored constraints are relative to the budget


def test_the_training_budget_is_searched_and_a_margin_tightens_the_metric_gates(searchable):
    from edgetl.search import budget, space, study_name, trial_recipe

    recipe = recipe_from_dict(searchable)
    assert space(recipe)["prune.recovery_epochs"] == ("int", (0, 2 * recipe.prune.recovery_epochs, 1))
    assert space(recipe)["prune.input_size"] == ("categorical", (None, 24, 16))  # 32 px: 5/6 and 2/3 of it -> 24
    demo = recipe_from_dict(searchable, ["backbone.input_size=96"])
    assert space(demo)["prune.input_size"] == ("categorical", (None, 80, 64, 48))
    assert "distill.transfer_size" not in space(recipe)
    assert space(recipe_from_dict(searchable, ["distill.transfer_size=500"]))["distill.transfer_size"] == (
        "categorical",
        (0, 500),
    )
    assert "prune.input_size" not in space(recipe_from_dict(searchable, ["backbone.input_size=null"]))
    r = trial_recipe(recipe, {"prune.target_macs": 0.5, "prune.recovery_epochs": 2})
    assert r.prune.recovery_epochs == 2
    gates = budget(recipe_from_dict(searchable, ["verify.max_accuracy_drop=2", "verify.min_accuracy=80"]))
    inside = budget(recipe_from_dict(searchable, ["verify.max_accuracy_drop=2", "verify.min_accuracy=80"]), 0.5)
    assert (gates["max_metric_drop"], gates["min_metric"]) == (2, 80)
    assert (inside["max_metric_drop"], inside["min_metric"]) == (1.5, 80.5)  # validation must beat them by 0.5
    assert study_name(recipe, 0.5) != study_name(recipe)  # its constraints are other numbers


def test_a_trial_whose_process_was_killed_is_failed_and_its_point_queued_again(tmp_path):
    """The storage beats a heartbeat per running trial; one that stops beating (kill -9) is failed by the next worker
    and its point is tried once more."""
    import time

    import optuna
    from optuna.trial import TrialState

    from edgetl.search import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", grace_s=1)
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    trial = study.ask()
    trial.suggest_float("prune.target_macs", 0.2, 1.0, step=0.05)
    storage.record_heartbeat(trial._trial_id)  # its process beat once, then died
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    states = [(t.state, t.params) for t in study.get_trials(deepcopy=False)]
    assert states[0] == (TrialState.FAIL, trial.params)
    assert states[1] == (TrialState.WAITING, trial.params)  # queued again: the next optimize runs it first
