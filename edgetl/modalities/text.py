"""Texts: tokenized with the backbone's ``tokenizer.json`` through the runner's ``encode`` (the device's own code),
truncated to ``max_length``, padded per batch to the longest example. With ``words`` (token classification) each
example is a list of words and its targets are word tags, aligned to the first sub-token of each word. With a
``target`` tokenizer (seq2seq) each example has a target text: training batches carry the decoder's inputs (the
start token, then the target shifted right) and the target tokens as labels (-100 at padding)."""

from __future__ import annotations

import numpy as np

from edgetl.runner import encode


class Text:
    name = "text"
    static_int8 = False  # INT8 = ORT dynamic (static QDQ built beside it where it measures faster)
    supports_qat = False
    conv_placements = False

    def __init__(self, pre: dict, tokenizer, words: bool = False, target=None):
        self.pre = pre
        self.tokenizer = tokenizer
        self.words = words  # examples are word lists with one tag per word
        self.target = target  # seq2seq: the tokenizer of target texts (truncated to task.max_target_length)

    def labels(self, texts: list[str]) -> np.ndarray:
        """Target token ids after the decoder's start token (a tokenizer that adds it, as BERT's [CLS], has it
        dropped), ending with the end token; int64 [batch, longest], -100 at padding."""
        from edgetl.tagging import IGNORE

        start = self.pre["generation"]["start_id"]
        rows = [e.ids[1:] if e.ids and e.ids[0] == start else e.ids for e in self.target.encode_batch(list(texts))]
        out = np.full((len(rows), max(len(r) for r in rows)), IGNORE, np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _encode(self, texts: list, pad_to: int | None = None):
        return encode(self.tokenizer, texts, self.pre, pad_to=pad_to, words=self.words)

    def _aligned(self, encs, tags: list) -> list[np.ndarray]:
        """Per example, its word tags on the first sub-token of each word (IGNORE elsewhere), real tokens only."""
        from edgetl.tagging import align

        return [align(e.word_ids, t) for e, t in zip(encs, tags, strict=True)]

    def targets(self, split, batch: int = 64):
        """The targets ``feeds(split, batch)`` predictions are scored against, in the same order: class ids, or
        per-example token labels of each example's real length."""
        if self.target is not None:
            return [row for i in range(0, len(split), batch) for row in self.labels(split.targets[i : i + batch])]
        if not self.words:
            return split.labels
        out = []
        for i in range(0, len(split), batch):
            _, encs = self._encode(split.texts[i : i + batch])
            out += self._aligned(encs, split.targets[i : i + batch])
        return out

    def describe(self) -> str:
        return f"max {self.pre['max_length']} tokens"

    def materialize(self, pool, idx: np.ndarray, desc: str):
        from edgetl.data import Split

        targets = [pool.targets[i] for i in idx] if pool.targets is not None else None
        return Split(labels=pool.labels[idx], texts=[pool.items[i] for i in idx], targets=targets)

    def spare_items(self, train, idx, unlabelled) -> tuple[list, object]:
        return [train.items[i] for i in idx] + list(unlabelled.items if unlabelled else []), None

    def decoded_bytes(self, n: int) -> int:
        return 0  # texts are tokenized per batch

    def golden(self, split, n: int, max_bytes: int) -> tuple[dict, dict]:
        """Up to ``n`` tokenized examples (the token ids are what the device feeds) and the same feed."""
        feed = self.feeds(split, batch=min(n, len(split)), limit=n)[0]
        return dict(feed), feed

    def feeds(
        self, split, batch: int = 64, limit: int | None = None, pad_to: int | None = None, annotate: bool = False
    ) -> list[dict]:
        """ONNX inputs for ``split`` in order; ``annotate`` (word lists): also "_word_starts", the tokens that start a
        word, for decoding (``measure.model_inputs`` drops it before a model runs)."""
        n = len(split) if limit is None else min(limit, len(split))
        out = []
        for i in range(0, n, batch):
            feed, encs = self._encode(split.texts[i : min(i + batch, n)], pad_to=pad_to)
            if annotate and self.words:
                from edgetl.tagging import word_starts

                starts = np.zeros(feed["input_ids"].shape, bool)
                for row, e in enumerate(encs):
                    first = word_starts(e.word_ids)[: starts.shape[1]]
                    starts[row, : len(first)] = first
                feed["_word_starts"] = starts
            out.append(feed)
        return out

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
        """One example as tensors and as a feed; seq2seq: with its target's decoder inputs, so the op counter counts
        one teacher-forced pass (encoder and decoder), not a generation."""
        import torch

        feed = self.feeds(split, batch=1, limit=1)[0]
        if self.target is not None:
            from edgetl.seq2seq import shift_right

            gen = self.pre["generation"]
            y = torch.from_numpy(self.labels(split.targets[:1]))
            feed = {**feed, "decoder_input_ids": shift_right(y, gen["start_id"], gen["pad_id"]).numpy()}
        return {k: torch.from_numpy(v) for k, v in feed.items()}, feed

    def loader(self, split, batch_size: int, augment=None, shuffle: bool = False, seed: int = 0):
        import torch
        from torch.utils.data import DataLoader

        from edgetl.tagging import IGNORE

        def collate(idx: list[int]):
            feed, encs = self._encode([split.texts[i] for i in idx])
            x = {k: torch.from_numpy(v) for k, v in feed.items()}
            if self.target is not None:
                from edgetl.seq2seq import shift_right

                y = torch.from_numpy(self.labels([split.targets[i] for i in idx]))
                gen = self.pre["generation"]
                x["decoder_input_ids"] = shift_right(y, gen["start_id"], gen["pad_id"])
                return x, y
            if not self.words:
                return x, torch.as_tensor(split.labels[idx])
            y = np.full(feed["input_ids"].shape, IGNORE, np.int64)  # token labels, padded like the batch
            for row, labels in enumerate(self._aligned(encs, [split.targets[i] for i in idx])):
                y[row, : len(labels)] = labels[: y.shape[1]]
            return x, torch.from_numpy(y)

        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            list(range(len(split))), batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate
        )

    def bundle_preprocess(self, data_cfg) -> dict:
        pre = dict(self.pre)
        if data_cfg.text_pair_column:
            pre["pair"] = True  # the runners take 'FIRST<TAB>SECOND' inputs
        return pre
