"""Object detection: boxes and classes per image from an SSD-style detector (``edgetl.detector``).

Raw outputs are the head's box deltas and class logits per fixed anchor ([B, A, 4 + 1 + C], background first);
``decode`` is the device runner's own ``decode_detections`` (box decoding, per-class score threshold, top-k, NMS in
numpy), so the build and the device decode alike. Loss: torchvision's ``SSD.compute_loss``; distillation: per-anchor
class KL at temperature T plus box-delta imitation, both weighted by the teacher's foreground probability (the
anchors are fixed, so teacher and student outputs align one to one) and mixed with the task loss. Metric: COCO mAP
@[.5:.95] with ``pycocotools`` (mAP@.5 and per-class AP in the report row); agreement: the teacher's confident boxes
matched by the student's (same class, IoU >= 0.5), as an F1.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.tasks.base import Metric, Parity, output_parity

CONFIDENT = 0.5  # boxes at or above this score count for teacher agreement and as pseudo-labels


def matched(pred: dict, ref: dict, iou: float = 0.5) -> int:
    """Greedy one-to-one matches of ``pred``'s boxes to ``ref``'s of the same class, highest scores first."""
    from edgetl.runner import box_iou

    if not len(pred["boxes"]) or not len(ref["boxes"]):
        return 0
    ious = box_iou(ref["boxes"], pred["boxes"])
    ious[ref["labels"][:, None] != pred["labels"][None, :]] = 0.0
    used, n = set(), 0
    for i in np.argsort(-ref["scores"]) if "scores" in ref else range(len(ref["boxes"])):
        for j in np.argsort(-ious[i]):
            if ious[i, j] < iou:
                break
            if j not in used:
                used.add(j)
                n += 1
                break
    return n


def coco_eval(predictions: list[dict], targets: list[dict], num_classes: int):
    """pycocotools' COCOeval over in-memory predictions and targets (xyxy pixel boxes, class ids from 0), or None
    when there is nothing to evaluate."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    anns = []
    for i, t in enumerate(targets):
        for b, c in zip(t["boxes"], t["labels"], strict=True):
            box = xywh(b)
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1, "bbox": box}
            anns.append({**ann, "area": box[2] * box[3], "iscrowd": 0})
    dets = [
        {"image_id": i, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
        for i, p in enumerate(predictions)
        for b, c, s in zip(p["boxes"], p["labels"], p["scores"], strict=True)
    ]
    if not anns or not dets:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i} for i in range(len(targets))],
            "annotations": anns,
            "categories": [{"id": c + 1} for c in range(num_classes)],
        }
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


class Detection:
    name = "detection"
    metric_name = "mAP"
    higher_is_better = True
    output_names = ("head",)
    hf_auto_class = ""
    float_tail = True  # INT8: leave the nodes after the last Conv / MatMul in float (quantize_onnx)
    optimum_task = ""
    batch_axis = True
    golden_compare = "values"

    def __init__(self, classes: list[str], detector: str = "ssdlite", score_thresh: float | None = None):
        self.classes = list(classes)
        self.num_outputs = len(self.classes) + 1  # + background
        self.detector = detector
        self.score_thresh = score_thresh  # None: the detector's own (SSD 0.01, Faster R-CNN 0.05)
        self._helper = None

    @property
    def helper(self):
        if self._helper is None:
            from edgetl.detector import loss_helper

            self._helper = loss_helper()
        return self._helper

    def head(self, in_features: int):
        raise EdgetlError("detection builds its own head (task.detector)")

    def output_axes(self) -> dict:
        return {"head": {0: "batch"}}

    def loss(self, outputs, targets, label_smoothing: float = 0.0, model=None):
        import torch
        from torchvision.models.detection.ssd import SSD
        from torchvision.ops import box_iou as torch_iou

        anchors = model.anchors
        matches, tgts = [], []
        for t in targets:
            if t["boxes"].numel() == 0:
                matches.append(torch.full((len(anchors),), -1, dtype=torch.int64))
            else:
                matches.append(self.helper.proposal_matcher(torch_iou(t["boxes"], anchors)))
            tgts.append({"boxes": t["boxes"], "labels": t["labels"] + 1})  # 0 is the background
        head = {"bbox_regression": outputs[..., :4], "cls_logits": outputs[..., 4:]}
        losses = SSD.compute_loss(self.helper, tgts, head, [anchors] * len(targets), matches)
        return losses["bbox_regression"] + losses["classification"]

    def distill_loss(
        self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0, model=None
    ):
        import torch.nn.functional as F

        task = self.loss(student, targets, model=model)
        if alpha == 0.0:
            return task
        t = temperature
        fg = 1.0 - F.softmax(teacher[..., 4:], -1)[..., 0]  # the teacher's foreground probability per anchor
        norm = fg.sum().clamp(min=1.0)
        kl = F.kl_div(
            F.log_softmax(student[..., 4:] / t, -1),
            F.log_softmax(teacher[..., 4:] / t, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        boxes = F.smooth_l1_loss(student[..., :4], teacher[..., :4], reduction="none").sum(-1)
        imitation = t * t * (kl * (fg + 0.01)).sum() / norm + (boxes * fg).sum() / norm
        return alpha * imitation + (1.0 - alpha) * task

    def decode(self, outputs: np.ndarray, feed: dict | None = None, params=None) -> list[dict]:
        from edgetl.runner import decode_detections

        if params is None:
            raise EdgetlError("detection decoding needs the anchors (decode_params)")
        return decode_detections(np.asarray(outputs), params)

    def decode_params(self, model=None, metadata: dict | None = None):
        """The anchors and NMS settings, from the torch model or the ONNX file's metadata."""
        import json

        if model is not None and hasattr(model, "anchors"):
            h = self.helper
            return {
                "anchors": model.anchors.detach().numpy().astype(np.float32),
                "size": int(model.size),  # boxes are clipped to the model's input
                "score_thresh": h.score_thresh if self.score_thresh is None else self.score_thresh,
                "topk": h.topk_candidates,
                "nms": h.nms_thresh,
                "max_det": h.detections_per_img,
            }
        if metadata and "edgetl.detection" in metadata:
            p = json.loads(metadata["edgetl.detection"])
            return {**p, "anchors": np.asarray(p["anchors"], np.float32)}
        return None

    def export_metadata(self, model) -> dict:
        import json

        p = self.decode_params(model=model)
        return {"edgetl.detection": json.dumps({**p, "anchors": np.round(p["anchors"], 4).tolist()})}

    def bundle_files(self, metadata: dict) -> dict:
        """Side files for runtimes that do not read ONNX metadata (Node): preprocess key -> (file name, text)."""
        return {"detection": ("detection.json", metadata["edgetl.detection"])} if "edgetl.detection" in metadata else {}

    def eval_extras(self, targets) -> dict:
        return {}

    def batch_targets(self, targets, feed: dict) -> list[dict]:
        return [{k: np.asarray(v) for k, v in t.items()} for t in targets]

    def score(self, predictions, targets) -> Metric:
        ev = coco_eval(list(predictions), list(targets), len(self.classes))
        value = 100.0 * max(float(ev.stats[0]), 0.0) if ev is not None else 0.0
        return Metric(self.metric_name, value, self.higher_is_better)

    def agreement(self, predictions, reference, targets=None) -> float:
        """The reference's confident boxes (score >= 0.5) matched one to one by the prediction's (same class, IoU >=
        0.5), as an F1 in percent: 100 when both find the same objects, whatever their scores below that."""
        hits = total = 0
        for p, r in zip(predictions, reference, strict=True):
            p, r = (_confident(x) for x in (p, r))
            hits += matched(p, r)
            total += len(p["boxes"]) + len(r["boxes"])
        return 100.0 if total == 0 else 100.0 * 2 * hits / total

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        # agreement per anchor: the same best class (background included)
        same = sum(
            int((r[..., 4:].argmax(-1) == g[..., 4:].argmax(-1)).sum()) for r, g in zip(reference, got, strict=True)
        )
        anchors = sum(r.shape[0] * r.shape[1] for r in reference)
        return output_parity(reference, got, atol, rtol, same, anchors, n=sum(len(r) for r in reference))

    def pseudo_targets(self, teacher_outputs: np.ndarray):
        raise EdgetlError("distill.transfer_size is not supported for detection yet")

    def details(self, predictions, targets) -> dict:
        """mAP@.5, per-class AP@[.5:.95] and the precision / recall curve at IoU 0.5 per class."""
        ev = coco_eval(list(predictions), list(targets), len(self.classes))
        if ev is None:
            return {"map50": 0.0, "per_class_ap": {c: 0.0 for c in self.classes}}
        prec = ev.eval["precision"]  # [IoU thresholds, 101 recall points, classes, areas, max dets]
        per_class, curves = {}, {}
        for k, name in enumerate(self.classes):
            p = prec[:, :, k, 0, -1]
            per_class[name] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else 0.0
            curves[name] = [round(float(v), 4) for v in np.maximum(prec[0, :, k, 0, -1], 0)]
        return {"map50": 100.0 * max(float(ev.stats[1]), 0.0), "per_class_ap": per_class, "pr50": curves}

    def check_outputs(self, outputs: Any) -> None:
        if outputs.dim() != 3 or outputs.shape[-1] != 4 + self.num_outputs:
            raise EdgetlError(
                f"the model outputs shape {tuple(outputs.shape)}; expected [batch, anchors, {4 + self.num_outputs}] "
                "(keep 'det' in prune.protect)"
            )

    n_examples = 6

    def examples(self, inputs, predictions, targets, n: int) -> list[dict]:
        """The first test images (as the model saw them) with their true boxes in green and the shipped model's in
        red (score >= 0.3), as PNG data for the report, and the boxes themselves."""
        import base64

        from PIL import Image, ImageDraw

        out = []
        for i, (p, t) in enumerate(list(zip(predictions, targets, strict=False))[:n]):
            p = _confident(p, 0.3)
            image = Image.fromarray(np.asarray(inputs[i])).resize((2 * inputs[i].shape[1], 2 * inputs[i].shape[0]))
            pen = ImageDraw.Draw(image)
            for b in t["boxes"]:
                pen.rectangle([2 * float(v) for v in b], outline=(30, 170, 60), width=2)
            for b, c, s in zip(p["boxes"], p["labels"], p["scores"], strict=True):
                pen.rectangle([2 * float(v) for v in b], outline=(220, 40, 40), width=2)
                pen.text(
                    (2 * float(b[0]) + 3, 2 * float(b[1]) + 2), f"{self.classes[int(c)]} {s:.2f}", fill=(220, 40, 40)
                )
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(
                {
                    "png": base64.b64encode(buf.getvalue()).decode(),
                    "true": [[*map(float, b), int(c)] for b, c in zip(t["boxes"], t["labels"], strict=True)],
                    "pred": [
                        [*map(float, b), int(c), float(s)]
                        for b, c, s in zip(p["boxes"], p["labels"], p["scores"], strict=True)
                    ],
                }
            )
        return out

    def report_sections(self) -> list[tuple[str, Callable[[dict], str]]]:
        return [
            ("Average precision per class", per_class_ap),
            ("Precision / recall at IoU 0.5", pr_curves),
            ("Test images: true (green) and predicted (red) boxes", pictures),
        ]


def _confident(p: dict, at: float = CONFIDENT) -> dict:
    keep = np.asarray(p.get("scores", np.ones(len(p["boxes"])))) >= at
    return {k: np.asarray(v)[keep] for k, v in p.items()}


# ---------------------------------------------------------------------------------------------------------------
# report sections


def per_class_ap(report: dict) -> str:
    from html import escape

    from edgetl.report import _fmt, _table

    rows = [r for r in report.get("rows") or [] if r.get("per_class_ap")]
    if not rows:
        return "<p class='muted'>no per-class AP</p>"
    names = list(rows[0]["per_class_ap"])
    header = ["model", "mAP@.5 %"] + [f"{n} AP %" for n in names]
    cells = [[escape(r["stage"]), _fmt(r.get("map50"))] + [_fmt(r["per_class_ap"].get(n)) for n in names] for r in rows]
    return _table(header, cells, ["ship" if r.get("shipped") else "" for r in rows])


def pr_curves(report: dict) -> str:
    from edgetl.report import _figure, _png, _shipped

    ship = _shipped(report)
    if not ship or not ship.get("pr50"):
        return "<p class='muted'>no precision / recall curve</p>"
    fig, ax = _figure(6, 4)
    recall = np.linspace(0, 1, 101)
    for name, p in ship["pr50"].items():
        ax.plot(recall, p, label=name)
    ax.set(xlabel="recall", ylabel="precision", title=f"precision / recall at IoU 0.5: {ship['stage']} (test set)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def pictures(report: dict) -> str:
    found = ((report.get("metrics") or {}).get("verify") or {}).get("examples") or []
    if not found:
        return "<p class='muted'>no example images</p>"
    imgs = "".join(f"<img alt='test image {i}' src='data:image/png;base64,{e['png']}'> " for i, e in enumerate(found))
    return f"<div>{imgs}</div><p class='muted'>the shipped model under ONNX Runtime, test split, score >= 0.3</p>"


class TwoStageDetection(Detection):
    """Faster R-CNN (``edgetl.detector.build_faster_rcnn``): the graph decodes its own boxes (RPN proposals, RoI
    head, NMS), so raw outputs *are* the detections, [B, N, 6] (box, score, class id; -1 rows pad), and the graph
    takes one image per run. Loss: torchvision's RPN + RoI-head losses on the FPN maps. Distillation: the teacher's
    confident detections (score >= 0.5) as a second set of targets, ``alpha * loss(teacher's boxes) + (1 - alpha) *
    loss(true boxes)``: proposals differ between teacher and student, so there are no per-anchor outputs to align
    (the SSD recipe's KL); ``distill.feature_weight`` with FPN layers adds feature imitation on top. Parity: final
    boxes matched between PyTorch and ORT (``runner.detection_diff``); their agreement gates the export."""

    output_names = ("detections",)
    batch_axis = False  # the traced graph loops over the images it was exported with: one per run
    golden_compare = "detections"

    def __init__(self, classes: list[str], score_thresh: float | None = None, proposals: int | None = None):
        super().__init__(classes, "faster_rcnn", score_thresh)
        self.proposals = proposals  # RPN proposals per image at inference (None: the detector's 150)

    def output_axes(self) -> dict:
        return {"detections": {1: "boxes"}}

    @staticmethod
    def _targets(targets) -> list[dict]:
        return [{"boxes": t["boxes"].float(), "labels": t["labels"] + 1} for t in targets]  # 0 is the background

    def loss(self, outputs, targets, label_smoothing: float = 0.0, model=None):
        maps = outputs if isinstance(outputs, dict) else model.last_maps  # eval: the maps behind the detections
        return sum(model.losses(maps, self._targets(targets)).values())

    def distill_loss(
        self, student, teacher, targets, alpha: float, temperature: float, label_smoothing: float = 0.0, model=None
    ):
        if alpha == 0.0:
            return self.loss(student, targets, model=model)
        pseudo = []
        for rows in teacher.detach():
            rows = rows[rows[:, 4] >= CONFIDENT]
            pseudo.append({"boxes": rows[:, :4], "labels": rows[:, 5].long() + 1})
        maps = student if isinstance(student, dict) else model.last_maps
        kd = sum(model.losses(maps, pseudo).values())
        return kd if alpha == 1.0 else alpha * kd + (1.0 - alpha) * self.loss(student, targets, model=model)

    def decode(self, outputs: np.ndarray, feed: dict | None = None, params=None) -> list[dict]:
        from edgetl.runner import decode_detections

        return decode_detections(np.asarray(outputs), {"in_graph": True})

    def decode_params(self, model=None, metadata: dict | None = None):
        """The graph's own thresholds (what the runtime reports; it decodes nothing)."""
        import json

        if model is not None and hasattr(model, "det"):
            heads = model.det.roi_heads
            return {
                "in_graph": True,
                "size": int(model.size),
                "score_thresh": float(heads.score_thresh),
                "nms": float(heads.nms_thresh),
                "max_det": int(heads.detections_per_img),
            }
        if metadata and "edgetl.detection" in metadata:
            return json.loads(metadata["edgetl.detection"])
        return None

    def export_metadata(self, model) -> dict:
        import json

        return {"edgetl.detection": json.dumps(self.decode_params(model=model))}

    def parity(self, reference: list[np.ndarray], got: list[np.ndarray], atol: float, rtol: float) -> Parity:
        """Final boxes of both, matched (same class, IoU >= 0.5); agreement: matched boxes as an F1, the export's
        gate (``export.min_agreement``); max|diff|: the largest score difference or 1 - IoU of a matched pair, a box
        only one side found counting its score, reported but not gated (``runner.BOX_SLACK``). Boxes scoring under
        0.3 are not counted (``runner.DIFF_MIN_SCORE``). Float rounding reorders one object's proposals, so NMS can
        keep a neighbour and a box moves a few pixels, or a box near 0.5 is found on one side only: exact outputs
        are not the contract of a two-stage graph (the demo's FP32 export: 4.75 px on one box, then one lone box
        of 0.51 among 80 images, at 99.9% agreement)."""
        from edgetl.runner import BOX_SLACK, DIFF_MIN_SCORE, detection_diff

        found = [[self.decode(b) for b in side] for side in (reference, got)]
        diff, hits, total = detection_diff(*(sum(side, []) for side in found), min_score=DIFF_MIN_SCORE, relative=True)
        n = sum(len(r) for r in reference)
        return Parity(diff, atol + BOX_SLACK, 1.0 if total == 0 else 2 * hits / total, n)

    def check_outputs(self, outputs: Any) -> None:
        if outputs.dim() != 3 or outputs.shape[-1] != 6:
            raise EdgetlError(
                f"the model outputs shape {tuple(outputs.shape)}; expected [batch, boxes, 6] (keep 'det' in "
                "prune.protect)"
            )
