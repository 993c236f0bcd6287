"""Read an ``edgetl search`` study: every trial's validation metric, speed-up and size, and for each budget (the
most validation points the shipped model may lose against the fine-tuned FP32 model) the fastest trial inside it.

The speed-ups are those the trials measured (ORT p50 of the fine-tuned FP32 ONNX model / the trial's shipped model,
batch 1, the recipe's verify.threads, interleaved runs) on the machine that ran the search; nothing is re-timed.

    .venv/bin/python benchmarks/search_front.py artifacts/fmnist_search.search.db [--budgets 0.5,1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import optuna

    from edgetl.runner import device_info
    from edgetl.search import describe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="the study's SQLite file (edgetl search writes <out>.search.db)")
    ap.add_argument("--study", help="study name (default: the only one in the file)")
    ap.add_argument("--budgets", default="0.5,1,2", help="max validation drops, in points, comma-separated")
    args = ap.parse_args()
    storage = f"sqlite:///{Path(args.db).resolve()}"
    names = optuna.get_all_study_names(storage)
    name = args.study or (names[0] if len(names) == 1 else None)
    if name is None:
        sys.exit(f"{args.db} holds studies {names}: pick one with --study")
    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "measured" in t.user_attrs]
    info = device_info()
    print(f"study {name}: {len(study.trials)} trials, {len(done)} measured")
    print(f"machine now: {info['cpu']}, {info['cores']} cores, int8 features {', '.join(info['int8']) or 'none'}")
    print(f"\n{'trial':>5}  {'val':>6} {'drop':>6} {'speed-up':>8} {'MB':>6}  settings")
    for t in sorted(done, key=lambda t: -t.user_attrs["measured"]["speedup"]):
        m = t.user_attrs["measured"]
        print(
            f"{t.number:>5}  {m['val_metric']:>6.2f} {m['val_drop']:>+6.2f} {m['speedup']:>7.2f}x {m['size_mb']:>6.2f}"
            f"  {describe(t.params)}"
        )
    print(f"\n{'budget (max drop)':>17}  fastest trial inside it")
    for budget in (float(b) for b in args.budgets.split(",")):
        inside = [t for t in done if t.user_attrs["measured"]["val_drop"] <= budget]
        best = max(inside, key=lambda t: t.user_attrs["measured"]["speedup"], default=None)
        if best is None:
            print(f"{budget:>17g}  none")
            continue
        m = best.user_attrs["measured"]
        print(
            f"{budget:>17g}  trial {best.number}: {m['speedup']:.2f}x at {-m['val_drop']:+.2f}"
            f" ({describe(best.params)})"
        )


if __name__ == "__main__":
    main()
