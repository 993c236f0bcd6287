"""The classification task's half of the protocol, on plain data: decode, metric and its direction, agreement,
parity, pseudo-labels, details, the head and its losses; and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetl.errors import EdgetlError
from edgetl.tasks import create_task, report_sections
from edgetl.tasks.base import Metric


@pytest.fixture
def task():
    return create_task("classification", ["cat", "dog", "eel"])


def test_decode_score_and_agreement(task):
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.5]])
    preds = task.decode(logits)
    assert preds.tolist() == [0, 1, 2, 0]
    metric = task.score(preds, np.array([0, 1, 1, 0]))
    assert metric == Metric("accuracy", 75.0, True) and str(metric) == "accuracy 75.00%"
    assert task.agreement(preds, np.array([0, 1, 2, 2])) == 75.0


def test_metric_direction_decides_better_and_drop():
    up, down = Metric("acc", 80.0), Metric("acc", 78.5)
    assert up.better_than(down) and not down.better_than(up) and up.better_than(None)
    assert down.drop_from(up) == pytest.approx(1.5)
    loss_a, loss_b = Metric("WER", 10.0, higher_is_better=False), Metric("WER", 12.0, higher_is_better=False)
    assert loss_a.better_than(loss_b) and loss_b.drop_from(loss_a) == pytest.approx(2.0)


def test_parity_is_scale_aware_and_counts_agreement_per_example(task):
    ref = [np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]), np.array([[0.0, 0.0, 10.0]])]
    got = [r + 0.0015 for r in ref]
    p = task.parity(ref, got, atol=1e-3, rtol=1e-4)
    assert p.n == 3 and p.agreement == 1.0 and p.ok  # tolerance 1e-3 + 1e-4 * 10 = 2e-3
    flipped = [np.array([[0.0, 10.0, 0.0], [0.0, 10.0, 0.0]]), ref[1]]
    p = task.parity(ref, flipped, atol=1e-3, rtol=0.0)
    assert not p.ok and p.agreement == pytest.approx(2 / 3)


def test_pseudo_targets_and_confusion(task):
    assert task.pseudo_targets(np.array([[0.1, 0.9, 0.0]])).tolist() == [1]
    details = task.details(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert details == {"confusion": [[1, 0, 0], [0, 1, 0], [0, 1, 1]]}


def test_head_losses_and_output_check(task):
    head = task.head(8)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3 == task.num_outputs
    logits, y = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]), torch.tensor([0, 2])
    ce = task.loss(logits, y)
    assert float(ce) < 0.1 and float(task.loss(logits, y, label_smoothing=0.3)) > float(ce)
    assert float(task.distill_loss(logits, logits, y, 0.0, 4.0)) == pytest.approx(float(ce))
    assert float(task.distill_loss(logits, logits, y, 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)
    task.check_outputs(logits)
    with pytest.raises(EdgetlError, match="outputs 2 scores for 3 classes"):
        task.check_outputs(torch.zeros(1, 2))
    assert task.output_names == ("logits",) and task.output_axes() == {"logits": {0: "batch"}}


def test_registry_and_report_sections():
    with pytest.raises(EdgetlError, match="task.kind 'ranking' is not implemented"):
        create_task("ranking", [])
    assert create_task("seq2seq", []).metric_name == "BLEU"
    assert [t for t, _ in report_sections("seq2seq")][0] == "Generation metrics"
    assert [t for t, _ in report_sections("detection")][0] == "Average precision per class"
    titles = [t for t, _ in report_sections("classification")]
    assert "Confusion matrix (shipped model)" in titles
    assert report_sections(None) == report_sections("classification")  # older reports: classification
