"""Export every float model the pipeline kept (fine-tuned, pruned, distilled) to FP32 ONNX and prove ORT computes what
PyTorch computes on real validation inputs: within a scale-aware tolerance on the outputs and with the same decoded
predictions (the task judges both). The library side is ``edgetl.onnx_export``."""

from __future__ import annotations

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.measure import model_inputs
from edgetl.onnx_export import bundle_metadata, export_onnx, parity
from edgetl.state import State


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
    return state.replace(onnx=onnx, models=models, metrics={**state.metrics, "export": {"opset": cfg.opset, **checks}})
