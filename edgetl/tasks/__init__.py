"""Task registry: ``task.kind`` in the recipe -> the module that implements the protocol in ``tasks/base.py``."""

from __future__ import annotations

from edgetl.errors import EdgetlError

KINDS = ("classification", "token_classification", "detection", "seq2seq")


def create_task(kind: str, classes: list[str], cfg=None):
    """The task object for a recipe's ``task.kind`` (``cfg``: its task section) and the data's class names."""
    if kind == "classification":
        from edgetl.tasks.classification import Classification

        return Classification(classes)
    if kind == "token_classification":
        from edgetl.tasks.token_classification import TokenClassification

        return TokenClassification(
            classes, crf=bool(getattr(cfg, "crf", False)), crf_lr_scale=getattr(cfg, "crf_lr_scale", 100.0)
        )
    if kind == "detection":
        from edgetl.tasks.detection import Detection, TwoStageDetection

        detector = getattr(cfg, "detector", "ssdlite")
        if detector == "faster_rcnn":
            return TwoStageDetection(
                classes, score_thresh=getattr(cfg, "score_thresh", None), proposals=getattr(cfg, "proposals", None)
            )
        return Detection(classes, detector=detector, score_thresh=getattr(cfg, "score_thresh", None))
    if kind == "seq2seq":
        from edgetl.tasks.seq2seq import Seq2Seq

        return Seq2Seq(
            getattr(cfg, "max_target_length", 64),
            getattr(cfg, "max_new_tokens", None),
            getattr(cfg, "num_beams", 1),
            getattr(cfg, "metric", "bleu"),
        )
    raise EdgetlError(f"task.kind '{kind}' is not implemented (known: {', '.join(KINDS)})")


def report_sections(kind: str | None) -> list:
    """The report sections of a task by name (report.json records it; older reports are classification)."""
    try:
        return create_task(kind or "classification", []).report_sections()
    except EdgetlError:
        return []
