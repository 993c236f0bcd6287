"""Detectors built from torchvision's detection parts over an edgetl trunk (``task.detector``).

``ssdlite``: torchvision's SSDLite recipe (``torchvision.models.detection.ssdlite``) on any torchvision classifier
with a ``features`` stack (MobileNetV2 / V3, EfficientNet): the trunk's last stride-16 and stride-32 maps, SSDLite's
extra blocks for coarser maps, ``SSDLiteHead`` (depthwise-separable box and class convs) and ``DefaultBoxGenerator``
anchors, fixed for the fixed input size. The module returns the head's *raw* outputs, box deltas and class logits
concatenated per anchor ([batch, anchors, 4 + 1 + classes]); box decoding and NMS run after the graph (numpy, in
``runner.decode_detections``), so the float tail that INT8 detectors lose (onnxruntime #14233) is never quantized and
parity is checked anchor by anchor. The loss is torchvision's own ``SSD.compute_loss`` (smooth L1 on matched anchors,
cross-entropy with 3:1 hard negatives).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from edgetl.errors import EdgetlError
from edgetl.lazy import lazy_classes, picklable
from edgetl.runner import BOX_WEIGHTS  # the device decodes with the weights the loss encodes with

DETECTORS = ("ssdlite",)


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

    return SSDLite, TorchvisionSSD


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

    features = getattr(trunk, "features", None)
    if not isinstance(features, nn.Sequential):
        raise EdgetlError(
            "task.detector ssdlite needs a torchvision backbone with a 'features' stack "
            "(torchvision:mobilenet_v2, mobilenet_v3_large, efficientnet_b0 ...)"
        )
    training = features.training
    features.eval()
    with torch.no_grad():  # where the stride reaches 32: the maps before and at the end of the trunk
        x, strides, widths = torch.zeros(1, 3, size, size), [], []
        for block in features:
            x = block(x)
            strides.append(size // x.shape[-1])
            widths.append(x.shape[1])
    features.train(training)
    if strides[-1] < 32 or 16 not in strides:
        raise EdgetlError(f"backbone.input_size {size} is too small for SSDLite: the trunk needs stride 16 and 32")
    split = max(i for i, s in enumerate(strides) if s <= 16) + 1
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
__getattr__ = lazy_classes(__name__, {"SSDLite": _modules, "TorchvisionSSD": _modules})
