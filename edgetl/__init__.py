"""edgetl: pretrained backbone + labelled data -> verified, compressed ONNX bundle for edge devices."""

__version__ = "0.1.0"
