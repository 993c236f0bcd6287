"""Compression: pruning really removes channels, KD is the right loss, QAT ends in int8 kernels, gates bite."""

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgetl.backbones import build_backbone
from edgetl.cli import main
from edgetl.compress.ort_quant import float_compute_ops, optimized_ops, quantize_onnx
from edgetl.compress.prune import (
    input_size_of,
    make_pruner,
    protected_layers,
    prune_step,
    ratio_for_macs,
    resize_input,
)
from edgetl.compress.qat import attach_fake_quant, detach_fake_quant
from edgetl.config import BackboneCfg, PruneCfg, QuantizeCfg
from edgetl.errors import EdgetlError
from edgetl.measure import count_params_macs
from edgetl.onnx_export import export_onnx, parity
from edgetl.tasks import create_task
from edgetl.tasks.classification import kd_loss
from tests.conftest import write_recipe


def _mnv2():
    torch.manual_seed(0)
    return build_backbone(BackboneCfg(name="torchvision:mobilenet_v2", pretrained=False, input_size=32), 5)


def test_pruning_removes_channels_and_still_exports(tmp_path):
    b = _mnv2()
    model = b.model.eval()
    params0, macs0 = count_params_macs(model, 32)
    example = torch.randn(1, 3, 32, 32)
    pruner = make_pruner(model, example, PruneCfg(ratio=0.5, steps=1), b.head)
    prune_step(pruner, model, example)
    params1, macs1 = count_params_macs(model, 32)
    assert params1 < 0.5 * params0 and macs1 < 0.5 * macs0
    assert model.features[0][0].in_channels == 3  # stem input protected
    assert model.get_submodule(b.head).out_features == 5  # classifier output protected
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    path = export_onnx(model, b.contract, tmp_path / "p.onnx", {"input": x[:1]}, 17)
    check = parity(create_task("classification", list("abcde")), model, path, [{"input": x}], b.contract.atol, 0.0)
    assert check.ok and check.max_abs_diff < b.contract.atol and check.agreement == 1.0


def test_a_lower_input_size_is_part_of_the_model_pruned_counted_and_exported(tmp_path):
    import pickle

    b = _mnv2()
    model = b.model.eval()
    _, macs0 = count_params_macs(model, 32)
    resize_input(model, 16)  # the input is resized inside the model: what the device feeds stays 32 x 32
    _, macs_small = count_params_macs(model, 32)
    assert macs_small < 0.5 * macs0  # a quarter of the positions in the early layers (the last ones are 1 x 1)
    assert input_size_of(pickle.loads(pickle.dumps(model))) == 16  # survives the stage cache
    with pytest.raises(EdgetlError, match="already resizes"):
        resize_input(model, 16)
    example = torch.randn(1, 3, 32, 32)
    pruner = make_pruner(model, example, PruneCfg(ratio=0.5, steps=1), b.head)
    prune_step(pruner, model, example)
    _, macs1 = count_params_macs(model, 32)
    assert macs1 < 0.5 * macs_small and input_size_of(model) == 16
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    path = export_onnx(model, b.contract, tmp_path / "r.onnx", {"input": x[:1]}, 17)
    graph = onnx.load(path).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    resize = next(n for n in graph.node if n.op_type == "Resize")  # the input, resized, feeds the first Conv
    assert resize.input[0] == graph.input[0].name
    assert next(n for n in graph.node if n.op_type == "Conv").input[0] == resize.output[0]
    check = parity(create_task("classification", list("abcde")), model, path, [{"input": x}], b.contract.atol, 0.0)
    assert check.ok and check.agreement == 1.0


def test_input_size_builds_a_bundle_that_takes_the_full_size(tmp_path, tiny_raw):
    tiny_raw["finetune"].update(epochs=1)
    tiny_raw["prune"] = {"ratio": 0, "input_size": 24, "recovery_epochs": 1}  # the resolution alone
    tiny_raw["quantize"] = {"method": "ptq", "require_speedup": False, "calibration_size": 32}
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "input resized to 24 px inside the model" in result.output
    report = json.loads((out / "report.json").read_text())
    p = report["metrics"]["prune"]
    assert p["input_size"] == 24 and p["macs_before"] < p["macs_fine_tuned"] and p["macs_after"] == p["macs_before"]
    rows = {r["stage"]: r for r in report["rows"]}
    assert rows["pruned"]["params"] == rows["fp32"]["params"] and rows["pruned"]["macs"] < rows["fp32"]["macs"]
    shipped = onnx.load(out / "model.onnx").graph
    assert [d.dim_value for d in shipped.input[0].type.tensor_type.shape.dim[2:]] == [32, 32]
    assert any(n.op_type == "Resize" for n in shipped.node)
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["crop"] == 32  # the device prepares images as for the fine-tuned model
    assert "24 px, resized inside the model" in (out / "report.html").read_text()
    # only where it means something: image classifiers below their input size
    tiny_raw["prune"]["input_size"] = 32
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 2 and "prune.input_size': 32 must be below the input size 32" in result.output
    from edgetl.config import recipe_from_dict
    from tests.tiny import detection_recipe

    det = detection_recipe(tmp_path / "a.json")
    det["prune"]["input_size"] = 32
    with pytest.raises(EdgetlError, match="prune.input_size': for image classification only"):
        recipe_from_dict(det)


def test_target_macs_searches_the_ratio_that_lands_on_it():
    b = _mnv2()
    model = b.model.eval()
    macs0 = count_params_macs(model, 32)[1]
    example = torch.randn(1, 3, 32, 32)
    target, steps = 0.25, 3  # 3 rounded steps prune deeper than 1 at the same ratio

    def make(m, r):
        return make_pruner(m, example, PruneCfg(ratio=r, steps=steps), b.head)

    ratio, reached = ratio_for_macs(model, make, 32, target, steps=steps)
    assert count_params_macs(model, 32)[1] == macs0  # the search prunes copies only
    assert 0.0 < ratio < 0.9 and target - 0.1 < reached <= target
    pruned = copy.deepcopy(model)
    pruner = make(pruned, ratio)  # the real iterative pruning lands where the search said
    for _ in range(steps):
        prune_step(pruner, pruned, example)
    assert count_params_macs(pruned, 32)[1] / macs0 == pytest.approx(reached, abs=0.005)


def test_target_macs_reaches_deep_targets_where_95_percent_pruning_does_not():
    """Near 100% Torch-Pruning skips groups that would lose every channel, so MACs are not monotonic in the ratio
    (MobileNetV2: 90% -> 12% of the MACs, 95% -> 34%); the search's bound walks up instead of starting at 95%."""
    b = _mnv2()
    example = torch.randn(1, 3, 32, 32)
    ratio, reached = ratio_for_macs(
        b.model.eval(), lambda m, r: make_pruner(m, example, PruneCfg(ratio=r, steps=1), b.head), 32, 0.22
    )
    assert 0.5 < ratio < 0.9 and 0.15 < reached <= 0.22
    with pytest.raises(EdgetlError, match="out of reach"):
        ratio_for_macs(
            b.model.eval(), lambda m, r: make_pruner(m, example, PruneCfg(ratio=r, steps=1), b.head), 32, 0.01
        )


def test_protected_layers_come_from_the_model_being_pruned():
    b = _mnv2()
    layers = protected_layers(b.model, b.head, ("stem", "head"))
    own = list(b.model.modules())
    assert all(any(layer is m for m in own) for layer in layers) and len(layers) == 2


def test_the_teacher_in_onnx_runtime_gives_the_same_distillation_loss(tmp_path):
    from edgetl.runner import session
    from edgetl.train import Distill

    teacher, student = _mnv2(), _mnv2()
    resize_input(student.model, 24)
    x = torch.randn(8, 3, 32, 32)
    path = export_onnx(teacher.model.eval(), teacher.contract, tmp_path / "t.onnx", {"input": x[:1].numpy()}, 17)
    task, y = create_task("classification", list("abcde")), torch.randint(0, 5, (8,))
    by_torch = Distill(task, teacher.model)(student.model.eval(), x, y)
    by_ort = Distill(task, teacher.model, teacher_session=session(path))(student.model, x, y)
    assert by_ort.item() == pytest.approx(by_torch.item(), rel=1e-4)
    by_ort.backward()  # the student still learns through it
    assert student.model.features[0][0].weight.grad is not None


def test_kd_loss_is_cross_entropy_at_alpha_zero_and_matches_teacher_at_one():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1)
    assert torch.allclose(kd_loss(s, t, y, alpha=0.0, temperature=4.0, label_smoothing=0.1), ce)
    assert kd_loss(t, t, y, alpha=1.0, temperature=4.0).abs() < 1e-6  # student == teacher: nothing to learn
    assert kd_loss(s, t, y, alpha=1.0, temperature=4.0) > 0


def _qat_onnx(tmp_path, reduce_range=False):
    b = _mnv2()
    model = b.model
    handles = attach_fake_quant(model, reduce_range)
    model.train()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        model(x)  # ranges
    loss = model(x).sum()
    loss.backward()  # gradients flow through the fake quantizers
    assert model.features[0][0].parametrizations.weight.original.grad is not None
    detach_fake_quant(model, handles)
    assert not any(hasattr(m, "edgetl_act_fq") for m in model.modules())
    model.eval()
    calib = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    fp32 = export_onnx(model, b.contract, tmp_path / "qat.fp32.onnx", {"input": calib[:1]}, 17)
    int8 = quantize_onnx(
        fp32,
        tmp_path / "qat.int8.onnx",
        [{"input": calib[i : i + 8]} for i in range(0, 32, 8)],
        QuantizeCfg(),
        reduce_range,
    )
    return model, fp32, int8, calib


def test_feature_distillation_matches_pruned_features_through_a_projection():
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    from edgetl.tasks import create_task
    from edgetl.train import Distill, FeatureKD, fit

    b = _mnv2()
    teacher = copy.deepcopy(b.model).eval()
    student = b.model.eval()
    example = torch.randn(1, 3, 32, 32)
    prune_step(make_pruner(student, example, PruneCfg(ratio=0.5, steps=1, protect=("stem",)), b.head), student, example)
    assert student.get_submodule(b.head).in_features < teacher.get_submodule(b.head).in_features  # narrowed
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 5, (32,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    task = create_task("classification", list("abcde"))
    kd = Distill(task, teacher, alpha=0.5, feature_weight=1.0, feature_layers=("", "features.4"), head=b.head)
    probe = FeatureKD(student, teacher, kd.feature_layers, kd.head)
    with torch.no_grad():
        student(x[:4]), teacher(x[:4])
    assert len(probe.make_projections()) == 2  # both layers were narrowed by pruning: two projections
    assert probe.loss() > 0
    probe.remove()
    history = fit(student, loader, loader, task=task, objective=kd, epochs=1, lr=1e-3, warmup_epochs=0.0, desc="kd")
    assert np.isfinite(history[0]["train_loss"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())  # hooks removed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_qat_export_is_qdq_and_runs_int8_kernels_with_no_float_conv(tmp_path):
    _, _, int8, _ = _qat_onnx(tmp_path)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    optimized = optimized_ops(int8)
    assert optimized.get("QLinearConv", 0) >= 50  # every MobileNetV2 conv runs as an int8 kernel
    assert optimized.get("Conv", 0) == 0 and optimized.get("FusedConv", 0) == 0
    assert float_compute_ops({k: v for k, v in optimized.items() if k != "Gemm"}) == 0


def test_int8_agrees_with_pytorch_on_a_fixed_batch(tmp_path):
    from edgetl.runner import session

    model, _, int8, calib = _qat_onnx(tmp_path)
    with torch.no_grad():
        ref = model(torch.from_numpy(calib)).numpy()
    got = session(int8).run(None, {"input": calib})[0]
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


COMPRESS = {
    "prune": {"ratio": 0.3, "steps": 1, "recovery_epochs": 1, "lr": 0.002},
    "distill": {"epochs": 1, "lr": 0.002},
    "quantize": {"method": "qat", "epochs": 1, "lr": 0.0005, "require_speedup": False, "calibration_size": 128},
    "export": {"fp16": True},
}


@pytest.fixture(scope="session")
def compressed(tmp_path_factory):
    from tests.conftest import TINY

    raw = json.loads(json.dumps(TINY))
    raw["finetune"].update(epochs=4, lr=0.01)
    raw.update(COMPRESS)
    tmp = tmp_path_factory.mktemp("compressed")
    out = tmp / "c"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp / "c.yaml", raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "report.json").read_text()), result.output


def test_report_has_one_row_per_stage_and_ships_int8(compressed):
    out, report, output = compressed
    rows = {r["stage"]: r for r in report["rows"]}
    assert {"fp32", "pruned", "distilled", "ptq", "qat"} <= set(rows)  # + the shipped placement variant, if any
    for r in rows.values():
        assert {"metric_torch", "metric_ort", "agreement", "params", "macs", "size_mb", "p50_ms", "p90_ms"} <= set(r)
    assert rows["pruned"]["params"] < rows["fp32"]["params"] and rows["pruned"]["macs"] < rows["fp32"]["macs"]
    chosen = report["metrics"]["quantize"]["chosen"]
    assert chosen.split("_")[0] in ("qat", "ptq") and rows[chosen]["shipped"] and rows[chosen]["file"] == "model.onnx"
    assert rows[chosen]["size_mb"] < 0.5 * rows["distilled"]["size_mb"]  # int8 weights
    assert {p.name for p in out.glob("*.onnx")} == {"model.onnx", "model.fp32.onnx", "model.fp16.onnx"}
    q = report["metrics"]["quantize"]  # at most the classifier Gemm and the leading Convs auto kept FP32
    assert q["float_compute_ops_left"] <= 1 + q["float_leading_convs"]
    assert "history" in report and report["history"]["qat"] and report["history"]["distill"]


def test_fp16_copy_ships_and_each_precision_is_measured_per_provider(compressed):
    """export.fp16: the distilled model (the INT8 model's source) in FP16 ships as model.fp16.onnx, checked against its
    FP32 export; verify measures FP32, FP16 and INT8 on each provider (here the CPU EP) against FP32 on the CPU."""
    out, report, output = compressed
    fp16 = report["metrics"]["export"]["fp16"]
    assert fp16["source"] == "distilled" and fp16["agreement"] >= 0.99 and fp16["file"] == "model.fp16.onnx"
    assert "model.fp16.onnx" in json.loads((out / "manifest.json").read_text())["files"]
    rows = report["metrics"]["verify"]["providers"]
    assert [(r["provider"], r["precision"]) for r in rows] == [
        ("CPUExecutionProvider", p) for p in ("fp32", "fp16", "int8")
    ]
    assert rows[0]["agreement_vs_cpu_fp32"] == 100.0 and rows[1]["agreement_vs_cpu_fp32"] >= 95.0
    assert [r["model"] for r in rows] == ["distilled", "fp16 copy", report["metrics"]["quantize"]["chosen"]]
    assert rows[2]["max_abs_diff_vs_cpu_fp32"] > 0
    assert "CPUExecutionProvider fp16: p50" in output
    assert "Execution providers" in (out / "report.html").read_text()


def _build_ptq(tmp_path, tiny_raw):
    """`edgetl build` of the tiny recipe, 1 epoch, ORT PTQ; returns (the CLI result, the bundle folder)."""
    tiny_raw["finetune"]["epochs"] = 1
    tiny_raw["quantize"] = {"method": "ptq", "calibration_size": 64}
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result, out


def val_metric(accuracy_of_file):
    """A stand-in for measure.ort_metric: the validation accuracy a test assigns to each quantized file."""
    from edgetl.tasks.base import Metric

    return lambda task, path, batches, targets: Metric("accuracy", accuracy_of_file(path))


def test_slower_int8_is_not_shipped_silently(tmp_path, tiny_raw, monkeypatch):
    import edgetl.stages.quantize as q

    monkeypatch.setattr(q, "speedup", lambda fp32, int8, feed, runs=60, threads=1: 0.8)
    result, out = _build_ptq(tmp_path, tiny_raw)
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["quantize"]["chosen"] is None
    assert "shipping FP32" in result.output
    assert next(r for r in report["rows"] if r["shipped"])["stage"] == "fp32"


@pytest.mark.parametrize("speed, kept", [(1.10, True), (1.0, False)])
def test_auto_float_stem_is_kept_when_as_accurate_and_faster(tmp_path, tiny_raw, monkeypatch, speed, kept):
    """float_leading_convs "auto": the graph with stem + first depthwise conv in FP32 ships when it is at least as
    accurate on validation and measurably faster than the all-INT8 one (a 3-channel stem is a poor int8 GEMM)."""
    import edgetl.stages.quantize as q

    monkeypatch.setattr(q, "ort_metric", val_metric(lambda path: 80.0))  # a tie on validation

    def speedup(a, b, feed, runs=60, threads=1):  # fl2 as measured; six FP32 Convs no faster than two
        return speed if "fl2" in Path(b).name else 1.0 if "fl6" in Path(b).name else 1.5

    monkeypatch.setattr(q, "speedup", speedup)
    result, out = _build_ptq(tmp_path, tiny_raw)
    chosen = json.loads((out / "report.json").read_text())["metrics"]["quantize"]["chosen"]
    assert chosen == ("ptq_fl2" if kept else "ptq")
    assert ("Convs kept FP32" in result.output) == kept


@pytest.mark.parametrize("w8_acc, kept", [(81.0, True), (80.0, False)])
def test_8bit_weights_ship_without_vnni_only_when_more_accurate(tmp_path, tiny_raw, monkeypatch, w8_acc, kept):
    import edgetl.runner
    import edgetl.stages.quantize as q

    features = {**edgetl.runner.cpu_int8_features(), "vnni_or_dot": False}
    monkeypatch.setattr(edgetl.runner, "cpu_int8_features", lambda: features)
    monkeypatch.setattr(q, "ort_metric", val_metric(lambda path: w8_acc if "w8" in Path(path).name else 80.0))
    monkeypatch.setattr(q, "speedup", lambda a, b, feed, runs=60, threads=1: 1.5 if "fl" not in Path(b).name else 1.0)
    result, out = _build_ptq(tmp_path, tiny_raw)
    metrics = json.loads((out / "report.json").read_text())["metrics"]["quantize"]
    assert metrics["chosen"] == ("ptq_w8" if kept else "ptq") and metrics["reduce_range"] is not kept
    assert ("8-bit weights" in result.output) == kept


@pytest.mark.parametrize(
    "gate, value, message",
    [
        ("min_speedup", 1000.0, "gate min_speedup failed"),
        ("max_size_mb", 0.001, "gate max_size_mb failed"),
        ("max_accuracy_drop", 0.0, "gate max_accuracy_drop failed"),
    ],
)
def test_each_gate_fails_the_build(tmp_path, tiny_raw, gate, value, message):
    tiny_raw["finetune"]["epochs"] = 1
    if gate == "max_accuracy_drop":  # 90% of the channels gone and no recovery: accuracy falls
        tiny_raw["prune"] = {"ratio": 0.9, "steps": 1, "recovery_epochs": 0, "round_to": None}
    tiny_raw["verify"][gate] = value
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists() and (tmp_path / "o.failed-report.json").is_file()


def test_fp32_stem_with_8bit_weights_ships_when_only_the_pair_wins(tmp_path, tiny_raw, monkeypatch):
    """Without VNNI, 8-bit weights pay mostly where the stem is FP32: the pair is judged as a candidate of its own
    (tried one after the other, neither the FP32 stem (+0.2 pt, no faster) nor 8-bit weights alone (-0.5 pt) would
    be kept, and the +1.0 pt pair would never be built)."""
    import edgetl.runner
    import edgetl.stages.quantize as q

    features = {**edgetl.runner.cpu_int8_features(), "vnni_or_dot": False}
    monkeypatch.setattr(edgetl.runner, "cpu_int8_features", lambda: features)

    def acc(path):
        name = Path(path).name
        return {(True, True): 81.0, (True, False): 80.2, (False, True): 79.5}.get(("fl2" in name, "w8" in name), 80.0)

    monkeypatch.setattr(q, "ort_metric", val_metric(acc))
    monkeypatch.setattr(q, "speedup", lambda a, b, feed, runs=60, threads=1: 1.0 if "ptq" in Path(a).name else 1.5)
    result, out = _build_ptq(tmp_path, tiny_raw)
    metrics = json.loads((out / "report.json").read_text())["metrics"]["quantize"]
    assert metrics["chosen"] == "ptq_fl2_w8" and metrics["reduce_range"] is False
    assert metrics["val_metric_ort"]["ptq_fl2_w8"] == 81.0
    assert "Convs kept FP32" in result.output and "8-bit weights" in result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.fp32.onnx", "model.onnx"]


@pytest.mark.parametrize("fl6_acc, chosen", [(80.7, "ptq_fl6"), (80.4, "ptq_fl2")])
def test_six_fp32_leading_convs_ship_only_when_clearly_more_accurate_than_two(
    tmp_path, tiny_raw, monkeypatch, fl6_acc, chosen
):
    """The float_leading_convs "auto" ladder: the first two blocks in FP32 (six Convs; where EfficientNet-Lite0's
    INT8 lost 1-2 pt) are slower than the FP32 stem alone, so they ship only when at least 0.5 pt more accurate on
    validation than the placement already kept; the bundle holds only the shipped INT8 graph and the FP32 one."""
    import edgetl.stages.quantize as q

    def acc(path):
        name = Path(path).name
        return fl6_acc if "fl6" in name else 80.1 if "fl2" in name else 80.0

    def speedup(a, b, feed, runs=60, threads=1):  # fl2 1.1x the all-INT8 graph, fl6 0.9x fl2; all beat FP32
        return 0.9 if "fl2" in Path(a).name else 1.1 if "ptq" in Path(a).name else 1.5

    monkeypatch.setattr(q, "ort_metric", val_metric(acc))
    monkeypatch.setattr(q, "speedup", speedup)
    result, out = _build_ptq(tmp_path, tiny_raw)
    metrics = json.loads((out / "report.json").read_text())["metrics"]["quantize"]
    assert metrics["chosen"] == chosen
    assert ("first 6 Convs kept FP32" in result.output) == (chosen == "ptq_fl6")
    assert "first 2 Convs kept FP32" in result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.fp32.onnx", "model.onnx"]


def test_placements_of_ptq_and_qat_are_judged_before_choosing_between_them(tmp_path, tiny_raw, monkeypatch):
    """QAT can beat all-INT8 PTQ and still lose to PTQ with FP32 leading convs (EfficientNet-Lite0 here: QAT 86.95%
    on validation shipped at -1.6 pt while PTQ with six FP32 convs held 87.4%): both candidates' placement variants
    are built and the better final graph ships; the bundle holds only it and the FP32 graph."""
    import edgetl.stages.quantize as q

    def acc(path):
        name = Path(path).name
        return 80.5 if "qat" in name else 81.5 if "ptq-fl6" in name else 80.0

    monkeypatch.setattr(q, "ort_metric", val_metric(acc))
    monkeypatch.setattr(q, "speedup", lambda a, b, feed, runs=60, threads=1: 1.5 if "fp32" in Path(a).name else 1.0)
    tiny_raw["finetune"]["epochs"] = 1
    tiny_raw["quantize"] = {"method": "qat", "epochs": 1, "calibration_size": 64}
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "report.json").read_text())["metrics"]["quantize"]
    assert metrics["chosen"] == "ptq_fl6"
    assert metrics["placements"] == {
        "ptq": {"kept": "fl6", "val_metric": 81.5},
        "qat": {"kept": None, "val_metric": 80.5},
    }
    assert "QAT val accuracy 80.50 (qat) < PTQ 81.50 (ptq_fl6): shipped PTQ" in result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.fp32.onnx", "model.onnx"]


def test_same_padding_shape_arithmetic_stays_float(tmp_path):
    """timm's dynamic "same" padding computes pads from tensor shapes; quantizing that arithmetic shrank feature
    maps (EfficientNet-Lite0 87% -> 50%). Those nodes are excluded and the INT8 graph keeps FP32's shapes."""
    from edgetl.compress.ort_quant import _float_nodes

    torch.manual_seed(0)
    b = build_backbone(BackboneCfg(name="timm:tf_efficientnet_lite0", pretrained=False, input_size=64), 3)
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    fp32 = export_onnx(b.model.eval(), b.contract, tmp_path / "lite.onnx", {"input": x[:1]}, 17)
    excluded = _float_nodes(fp32)
    assert excluded and all(n for n in excluded)
    assert len(_float_nodes(fp32, float_leading_convs=2)) == len(excluded) + 2
    int8 = quantize_onnx(fp32, tmp_path / "lite.int8.onnx", [{"input": x}], QuantizeCfg(), reduce_range=True)
    from edgetl.runner import session

    ref = session(fp32).run(None, {"input": x})[0]
    got = session(int8).run(None, {"input": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9


def test_distillation_transfer_set_adds_spare_examples_labelled_by_the_teacher(tiny_raw, tmp_path):
    from edgetl.config import recipe_from_dict
    from edgetl.data import Split
    from edgetl.measure import torch_predictions
    from edgetl.stages import distill, load
    from edgetl.state import State

    tiny_raw["data"]["max_train"] = 300
    recipe = recipe_from_dict(tiny_raw)
    state = load.run(State(recipe=recipe, workdir=tmp_path), recipe)
    state = state.replace(teacher=state.backbone.model.eval())  # untrained: its labels differ from the true ones
    train, info = distill.transfer_set(state, 200, seed=1)
    assert len(train) == 500 and info["transfer_extra"] == 200
    assert np.array_equal(train.images[:300], state.data.train.images)
    extra = Split(labels=train.labels[300:], images=train.images[300:])
    teacher = torch_predictions(state.task, state.teacher, state.modality.feeds(extra))
    assert np.array_equal(extra.labels, teacher)
    assert info["transfer_teacher_metric"] < 50  # the hidden labels were not used
    state.data.n_spare = 0
    with pytest.raises(EdgetlError, match="no examples beyond data.max_train"):
        distill.transfer_set(state, 200, seed=1)


def test_transfer_set_draws_on_unlabelled_images(tiny_raw, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgetl.config import recipe_from_dict
    from edgetl.stages import distill, load
    from edgetl.state import State

    unl = tmp_path / "unlabelled"
    unl.mkdir()
    for j, img in enumerate(load_digits().images[:40]):
        Image.fromarray((img * 15.9).astype(np.uint8)).save(unl / f"{j}.png")
    tiny_raw["data"]["unlabelled_path"] = str(unl)
    with pytest.raises(EdgetlError, match="only used by distillation's transfer set"):
        load.run(State(recipe=recipe_from_dict(tiny_raw), workdir=tmp_path), recipe_from_dict(tiny_raw))
    tiny_raw["distill"] = {"transfer_size": 5000}
    recipe = recipe_from_dict(tiny_raw)  # no max_train: the training pool has no leftovers, only the 40 unlabelled
    state = load.run(State(recipe=recipe, workdir=tmp_path), recipe)
    state = state.replace(teacher=state.backbone.model.eval())
    train, info = distill.transfer_set(state, 5000, seed=1)
    assert info == {"transfer_extra": 40, "transfer_unlabelled": 40, "transfer_teacher_metric": None}
    assert len(train) == len(state.data.train) + 40 and (train.labels >= 0).all()  # the teacher labelled them
    tiny_raw["data"]["max_train"] = 300  # leftovers and unlabelled images together: agreement only on the former
    recipe = recipe_from_dict(tiny_raw)
    state = load.run(State(recipe=recipe, workdir=tmp_path), recipe)
    state = state.replace(teacher=state.backbone.model.eval())
    _, info = distill.transfer_set(state, 5000, seed=1)
    assert info["transfer_extra"] == state.data.n_spare and info["transfer_unlabelled"] == 40
    assert 0 <= info["transfer_teacher_metric"] < 50  # the untrained teacher, on the leftovers' hidden labels
    tiny_raw["data"].pop("unlabelled_path")
    tiny_raw["data"]["max_train"] = None
    recipe = recipe_from_dict(tiny_raw)
    with pytest.raises(EdgetlError, match="no examples beyond data.max_train"):  # found before fine-tuning
        load.run(State(recipe=recipe, workdir=tmp_path), recipe)


def test_failed_qat_falls_back_to_ptq_and_leaves_no_qat_files(tmp_path, tiny_raw, monkeypatch):
    """QAT that fails after writing its ONNX (here: the exporter raises once the file is written) falls back to
    ORT PTQ, says so, and its half-made files stay out of the bundle and its manifest."""
    import edgetl.stages.quantize as quantize_stage
    from edgetl.runner import verify_manifest

    real = quantize_stage.export_onnx

    def export_then_fail(model, contract, path, *args, **kwargs):
        real(model, contract, path, *args, **kwargs)
        if "qat" in Path(path).name:
            raise RuntimeError("exporter bug")
        return path

    monkeypatch.setattr(quantize_stage, "export_onnx", export_then_fail)
    tiny_raw["finetune"]["epochs"] = 1
    tiny_raw["quantize"] = {
        "method": "qat",
        "epochs": 1,
        "calibration_size": 64,
        "float_leading_convs": 0,
        "require_speedup": False,
    }
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["build", write_recipe(tmp_path / "r.yaml", tiny_raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "QAT failed (RuntimeError: exporter bug); shipped ORT PTQ instead" in result.output
    q = json.loads((out / "report.json").read_text())["metrics"]["quantize"]
    assert q["chosen"].startswith("ptq") and "qat" not in q["val_metric_ort"]
    assert not list(out.glob("*qat*")) and not [f for f in verify_manifest(out)["files"] if "qat" in f]
