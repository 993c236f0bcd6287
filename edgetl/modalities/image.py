"""Images: decoded with the device runner's own ``prepare`` (resize shorter side, center crop) into uint8 arrays,
normalised by ``normalize`` for ONNX feeds, augmented with torchvision v2 for training. ``data.decode`` says when:
once into memory (default), per batch (``lazy``), or once into a file on disk (``disk``; ``edgetl.modalities.stored``).
"""

from __future__ import annotations

import numpy as np

from edgetl.runner import normalize, prepare


class Image:
    name = "image"
    static_int8 = True  # INT8 = ORT static QDQ calibrated on training images
    supports_qat = True
    conv_placements = True  # leading Convs may stay FP32 (quantize.float_leading_convs)

    def __init__(self, pre: dict):
        self.pre = pre
        # set by data.load_data from the data section: when to decode, training-batch workers, the source's identity
        self.decode, self.workers, self.source_id = "memory", None, None

    def describe(self) -> str:
        return f"input {self.pre['crop']}px"

    def n_workers(self) -> int:
        """DataLoader processes for batches: data.workers, else none for images in memory (indexing an
        array is cheap) and up to 4 when batches are decoded or read on demand."""
        import os

        if self.workers is not None:
            return self.workers
        return 0 if self.decode == "memory" else min(4, os.cpu_count() or 1)

    def _stored(self, pool, idx: np.ndarray, desc: str):
        """``materialize`` for data.decode lazy / disk: nothing decoded ahead (disk: once, into a file)."""
        from edgetl.data import Split
        from edgetl.modalities.stored import LazyImages, decode_key, decode_to_disk

        images = LazyImages([(pool.load, pool.items[i]) for i in idx], self.pre)
        targets = None
        if pool.targets is not None:  # boxes follow each image's size to the model's input (read, not kept)
            targets = [self.scaled(pool.targets[i], pool.load(pool.items[i]).size) for i in idx]
        if self.decode == "disk":
            from edgetl.cache import open_cache

            key = decode_key(images.sources, self.pre, self.source_id)
            images = decode_to_disk(images, open_cache().root / "decoded", key, desc, self.n_workers())
        return Split(labels=pool.labels[idx], images=images, targets=targets)

    def materialize(self, pool, idx: np.ndarray, desc: str):
        if self.decode != "memory":
            return self._stored(pool, idx, desc)
        import sys

        from tqdm.auto import tqdm

        from edgetl.data import Split

        quiet = len(idx) < 2000 or not sys.stderr.isatty()
        arrays, targets = [], []
        for i in tqdm(idx, desc=f"decode {desc}", leave=False, disable=quiet):
            image = pool.load(pool.items[i])
            arrays.append(prepare(image, self.pre))
            if pool.targets is not None:  # boxes follow the image to the model's input size
                targets.append(self.scaled(pool.targets[i], image.size))
        return Split(
            labels=pool.labels[idx], images=np.stack(arrays), targets=targets if pool.targets is not None else None
        )

    def scaled(self, target: dict, size: tuple[int, int]) -> dict:
        """Boxes in an image of ``size`` (w, h) -> boxes in the prepared image (``fit: stretch``)."""
        c = self.pre["crop"]
        scale = np.asarray([c / size[0], c / size[1]] * 2, np.float32)
        return {"boxes": np.asarray(target["boxes"], np.float32) * scale, "labels": np.asarray(target["labels"])}

    def spare_items(self, train, idx, unlabelled) -> tuple[list, object]:
        """Training-pool examples ``idx`` and unlabelled ones as (items, loader) of one pool."""
        extra = unlabelled.items if unlabelled else []
        items = [(train.load, train.items[i]) for i in idx] + [(unlabelled.load, it) for it in extra]
        return items, lambda item: item[0](item[1])

    def targets(self, split, batch: int = 64):
        """What ``feeds(split)`` predictions are scored against, in order: the class ids (detection: the boxes)."""
        return split.targets if split.targets is not None else split.labels

    def decoded_bytes(self, n: int) -> int:
        """Memory the decoded examples take (none held when they are decoded on demand)."""
        return n * self.pre["crop"] * self.pre["crop"] * 3 if self.decode == "memory" else 0

    def golden(self, split, n: int, max_bytes: int) -> tuple[dict, dict]:
        """Up to ``n`` examples as the device holds them before the model (prepared uint8 images), under
        ``max_bytes``, and the feed they make."""
        each = self.pre["crop"] * self.pre["crop"] * 3
        k = max(1, min(n, len(split), max_bytes // each))
        images = split.images[:k]
        return {"images": images}, {"input": normalize(images, self.pre)}

    def feeds(
        self, split, batch: int = 64, limit: int | None = None, pad_to: int | None = None, annotate: bool = False
    ) -> list[dict]:
        n = len(split) if limit is None else min(limit, len(split))
        return [{"input": normalize(split.images[i : min(i + batch, n)], self.pre)} for i in range(0, n, batch)]

    def parity_feeds(self, split) -> list[dict]:
        return self.feeds(split, limit=256, batch=32)

    def latency_feed(self, split) -> dict:
        return self.feeds(split, batch=1, limit=1)[0]

    def calibration(self, split, size: int) -> list[dict]:
        return self.feeds(split, batch=16, limit=size)

    def trace_example(self, split):
        """(torch input for DepGraph tracing, the feed MACs are counted on)."""
        import torch

        c = self.pre["crop"]
        return torch.randn(1, 3, c, c), {"input": np.zeros((1, 3, c, c), np.float32)}

    def box_loader(self, split, batch_size: int, augment=None, shuffle: bool = False, seed: int = 0):
        """Images with their boxes: (normalised batch, list of {"boxes", "labels"} tensors). Training augments
        with torchvision v2's box-aware ops (``tv_tensors.BoundingBoxes``): photometric distortion, SSD's random
        IoU crop resized back to the input, horizontal flip; boxes left too small are dropped."""
        import torch
        from torch.utils.data import DataLoader, Dataset
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        pre, c = self.pre, self.pre["crop"]
        g = torch.Generator().manual_seed(seed)
        mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
        photometric = v2.RandomPhotometricDistort(p=0.5)
        crop = v2.Compose([v2.RandomIoUCrop(), v2.Resize((c, c), antialias=True)])
        flip = v2.RandomHorizontalFlip()
        sanitize = v2.SanitizeBoundingBoxes(min_size=2.0)

        class _Boxes(Dataset):
            def __len__(self):
                return len(split)

            def __getitem__(self, i):
                x = tv_tensors.Image(torch.from_numpy(split.images[i]).permute(2, 0, 1))
                t = split.targets[i]
                boxes = tv_tensors.BoundingBoxes(torch.as_tensor(t["boxes"]), format="XYXY", canvas_size=(c, c))
                target = {"boxes": boxes, "labels": torch.as_tensor(t["labels"], dtype=torch.int64)}
                if augment is not None:
                    x = photometric(x)
                    if augment.random_resized_crop and len(boxes):
                        x, target = crop(x, target)
                    if augment.hflip:
                        x, target = flip(x, target)
                    x, target = sanitize(x, target)
                target = {"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"]}
                return (x.as_subclass(torch.Tensor).float() / 255.0 - mean) / std, target

        def collate(batch):
            return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

        return DataLoader(
            _Boxes(),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=g,
            num_workers=self.n_workers(),
            collate_fn=collate,
        )

    def loader(self, split, batch_size: int, augment=None, shuffle: bool = False, seed: int = 0):
        if split.targets is not None:
            return self.box_loader(split, batch_size, augment, shuffle, seed)
        import torch
        from torch.utils.data import DataLoader, Dataset
        from torchvision.transforms import v2

        pre = self.pre
        g = torch.Generator().manual_seed(seed)
        mean = torch.tensor(pre["mean"]).view(3, 1, 1)
        std = torch.tensor(pre["std"]).view(3, 1, 1)
        ops = []
        if augment is not None:
            if augment.random_resized_crop:
                ops.append(v2.RandomResizedCrop(pre["crop"], scale=(augment.crop_scale_min, 1.0), antialias=True))
            if augment.hflip:
                ops.append(v2.RandomHorizontalFlip())
        aug = v2.Compose(ops) if ops else None

        class _Images(Dataset):
            def __len__(self):
                return len(split)

            def __getitem__(self, i):
                x = torch.from_numpy(split.images[i]).permute(2, 0, 1)
                if aug is not None:
                    x = aug(x)
                return (x.float() / 255.0 - mean) / std, int(split.labels[i])

        return DataLoader(_Images(), batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=self.n_workers())

    def bundle_preprocess(self, data_cfg) -> dict:
        return dict(self.pre)
