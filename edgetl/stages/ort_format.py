"""ORT mobile format: convert the shipped model to ``model.ort`` and record ORT's mobile usability check.

``model.ort`` is what ONNX Runtime Mobile (Android/iOS, minimal builds) loads; the usability check says
whether NNAPI / CoreML are worth trying for this graph. Runs when ``export.ort_format`` is true.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from edgetl.config import Recipe
from edgetl.errors import EdgetlError
from edgetl.state import State, shipped_role


def convert(onnx_path: Path, dst: Path) -> Path:
    """ORT's own converter (fixed optimizations, as recommended for mobile) into ``dst``."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, src)
        convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "out", optimization_styles=[OptimizationStyle.Fixed])
        produced = list((Path(tmp) / "out").glob("*.ort"))
        if not produced:
            raise EdgetlError(f"ORT format conversion produced no .ort file for {onnx_path.name}")
        shutil.copyfile(produced[0], dst)
    return dst


def usability(onnx_path: Path) -> dict:
    """ORT's mobile usability analysis, with its log lines kept for the report."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("edgetl.mobile_usability")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    try:
        try_eps = usability_checker.analyze_model(onnx_path, skip_optimize=False, logger=logger)
    finally:
        logger.removeHandler(handler)
    return {"nnapi_or_coreml_worth_trying": bool(try_eps), "log": lines}


def run(state: State, recipe: Recipe) -> State:
    role = shipped_role(state)
    src = state.workdir / state.onnx[role]
    dst = convert(src, state.workdir / "model.ort")
    check = usability(src)
    print(
        f"  model.ort {dst.stat().st_size / 1e6:.2f} MB; NNAPI/CoreML worth trying: "
        f"{'yes' if check['nnapi_or_coreml_worth_trying'] else 'no (use the CPU EP)'}"
    )
    info = {"file": dst.name, "size_mb": dst.stat().st_size / 1e6, "source": role, **check}
    return state.replace(metrics={**state.metrics, "ort_format": info})
