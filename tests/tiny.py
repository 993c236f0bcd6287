"""Tiny, download-free assets shared by the tests and deploy/node/make_fixture.py: an image recipe on sklearn
digits, and a random 2-layer BERT with a vocab-file tokenizer plus a CSV of word-list "reviews" for text."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TINY = {
    "name": "tiny",
    "seed": 0,
    "backbone": {"name": "timm:mobilenetv3_small_050", "pretrained": False, "input_size": 32},
    "data": {"kind": "digits", "batch_size": 128, "augment": {"hflip": False}},
    "finetune": {"strategy": "full", "epochs": 2, "lr": 0.003, "lr_decay": 1.0, "label_smoothing": 0.0},
    "verify": {"runs": 5, "warmup": 2},
}

POS = "good great excellent lovely fun warm".split()
NEG = "bad awful poor terrible boring dull".split()
FILLER = "the movie film was a is and very quite".split()


def make_tiny_bert(d: Path) -> Path:
    """A randomly initialised 2-layer, 2-head BERT classifier and its WordPiece tokenizer, saved in ``d``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)  # the same weights whichever tests ran before

    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILLER]))
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    config = BertConfig(
        vocab_size=5 + len(POS + NEG + FILLER),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(d)
    return d


def sentences(n: int = 240, seed: int = 0) -> list[dict]:
    """Shuffled filler words plus two sentiment words: the label is easy to learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = list(rng.choice(FILLER, 4)) + list(rng.choice(POS if label == "pos" else NEG, 2))
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


def write_reviews(path: Path, n: int = 240) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "sentiment"])
        w.writeheader()
        w.writerows(sentences(n))
    return path


def text_recipe(bert: Path, data: Path) -> dict:
    """fine-tune -> prune heads/FFN -> distill -> ORT dynamic INT8 on the tiny BERT."""
    return {
        "name": "tiny_text",
        "backbone": {"name": f"hf:{bert}"},
        "data": {
            "kind": "csv",
            "path": str(data),
            "text_column": "review",
            "label_column": "sentiment",
            "max_length": 16,
            "batch_size": 32,
        },
        "finetune": {"strategy": "full", "epochs": 4, "lr": 0.003, "lr_decay": 1.0, "label_smoothing": 0.0},
        "prune": {"ratio": 0.5, "steps": 1, "recovery_epochs": 1, "lr": 0.001},
        "distill": {"epochs": 1, "lr": 0.001, "feature_weight": 1.0},  # + every layer's hidden states
        "quantize": {"method": "ptq", "require_speedup": False},
        "verify": {"runs": 5, "warmup": 2},
    }


# ---------------------------------------------------------------------------------------------------------------
# token classification: tagged sentences from names and places, a tiny BERT whose vocabulary splits some names
# into sub-words ("alicia" -> "ali ##cia"), written as CoNLL

PEOPLE = ["alice", "bob", "carol", "dave", "alicia"]
PLACES = [["paris"], ["rome"], ["oslo"], ["new", "york"], ["lima"]]
NER_FILLER = "went to met in visited from and the lives".split()
NER_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "ali",
    "##cia",
    *PEOPLE[:4],
    *{w for p in PLACES for w in p},
    *NER_FILLER,
]


def ner_sentences(n: int = 200, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences like 'alice went to new york' with IOB2 tags (PER, LOC)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        who = str(rng.choice(PEOPLE))
        where = PLACES[int(rng.integers(len(PLACES)))]
        verb = str(rng.choice(["went to", "lives in", "visited"])).split()
        words = [who, *verb, *where]
        tags = ["B-PER"] + ["O"] * len(verb) + ["B-LOC"] + ["I-LOC"] * (len(where) - 1)
        if rng.random() < 0.5:
            other = str(rng.choice(PEOPLE))
            words, tags = [*words, "and", other], [*tags, "O", "B-PER"]
        out.append((words, tags))
    return out


def write_conll(path: Path, sentences: list, scheme: str = "iob2") -> Path:
    """CoNLL: word, a dummy POS column, the tag; blank lines between sentences; -DOCSTART- first."""
    lines = ["-DOCSTART- -X- O", ""]
    for words, tags in sentences:
        if scheme == "bioes":
            tags = _to_bioes(tags)
        lines += [f"{w} NN {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines))
    return path


def _to_bioes(tags: list[str]) -> list[str]:
    out = []
    for i, t in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        cont = nxt.startswith("I-")
        if t.startswith("B-"):
            out.append(("B-" if cont else "S-") + t[2:])
        elif t.startswith("I-"):
            out.append(("I-" if cont else "E-") + t[2:])
        else:
            out.append(t)
    return out


def make_tiny_ner_bert(d: Path) -> Path:
    """A randomly initialised 2-layer BERT and its WordPiece tokenizer over NER_VOCAB, saved in ``d``."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(NER_VOCAB))
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    config = BertConfig(
        vocab_size=len(NER_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForTokenClassification(config).save_pretrained(d)
    return d


def ner_recipe(bert: Path, data: Path) -> dict:
    """fine-tune -> prune heads/FFN -> distill -> ORT INT8 on the tiny BERT, tagging words."""
    return {
        "name": "tiny_ner",
        "task": {"kind": "token_classification"},
        "backbone": {"name": f"hf:{bert}"},
        "data": {"kind": "conll", "path": str(data), "max_length": 24, "batch_size": 16},
        "finetune": {"strategy": "full", "epochs": 6, "lr": 0.005, "lr_decay": 1.0, "label_smoothing": 0.0},
        "prune": {"ratio": 0.5, "steps": 1, "recovery_epochs": 1, "lr": 0.001},
        "distill": {"epochs": 1, "lr": 0.001},
        "quantize": {"method": "ptq", "require_speedup": False},
        "verify": {"runs": 5, "warmup": 2},
    }


def write_digit_boxes(root: Path, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    """A tiny COCO detection set from sklearn digits 0, 1 and 7: one to two digits (8 px scaled to 16-24 px) per
    canvas on a dark background, every fifth canvas empty. Returns the annotations file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgetl.boxes import write_coco

    digits = load_digits()
    rng = np.random.default_rng(seed)
    classes = [0, 1, 7]
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, boxes = [], []
    for i in range(n):
        canvas = np.full((size, size), 20, np.uint8)
        placed: list = []
        boxes.append([])
        for _ in range(0 if i % 5 == 4 else int(rng.integers(1, 3))):
            c = int(rng.integers(len(classes)))
            pool = np.flatnonzero(digits.target == classes[c])
            side = int(rng.integers(16, 25))
            item = Image.fromarray((digits.images[rng.choice(pool)] * 15.9).astype(np.uint8)).resize((side, side))
            for _ in range(20):  # a free spot
                x, y = (int(v) for v in rng.integers(0, size - side, 2))
                if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s in placed):
                    break
            else:
                continue
            placed.append((x, y, side))
            canvas[y : y + side, x : x + side] = np.maximum(canvas[y : y + side, x : x + side], np.asarray(item))
            boxes[-1].append((c, x, y, side, side))
        name = f"{i:03d}.png"
        Image.fromarray(canvas).save(root / "images" / name)
        images.append((name, size, size))
    return write_coco(root / "annotations.json", images, boxes, [f"digit{c}" for c in classes])


def detection_recipe(annotations: Path, size: int = 64) -> dict:
    """A random-init MobileNetV2 SSDLite on ``write_digit_boxes``: every stage once, tiny budgets."""
    return {
        "name": "tinydet",
        "seed": 0,
        "task": {"kind": "detection"},
        "backbone": {"name": "torchvision:mobilenet_v2", "pretrained": False, "input_size": size},
        "data": {"kind": "coco", "path": str(annotations), "batch_size": 16},
        "finetune": {"strategy": "full", "epochs": 1, "lr": 0.003},
        "prune": {"ratio": 0.25, "steps": 1, "recovery_epochs": 1},
        "distill": {"epochs": 1},
        "quantize": {"method": "ptq", "calibration_size": 16, "float_leading_convs": 0},
        "verify": {"runs": 5, "warmup": 2},
    }


def write_pairs(path: Path, n: int = 320, seed: int = 0) -> Path:
    """seq2seq pairs: two to four filler and sentiment words, the target the same words sorted (learnable by a tiny
    encoder-decoder in a few epochs; the tokenizer is make_tiny_bert's)."""
    rng = np.random.default_rng(seed)
    words = FILLER + POS + NEG
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["source", "target"])
        w.writeheader()
        for _ in range(n):
            picked = list(rng.choice(words, int(rng.integers(2, 5)), replace=False))
            w.writerow({"source": " ".join(picked), "target": " ".join(sorted(picked))})
    return path


def seq2seq_recipe(bert: Path, data: Path) -> dict:
    """The tiny BERT warm-started into an encoder-decoder, fine-tuned to sort words, ORT dynamic INT8."""
    return {
        "name": "tiny_seq2seq",
        "seed": 0,
        "task": {"kind": "seq2seq", "max_target_length": 8},
        "backbone": {"name": f"hf:{bert}"},
        "data": {
            "kind": "csv",
            "path": str(data),
            "text_column": "source",
            "target_column": "target",
            "max_length": 8,
            "batch_size": 16,
        },
        "finetune": {"strategy": "full", "epochs": 8, "lr": 0.005, "lr_decay": 1.0, "label_smoothing": 0.0},
        # INT8 ships whatever its speed: on a model this small it is about as fast as FP32, and the test must not
        # depend on timing noise
        "quantize": {"method": "ptq", "require_speedup": False},
        "export": {"min_agreement": 0.9},
        "verify": {"runs": 3, "warmup": 1},
    }
