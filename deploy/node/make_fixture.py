"""Build tiny bundles (images on sklearn digits; text on a random tiny BERT; NER, seq2seq, and SSDLite and Faster
R-CNN detectors) and write what Python's runner makes of a few inputs, so the Node example can be checked against it
(test/predict.test.js reads OUT/fixture.json).

    .venv/bin/python deploy/node/make_fixture.py OUT_DIR [--bundle IMAGE_BUNDLE] [--text-bundle TEXT_BUNDLE]

For each image: the PNG, the array runner.prepare() made of it (prepared uint8 HWC as JSON, the Node example's
second input format), the float32 input runner.normalize() made of that, the bundle runner's probabilities and
top-k labels, and prepare()'s output under a few other resize / crop / interpolation settings. For the texts:
runner.encode_texts()'s token arrays for the batch, and the runner's probabilities and top-k labels.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.tiny import (  # noqa: E402
    TINY,
    detection_recipe,
    make_tiny_bert,
    make_tiny_ner_bert,
    ner_recipe,
    ner_sentences,
    seq2seq_recipe,
    text_recipe,
    write_conll,
    write_digit_boxes,
    write_pairs,
    write_reviews,
)

# the tests' tiny recipe with 3 epochs, so predictions are not near-ties
RECIPE = {**TINY, "name": "tiny_node", "finetune": {**TINY["finetune"], "epochs": 3}}
# texts for the text bundle: mixed case, punctuation, accents, an unknown word, one longer than max_length (16)
TEXTS = [
    "a great lovely film",
    "Awful, BORING movie!",
    "the film was quite dull and poor",
    "très bon: excellent",
    "zebra",
    " ".join(["the movie was very good and fun"] * 4),
]
# (width, height, PIL mode): smaller, equal to and larger than the crop, both orientations, grey / RGB / RGBA
SHAPES = [
    (8, 8, "L"),
    (32, 32, "RGB"),
    (45, 30, "RGB"),
    (30, 61, "RGBA"),
    (37, 37, "RGB"),
    (100, 64, "L"),
    (33, 35, "P"),
]
TOP_K = 3
# more preprocessing settings, checked for byte parity of the prepared arrays only (crop > resize pads with 0)
VARIANTS = [
    {"resize": 32, "crop": 32, "interpolation": "bilinear"},
    {"resize": 50, "crop": 40, "interpolation": "bicubic"},
    {"resize": 20, "crop": 24, "interpolation": "bilinear"},
    {"resize": 36, "crop": 36, "interpolation": "bilinear", "fit": "stretch"},  # detection: no crop
]


def build_bundle(out: Path, recipe: dict, name: str) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    edgetl = Path(sys.executable).parent / "edgetl"
    subprocess.run([str(edgetl), "build", str(path), "--out", str(out / name)], check=True)
    return out / name


def text_cases(bundle: Path) -> dict:
    runner = load_runner(bundle)
    model = runner.Bundle(bundle)
    feed = runner.encode_texts(model.tokenizer, TEXTS, model.preprocess)
    probs = runner.softmax(model.session.run(None, feed)[0])
    tops = model.predict_texts(TEXTS, TOP_K)
    return {
        "bundle": str(bundle),
        "texts": TEXTS,
        "feed": {k: v.tolist() for k, v in feed.items()},
        "probs": probs.tolist(),
        "top": [[t["label"] for t in r["top"]] for r in tops],
    }


NER_TEXTS = ["alicia went to new york", "bob lives in rome and carol", "visited oslo", "(bob) visited rome, then oslo."]
SPLIT_TEXTS = ['I met Alicia, then (Bob) in "New York". Don\'t #tag @user', "  a\tb\nc ...", "caf\u00e9 na\u00efve."]


def ner_cases(bundle: Path) -> dict:
    """The Python runner's entity spans for NER_TEXTS on a token-classification bundle (with a CRF), and its Viterbi
    path on seeded random emissions and scores."""
    runner = load_runner(bundle)
    model = runner.Bundle(bundle)
    rng = np.random.default_rng(0)
    shapes = {"start": 5, "end": 5, "transitions": (5, 5)}
    scores = {k: (rng.standard_normal(shape) * 2).astype(np.float32) for k, shape in shapes.items()}
    emissions = rng.standard_normal((7, 5)).astype(np.float32)
    return {
        "bundle": str(bundle),
        "texts": NER_TEXTS,
        "results": model.predict_entities(NER_TEXTS),
        "splits": {t: [list(span) for span in runner.split_words(t)] for t in SPLIT_TEXTS},
        "viterbi": {
            "emissions": emissions.tolist(),
            "scores": {k: v.tolist() for k, v in scores.items()},
            "path": runner.viterbi(emissions, **scores).tolist(),
        },
    }


S2S_TEXTS = ["good movie the", "film bad", "the excellent lovely was fun", "zebra"]


def seq2seq_cases(bundle: Path) -> dict:
    """The Python runner's greedy generation (encoder + merged decoder, KV cache) for S2S_TEXTS, in one batch."""
    model = load_runner(bundle).Bundle(bundle)
    return {"bundle": str(bundle), "texts": S2S_TEXTS, "results": model.generate(S2S_TEXTS)}


def detection_cases(bundle: Path, out: Path, min_score: float = 0.0) -> dict:
    """The Python runner's boxes (all of them: min score 0) for a few PNGs of other sizes than the model's."""
    from PIL import Image

    runner = load_runner(bundle)
    model = runner.Bundle(bundle)
    files = []
    for i, (w, h) in enumerate([(64, 64), (90, 70), (50, 80)]):
        canvas = Image.open(sorted((out / "det_data" / "images").iterdir())[i]).convert("RGB").resize((w, h))
        files.append(out / f"det{i}_{w}x{h}.png")
        canvas.save(files[-1])
    return {
        "bundle": str(bundle),
        "files": [str(f) for f in files],
        "min_score": min_score,
        "results": model.predict_boxes(files, min_score),
    }


def faster_rcnn_recipe(annotations: Path) -> dict:
    """The tiny detection recipe with a two-stage detector (decodes in its graph, one image per run): one epoch, no
    prune / distill. lr 0.001: at the tiny recipe's 0.003 the untrained RoI head learns "background" for every
    proposal in three steps and finds nothing, so there would be no boxes to compare."""
    recipe = {k: v for k, v in detection_recipe(annotations).items() if k not in ("prune", "distill")}
    recipe["name"] = "tiny_frcnn"
    recipe["task"] = {**recipe["task"], "detector": "faster_rcnn"}
    recipe["finetune"] = {**recipe["finetune"], "epochs": 1, "lr": 0.001}
    return recipe


def load_runner(bundle: Path):
    """The bundle's own runner.py: the same code a device runs."""
    spec = importlib.util.spec_from_file_location("bundle_runner", bundle / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(out: Path) -> list[Path]:
    """Digits upscaled to various sizes, with seeded colour noise so resampling has texture to get wrong."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate(SHAPES):
        digit = Image.fromarray((digits.images[i * 7] * 15.9).astype(np.uint8)).resize((w, h), Image.NEAREST)
        rgb = np.stack([np.asarray(digit)] * 3, axis=-1).astype(int) + rng.integers(-40, 40, (h, w, 3))
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        if mode == "RGBA":
            img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        img = img.convert(mode) if mode in ("L", "P") else img
        path = out / f"img{i}_{w}x{h}_{mode}.png"
        img.save(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--bundle", type=Path, help="use this image bundle instead of building one")
    ap.add_argument("--text-bundle", type=Path, help="use this text bundle instead of building one")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = (args.bundle or build_bundle(args.out, RECIPE, "bundle")).resolve()
    text_bundle = args.text_bundle or build_bundle(
        args.out,
        text_recipe(make_tiny_bert(args.out / "tiny_bert"), write_reviews(args.out / "reviews.csv", 400)),
        "text_bundle",
    )
    ner_bundle = build_bundle(
        args.out,
        {  # with a CRF: the Node example decodes with Viterbi like runner.py
            **ner_recipe(
                make_tiny_ner_bert(args.out / "tiny_ner_bert"), write_conll(args.out / "ner.conll", ner_sentences())
            ),
            "task": {"kind": "token_classification", "crf": True},
        },
        "ner_bundle",
    )
    det_data = write_digit_boxes(args.out / "det_data", n=48)
    det_bundle = build_bundle(args.out, detection_recipe(det_data), "det_bundle").resolve()
    frcnn_bundle = build_bundle(args.out, faster_rcnn_recipe(det_data), "frcnn_bundle").resolve()
    s2s_bundle = build_bundle(
        args.out,
        seq2seq_recipe(make_tiny_bert(args.out / "s2s_bert"), write_pairs(args.out / "pairs.csv")),
        "s2s_bundle",
    ).resolve()
    runner = load_runner(bundle)
    model = runner.Bundle(bundle)

    from PIL import Image

    cases = []
    for png in images(args.out):
        with Image.open(png) as im:
            arr = runner.prepare(im, model.preprocess)
        prepared = png.with_suffix(".json")
        prepared.write_text(json.dumps({"shape": list(arr.shape), "data": arr.ravel().tolist()}))
        probs = runner.softmax(model.logits_from_arrays(arr[None]))[0]
        top = model.predict_files([str(png)], TOP_K)[0]["top"]
        with Image.open(png) as im:
            variants = [
                base64.b64encode(runner.prepare(im, {**model.preprocess, **v}).tobytes()).decode() for v in VARIANTS
            ]
        normalized = base64.b64encode(runner.normalize(arr[None], model.preprocess).tobytes()).decode()
        cases.append(
            {
                "png": str(png.resolve()),
                "prepared": str(prepared.resolve()),
                "probs": probs.tolist(),
                "top": [t["label"] for t in top],
                "variants": variants,
                "normalized": normalized,
            }
        )
    fixture = {
        "bundle": str(bundle),
        "top_k": TOP_K,
        "preprocess": model.preprocess,
        "variants": VARIANTS,
        "cases": cases,
        "text": text_cases(text_bundle.resolve()),
        "ner": ner_cases(ner_bundle.resolve()),
        "detection": detection_cases(det_bundle, args.out),
        # min score 0.05 (the graph's own threshold): an untrained detector's boxes all score low
        "faster_rcnn": detection_cases(frcnn_bundle, args.out, 0.05),
        "seq2seq": seq2seq_cases(s2s_bundle),
    }
    (args.out / "fixture.json").write_text(json.dumps(fixture, indent=2))
    print(
        f"fixture: {args.out / 'fixture.json'} ({len(cases)} images, bundle {bundle}; {len(TEXTS)} texts, "
        f"bundle {text_bundle})"
    )


if __name__ == "__main__":
    main()
