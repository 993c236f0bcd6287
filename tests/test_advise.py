"""finetune.strategy auto / edgetl advise: the scenario table on plain numbers, the measurements on a tiny
backbone, and an auto build that records its reasoning."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgetl.advise import choose
from edgetl.cli import main
from tests.conftest import write_recipe


@pytest.mark.parametrize(
    "per_class, pretrained, random, strategy, freeze, decay",
    [
        (20, 90.0, 40.0, "linear_probe", 0, 1.0),  # few examples, features that already separate them
        (20, 60.0, 55.0, "freeze", 9, 0.8),  # few examples, a domain unlike the pretraining: half the blocks
        (200, 90.0, 40.0, "freeze", 6, 0.8),  # similar data: the later blocks
        (200, 84.0, 78.0, "full", 0, 1.0),  # Fashion-MNIST on ImageNet weights: everything, one LR
        (2000, 90.0, 40.0, "full", 0, 0.8),  # plenty of similar data: layer-wise LRs
        (2000, 70.0, 65.0, "full", 0, 1.0),
    ],
)
def test_the_scenario_table(per_class, pretrained, random, strategy, freeze, decay):
    advice = choose(per_class, pretrained, random, blocks=19)
    assert (advice.strategy, advice.freeze_blocks, advice.lr_decay) == (strategy, freeze, decay)
    assert f"{per_class} training examples per class" in advice.describe() and strategy in advice.describe()


def test_advise_measures_without_training_and_auto_builds_with_its_choice(tiny_raw, tmp_path):
    tiny_raw["finetune"]["strategy"] = "auto"
    path = write_recipe(tmp_path / "r.yaml", tiny_raw)
    result = CliRunner().invoke(main, ["advise", path, "--json"])
    assert result.exit_code == 0, result.output
    advice = json.loads(result.output[result.output.index("{") :])
    assert advice["per_class"] > 0 and 0 <= advice["probe_random"] <= 100 and 0 <= advice["probe_pretrained"] <= 100
    assert advice["strategy"] in ("linear_probe", "freeze", "full") and advice["reason"]
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["build", path, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "strategy auto: " in result.output
    finetune = json.loads((out / "report.json").read_text())["metrics"]["finetune"]
    assert finetune["strategy"] == advice["strategy"] and finetune["advice"]["text"].startswith(
        f"{advice['per_class']:.0f} training examples per class"
    )


def test_auto_is_for_classification(tmp_path):
    from tests.tiny import detection_recipe

    raw = detection_recipe(tmp_path / "a.json")
    raw["finetune"]["strategy"] = "auto"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw)])
    assert result.exit_code == 2 and "auto measures a classification probe" in result.output
