"""Object detection: the runtime's box decoding and NMS against torchvision's, COCO mAP and teacher agreement on
plain boxes, a training step, recipe and annotation errors, and a tiny SSDLite built end to end into a bundle whose
runner returns the build's boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.tasks import create_task
from tests.conftest import golden_pngs, rebuilt_from_cache, write_recipe
from tests.tiny import detection_recipe, write_digit_boxes

CLASSES = ["a", "b", "c"]


def _detector(size: int = 64):
    import torch
    import torchvision

    from edgetl.detector import build_ssdlite

    torch.manual_seed(0)
    return build_ssdlite(torchvision.models.mobilenet_v2(weights=None), size, len(CLASSES)).eval()


def test_runtime_decoding_equals_torchvisions_ssd_postprocess():
    """runner.decode_detections (numpy: BoxCoder decode, per-class threshold and top-k, NMS) gives torchvision's
    SSD.postprocess_detections boxes, scores and labels on the same raw outputs."""
    import torch
    from torchvision.models.detection.ssd import SSD

    from edgetl.detector import loss_helper
    from edgetl.runner import decode_detections

    model = _detector(96)
    torch.manual_seed(1)
    out = model(torch.randn(3, 3, 96, 96)) + torch.randn(3, len(model.anchors), 4 + 4) * 2
    h = loss_helper()
    head = {"bbox_regression": out[..., :4], "cls_logits": out[..., 4:]}
    want = SSD.postprocess_detections(h, head, [model.anchors] * 3, [(96, 96)] * 3)
    got = decode_detections(out.detach().numpy(), create_task("detection", CLASSES).decode_params(model=model))
    for w, g in zip(want, got, strict=True):
        order = np.argsort(-w["scores"].detach().numpy(), kind="stable")
        assert len(g["boxes"]) == len(order) > 10
        assert np.allclose(g["boxes"], w["boxes"].detach().numpy()[order], atol=1e-3)
        assert np.allclose(g["scores"], w["scores"].detach().numpy()[order], atol=1e-5)
        assert (g["labels"] == w["labels"].numpy()[order] - 1).all()  # 0-based, background removed


def test_nms_keeps_what_torchvision_keeps():
    import torch
    import torchvision

    from edgetl.runner import nms

    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 150, (600, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (600, 2))], 1)
    scores = rng.random(600)
    want = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.5).numpy()
    assert (nms(boxes, scores, 0.5) == want).all() and (nms(boxes, scores, 0.5, limit=7) == want[:7]).all()


def _targets():
    return [
        {"boxes": np.array([[10, 10, 30, 30], [40, 40, 60, 62]], np.float32), "labels": np.array([0, 1])},
        {"boxes": np.array([[5, 5, 25, 45]], np.float32), "labels": np.array([2])},
        {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)},
    ]


def _as_predictions(targets, shift: float = 0.0, labels=None):
    return [
        {
            "boxes": t["boxes"] + shift,
            "scores": np.full(len(t["boxes"]), 0.9, np.float32),
            "labels": t["labels"] if labels is None else np.full(len(t["labels"]), labels),
        }
        for t in targets
    ]


def test_coco_map_rewards_exact_boxes_and_punishes_wrong_ones():
    task = create_task("detection", CLASSES)
    targets = _targets()
    assert task.score(_as_predictions(targets), targets).value == pytest.approx(100.0)
    shifted = task.score(_as_predictions(targets, shift=4.0), targets).value
    assert 0.0 < shifted < 100.0  # IoU ~0.6-0.7: counts at 0.5, not at 0.75
    assert task.score(_as_predictions(targets, labels=0), targets).value < 50.0  # wrong classes
    nothing = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)} for _ in targets]
    assert task.score(nothing, targets).value == 0.0
    details = task.details(_as_predictions(targets), targets)
    assert details["map50"] == pytest.approx(100.0) and set(details["per_class_ap"]) == set(CLASSES)
    assert len(details["pr50"]["a"]) == 101


def test_agreement_is_the_f1_of_matched_confident_boxes():
    task = create_task("detection", CLASSES)
    teacher = _as_predictions(_targets())
    assert task.agreement(teacher, teacher) == 100.0
    assert task.agreement(_as_predictions(_targets(), shift=30.0), teacher) == 0.0
    half = [dict(p) for p in teacher]
    half[0] = {k: v[:1] for k, v in teacher[0].items()}  # one of the three objects missed
    assert task.agreement(half, teacher) == pytest.approx(100 * 2 * 2 / 5)


def test_training_steps_lower_the_ssd_loss():
    import torch

    model = _detector(64).train()
    task = create_task("detection", CLASSES)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[30.0, 20.0, 60.0, 50.0], [2.0, 2.0, 20.0, 24.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
        {"boxes": torch.tensor([[10.0, 30.0, 40.0, 62.0]]), "labels": torch.tensor([2])},
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = task.loss(model(x), targets, model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    student, teacher = model(x), model(x).detach()
    same = task.distill_loss(student, teacher, targets, 1.0, 4.0, model=model)
    other = task.distill_loss(student, teacher + torch.randn_like(teacher), targets, 1.0, 4.0, model=model)
    assert float(same.detach()) < 1e-4 < float(other.detach())  # imitation is zero against itself


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"kind": "folder", "path": "x"}}, "detection reads coco, voc or yolo annotations"),
        ({"backbone": {"name": "timm:mobilenetv3_small_050"}}, "builds on a torchvision backbone"),
        ({"finetune": {"strategy": "linear_probe"}}, "linear_probe trains a classifier"),
    ],
)
def test_recipes_that_cannot_detect_fail_at_load(tmp_path, change, message):
    raw = detection_recipe(tmp_path / "a.json")
    for key, value in change.items():
        raw[key] = {**raw[key], **value}
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw)])
    assert result.exit_code == 2 and message in result.output


def test_a_bad_box_is_one_error_line_naming_the_file(tmp_path):
    ann = write_digit_boxes(tmp_path / "data", n=10)
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [50, 50, 40, 40]  # past the 64 px image
    ann.write_text(json.dumps(coco))
    edgetl = str(Path(sys.executable).parent / "edgetl")
    proc = subprocess.run(
        [edgetl, "build", write_recipe(tmp_path / "r.yaml", detection_recipe(ann)), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(ann) in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def det_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    ann = write_digit_boxes(tmp / "data", n=64)
    out = tmp / "bundle"
    recipe = detection_recipe(ann)
    recipe["quantize"] = {**recipe["quantize"], "method": "qat", "epochs": 1}  # QAT through fit, PTQ beside it
    result = CliRunner().invoke(main, ["build", write_recipe(tmp / "r.yaml", recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


def test_detection_bundle_is_fine_tuned_pruned_distilled_and_int8(det_bundle):
    out, report = det_bundle
    assert "unsaved" not in report["metrics"]["cache"]  # every stage's models pickle: a rebuild resumes
    rows = {r["stage"]: r for r in report["rows"]}
    assert report["task"] == "detection" and report["metric"]["name"] == "mAP"
    assert {"fp32", "pruned", "distilled", "ptq", "qat"} <= set(rows) and any(r["shipped"] for r in report["rows"])
    for role in ("fp32", "pruned", "distilled"):  # every float model matches PyTorch anchor by anchor
        parity = report["metrics"]["export"][role]
        assert parity["max_abs_diff"] <= parity["tolerance"] and parity["agreement"] == 1.0
    assert rows["pruned"]["params"] < rows["fp32"]["params"] and rows["pruned"]["macs"] < rows["fp32"]["macs"]
    assert set(rows["fp32"]["per_class_ap"]) == {"digit0", "digit1", "digit7"} and "map50" in rows["fp32"]
    assert json.loads((out / "labels.json").read_text()) == ["digit0", "digit1", "digit7"]
    settings = json.loads((out / "detection.json").read_text())
    assert np.asarray(settings["anchors"]).shape[1] == 4 and settings["size"] == 64
    html = (out / "report.html").read_text()
    assert "Average precision per class" in html and "Precision / recall at IoU 0.5" in html
    examples = report["metrics"]["verify"]["examples"]
    assert len(examples) == 6 and all(e["png"] and len(e["true"]) <= 2 for e in examples)
    assert html.count("data:image/png;base64,") >= 6 + 2  # the six test images and the plots


def test_int8_runs_int8_convs_and_keeps_the_box_and_score_tail_float(det_bundle):
    import onnx

    out, report = det_bundle
    shipped = next(r for r in report["rows"] if r["shipped"])
    assert shipped["stage"] not in ("fp32", "pruned", "distilled")
    graph = onnx.load(str(out / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    int8 = [
        n for n in convs if producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"
    ]
    assert len(int8) >= 0.8 * len(convs)  # (QDQ: ORT runs these as int8 convolutions)
    tail = producer[graph.output[0].name]
    assert tail.op_type == "Concat"  # box deltas and logits joined in float, no shared uint8 scale
    assert all(producer[i].op_type not in ("DequantizeLinear", "QuantizeLinear") for i in tail.input)


def test_runner_predicts_the_builds_boxes_and_draws_them(det_bundle, tmp_path):
    """The runner on PNG files of the golden images (prepared at the model's size) returns exactly what the build's
    decoding gives on the model's outputs for them; --draw writes the picture; verify passes."""
    from edgetl.runner import Bundle, decode_detections, normalize

    out, _ = det_bundle
    images, files = golden_pngs(out, 4, tmp_path)
    bundle = Bundle(out)
    want = decode_detections(
        bundle.session.run(None, {"input": normalize(images, bundle.preprocess)})[0], bundle.detection
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(out / "runner.py"),
            str(out),
            "predict",
            *map(str, files),
            "--json",
            "--min-score",
            "0",
            "--draw",
            str(tmp_path / "drawn"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for got, w in zip(json.loads(proc.stdout), want, strict=True):
        assert [o["label"] for o in got["objects"]] == [bundle.labels[c] for c in w["labels"]]
        assert np.allclose([o["box"] for o in got["objects"]], np.round(w["boxes"], 1).reshape(-1, 4), atol=0.051)
        assert np.allclose([o["score"] for o in got["objects"]], w["scores"], atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [f"{i}.boxes.png" for i in range(4)]
    verify = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "verify"], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stdout.startswith("verify PASS"), verify.stdout + verify.stderr


def test_transfer_strategies_train_the_head_and_keep_frozen_trunk_blocks(tmp_path):
    """freeze (the whole trunk) trains only the new extra blocks and box / class head; gradual unfreezing starts
    there and opens trunk blocks from the top as epochs pass."""
    import dataclasses

    import torch

    from edgetl.config import recipe_from_dict
    from edgetl.stages import finetune, load
    from edgetl.state import State

    raw = detection_recipe(write_digit_boxes(tmp_path / "data", n=40))
    raw["finetune"] = {"strategy": "freeze", "epochs": 1, "lr": 0.01, "freeze_blocks": 19}
    recipe = recipe_from_dict({k: v for k, v in raw.items() if k not in ("prune", "distill", "quantize")})
    state = load.run(State(recipe=recipe, workdir=tmp_path / "w"), recipe)
    assert len(state.backbone.blocks) == 19 and state.backbone.head == "det"  # MobileNetV2's features, then ours
    before = {k: v.clone() for k, v in state.backbone.model.state_dict().items()}
    after = finetune.run(state, recipe).backbone.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("det.head.") for k in changed) and any(k.startswith("det.extras.") for k in changed)
    assert not any(k.startswith("features.") for k in changed)  # weights and BatchNorm statistics alike
    cfg = dataclasses.replace(recipe.finetune, strategy="gradual_unfreeze", unfreeze_every=1, unfreeze_group=2)
    _, on_epoch_start = finetune.param_groups(state.backbone, cfg)
    model = state.backbone.model
    for epoch, opened in ((0, set()), (1, {17, 18}), (2, {15, 16, 17, 18})):
        on_epoch_start(epoch)
        trainable = {
            int(n.split(".")[1]) for n, p in model.named_parameters() if n.startswith("features.") and p.requires_grad
        }
        assert trainable == opened and all(p.requires_grad for p in model.det.parameters())


def test_torchvisions_own_ssdlite_fine_tunes_with_a_new_class_head(tmp_path):
    """``torchvision:ssdlite320_mobilenet_v3_large`` (COCO weights for online users; random here) gets a head for
    the data's classes and its anchors at the recipe's size, and builds into a bundle like edgetl's own SSDLite."""
    raw = detection_recipe(write_digit_boxes(tmp_path / "data", n=40), size=96)
    raw["backbone"] = {"name": "torchvision:ssdlite320_mobilenet_v3_large", "pretrained": False, "input_size": 96}
    for key in ("prune", "distill"):
        raw.pop(key)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["crop"] == 96 and pre["fit"] == "stretch"  # torchvision's transform
    settings = json.loads((out / "detection.json").read_text())
    assert np.asarray(settings["anchors"]).shape == ((36 + 9 + 4 + 1 + 1 + 1) * 6, 4)  # 6 maps from 6 x 6 down
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["export"]["fp32"]["agreement"] == 1.0
    raw["task"] = {"kind": "classification"}
    raw["data"] = {"kind": "digits"}
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "c.yaml", raw), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "is a detector: set task.kind: detection" in result.output


def test_a_rebuild_in_a_fresh_process_restores_every_stage(det_bundle, tmp_path):
    rebuilt_from_cache(det_bundle[0].parent / "r.yaml", tmp_path / "again")
