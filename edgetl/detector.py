"""Detectors built from torchvision's detection parts over an edgetl trunk (``task.detector``).

``ssdlite``: torchvision's SSDLite recipe (``torchvision.models.detection.ssdlite``) on any torchvision classifier
with a ``features`` stack (MobileNetV2 / V3, EfficientNet): the trunk's last stride-16 and stride-32 maps, SSDLite's
extra blocks for coarser maps, ``SSDLiteHead`` (depthwise-separable box and class convs) and ``DefaultBoxGenerator``
anchors, fixed for the fixed input size. The module returns the head's *raw* outputs, box deltas and class logits
concatenated per anchor ([batch, anchors, 4 + 1 + classes]); box decoding and NMS run after the graph (numpy, in
``runner.decode_detections``), so the float tail that INT8 detectors lose (onnxruntime #14233) is never quantized and
parity is checked anchor by anchor. The loss is torchvision's own ``SSD.compute_loss`` (smooth L1 on matched anchors,
cross-entropy with 3:1 hard negatives).

``faster_rcnn``: torchvision's two-stage parts (``FeaturePyramidNetwork``, ``RegionProposalNetwork``, ``RoIHeads``
with ``MultiScaleRoIAlign`` and ``TwoMLPHead``) in the pattern of ``fasterrcnn_mobilenet_v3_large_320_fpn``: the
trunk's stride-16 and stride-32 maps into an FPN (plus its max-pool level), proposals from the RPN, boxes and
classes from the RoI head. Proposals, RoI pooling and NMS depend on the data, so unlike SSD the graph ends with
torchvision's own post-processing: the ONNX output is the final detections per image, [batch, boxes, 6] (x1, y1, x2,
y2, score, class id; rows padded with score -1 where a batch's images found different counts), and the runtime only
filters them. The traced graph loops over the images it was exported with, so it takes one image per run. In
training the module returns the FPN maps and the task's loss runs RPN and RoI head on them with the targets
(torchvision's own losses: objectness BCE + box smooth L1 on sampled anchors, RoI cross-entropy + box smooth L1).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from edgetl.errors import EdgetlError
from edgetl.lazy import lazy_classes, picklable
from edgetl.runner import BOX_WEIGHTS  # the device decodes with the weights the loss encodes with

DETECTORS = ("ssdlite", "faster_rcnn")
# the RPN keeps its top proposals whatever their objectness (torchvision's mobile preset drops those under 0.05): an
# image with none would leave the RoI head zero rows, which the exported graph's Reshape(0, -1) cannot take in ORT
NO_EMPTY_PROPOSALS = 0.0
PAD = -1.0  # a padding row of a two-stage detector's output (score -1: runner.decode_detections drops it)


@picklable
def _modules():
    import torch
    from torch import nn

    class SSDLite(nn.Module):
        """``features``: the pretrained trunk (blocks); ``det``: everything new (extra blocks + head)."""

        def __init__(self, features, split: int, extras, head, anchors, size: int):
            super().__init__()
            self.size = size  # the fixed square input the anchors are laid out for
            self.features = features
            self.split = split  # features[:split] ends at stride 16
            self.det = nn.Module()
            self.det.extras = extras
            self.det.head = head
            self.register_buffer("anchors", anchors, persistent=False)  # [A, 4] xyxy, model-input pixels

        def maps(self, x):
            out = []
            for i, block in enumerate(self.features):
                x = block(x)
                if i == self.split - 1:
                    out.append(x)
            out.append(x)
            for block in self.det.extras:
                x = block(x)
                out.append(x)
            return out

        def forward(self, input):
            h = self.det.head(self.maps(input))
            return torch.cat([h["bbox_regression"], h["cls_logits"]], -1)

    class TorchvisionSSD(nn.Module):
        """A torchvision SSD-family detector's backbone (``features``) and head (``det``) with fixed anchors."""

        def __init__(self, features, head, anchors, size: int):
            super().__init__()
            self.size = size
            self.features = features
            self.det = head
            self.register_buffer("anchors", anchors, persistent=False)

        def forward(self, input):
            h = self.det(list(self.features(input).values()))
            return torch.cat([h["bbox_regression"], h["cls_logits"]], -1)

    class TwoStage(nn.Module):
        """``features``: the trunk (blocks); ``det``: the FPN, the RPN and the RoI heads. ``taps``: the indices of
        the trunk blocks whose outputs feed the FPN (an ``nn.Sequential`` trunk), or None for a trunk that returns
        its maps itself (torchvision's ``IntermediateLayerGetter``)."""

        def __init__(self, features, taps, fpn, rpn, roi_heads, size: int):
            super().__init__()
            self.size = size
            self.features = features
            self.taps = taps
            self.det = nn.Module()
            self.det.fpn, self.det.rpn, self.det.roi_heads = fpn, rpn, roi_heads
            self.last_maps = None  # the FPN maps of the last eval batch (the validation loss reads them)

        def __getstate__(self):  # a cached or copied model leaves the last batch's maps behind
            return {**self.__dict__, "last_maps": None}

        def maps(self, x):
            if self.taps is None:
                return self.det.fpn(self.features(x))
            found, out = {}, x
            for i, block in enumerate(self.features):
                out = block(out)
                if i in self.taps:
                    found[str(len(found))] = out
            return self.det.fpn(found)

        def trace_forward(self, x):
            """What pruning traces: the FPN maps (proposals and NMS have no gradient to follow)."""
            return list(self.maps(x).values())

        def images(self, maps):
            """An ``ImageList`` of the batch at the fixed input size (the anchors read only its shape)."""
            from torchvision.models.detection.image_list import ImageList

            first = next(iter(maps.values()))
            n = first.shape[0]
            return ImageList(first.new_zeros(()).expand(n, 3, self.size, self.size), [(self.size, self.size)] * n)

        def forward(self, input):
            maps = self.maps(input)
            if self.training:
                return maps  # the losses need the targets: Detection.loss calls losses(maps, targets)
            self.last_maps = maps
            images = self.images(maps)
            proposals, _ = self.det.rpn(images, maps)
            found, _ = self.det.roi_heads(maps, proposals, images.image_sizes)
            rows = [
                torch.cat([d["boxes"], d["scores"][:, None], (d["labels"] - 1)[:, None].to(d["boxes"])], 1)
                for d in found
            ]
            n = max(len(r) for r in rows)
            rows = [r if len(r) == n else torch.cat([r, r.new_full((1, 6), PAD).expand(n - len(r), 6)]) for r in rows]
            return torch.stack(rows)

        def losses(self, maps, targets) -> dict:
            """torchvision's RPN and RoI-head losses on ``maps`` for ``targets`` (boxes xyxy, labels from 1)."""
            images = self.images(maps)
            modes = self.det.rpn.training, self.det.roi_heads.training
            self.det.rpn.train(), self.det.roi_heads.train()  # the validation loss too: losses exist in train mode
            try:
                proposals, rpn = self.det.rpn(images, maps, targets)
                _, roi = self.det.roi_heads(maps, proposals, images.image_sizes, targets)
            finally:
                self.det.rpn.train(modes[0]), self.det.roi_heads.train(modes[1])
            return {**rpn, **roi}

    return SSDLite, TorchvisionSSD, TwoStage


def _two_stage(size: int, chans: list[int], num_classes: int, fpn_width: int, anchor_scale: float, **rcnn):
    """FPN + RPN + RoI heads as torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn`` builds them (two trunk maps
    and a max-pool level, 15 anchors per location, 7x7 RoIAlign on the two FPN maps), with anchor sizes scaled to the
    input size and a narrower FPN and box head for the edge."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, RPNHead, TwoMLPHead
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    fpn = FeaturePyramidNetwork(chans, fpn_width, extra_blocks=LastLevelMaxPool())
    sizes = tuple(max(4, round(s * anchor_scale)) for s in (32, 64, 128, 256, 512))
    anchors = AnchorGenerator((sizes,) * 3, ((0.5, 1.0, 2.0),) * 3)
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(fpn_width, anchors.num_anchors_per_location()[0]),
        0.7,  # fg / bg IoU of anchors, torchvision's defaults
        0.3,
        256,
        0.5,
        dict(training=2000, testing=rcnn.get("pre_nms", 150)),
        dict(training=2000, testing=rcnn.get("post_nms", 150)),
        0.7,
        score_thresh=NO_EMPTY_PROPOSALS,
    )
    pooler = MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2)
    width = rcnn.get("representation", 512)
    heads = RoIHeads(
        pooler,
        TwoMLPHead(fpn_width * 7 * 7, width),
        FastRCNNPredictor(width, num_classes + 1),
        0.5,  # fg / bg IoU of proposals
        0.5,
        rcnn.get("rois_per_image", 128),
        0.25,
        None,
        0.05,  # score threshold, NMS IoU and detections per image, torchvision's defaults
        0.5,
        100,
    )
    return fpn, rpn, heads


def _trunk_maps(trunk, size: int, detector: str):
    """``trunk.features`` probed at ``size``: (the blocks, the index of the last block at stride 16, every block's
    output width); the trunk must reach stride 32."""
    import torch
    from torch import nn

    features = getattr(trunk, "features", None)
    if not isinstance(features, nn.Sequential):
        raise EdgetlError(
            f"task.detector {detector} needs a torchvision backbone with a 'features' stack "
            "(torchvision:mobilenet_v2, mobilenet_v3_large, efficientnet_b0 ...)"
        )
    training = features.training
    features.eval()
    with torch.no_grad():  # where the stride reaches 16 and 32
        x, strides, widths = torch.zeros(1, 3, size, size), [], []
        for block in features:
            x = block(x)
            strides.append(size // x.shape[-1])
            widths.append(x.shape[1])
    features.train(training)
    if strides[-1] < 32 or 16 not in strides:
        raise EdgetlError(f"backbone.input_size {size} is too small for {detector}: the trunk needs stride 16 and 32")
    return features, max(i for i, s in enumerate(strides) if s <= 16), widths


def build_faster_rcnn(
    trunk,
    size: int,
    num_classes: int,
    fpn_width: int = 128,
    score_thresh: float | None = None,
    proposals: int | None = None,
):
    """Faster R-CNN over ``trunk.features`` for ``num_classes`` object classes (+ background) at ``size`` x ``size``:
    the trunk's last stride-16 and stride-32 maps feed the FPN; ``proposals`` per image at inference (None: 150)."""
    features, last16, widths = _trunk_maps(trunk, size, "faster_rcnn")
    taps = [last16, len(features) - 1]
    fpn, rpn, heads = _two_stage(size, [widths[i] for i in taps], num_classes, fpn_width, size / 320)
    _set_heads(rpn, heads, score_thresh, proposals)
    return _modules()[2](features, taps, fpn, rpn, heads, size).train(features.training)


def _set_heads(rpn, heads, score_thresh: float | None, proposals: int | None) -> None:
    """The recipe's inference settings: the RoI head's score threshold, the RPN's proposals per image (its top-n per
    FPN level before NMS and per image after, at inference; training keeps its own)."""
    if score_thresh is not None:
        heads.score_thresh = score_thresh
    if proposals is not None:
        rpn._pre_nms_top_n["testing"] = rpn._post_nms_top_n["testing"] = proposals


def wrap_torchvision_rcnn(
    detector, size: int, num_classes: int, score_thresh: float | None = None, proposals: int | None = None
):
    """A torchvision Faster R-CNN (``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``, COCO weights for online
    users) with a new box predictor for ``num_classes``, at a fixed ``size``; its own resize / normalise transform and
    box rescaling give way to edgetl's (the bundle's runner does them)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    heads = detector.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes + 1)
    _set_heads(detector.rpn, heads, score_thresh, proposals)
    body, fpn = detector.backbone.body, detector.backbone.fpn
    detector.rpn.score_thresh = NO_EMPTY_PROPOSALS
    return _modules()[2](body, None, fpn, detector.rpn, heads, size).train(detector.training)


def wrap_torchvision_ssd(detector, size: int, num_classes: int):
    """A torchvision SSD-family detector (``torchvision:ssdlite320_mobilenet_v3_large``, ``ssd300_vgg16``, COCO
    weights for online users) with a new class head for ``num_classes``, its anchors fixed for ``size``; its own
    resize / normalise transform and post-processing give way to edgetl's (the bundle's runner does them)."""
    import torch
    from torch import nn
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.ssd import SSD, SSDClassificationHead
    from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

    if not isinstance(detector, SSD):
        raise EdgetlError(
            "torchvision detectors of the SSD family fine-tune here (ssdlite320_mobilenet_v3_large, ssd300_vgg16); "
            "Faster R-CNN, RetinaNet, FCOS and Mask R-CNN are not supported yet, or name a classifier backbone "
            "(torchvision:mobilenet_v2) for task.detector ssdlite"
        )
    training = detector.training
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size)
        maps = list(detector.eval().backbone(x).values())
    chans, per_loc = [m.shape[1] for m in maps], detector.anchor_generator.num_anchors_per_location()
    if isinstance(detector.head.classification_head, SSDLiteClassificationHead):
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
        new = SSDLiteClassificationHead(chans, per_loc, num_classes + 1, norm)
    else:
        new = SSDClassificationHead(chans, per_loc, num_classes + 1)
    detector.head.classification_head = new
    anchors = detector.anchor_generator(ImageList(x, [(size, size)]), maps)[0]
    return _modules()[1](detector.backbone, detector.head, anchors, size).train(training)


def build_ssdlite(trunk, size: int, num_classes: int):
    """SSDLite over ``trunk.features`` for ``num_classes`` object classes (+ background) at ``size`` x ``size``."""
    import torch
    from torch import nn
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _normal_init

    features, split, widths = _trunk_maps(trunk, size, "ssdlite")
    split += 1
    # torchvision SSDLite's eps; its momentum 0.03 suits its 600-epoch schedule, a fine-tune of a few epochs needs
    # the running statistics of the new layers to settle faster (0.1, PyTorch's default)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    last = widths[-1]
    extras, side, chans = nn.ModuleList(), -(-size // 32), [widths[split - 1], last]
    for width in (256, 128, 128):  # coarser maps down to 1 x 1
        if side <= 1:
            break
        extras.append(_extra_block(chans[-1], width, norm))
        chans.append(width)
        side = -(-side // 2)
    _normal_init(extras)
    generator = DefaultBoxGenerator([[2, 3] for _ in chans], min_ratio=0.2, max_ratio=0.95)
    anchors_per_loc = generator.num_anchors_per_location()
    head = SSDLiteHead(chans, anchors_per_loc, num_classes + 1, norm)
    model = _modules()[0](features, split, extras, head, torch.zeros(0, 4), size)
    training = model.training
    with torch.no_grad():
        maps = model.eval().maps(torch.zeros(1, 3, size, size))
        anchors = generator(ImageList(torch.zeros(1, 3, size, size), [(size, size)]), maps)[0]
    model.anchors = anchors
    return model.train(training)


def loss_helper():
    """What torchvision's ``SSD.compute_loss`` / ``postprocess_detections`` read from ``self``."""
    from torchvision.models.detection import _utils as det_utils

    return SimpleNamespace(
        box_coder=det_utils.BoxCoder(weights=BOX_WEIGHTS),
        proposal_matcher=det_utils.SSDMatcher(0.5),
        neg_to_pos_ratio=3,
        score_thresh=0.01,
        topk_candidates=400,
        nms_thresh=0.55,
        detections_per_img=100,
    )


# unpickling a cached model finds its class
__getattr__ = lazy_classes(__name__, {"SSDLite": _modules, "TorchvisionSSD": _modules, "TwoStage": _modules})
