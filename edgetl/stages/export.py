"""Export every float model the pipeline kept (fine-tuned, pruned, distilled) to FP32 ONNX and prove ORT computes what
PyTorch computes on real validation inputs: within a scale-aware tolerance on the outputs and with the same decoded
predictions (the task judges both). ``export.fp16`` adds an FP16 copy of the newest float model for GPU execution
providers; the build fails unless it decodes as the FP32 model does. The library side is ``edgetl.onnx_export``."""

from __future__ import annotations

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.measure import model_inputs
from edgetl.onnx_export import FP16_FILE, bundle_metadata, export_onnx, parity, to_fp16
from edgetl.state import State, float_role


def run(state: State, recipe: Recipe) -> State:
    cfg = recipe.export
    contract = state.backbone.contract
    atol = cfg.atol if cfg.atol is not None else contract.atol
    batches = state.modality.parity_feeds(state.data.val)
    models = state.models or {"fp32": state.backbone.model}
    onnx, checks = dict(state.onnx), {}
    for role, model in models.items():
        path = state.workdir / f"model.{role}.onnx"
        sample = model_inputs(batches[0])
        export_onnx(
            model.eval(), contract, path, sample, cfg.opset, bundle_metadata(state, model), state.task.optimum_task
        )
        check = parity(state.task, model, path, batches, atol, cfg.rtol)
        print(
            f"  {role}: ORT vs PyTorch max|diff| {check.max_abs_diff:.2e} (tolerance {check.tolerance:.2e}), "
            f"agreement {100 * check.agreement:.2f}% on {check.n} validation inputs"
        )
        if not check.ok or check.agreement < cfg.min_agreement:
            raise EdgetlError(
                f"ONNX export of the {role} model does not match PyTorch: max|diff| {check.max_abs_diff:.3g} "
                f"(tolerance {check.tolerance:.3g} = export.atol {atol:g} + export.rtol {cfg.rtol:g} x output "
                f"scale), agreement {100 * check.agreement:.1f}% (export.min_agreement "
                f"{100 * cfg.min_agreement:.1f}%); raise export.rtol if predictions agree, else report a bug"
            )
        onnx[role] = path.name
        checks[role] = {
            "max_abs_diff": check.max_abs_diff,
            "tolerance": check.tolerance,
            "atol": atol,
            "rtol": cfg.rtol,
            "agreement": check.agreement,
            "n": check.n,
        }
    state = state.replace(onnx=onnx, models=models)
    if cfg.fp16:  # GPU targets: the newest float model in float16, its decoded outputs checked against FP32's
        source = float_role(state)
        path = to_fp16(state.workdir / onnx[source], state.workdir / FP16_FILE)
        check = parity(state.task, state.workdir / onnx[source], path, batches, atol, cfg.rtol)
        print(
            f"  fp16 ({source}): ORT FP16 vs FP32 max|diff| {check.max_abs_diff:.2e}, agreement "
            f"{100 * check.agreement:.2f}% on {check.n} validation inputs, {path.stat().st_size / 1e6:.2f} MB"
        )
        if check.agreement < cfg.min_agreement:
            raise EdgetlError(
                f"the FP16 copy of the {source} model decodes {100 * check.agreement:.1f}% of validation inputs as "
                f"the FP32 model does (export.min_agreement {100 * cfg.min_agreement:.1f}%); set export.fp16: false"
            )
        checks["fp16"] = {
            "file": FP16_FILE,
            "source": source,
            "max_abs_diff": check.max_abs_diff,  # against the FP32 ONNX model, not PyTorch
            "tolerance": check.tolerance,  # recorded; the agreement is the check (float16 keeps ~3 digits)
            "agreement": check.agreement,
            "n": check.n,
            "size_mb": path.stat().st_size / 1e6,
        }
    return state.replace(metrics={**state.metrics, "export": {"opset": cfg.opset, **checks}})
