#!/usr/bin/env python3
"""Device-side runner for an edgetl bundle: needs only onnxruntime and numpy, plus Pillow for image bundles or
tokenizers for text bundles (no torch, no transformers, no edgetl).

Every bundle ships a copy of this file as ``runner.py``; edgetl itself uses the same functions, so the
preprocessing a device applies is byte-for-byte the one edgetl verified accuracy with.

    python runner.py BUNDLE_DIR predict IMAGE [IMAGE ...] [--top-k 3] [--json]  (text bundles: TEXT [TEXT ...];
                                                                          sentence pairs: 'FIRST<TAB>SECOND')
    python runner.py BUNDLE_DIR predict IMAGE ... [--min-score 0.3] [--draw out.png]   (detection bundles)
    python runner.py BUNDLE_DIR verify [--json]     the golden set's outputs on this machine: PASS (exit 0) / FAIL (1)
    python runner.py BUNDLE_DIR bench [--batch 1] [--threads 1] [--seq 128] [--runs 200] [--warmup 20]
                                      [--model model.onnx] [--providers cpu] [--json]

The manifest (sha256 of every file) is checked before the model is loaded; files it marks as reference material
(the FP32 model, the report, the golden set) may be left out of a slim device copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that is incomplete, tampered with or unreadable."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


REQUIRED = ("model.onnx", "labels.json", "preprocess.json")  # every bundle's manifest lists these
FORMAT = "edgetl-bundle"  # manifest.json's "format": how edgetl knows a directory is a bundle it wrote
FORMAT_VERSION = 1
GOLDEN = "golden.json"  # the golden set's description; its arrays are in golden.bin
MAX_JSON_BYTES = 16 << 20  # manifest / labels / preprocess files are small; refuse to parse anything huge


def read_json(path: Path, what: str):
    """A small JSON file of the bundle; unreadable, huge, corrupt or absurdly nested is one BundleError."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise BundleError(f"{path} is too large for a bundle's {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except BundleError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise BundleError(f"cannot read the bundle's {what} {path.name}: {type(e).__name__}") from None


def safe_name(bundle: Path, name) -> Path:
    """The file ``name`` inside ``bundle``: only plain relative paths below the bundle are valid (no absolute
    paths, no '..', no backslashes, no symlinks out), so a manifest can never point outside its directory."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or name.startswith("/") or "\\" in name or ":" in name or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{MANIFEST} lists {str(name)[:80]!r}: only plain file names inside the bundle are valid")
    root = Path(bundle).resolve()
    path = Path(bundle) / name
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise BundleError(f"bundle file {name} points outside the bundle")
    return path


def read_manifest(bundle: Path) -> dict:
    """manifest.json, checked to be edgetl's (format marker, a map of safe names to sha256 digests)."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}: not an edgetl bundle")
    try:
        manifest = read_json(path, "manifest")
    except BundleError:
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{path} is not a valid edgetl manifest (corrupt JSON or no 'files' map)")
    if manifest.get("format", FORMAT) != FORMAT:
        raise BundleError(f"{path} is not an edgetl manifest (format {str(manifest.get('format'))[:40]!r})")
    for name in files:
        safe_name(bundle, name)
    return manifest


def verify_manifest(bundle: Path, required: tuple[str, ...] = REQUIRED) -> dict:
    """Check every file listed in manifest.json against its sha256 (and that ``required`` are listed); return it.
    Files the manifest marks as reference material (``reference``: the FP32 model, the report, the golden set ...)
    may be left out of a slim device copy; every file that is there must be unchanged."""
    manifest = read_manifest(bundle)
    files = manifest["files"]
    unlisted = [name for name in required if name not in files]
    if unlisted:
        raise BundleError(f"{MANIFEST} does not list {', '.join(unlisted)}: incomplete or tampered bundle")
    optional = set(manifest.get("reference") or []) - set(required)
    for name, digest in files.items():
        f = safe_name(bundle, name)
        if not f.is_file():
            if name in optional:
                continue  # a slim copy: reference material left behind
            raise BundleError(f"bundle file missing: {name}")
        if sha256(f) != digest:
            raise BundleError(f"bundle file changed since build (sha256 mismatch): {name}")
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# image preprocessing: resize the shorter side, center crop, scale to [0, 1], normalize


_RESAMPLE = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}  # PIL.Image.Resampling values


def prepare(image, pre: dict) -> np.ndarray:
    """PIL image -> uint8 HWC array of the model's crop size (RGB): the shorter side resized, then a center crop;
    ``fit: stretch`` resizes the whole image to crop x crop instead."""
    image = image.convert("RGB")
    resample = _RESAMPLE.get(pre.get("interpolation", "bilinear"), 2)
    if pre.get("fit") == "stretch":  # detection: the whole image at the model's size, boxes scale with it
        return np.asarray(image.resize((pre["crop"], pre["crop"]), resample=resample), dtype=np.uint8)
    w, h = image.size
    short = pre["resize"]
    if w <= h:
        nw, nh = short, max(1, round(h * short / w))
    else:
        nw, nh = max(1, round(w * short / h)), short
    image = image.resize((nw, nh), resample=resample)
    c = pre["crop"]
    left, top = (nw - c) // 2, (nh - c) // 2
    image = image.crop((left, top, left + c, top + c))
    return np.asarray(image, dtype=np.uint8)


def normalize(batch: np.ndarray, pre: dict) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, normalized with the pretrained mean/std."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------------
# text: the backbone's own tokenizer.json, truncated to max_length, padded to the longest text in the batch


def load_tokenizer(path: str | Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def encode_texts(tokenizer, texts: list, pre: dict, pad_to: int | None = None) -> dict:
    """Texts (or (text, pair) tuples) -> int64 input_ids / attention_mask [/ token_type_ids], padded with pad_id."""
    return encode(tokenizer, texts, pre, pad_to)[0]


def encode(tokenizer, texts: list, pre: dict, pad_to: int | None = None, words: bool = False) -> tuple[dict, list]:
    """``encode_texts`` and the tokenizer's encodings (word ids, character offsets); ``words``: each text is
    already split into words (a list of str), as in CoNLL files."""
    pairs = not words and isinstance(texts[0], (tuple, list))
    if words:
        encs = tokenizer.encode_batch([list(t) for t in texts], is_pretokenized=True)
    else:
        encs = tokenizer.encode_batch([tuple(t) for t in texts] if pairs else list(texts))
    length = pad_to or max(len(e.ids) for e in encs)
    ids = np.full((len(encs), length), pre.get("pad_id", 0), np.int64)
    mask = np.zeros((len(encs), length), np.int64)
    types = np.zeros((len(encs), length), np.int64)
    for i, e in enumerate(encs):
        k = min(len(e.ids), length)
        ids[i, :k], mask[i, :k], types[i, :k] = e.ids[:k], 1, e.type_ids[:k]
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: out[name] for name in pre["inputs"]}, encs


def text_inputs(texts: list[str], pre: dict) -> list:
    """Inputs as the model takes them: the texts, or for a sentence-pair bundle ("pair" in preprocess.json) each
    'FIRST<TAB>SECOND' split into a (first, second) pair."""
    if not pre.get("pair"):
        return list(texts)
    bad = [t for t in texts if t.count("\t") != 1 or not all(half.strip() for half in t.split("\t"))]
    if bad:
        raise BundleError(
            f"this bundle classifies sentence pairs: give each input as 'FIRST<TAB>SECOND' (got {bad[0]!r})"
        )
    return [tuple(t.split("\t")) for t in texts]


# a word as CoNLL files hold them: whitespace-separated, leading / trailing punctuation split off ("don't", "#tag",
# "@user" stay whole); the same pattern in deploy/node/index.js
WORD = re.compile(r"""[(\[{"'“‘]|[^\s]+?(?=[.,;:!?)\]}"'”’]*(?:\s|$))|[.,;:!?)\]}"'”’]""")


def split_words(text: str) -> list[tuple[int, int]]:
    """The (start, end) character spans of ``text``'s words. A token-classification model was trained on words
    given as lists (``is_pretokenized``, each word's first token labelled); its tokenizer's own pre-tokenizer splits
    raw text elsewhere ("don't" -> don ' t), and tags read at those untrained positions would be noise."""
    return [m.span() for m in WORD.finditer(text)]


def viterbi(emissions: np.ndarray, start: np.ndarray, end: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """The best tag path of a linear-chain CRF (pytorch-crf's scoring: start + emissions + transitions[i, j] from
    tag i to tag j + end) over ``emissions`` [words, tags]."""
    score = start + emissions[0]
    back = []
    for em in emissions[1:]:
        total = score[:, None] + transitions + em[None, :]
        back.append(total.argmax(0))
        score = total.max(0)
    path = [int((score + end).argmax())]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    return np.asarray(path[::-1], np.int64)


# ---------------------------------------------------------------------------------------------------------------
# detection: the head's raw outputs per anchor -> boxes (torchvision SSD's BoxCoder and postprocess_detections)

BOX_CLIP = float(np.log(1000.0 / 16))  # torchvision's cap on the predicted log width / height scale
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision SSD's BoxCoder weights (the training loss encodes with them)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (xyxy)."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(-1)
    area_a, area_b = ((x[:, 2:] - x[:, :2]).clip(0).prod(-1) for x in (a, b))
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray, weights=BOX_WEIGHTS) -> np.ndarray:
    """Box deltas [A, 4] relative to ``anchors`` [A, 4] (xyxy) -> boxes xyxy."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw, dh = np.minimum(deltas[:, 2] / weights[2], BOX_CLIP), np.minimum(deltas[:, 3] / weights[3], BOX_CLIP)
    px, py, pw, ph = dx * w + cx, dy * h + cy, np.exp(dw) * w, np.exp(dh) * h
    return np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first (the first ``limit``)."""
    order = np.argsort(-scores, kind="stable")
    keep: list = []
    while len(order) and (limit is None or len(keep) < limit):
        i, rest = order[0], order[1:]
        keep.append(i)
        order = rest[box_iou(boxes[i : i + 1], boxes[rest])[0] <= iou]
    return np.asarray(keep, np.int64)


def decode_detections(outputs: np.ndarray, params: dict) -> list[dict]:
    """Raw head outputs [B, A, 4 + 1 + C] (box deltas, then logits with background first) -> per image boxes (xyxy
    in model-input pixels), scores and class ids (0-based, background removed): per class a score threshold and the
    top-k candidates, then NMS per class, the best ``max_det`` kept. A two-stage detector (``params["in_graph"]``)
    decodes in its graph: its rows [B, N, 6] are already boxes, score and class id; rows scoring below 0 pad."""
    if params.get("in_graph"):
        return [
            {"boxes": r[:, :4], "scores": r[:, 4], "labels": r[:, 5].astype(np.int64)}
            for r in (row[row[:, 4] >= 0] for row in np.asarray(outputs, np.float32))
        ]
    anchors, size = np.asarray(params["anchors"], np.float32), float(params["size"])
    out = []
    for row in np.asarray(outputs, np.float32):
        boxes = decode_boxes(row[:, :4], anchors).clip(0, size)
        probs = softmax(row[:, 4:])
        found = []  # per class: the candidates above the threshold, best first, at most topk
        for c in range(1, probs.shape[1]):
            idx = np.flatnonzero(probs[:, c] > params["score_thresh"])
            found.append(idx[np.argsort(-probs[idx, c], kind="stable")][: int(params["topk"])])
        lab = np.concatenate([np.full(len(idx), c) for c, idx in enumerate(found)])
        idx = np.concatenate(found)
        b, s = boxes[idx], probs[idx, lab + 1]
        # per-class NMS in one pass: boxes of different classes are moved apart (torchvision's batched_nms)
        keep = nms(b + (lab * (size + 1))[:, None], s, params["nms"], int(params["max_det"]))
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep].astype(np.int64)})
    return out


DIFF_MIN_SCORE = 0.3  # parity of a two-stage detector's final boxes: boxes under this score are not compared
# Its gate is the agreement of matched boxes, not their largest difference (reported, in score and 1 - IoU): float
# rounding reorders one object's proposals, so NMS can keep a neighbour and a box moves a few pixels, or a box near
# 0.5 is found on one side only (the demo's FP32 export: one box of 0.51 among 80 images, agreement 99.9%)
BOX_SLACK = 1.0  # scores and 1 - IoU are at most 1: the difference is reported, the agreement gates


def detection_diff(
    reference: list[dict], got: list[dict], iou: float = 0.5, min_score: float = 0.0, relative: bool = False
) -> tuple[float, int, int]:
    """How far ``got``'s detections are from ``reference``'s, image by image: boxes matched one to one (same class,
    IoU >= ``iou``, the reference's best first); the largest |difference| of a matched pair's coordinates and score,
    where a box left unmatched on either side counts its own score (it fell under the other's threshold). Pairs and
    lone boxes scoring under ``min_score`` are matched but not counted: weak proposals can trade places with a near
    duplicate when proposals differ by float rounding. ``relative``: a pair's coordinates count as 1 - their IoU
    instead of pixels. Returns (that difference, counted pairs, counted boxes)."""
    diff, hits, total = 0.0, 0, 0
    for r, g in zip(reference, got, strict=True):
        pairs: dict = {}  # reference index -> got index
        if len(r["boxes"]) and len(g["boxes"]):
            ious = box_iou(r["boxes"], g["boxes"])
            ious[r["labels"][:, None] != g["labels"][None, :]] = 0.0
            for i in np.argsort(-r["scores"], kind="stable"):
                for j in np.argsort(-ious[i], kind="stable"):
                    if ious[i, j] < iou:
                        break
                    if j not in pairs.values():
                        pairs[int(i)] = int(j)
                        break
        for i, j in pairs.items():
            if max(r["scores"][i], g["scores"][j]) >= min_score:
                hits += 1
                total += 2
                if relative:
                    d = 1.0 - box_iou(r["boxes"][i : i + 1], g["boxes"][j : j + 1])[0, 0]
                else:
                    d = np.abs(r["boxes"][i] - g["boxes"][j]).max()
                diff = max(diff, float(d), float(abs(r["scores"][i] - g["scores"][j])))
        lone = [s for i, s in enumerate(r["scores"]) if i not in pairs]
        lone += [s for j, s in enumerate(g["scores"]) if j not in pairs.values()]
        lone = [float(s) for s in lone if s >= min_score]
        total += len(lone)
        diff = max([diff, *lone])
    return diff, hits, total


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime


PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def resolve_providers(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Short or full provider names -> ORT provider names; a missing one is an error listing what is available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out = []
    for name in names or ["cpu"]:
        full = PROVIDERS.get(name.strip().lower(), name.strip())
        if full not in available:
            short = [k for k, v in PROVIDERS.items() if v in available]
            raise BundleError(f"execution provider '{name}' is not available here; available: {', '.join(short)}")
        out.append(full)
    return out


def open_session(model_path: str | Path, threads: int = 1, providers: list[str] | None = None):
    """``session`` for a user-named model: a file ORT cannot load is a one-line BundleError, not ORT's traceback."""
    try:
        return session(model_path, threads, providers)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        raise BundleError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0][:200]}") from None


def session(model_path: str | Path, threads: int = 1, providers: list[str] | None = None):
    """An ORT session on ``model_path``; a seq2seq model (an encoder with its ``.decoder.onnx`` beside it) is a
    ``Generator``, whose ``run`` generates token ids."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model_path), opts, providers=resolve_providers(providers))
    decoder = decoder_path(model_path)
    if decoder.is_file():
        meta = sess.get_modelmeta().custom_metadata_map
        try:
            generation = json.loads(meta["edgetl.generation"])
        except (KeyError, ValueError):
            raise BundleError(f"{model_path} has a decoder beside it but no edgetl.generation metadata") from None
        dec = ort.InferenceSession(str(decoder), opts, providers=resolve_providers(providers))
        return Generator(sess, dec, generation)
    return sess


def run_batch(sess, feed: dict) -> np.ndarray:
    """The first output of ``sess`` for a batch ``feed``. A graph that takes one example per run (its batch dimension
    fixed at 1: a two-stage detector's traced graph loops over the images it was exported with) runs row by row;
    rows of different lengths (boxes found) are padded with -1, which a detector's decoding drops."""
    inputs = getattr(sess, "get_inputs", None)
    n = len(next(iter(feed.values())))
    if inputs is None or inputs()[0].shape[0] != 1 or n == 1:
        return sess.run(None, feed)[0]
    rows = [sess.run(None, {k: v[i : i + 1] for k, v in feed.items()})[0] for i in range(n)]
    longest = max(r.shape[1] for r in rows)
    pad = [(0, 0), None, *[(0, 0)] * (rows[0].ndim - 2)]
    return np.concatenate(
        [np.pad(r, [(0, longest - r.shape[1]) if p is None else p for p in pad], constant_values=-1) for r in rows]
    )


# ---------------------------------------------------------------------------------------------------------------
# seq2seq: an encoder, optimum's merged decoder (one graph with and without past key values) and a greedy loop


def decoder_path(model_path: str | Path) -> Path:
    """The decoder that goes with a seq2seq encoder file: model.onnx -> model.decoder.onnx."""
    p = Path(model_path)
    return p.with_name(p.stem + ".decoder.onnx")


def model_files(model_path: str | Path) -> list[Path]:
    """Every file of one model: the file itself, and a seq2seq encoder's decoder."""
    p = Path(model_path)
    return [p] + [d for d in [decoder_path(p)] if d.is_file()]


class Generator:
    """Generation with a KV cache on ONNX Runtime, the loop a device runs: the encoder once, then the merged decoder
    one token at a time (its first call without past key values, ``use_cache_branch`` false; later calls feed back
    the present keys / values). Greedy, or beam search with ``num_beams`` > 1 (transformers' beam search: the top
    2 x beams continuations per step, finished hypotheses scored by log-probability / length ** length_penalty,
    early stopping once every beam has finished; the cache reordered with the beams). ``run(None, feed)`` returns
    ``[ids]``: int64 [batch, max_new_tokens], the tokens after the start token, the end token included, then padding,
    as transformers' ``generate`` returns them, so it stands wherever an ORT session stands (latency, parity, the
    golden set)."""

    def __init__(self, encoder, decoder, generation: dict):
        self.encoder, self.decoder = encoder, decoder
        self.start, self.eos, self.pad = (int(generation[k]) for k in ("start_id", "eos_id", "pad_id"))
        self.max_new_tokens = int(generation["max_new_tokens"])
        self.num_beams = int(generation.get("num_beams", 1))
        self.length_penalty = float(generation.get("length_penalty", 1.0))
        self.past = {i.name: i.shape for i in decoder.get_inputs() if i.name.startswith("past_key_values.")}
        self.outputs = [o.name for o in decoder.get_outputs()]

    def get_inputs(self):
        return self.encoder.get_inputs()

    def get_providers(self):
        return self.encoder.get_providers()

    def fixed(self, tokens: int):
        """This generator as a session whose ``run`` makes exactly ``tokens`` greedy decoder steps (no early stop at
        the end token: every model timed does the same work); 1 times the first token (encoder + one decoder step)."""
        gen = self

        class Fixed:
            def run(self, output_names, feed):
                return gen.run(output_names, feed, max_new_tokens=tokens, stop_at_eos=False, num_beams=1)

        return Fixed()

    def _start(self, feed: dict, repeat: int):
        """Encoder states and attention mask (each row ``repeat`` times, for beams) and an empty past."""
        mask = feed["attention_mask"]
        hidden = self.encoder.run(None, {k: feed[k] for k in ("input_ids", "attention_mask")})[0]
        hidden, mask = np.repeat(hidden, repeat, axis=0), np.repeat(mask, repeat, axis=0)
        past = {n: np.zeros((len(mask), shape[1], 0, shape[3]), np.float32) for n, shape in self.past.items()}
        return hidden, mask, past

    def _step(self, token: np.ndarray, hidden, mask, past: dict, step: int) -> np.ndarray:
        """One decoder call: the last position's logits; ``past`` updated in place with the present keys / values."""
        res = self.decoder.run(
            None,
            {
                "input_ids": token,
                "encoder_hidden_states": hidden,
                "encoder_attention_mask": mask,
                "use_cache_branch": np.array([step > 0]),
                **past,
            },
        )
        for name, value in zip(self.outputs[1:], res[1:], strict=True):
            key = name.replace("present.", "past_key_values.", 1)
            if step == 0 or ".decoder." in key:  # the encoder's keys / values are fixed after the first call
                past[key] = value
        return res[0][:, -1].astype(np.float32)

    def run(
        self,
        output_names,
        feed: dict,
        max_new_tokens: int | None = None,
        stop_at_eos: bool = True,
        num_beams: int | None = None,
        sampling: dict | None = None,
    ) -> list[np.ndarray]:
        """Generated ids; ``stop_at_eos`` false: exactly ``max_new_tokens`` greedy decoder steps (benchmarks);
        ``sampling`` ({temperature, top_k, top_p, seed}): each token drawn from the model's distribution after
        ``sample_filter`` instead of the most likely one (beam search is then not used)."""
        width = max_new_tokens or self.max_new_tokens
        beams = self.num_beams if num_beams is None else num_beams
        rng = np.random.default_rng(sampling.get("seed")) if sampling is not None else None
        if beams > 1 and rng is None:
            return [self._beam_search(feed, width, beams)]
        hidden, mask, past = self._start(feed, 1)
        batch = len(mask)
        out = np.full((batch, width), self.pad, np.int64)
        token = np.full((batch, 1), self.start, np.int64)
        done = np.zeros(batch, bool)
        for step in range(width):
            logits = self._step(token, hidden, mask, past, step)
            nxt = logits.argmax(-1) if rng is None else sample(logits, rng, **_sampling_args(sampling))
            if stop_at_eos:
                nxt[done] = self.pad
            out[:, step] = nxt
            done |= nxt == self.eos
            if done.all() and stop_at_eos:
                break
            token = nxt[:, None].astype(np.int64)
        return [out]

    def _beam_search(self, feed: dict, width: int, k: int) -> np.ndarray:
        """transformers' beam search (``_beam_search``, early_stopping true), step for step, in numpy."""
        hidden, mask, past = self._start(feed, k)
        batch, keep, length = len(mask) // k, 2 * k, width + 1  # 1: the start token
        running = np.full((batch, k, length), self.pad, np.int64)
        running[:, :, 0] = self.start
        best = running.copy()
        run_scores = np.zeros((batch, k), np.float32)
        run_scores[:, 1:] = -1e9
        scores = np.full((batch, k), -1e9, np.float32)
        finished = np.zeros((batch, k), bool)
        open_ = np.ones((batch, 1), bool)  # the early-stop heuristic: a running beam may still beat a finished one
        first_k = np.arange(keep) < k
        rows = np.arange(batch)[:, None]
        for cur in range(1, length):
            logits = self._step(running[:, :, cur - 1].reshape(-1, 1), hidden, mask, past, cur - 1)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            vocab = logp.shape[-1]
            total = (logp.reshape(batch, k, vocab) + run_scores[:, :, None]).reshape(batch, k * vocab)
            top = np.argsort(-total, axis=1, kind="stable")[:, :keep]
            top_lp, top_beam, top_ids = total[rows, top], top // vocab, top % vocab
            top_seqs = running[rows, top_beam].copy()
            top_seqs[:, :, cur] = top_ids
            hits = (top_ids == self.eos) | (cur + 1 >= length)
            alive = top_lp + hits * np.float32(-1e9)
            nxt = np.argsort(-alive, axis=1, kind="stable")[:, :k]
            running, run_scores, source = top_seqs[rows, nxt], alive[rows, nxt], top_beam[rows, nxt]
            norm = top_lp / np.float32(cur**self.length_penalty)
            norm = norm + (finished.all(1, keepdims=True) | ~open_ | ~(hits & first_k)) * np.float32(-1e9)
            merged = np.concatenate([scores, norm], 1)
            pick = np.argsort(-merged, axis=1, kind="stable")[:, :k]
            best = np.concatenate([best, top_seqs], 1)[rows, pick]
            scores = merged[rows, pick]
            finished = np.concatenate([finished, hits & first_k], 1)[rows, pick]
            order = (source + np.arange(batch)[:, None] * k).reshape(-1)  # the cache follows the beams
            for name in past:
                past[name] = past[name][order]
            worst = np.where(finished, scores.min(1, keepdims=True), np.float32(-1e9))
            open_ &= (run_scores[:, :1] / np.float32(cur**self.length_penalty) > worst).any(-1, keepdims=True)
            if not open_.any() or finished.all() or hits.all():
                break
        return best[:, 0, 1:]


def _sampling_args(sampling: dict) -> dict:
    return {k: sampling[k] for k in ("temperature", "top_k", "top_p") if sampling.get(k) is not None}


def sample_filter(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """transformers' sampling warpers in its order (temperature, top-k, top-p / nucleus, one token always kept),
    on [batch, vocab] logits: the scaled logits, -inf where a token is filtered out."""
    out = logits.astype(np.float32) / np.float32(temperature)
    if top_k and top_k < out.shape[-1]:
        kth = np.sort(out, axis=-1)[:, -top_k][:, None]
        out = np.where(out < kth, -np.inf, out)
    if top_p < 1.0:
        order = np.argsort(out, axis=-1, kind="stable")  # ascending, as transformers sorts
        ordered = np.take_along_axis(out, order, -1)
        probs = np.exp(ordered - ordered[:, -1:])
        cum = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        out = out.copy()
        np.put_along_axis(out, order, np.where(drop, -np.inf, ordered), -1)
    return out


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row drawn from softmax(``sample_filter(logits)``)."""
    f = sample_filter(logits, temperature, top_k, top_p)
    p = np.exp(f - f.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    cum = p.cumsum(-1)
    draw = rng.random((len(p), 1)) * cum[:, -1:]
    return np.minimum((cum <= draw).sum(-1), p.shape[-1] - 1)


def feed_for(sess, batch: int, seq: int = 128, rng: np.random.Generator | None = None) -> dict:
    """Random inputs of the model's declared shape: the first dynamic axis becomes ``batch``, later ones (a text
    model's sequence axis) ``seq``; token ids are random, attention masks all ones, token types zero."""
    rng = rng or np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(inp.shape)]
        if "int" in inp.type:
            fill = {"attention_mask": 1, "token_type_ids": 0}.get(inp.name)
            feed[inp.name] = (
                np.full(shape, fill, np.int64) if fill is not None else rng.integers(1, 20, size=shape, dtype=np.int64)
            )  # any valid ids: speed is the same
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def checked_feed(sess, feed: dict) -> dict:
    """``feed`` once run through ``sess``: an input the model cannot take (a sequence longer than its position
    table, a wrong batch for a fixed-shape model) is one BundleError naming ORT's reason, not a traceback."""
    try:
        sess.run(None, feed)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
        raise BundleError(
            f"the model cannot run on {shapes}: {str(e).splitlines()[0][:160]} (a smaller --seq or --batch?)"
        ) from None
    return feed


def latency(sess, feed: dict, runs: int = 100, warmup: int = 10) -> dict:
    """Wall-clock latency of ``sess.run`` on one fixed feed, in milliseconds."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    batch = next(iter(feed.values())).shape[0]
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "throughput_per_s": float(batch * 1e3 / np.percentile(t, 50)),
        "runs": runs,
        "batch": batch,
    }


def interleaved_latency(sessions: dict, feed: dict, runs: int = 100, warmup: int = 10, chunk: int = 10) -> dict:
    """Latency of several sessions on the same feed, measured in alternating chunks so that a noisy neighbour
    slows every variant alike; returns {name: latency-dict}."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict = {name: [] for name in sessions}
    done = 0
    while done < runs:
        n = min(chunk, runs - done)
        for name, sess in sessions.items():
            for _ in range(n):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
        done += n
    batch = next(iter(feed.values())).shape[0]
    out = {}
    for name, t in times.items():
        t = np.asarray(t)
        out[name] = {
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()),
            "throughput_per_s": float(batch * 1e3 / np.percentile(t, 50)),
            "runs": len(t),
            "batch": batch,
        }
    return out


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (model + runtime), in MB."""
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024.0 if sys.platform != "darwin" else rss / 1e6
    except (ImportError, OSError):
        return None


INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_int8_features() -> dict:
    """Which int8 instruction sets this CPU has (x86: AVX2, AVX-512, VNNI, AMX; ARM: dot-product, i8mm)."""
    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    found = {f: f in flags for f in INT8_FLAGS}
    found["vnni_or_dot"] = any(found[f] for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))
    return found


def device_info() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "int8": [f for f, on in cpu_int8_features().items() if on and f != "vnni_or_dot"],
    }


def check_preprocess(pre) -> dict:
    """preprocess.json with the keys and ranges the runner uses; anything else is one BundleError."""

    def bad(what: str):
        raise BundleError(f"preprocess.json: {what}")

    if not isinstance(pre, dict) or pre.get("kind") not in ("image", "text"):
        bad("expected an object with kind 'image' or 'text'")
    if pre["kind"] == "text":
        if not isinstance(pre.get("max_length"), int) or not 2 <= pre["max_length"] <= 65536:
            bad("max_length must be an integer >= 2")
        if not isinstance(pre.get("inputs"), list) or not pre["inputs"]:
            bad("inputs must list the model's input names")
        return pre
    for key in ("resize", "crop"):
        if not isinstance(pre.get(key), int) or not 1 <= pre[key] <= 8192:
            bad(f"{key} must be an integer between 1 and 8192")
    if pre["crop"] > pre["resize"]:
        bad("crop must not exceed resize")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            bad(f"{key} must be a list of 3 numbers")
    if not all(x > 0 for x in pre["std"]):
        bad("std must be positive")
    return pre


def _open(path):
    """An image file, decoded (a one-line BundleError for anything Pillow cannot read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise BundleError(
            f"cannot read image {path}: {type(e).__name__} (corrupt, not an image, or over Pillow's "
            "decompression-bomb limit)"
        ) from None


def draw_boxes(path, result: dict, out) -> None:
    """The image with its predicted boxes, labels and scores drawn, saved as PNG at ``out``."""
    from PIL import ImageDraw

    with _open(path) as im:
        im = im.convert("RGB")
    pen = ImageDraw.Draw(im)
    for o in result["objects"]:
        pen.rectangle(o["box"], outline=(255, 40, 40), width=max(1, round(min(im.size) / 160)))
        pen.text((o["box"][0] + 2, o["box"][1] + 1), f"{o['label']} {o['score']:.2f}", fill=(255, 40, 40))
    im.save(out, format="PNG")


class Bundle:
    """A verified bundle, ready to predict."""

    def __init__(
        self,
        path: str | Path,
        threads: int = 1,
        model: str = "model.onnx",
        check: bool = True,
        providers: list[str] | None = None,
    ):
        self.path = Path(path)
        listed = verify_manifest(self.path)["files"] if check else None
        # a model file the user made from the bundle's (model.ort, a fixed-shape copy) runs, marked unverified
        self.model_verified = listed is not None and model in listed
        self.labels = read_json(self.path / "labels.json", "labels")
        self.preprocess = check_preprocess(read_json(self.path / "preprocess.json", "preprocessing"))
        generates = self.preprocess.get("task") == "seq2seq"  # generates text: no class names
        if (
            not isinstance(self.labels, list)
            or not (self.labels or generates)
            or not all(isinstance(x, str) for x in self.labels)
        ):
            raise BundleError("labels.json must be a non-empty list of class names")
        tokenizer = self.preprocess.get("tokenizer", "tokenizer.json")
        needed = [tokenizer] if self.preprocess["kind"] == "text" else []
        needed += [self.preprocess[k] for k in ("crf", "detection") if self.preprocess.get(k)]
        for name in needed:
            safe_name(self.path, name)
            if listed is not None and name not in listed:
                raise BundleError(f"{MANIFEST} does not list {name}: incomplete or tampered bundle")
        self.crf = None
        if self.preprocess.get("crf"):  # token classification with a CRF: its start / end / transition scores
            scores = read_json(self.path / self.preprocess["crf"], "CRF scores")
            try:
                self.crf = {k: np.asarray(scores[k], np.float32) for k in ("start", "end", "transitions")}
            except (KeyError, TypeError, ValueError):
                raise BundleError(f"{self.preprocess['crf']} is not a valid set of CRF scores") from None
        self.detection = None
        if self.preprocess.get("detection"):  # a detector's anchors and NMS settings
            params = read_json(self.path / self.preprocess["detection"], "detection settings")
            try:
                anchors = np.asarray(params.get("anchors", []), np.float32).reshape(-1, 4)  # none: decoded in-graph
                self.detection = {**params, "anchors": anchors}
                float(params["size"]), float(params["score_thresh"]), float(params["nms"])
            except (KeyError, TypeError, ValueError):
                raise BundleError(f"{self.preprocess['detection']} is not a valid set of detection settings") from None
        model_path = safe_name(self.path, model)
        if not model_path.is_file():
            raise BundleError(
                f"{self.path} has no {model}" + (" (left out of this copy)" if self.model_verified else "")
            )
        self.session = open_session(model_path, threads, providers)
        if generates != isinstance(self.session, Generator):
            raise BundleError(
                f"{model} is {'not ' if generates else ''}a seq2seq model but preprocess.json says "
                f"{self.preprocess.get('task')}" + (f" ({decoder_path(model_path).name} missing?)" if generates else "")
            )
        width = None if generates else self.session.get_outputs()[0].shape[-1]
        per_class = width - 5 if self.detection is not None else width  # detection: 4 box deltas + background
        if self.detection is not None and self.detection.get("in_graph"):
            per_class = None  # a two-stage detector's rows: box, score, class id
        if isinstance(per_class, int) and per_class != len(self.labels):
            raise BundleError(f"labels.json names {len(self.labels)} classes but the model outputs {per_class}")
        self.tokenizer = None
        if self.preprocess["kind"] == "text":
            try:
                self.tokenizer = load_tokenizer(self.path / tokenizer, self.preprocess["max_length"])
            except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type for a bad file
                raise BundleError(f"cannot load {tokenizer}: {str(e).splitlines()[0][:120]}") from None

    def _top(self, names: list[str], logits: np.ndarray, top_k: int, key: str) -> list[dict]:
        out = []
        for name, p in zip(names, softmax(logits), strict=True):
            top = np.argsort(-p)[:top_k]
            out.append({key: name, "top": [{"label": self.labels[i], "prob": float(p[i])} for i in top]})
        return out

    def predict_texts(self, texts: list[str], top_k: int = 3) -> list[dict]:
        if self.tokenizer is None:
            raise BundleError("this bundle classifies images, not text")
        if any(not t.strip() for t in texts):
            raise BundleError("empty text")
        feed = encode_texts(self.tokenizer, text_inputs(texts, self.preprocess), self.preprocess)
        logits = self.session.run(None, feed)[0]
        return self._top(list(texts), logits, top_k, "text")

    def predict(self, inputs: list[str], top_k: int = 3, min_score: float = 0.3) -> list[dict]:
        """Image files or texts, whichever this bundle takes (a token-classification bundle: entity spans)."""
        if self.preprocess.get("task") == "token_classification":
            return self.predict_entities(inputs)
        if isinstance(self.session, Generator):
            return self.generate(inputs)
        if self.detection is not None:
            return self.predict_boxes(inputs, min_score)
        return self.predict_texts(inputs, top_k) if self.tokenizer else self.predict_files(inputs, top_k)

    def generate(
        self,
        texts: list[str],
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        sampling: dict | None = None,
    ) -> list[dict]:
        """Each text's generated output (greedy, beam search or ``sampling``, KV cache: ``Generator``), decoded by
        the bundle's tokenizer."""
        if any(not t.strip() for t in texts):
            raise BundleError("empty text")
        feed = encode_texts(self.tokenizer, list(texts), self.preprocess)
        ids = self.session.run(None, feed, max_new_tokens=max_new_tokens, num_beams=num_beams, sampling=sampling)[0]
        outputs = [
            row[: np.flatnonzero(row == self.session.eos)[0]] if (row == self.session.eos).any() else row for row in ids
        ]
        decoded = self.tokenizer.decode_batch(
            [r[r != self.session.pad].tolist() for r in outputs], skip_special_tokens=True
        )
        return [{"text": t, "output": o, "tokens": len(r)} for t, o, r in zip(texts, decoded, outputs, strict=True)]

    def predict_entities(self, texts: list[str]) -> list[dict]:
        """Named entities in each text: the text split into words (``split_words``) as the model was trained, the tag
        of each word's first token (argmax, or Viterbi with a CRF), IOB2 tags joined into spans with the words'
        character offsets, each with the mean probability of its words' tags."""
        if any(not t.strip() for t in texts):
            raise BundleError("empty text")
        spans_of = [split_words(t) for t in texts]
        words_of = [[t[a:b] for a, b in spans] for t, spans in zip(texts, spans_of, strict=True)]
        feed, encs = encode(self.tokenizer, words_of, self.preprocess, words=True)
        emissions = self.session.run(None, feed)[0]
        probs = softmax(emissions)
        crf = self.crf  # a CRF's scores: Viterbi decoding
        out = []
        for text, where, enc, em, p in zip(texts, spans_of, encs, emissions, probs, strict=True):
            words: dict = {}  # word -> its first token (words cut by truncation have none)
            for t, w in enumerate(enc.word_ids):
                if w is not None:
                    words.setdefault(w, t)
            order = sorted(words)
            firsts = [words[w] for w in order]
            best = viterbi(em[firsts], **crf) if crf and firsts else p[firsts].argmax(-1) if firsts else []
            spans: list[dict] = []
            for w, tag_id in zip(order, best, strict=True):
                tag = self.labels[int(tag_id)]
                (start, end), prob = where[w], float(p[words[w]][int(tag_id)])
                kind = tag[2:]
                if tag.startswith("I-") and spans and spans[-1]["label"] == kind and spans[-1]["open"]:
                    spans[-1]["end"], spans[-1]["probs"] = end, spans[-1]["probs"] + [prob]
                elif tag != "O":  # B-, or an I- that starts an entity (taken as B-)
                    spans.append({"label": kind, "start": start, "end": end, "probs": [prob], "open": True})
                if tag == "O" and spans:
                    spans[-1]["open"] = False
            ents = [
                {
                    "label": s["label"],
                    "start": s["start"],
                    "end": s["end"],
                    "text": text[s["start"] : s["end"]],
                    "score": float(np.mean(s["probs"])),
                }
                for s in spans
            ]
            out.append({"text": text, "entities": ents})
        return out

    def predict_boxes(self, files: list[str], min_score: float = 0.3) -> list[dict]:
        """Objects in each image: boxes (x1, y1, x2, y2 in the image's own pixels), labels and scores, best first;
        boxes scoring under ``min_score`` are left out."""
        arrays, sizes = [], []
        for f in files:
            with _open(f) as im:
                arrays.append(prepare(im, self.preprocess))
                sizes.append(im.size)
        found = decode_detections(self.logits_from_arrays(np.stack(arrays)), self.detection)
        out = []
        for f, (w, h), d in zip(files, sizes, found, strict=True):
            scale = np.asarray([w, h, w, h], np.float32) / self.preprocess["crop"]
            objects = [
                {"label": self.labels[int(c)], "score": float(s), "box": [round(float(v), 1) for v in b * scale]}
                for b, c, s in zip(d["boxes"], d["labels"], d["scores"], strict=True)
                if s >= min_score
            ]
            out.append({"file": str(f), "width": w, "height": h, "objects": objects})
        return out

    def logits_from_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC (already prepared) -> logits."""
        name = self.session.get_inputs()[0].name
        return run_batch(self.session, {name: normalize(images, self.preprocess)})

    def predict_files(self, files: list[str], top_k: int = 3) -> list[dict]:
        arrays = []
        for f in files:
            with _open(f) as im:
                arrays.append(prepare(im, self.preprocess))
        return self._top([str(f) for f in files], self.logits_from_arrays(np.stack(arrays)), top_k, "file")

    def verify_golden(self) -> dict:
        """Run the bundle's golden set (validation inputs with the shipped model's outputs at build time) through
        this machine's ONNX Runtime: max |difference|, top-1 agreement and whether both are within the bundle's
        limits. The check a device runs on itself."""
        spec_path = self.path / GOLDEN
        if not spec_path.is_file():
            raise BundleError(f"this copy of the bundle has no {GOLDEN} (it was left out): copy it to verify")
        spec = read_json(spec_path, "golden set")
        try:
            raw = safe_name(self.path, spec["data"]).read_bytes()

            def array(a: dict) -> np.ndarray:
                return np.frombuffer(raw, np.dtype(a["dtype"]), int(np.prod(a["shape"])), a["offset"]).reshape(
                    a["shape"]
                )

            arrays = {name: array(a) for name, a in spec["inputs"].items()}
            ref = array(spec["outputs"]).astype(np.float32)
            keep = arrays[spec["positions"]].astype(bool) if spec.get("positions") else None
            tolerance, need = float(spec["tolerance"]), float(spec["min_agreement"])
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise BundleError(f"{GOLDEN} is not a valid golden set: {type(e).__name__}") from None
        feed = {"input": normalize(arrays["images"], self.preprocess)} if "images" in arrays else arrays
        got = run_batch(self.session, feed)
        if spec.get("compare") == "detections":  # final boxes: matched, their coordinates and scores compared
            params = {"in_graph": True}
            found = [decode_detections(x, params) for x in (ref, got)]
            diff, hits, total = detection_diff(
                *found, min_score=float(spec.get("min_score", 0.0)), relative=bool(spec.get("relative"))
            )
            agree = 1.0 if total == 0 else 2 * hits / total
            return self._verdict(len(ref), diff, tolerance, agree, need, spec)
        if got.shape != ref.shape:
            raise BundleError(f"the model gives outputs of shape {got.shape} on the golden set, expected {ref.shape}")
        n = len(ref)
        if keep is not None:  # per-token outputs: real tokens only
            got, ref = got[keep], ref[keep]
        if spec.get("compare") == "tokens":  # generated ids: the share of identical outputs, and of differing tokens
            diff = float((got != ref).mean())
            agree = float((got == ref).all(-1).mean())
        else:
            diff = float(np.abs(got - ref).max())
            agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        return self._verdict(n, diff, tolerance, agree, need, spec)

    @staticmethod
    def _verdict(n: int, diff: float, tolerance: float, agree: float, need: float, spec: dict) -> dict:
        return {
            "n": int(n),
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "top1_agreement": agree,
            "min_agreement": need,
            "passed": diff <= tolerance and agree >= need,
            "model": spec.get("model"),
            "device": device_info(),
        }


def format_verify(r: dict) -> str:
    verdict = "PASS" if r["passed"] else "FAIL"
    return (
        f"verify {verdict}: {r['n']} golden inputs, max|diff| {r['max_abs_diff']:.3g} (tolerance "
        f"{r['tolerance']:.3g}), top-1 agreement {100 * r['top1_agreement']:.1f}% (need "
        f"{100 * r['min_agreement']:.1f}%) on {r['device']['cpu']}"
    )


def format_entities(result: dict) -> str:
    """One tab-separated line: the text, then each entity as LABEL 'text' [start:end] score."""
    ents = "  ".join(
        f"{e['label']} {e['text']!r} [{e['start']}:{e['end']}] {e['score']:.3f}" for e in result["entities"]
    )
    return f"{result['text']}\t{ents or '(no entities)'}"


def format_objects(result: dict) -> str:
    """One tab-separated line: the file, then each object as LABEL score [x1, y1, x2, y2]."""
    objects = "  ".join(f"{o['label']} {o['score']:.3f} {o['box']}" for o in result["objects"])
    return f"{result['file']}\t{objects or '(no objects)'}"


def format_output(result: dict) -> str:
    """One tab-separated line: the input text, then the generated text."""
    return f"{result['text']}\t{result['output']}"


def format_result(result: dict) -> str:
    if "output" in result:
        return format_output(result)
    if "objects" in result:
        return format_objects(result)
    return format_entities(result) if "entities" in result else format_top(result)


def format_top(result: dict) -> str:
    """One tab-separated line: the input, then label and probability of each of the top-k."""
    top = "  ".join(f"{t['label']} {t['prob']:.3f}" for t in result["top"])
    name = str(result.get("file", result.get("text"))).replace("\t", " | ")  # a pair's tab would split the line
    return f"{name}\t{top}"


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``error:`` line (exit 2), like every other error."""

    def error(self, message: str):
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="bundle directory (has manifest.json)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="top-k labels for images (or texts, for a text bundle)")
    p.add_argument("images", nargs="+", metavar="INPUT")
    p.add_argument("--top-k", type=int, default=3, help="labels per input, best first (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON: [{file | text, top: [{label, prob}]}]")
    p.add_argument("--min-score", type=float, default=0.3, help="detection: leave out boxes scoring less (0.3)")
    p.add_argument(
        "--draw", metavar="PATH", help="detection: save each image with its boxes (a .png for one image, else a folder)"
    )
    g = sub.add_parser("generate", help="seq2seq bundles: the generated text for each input text (greedy, KV cache)")
    g.add_argument("texts", nargs="+", metavar="TEXT")
    g.add_argument(
        "--max-new-tokens", type=int, default=None, help="stop after this many tokens (default: the bundle's)"
    )
    g.add_argument("--num-beams", type=int, default=None, help="beam search width (default: the bundle's; 1 = greedy)")
    g.add_argument(
        "--sample", action="store_true", help="draw each token from the model's distribution (not the most likely)"
    )
    g.add_argument("--temperature", type=float, default=1.0, help="with --sample: < 1 sharper, > 1 flatter (default 1)")
    g.add_argument(
        "--top-k",
        dest="sample_top_k",
        type=int,
        default=0,
        help="with --sample: only the k most likely tokens (0 = all)",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="with --sample: the smallest set of tokens whose "
        "probability reaches p (nucleus sampling; default 1 = all)",
    )
    g.add_argument("--seed", type=int, default=None, help="with --sample: the random seed (default: a fresh one)")
    g.add_argument("--json", action="store_true", help="print JSON: [{text, output, tokens}]")
    v = sub.add_parser("verify", help="check this machine's outputs against the golden set built into the bundle")
    v.add_argument("--model", default="model.onnx", help="which model to check (default model.onnx)")
    v.add_argument("--json", action="store_true", help="print JSON instead of a line")
    b = sub.add_parser("bench", help="latency p50/p90/p99 of the bundle's model")
    b.add_argument("--batch", type=int, default=1, help="batch size of the random input (default 1)")
    b.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    b.add_argument("--seq", type=int, default=128, help="sequence length for text models")
    b.add_argument("--runs", type=int, default=200, help="timed runs (default 200)")
    b.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    b.add_argument("--model", default="model.onnx", help="which of the bundle's ONNX files (default model.onnx)")
    b.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda, tensorrt, coreml, nnapi, ...")
    b.add_argument("--json", action="store_true", help="print JSON instead of a line")
    args = ap.parse_args(argv)
    for name in ("top_k", "batch", "threads", "seq", "runs", "max_new_tokens", "num_beams"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "warmup", 0) < 0:
        ap.error("--warmup must be >= 0")
    try:
        if args.cmd == "generate":
            bundle = Bundle(args.bundle)
            if not isinstance(bundle.session, Generator):
                raise BundleError("this bundle does not generate text: use predict")
            if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.sample_top_k < 0:
                raise BundleError("--temperature must be > 0, --top-p in (0, 1], --top-k >= 0")
            sampling = None
            if args.sample:
                sampling = {
                    "temperature": args.temperature,
                    "top_k": args.sample_top_k,
                    "top_p": args.top_p,
                    "seed": args.seed,
                }
            results = bundle.generate(args.texts, args.max_new_tokens, args.num_beams, sampling)
            print(json.dumps(results, indent=2) if args.json else "\n".join(format_output(r) for r in results))
        elif args.cmd == "predict":
            results = Bundle(args.bundle).predict(args.images, args.top_k, args.min_score)
            if args.draw and results and "objects" in results[0]:
                one = len(args.images) == 1 and args.draw.lower().endswith(".png")
                if not one:
                    os.makedirs(args.draw, exist_ok=True)
                for f, r in zip(args.images, results, strict=True):
                    draw_boxes(f, r, args.draw if one else Path(args.draw) / (Path(f).stem + ".boxes.png"))
            print(json.dumps(results, indent=2) if args.json else "\n".join(format_result(r) for r in results))
        elif args.cmd == "verify":
            result = Bundle(args.bundle, model=args.model).verify_golden()
            print(json.dumps(result, indent=2) if args.json else format_verify(result))
            return 0 if result["passed"] else 1
        else:
            bundle = Bundle(args.bundle, threads=args.threads, model=args.model, providers=args.providers.split(","))
            feed = checked_feed(bundle.session, feed_for(bundle.session, args.batch, args.seq))
            stats = latency(bundle.session, feed, args.runs, args.warmup)
            stats.update(
                threads=args.threads,
                model=args.model,
                model_verified=bundle.model_verified,
                providers=bundle.session.get_providers(),
                peak_rss_mb=peak_rss_mb(),
                device=device_info(),
            )
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                print(
                    f"{args.model}: p50 {stats['p50_ms']:.2f} ms  p90 {stats['p90_ms']:.2f} ms  "
                    f"p99 {stats['p99_ms']:.2f} ms  ({args.threads} thread(s), batch {args.batch})"
                )
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
