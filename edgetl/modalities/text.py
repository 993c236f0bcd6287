"""Texts: tokenized with the backbone's ``tokenizer.json`` through the runner's ``encode_texts`` (the device's own
code), truncated to ``max_length``, padded per batch to the longest example."""

from __future__ import annotations

import numpy as np

from edgetl.runner import encode_texts


class Text:
    name = "text"
    static_int8 = False  # INT8 = ORT dynamic (static QDQ built beside it where it measures faster)
    supports_qat = False
    conv_placements = False

    def __init__(self, pre: dict, tokenizer):
        self.pre = pre
        self.tokenizer = tokenizer

    def describe(self) -> str:
        return f"max {self.pre['max_length']} tokens"

    def materialize(self, pool, idx: np.ndarray, desc: str):
        from edgetl.data import Split

        return Split(labels=pool.labels[idx], texts=[pool.items[i] for i in idx])

    def spare_items(self, train, idx, unlabelled) -> tuple[list, object]:
        return [train.items[i] for i in idx] + list(unlabelled.items if unlabelled else []), None

    def decoded_bytes(self, n: int) -> int:
        return 0  # texts are tokenized per batch

    def golden(self, split, n: int, max_bytes: int) -> tuple[dict, dict]:
        """Up to ``n`` tokenized examples (the token ids are what the device feeds) and the same feed."""
        feed = self.feeds(split, batch=min(n, len(split)), limit=n)[0]
        return dict(feed), feed

    def feeds(self, split, batch: int = 64, limit: int | None = None, pad_to: int | None = None) -> list[dict]:
        n = len(split) if limit is None else min(limit, len(split))
        return [
            encode_texts(self.tokenizer, split.texts[i : min(i + batch, n)], self.pre, pad_to=pad_to)
            for i in range(0, n, batch)
        ]

    def parity_feeds(self, split) -> list[dict]:
        """Real validation texts, also at batch 1 (no padding) and padded to max_length."""
        return (
            self.feeds(split, batch=32, limit=128)
            + self.feeds(split, batch=1, limit=4)
            + self.feeds(split, batch=8, limit=16, pad_to=self.pre["max_length"])
        )

    def latency_feed(self, split) -> dict:
        """One real example padded to max_length: the worst case a device sees."""
        return self.feeds(split, batch=1, limit=1, pad_to=self.pre["max_length"])[0]

    def calibration(self, split, size: int) -> list[dict]:
        return self.feeds(split, batch=16, limit=size, pad_to=self.pre["max_length"])

    def trace_example(self, split):
        import torch

        feed = self.feeds(split, batch=1, limit=1)[0]
        return {k: torch.from_numpy(v) for k, v in feed.items()}, feed

    def loader(self, split, batch_size: int, augment=None, shuffle: bool = False, seed: int = 0):
        import torch
        from torch.utils.data import DataLoader

        def collate(idx: list[int]):
            enc = encode_texts(self.tokenizer, [split.texts[i] for i in idx], self.pre)
            return {k: torch.from_numpy(v) for k, v in enc.items()}, torch.as_tensor(split.labels[idx])

        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            list(range(len(split))), batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate
        )

    def bundle_preprocess(self, data_cfg) -> dict:
        pre = dict(self.pre)
        if data_cfg.text_pair_column:
            pre["pair"] = True  # the runners take 'FIRST<TAB>SECOND' inputs
        return pre
