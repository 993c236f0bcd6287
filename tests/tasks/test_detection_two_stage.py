"""Two-stage detection (``task.detector: faster_rcnn``): torchvision's RPN + RoI-head losses train, distillation
targets the teacher's confident boxes, final boxes are compared by matching, and a tiny Faster R-CNN builds end to
end into a bundle (fine-tune, prune, distill, INT8) whose one-image-per-run graph the runner drives."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.tasks import create_task
from tests.conftest import golden_pngs, write_recipe
from tests.tiny import detection_recipe, write_digit_boxes

CLASSES = ["a", "b", "c"]


def _model(size: int = 64):
    import torch
    import torchvision

    from edgetl.detector import build_faster_rcnn

    torch.manual_seed(0)
    return build_faster_rcnn(torchvision.models.mobilenet_v2(weights=None), size, len(CLASSES))


def _targets():
    import torch

    return [
        {"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[30.0, 20.0, 60.0, 50.0], [2.0, 2.0, 20.0, 24.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without objects
        {"boxes": torch.tensor([[10.0, 30.0, 40.0, 62.0]]), "labels": torch.tensor([2])},
    ]


def test_training_steps_lower_the_rpn_and_roi_losses_and_distillation_targets_the_teachers_boxes():
    import torch

    model = _model().train()
    task = create_task("detection", CLASSES, type("T", (), {"detector": "faster_rcnn"})())
    torch.manual_seed(0)
    x, targets = torch.randn(4, 3, 64, 64), _targets()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = task.loss(model(x), targets, model=model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]

    # a teacher whose confident detections are the true boxes: alpha 1 is the task loss on them (the same RoI
    # samples drawn under the same seed); a teacher that finds nothing confident gives another loss
    rows = [
        torch.cat([t["boxes"], torch.full((len(t["boxes"]), 1), 0.9), t["labels"][:, None].float()], 1) for t in targets
    ]
    n = max(len(r) for r in rows)
    teacher = torch.stack([torch.cat([r, torch.full((n - len(r), 6), -1.0)]) for r in rows])
    maps = model(x)

    def seeded(fn, *args, **kw):
        torch.manual_seed(1)
        return float(fn(*args, **kw).detach())

    want = seeded(task.loss, maps, targets, model=model)
    assert seeded(task.distill_loss, maps, teacher, targets, 1.0, 2.0, model=model) == pytest.approx(want, rel=1e-5)
    unsure = teacher.clone()
    unsure[..., 4] = 0.3  # under the confidence bar: no teacher boxes, every proposal is background
    assert seeded(task.distill_loss, maps, unsure, targets, 1.0, 2.0, model=model) != pytest.approx(want, rel=1e-3)

    model.eval()  # eval: final detections, [batch, boxes, 6], and the validation loss from the same maps
    with torch.no_grad():
        out = model(x)
        assert out.dim() == 3 and out.shape[0] == 4 and out.shape[-1] == 6
        assert np.isfinite(float(task.loss(out, targets, model=model)))


def test_box_head_pruner_removes_the_weakest_roi_neurons_with_the_trunks_channels():
    """The RoI box head runs once per proposal: its neurons go with the trunk's channels. fc6 -> fc7 -> predictor
    stay chained, the neurons kept are the strongest (L2 of in- and out-weights), MACs fall, the model still trains."""
    import torch

    from edgetl.compress.prune import _score, pruner_for
    from edgetl.config import PruneCfg
    from edgetl.measure import count_params_macs

    model = _model().eval()
    box = model.det.roi_heads.box_head
    strength = _score(box.fc6.weight, "magnitude", True).sum(1) + _score(box.fc7.weight, "magnitude", False).sum(1)
    want = set(strength.argsort(descending=True)[:256].tolist())
    rows = box.fc6.weight.detach().clone()
    macs0 = count_params_macs(model, 64)[1]
    trunk0 = sum(p.numel() for p in model.features.parameters())
    backbone = type("B", (), {"transformer": False, "head": "det"})()
    pruner = pruner_for(model, torch.randn(1, 3, 64, 64), PruneCfg(ratio=0.5, steps=1), backbone)
    pruner.step()
    pred = model.det.roi_heads.box_predictor
    assert (box.fc6.out_features, box.fc7.in_features, box.fc7.out_features) == (256, 256, 256)
    assert pred.cls_score.in_features == pred.bbox_pred.in_features == 256
    # fc6's rows kept are the strongest neurons' rows, unchanged
    kept = {int((rows == r).all(1).nonzero()[0, 0]) for r in box.fc6.weight.detach()}
    assert kept == want
    assert pruner.describe()[0] == {"box_head": [256, 256]}
    assert count_params_macs(model, 64)[1] < 0.7 * macs0
    assert sum(p.numel() for p in model.features.parameters()) < 0.5 * trunk0  # the trunk's channels went too
    model.train()
    task = create_task("detection", CLASSES, type("T", (), {"detector": "faster_rcnn"})())
    task.loss(model(torch.randn(2, 3, 64, 64)), _targets()[:2], model=model).backward()


def test_the_onnx_graph_takes_an_image_without_detections(tmp_path):
    """No box over the score threshold: ORT gives [1, 0, 6] (proposals are never empty: the RPN keeps its top ones,
    whose zero rows the graph's Reshape(0, -1) could not take)."""
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import BackboneCfg
    from edgetl.onnx_export import export_onnx
    from edgetl.runner import decode_detections, session

    task = create_task("detection", CLASSES, type("T", (), {"detector": "faster_rcnn", "score_thresh": 0.999})())
    torch.manual_seed(0)
    bb = build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=False, input_size=64), task)
    assert bb.model.det.rpn.score_thresh == 0.0
    x = np.zeros((1, 3, 64, 64), np.float32)
    path = export_onnx(bb.model.eval(), bb.contract, tmp_path / "m.onnx", {"input": x}, 17)
    out = session(path).run(None, {"input": x})[0]
    assert out.shape == (1, 0, 6) and decode_detections(out, {"in_graph": True})[0]["boxes"].shape == (0, 4)


def test_task_proposals_sets_the_rpns_inference_proposals_and_is_refused_elsewhere(tmp_path):
    """``task.proposals``: the RPN's top-n at inference (training keeps 2000), which the RoI head pools one by one;
    a one-line error for SSDLite or a count under 1."""
    import torch

    from edgetl.backbones import build_backbone
    from edgetl.config import recipe_from_dict

    raw = detection_recipe(write_digit_boxes(tmp_path / "data", n=10))
    raw["task"] = {"kind": "detection", "detector": "faster_rcnn", "proposals": 7}
    recipe = recipe_from_dict(raw)
    task = create_task("detection", CLASSES, recipe.task)
    torch.manual_seed(0)
    model = build_backbone(recipe.backbone, task).model.train()
    rpn = model.det.rpn
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (2000, 2000)  # training keeps its own
    found = []
    rpn.register_forward_hook(lambda m, i, out: found.append([len(p) for p in out[0]]))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 96, 96))
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (7, 7) and found == [[7, 7]]  # the RoI head pools 7 each
    for task_raw in ({"kind": "detection", "proposals": 7}, {**raw["task"], "proposals": 0}):
        raw["task"] = task_raw
        result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw)])
        assert (
            result.exit_code == 2
            and "'task.proposals': a positive count, for task.detector faster_rcnn" in result.output
        )


def _dets(*rows):
    a = np.asarray(rows, np.float32).reshape(-1, 6)
    return {"boxes": a[:, :4], "scores": a[:, 4], "labels": a[:, 5].astype(np.int64)}


def test_detection_diff_matches_boxes_and_counts_a_lost_box_by_its_score():
    from edgetl.runner import decode_detections, detection_diff

    ref = [_dets([10, 10, 30, 30, 0.9, 0], [40, 40, 60, 60, 0.6, 1]), _dets()]
    assert detection_diff(ref, ref) == (0.0, 2, 4)
    moved = [_dets([40, 40, 61.5, 60, 0.55, 1], [10, 10, 30, 30, 0.9, 0]), _dets()]  # another order, 1.5 px off
    assert detection_diff(ref, moved) == pytest.approx((1.5, 2, 4))
    lost = [_dets([10, 10, 30, 30, 0.9, 0]), _dets([0, 0, 5, 5, 0.2, 2])]  # one box lost, one weak box found
    diff, hits, total = detection_diff(ref, lost)
    assert diff == pytest.approx(0.6) and (hits, total) == (1, 4)
    relabelled = [_dets([10, 10, 30, 30, 0.9, 2], [40, 40, 60, 60, 0.6, 1]), _dets()]
    assert detection_diff(ref, relabelled)[:2] == (pytest.approx(0.9), 1)  # another class is another box
    # boxes under min_score are matched but not counted: a weak pair 3 px apart, a weak lone box
    weak = [_dets([10, 10, 30, 30, 0.9, 0], [40, 40, 60, 60, 0.2, 1], [0, 0, 8, 8, 0.1, 1])]
    moved = [_dets([10, 10, 30, 30, 0.9, 0], [43, 40, 63, 60, 0.25, 1])]
    assert detection_diff(weak, moved, min_score=0.3) == (0.0, 1, 2)
    assert detection_diff(weak, moved) == pytest.approx((3.0, 2, 5))
    # relative: a pair's coordinates count as 1 - IoU (20 x 20 boxes 3 px apart: 1 - 340 / 460)
    assert detection_diff(weak, moved, relative=True)[0] == pytest.approx(1 - 340 / 460)
    padded = np.asarray([[[10, 10, 30, 30, 0.9, 0], [-1, -1, -1, -1, -1, -1]]], np.float32)
    (found,) = decode_detections(padded, {"in_graph": True})
    assert found["boxes"].shape == (1, 4) and found["labels"].tolist() == [0]


@pytest.fixture(scope="module")
def rcnn_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rcnn")
    raw = detection_recipe(write_digit_boxes(tmp / "data", n=40))
    raw["verify"]["runs"] = 3
    # every scored box leaves the graph (a one-epoch detector scores low): the runner and the golden check compare boxes
    raw["task"] = {"kind": "detection", "detector": "faster_rcnn", "score_thresh": 0.0}
    raw["export"] = {**raw.get("export", {}), "ort_format": True}  # model.ort (ORT Mobile) of the INT8 graph too
    out = tmp / "bundle"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp / "r.yaml", raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text())


def test_faster_rcnn_bundle_is_pruned_distilled_int8_and_takes_one_image_per_run(rcnn_bundle):
    import onnx

    from edgetl.compress.ort_quant import COMPUTE

    out, report = rcnn_bundle
    rows = {r["stage"]: r for r in report["rows"]}
    assert {"fp32", "pruned", "distilled", "ptq"} <= set(rows)
    assert next(r for r in report["rows"] if r["shipped"])["stage"].startswith("ptq")  # a placement of PTQ
    for role in ("fp32", "pruned", "distilled"):  # final boxes of ORT and PyTorch, matched
        parity = report["metrics"]["export"][role]
        assert parity["max_abs_diff"] <= parity["tolerance"] and parity["agreement"] == 1.0
    assert rows["pruned"]["params"] < rows["fp32"]["params"]
    pruned = report["metrics"]["prune"]
    assert pruned["steps"][-1]["box_head"] == [384, 384] and pruned["macs_after"] < pruned["macs_before"]  # 512 -> 384
    assert json.loads((out / "detection.json").read_text())["in_graph"] is True
    assert json.loads((out / "golden.json").read_text())["compare"] == "detections"

    graph = onnx.load(str(out / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the traced graph takes one image
    assert [o.name for o in graph.output] == ["detections"]
    producer = {o: n for n in graph.node for o in n.output}

    def int8_weights(ops):
        nodes = [n for n in graph.node if n.op_type in ops]
        return nodes, [n for n in nodes if getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear"]

    convs, int8 = int8_weights(("Conv",))
    assert len(int8) >= 0.8 * len(convs)
    dense, int8 = int8_weights(("MatMul", "Gemm"))
    assert dense and int8  # the RoI head's MLP runs int8 too
    todo, seen = [graph.output[0].name], set()
    while todo:  # from the output back to the compute ops' dequantized outputs: decoding, scores and NMS stay float
        node = producer.get(todo.pop())
        if node is None or node.name in seen or node.op_type in COMPUTE:
            continue
        seen.add(node.name)
        if node.op_type == "DequantizeLinear":  # an int8 Conv / MatMul's output (its QuantizeLinear makes it int8)
            assert producer[node.input[0]].op_type == "QuantizeLinear"
            assert producer[producer[node.input[0]].input[0]].op_type in COMPUTE, node.name
            continue
        assert node.op_type != "QuantizeLinear", node.name
        todo += [i for i in node.input if i]
    assert "TopK" in {n.op_type for n in graph.node if n.name in seen}  # the proposals' path was walked


def test_runner_runs_the_faster_rcnn_bundle_image_by_image(rcnn_bundle, tmp_path):
    """The runner on PNGs of the golden images returns what the graph gives for each image alone; verify passes."""
    from edgetl.runner import Bundle, decode_detections, normalize, session

    out, _ = rcnn_bundle
    images, files = golden_pngs(out, 3, tmp_path)
    bundle = Bundle(out)
    want = [
        decode_detections(
            bundle.session.run(None, {"input": normalize(im[None], bundle.preprocess)})[0], {"in_graph": 1}
        )[0]
        for im in images
    ]
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "predict", *map(str, files), "--json", "--min-score", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert sum(len(g["objects"]) for g in got) > 0  # real boxes compared
    for g, w in zip(got, want, strict=True):
        assert [o["label"] for o in g["objects"]] == [bundle.labels[c] for c in w["labels"]]
        assert np.allclose([o["box"] for o in g["objects"]], np.round(w["boxes"], 1).reshape(-1, 4), atol=0.051)
    verify = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out), "verify"], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stdout.startswith("verify PASS"), verify.stdout + verify.stderr

    # model.ort, ORT Mobile's format of the shipped graph (NMS, RoiAlign, QDQ), gives the same boxes
    ort_file = json.loads((out / "report.json").read_text())["metrics"]["ort_format"]["file"]
    mobile = session(out / ort_file)
    for im, w in zip(images, want, strict=True):
        found = mobile.run(None, {"input": normalize(im[None], bundle.preprocess)})[0]
        (m,) = decode_detections(found, {"in_graph": 1})
        assert m["labels"].tolist() == w["labels"].tolist() and np.allclose(m["boxes"], w["boxes"], atol=1e-3)

    # a golden set holding a confident box the model does not find fails (the first image's first row replaced)
    import shutil

    from edgetl.runner import sha256

    copy = shutil.copytree(out, tmp_path / "copy")
    spec = json.loads((copy / "golden.json").read_text())
    raw = bytearray((copy / "golden.bin").read_bytes())
    at = spec["outputs"]["offset"]
    raw[at : at + 24] = np.asarray([3, 3, 9, 9, 0.99, 0], "<f4").tobytes()
    (copy / "golden.bin").write_bytes(raw)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["golden.bin"] = sha256(copy / "golden.bin")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bad = subprocess.run([sys.executable, str(copy / "runner.py"), str(copy), "verify"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout.startswith("verify FAIL"), bad.stdout + bad.stderr


def test_torchvisions_faster_rcnn_gets_a_new_box_predictor_and_other_detectors_one_error_line(tmp_path):
    from edgetl.backbones import build_backbone
    from edgetl.config import recipe_from_dict

    raw = detection_recipe(write_digit_boxes(tmp_path / "data", n=10), size=96)
    raw["task"] = {"kind": "detection", "detector": "faster_rcnn"}
    raw["backbone"] = {"name": "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "pretrained": False}
    recipe = recipe_from_dict(raw)
    task = create_task("detection", CLASSES, recipe.task)
    backbone = build_backbone(recipe.backbone, task)
    model = backbone.model.eval()
    assert model.det.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    assert backbone.head == "det" and len(backbone.blocks) >= 10  # the trunk's blocks fine-tune as for SSDLite
    import torch

    with torch.no_grad():
        assert model(torch.randn(2, 3, 320, 320)).shape[-1] == 6
    for name, detector, message in (
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite", "task.detector: faster_rcnn"),
        ("retinanet_resnet50_fpn", "faster_rcnn", "RetinaNet, FCOS and Mask R-CNN are not supported yet"),
    ):
        raw["task"]["detector"] = detector
        raw["backbone"]["name"] = f"torchvision:{name}"
        result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw)])
        assert result.exit_code == 2 and message in result.output, result.output
    raw["task"]["detector"], raw["export"] = "faster_rcnn", {"fp16": True}  # refused at load, before any training
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", raw)])
    assert result.exit_code == 2 and "'export.fp16': not supported for task.detector faster_rcnn" in result.output
