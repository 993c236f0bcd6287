"""How fast a warm-started encoder-decoder leaves its loss plateau: MiniLM-L6 warm-started into BART
(edgetl.seq2seq.warm_start) on the seq2seq demo's pairs, trained for a fixed number of steps, the mean training loss
printed every 20 steps and a few greedy outputs at the end.

    .venv/bin/python benchmarks/seq2seq_warmstart.py --data artifacts/seq2seq_data/punctuation.jsonl \\
        [--cross random|self] [--freeze-embeddings] [--lr 5e-4] [--steps 120] [--max-length 24]

``--cross self``: the decoder's cross-attention starts as a copy of its self-attention (what edgetl does), ``random``:
freshly initialised (BERT2BERT's choice). ``--freeze-embeddings``: the word / position embeddings (and so the tied LM
head) stay frozen, as the demo's ``finetune.freeze_blocks: 1``. One process, batches of 32 drawn with a seeded
generator, linear warm-up over 20 steps, AdamW.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from edgetl.assets import offline_hf_dir
    from edgetl.runner import cpu_int8_features, device_info
    from edgetl.seq2seq import shift_right, warm_start

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("artifacts/seq2seq_data/punctuation.jsonl"))
    ap.add_argument("--cross", choices=("self", "random"), default="self")
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=24)
    args = ap.parse_args()
    logging.set_verbosity_error()
    print(f"device: {json.dumps(device_info())} int8: {cpu_int8_features()}")
    src = str(offline_hf_dir("sentence-transformers/all-MiniLM-L6-v2"))
    tok = AutoTokenizer.from_pretrained(src)
    model = warm_start(AutoModel.from_pretrained(src), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    if args.cross == "random":
        torch.manual_seed(1)
        for layer in model.model.decoder.layers:
            for m in (layer.encoder_attn.q_proj, layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
                torch.nn.init.normal_(m.weight, std=model.config.init_std)
                torch.nn.init.zeros_(m.bias)
            torch.nn.init.normal_(layer.encoder_attn.out_proj.weight, std=model.config.init_std)
    if args.freeze_embeddings:
        model.model.shared.weight.requires_grad_(False)
        for side in (model.model.encoder, model.model.decoder):
            side.embed_positions.weight.requires_grad_(False)
    rows = [json.loads(line) for line in open(args.data)][:2000]
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    t0, losses = time.time(), []
    for step in range(args.steps):
        idx = np.random.default_rng(step).choice(len(rows), 32, replace=False)
        kw = {"return_tensors": "pt", "padding": True, "truncation": True, "max_length": args.max_length}
        enc = tok([rows[i]["source"] for i in idx], return_token_type_ids=False, **kw)
        labels = tok([rows[i]["target"] for i in idx], **kw)["input_ids"][:, 1:]
        labels = labels.masked_fill(labels == tok.pad_token_id, -100)
        logits = model(**enc, decoder_input_ids=shift_right(labels, tok.cls_token_id, tok.pad_token_id)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}: mean loss {np.mean(losses[-20:]):.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    enc = tok([r["source"] for r in rows[-4:]], return_tensors="pt", padding=True, return_token_type_ids=False)
    out = model.generate(
        **enc, max_new_tokens=32, decoder_start_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=0
    )
    for r, o in zip(rows[-4:], tok.batch_decode(out, skip_special_tokens=True), strict=True):
        print(f"{r['target']}  ->  {o}")


if __name__ == "__main__":
    main()
