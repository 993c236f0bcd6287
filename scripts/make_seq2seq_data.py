"""Write the seeded punctuation-restoration demo set (JSON lines, source / target):
``python scripts/make_seq2seq_data.py --out FILE``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from edgetl.seq2seq_demo import make  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    ap.add_argument("--n", type=int, default=3000, help="number of snippets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-words", type=int, default=16, help="longest snippet, in words")
    args = ap.parse_args()
    path = make(args.out, args.n, args.seed, args.max_words)
    print(f"wrote {sum(1 for _ in open(path))} snippet pairs to {path}")


if __name__ == "__main__":
    main()
