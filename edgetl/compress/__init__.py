"""Compression libraries used by the stages: structured pruning, ORT quantization, QAT and the INT8 choice."""
