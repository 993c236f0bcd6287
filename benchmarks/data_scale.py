"""Peak memory and training throughput of the same recipe at 1x and 10x the data, per ``data.decode`` mode.

The data: sklearn's 1,797 handwritten digits written as PNG files in class folders, the 1x set once and the 10x
set ten times over (distinct files, each decoded on its own). The recipe: timm mobilenetv3_small_050 (random init)
at 96 px, one fine-tune epoch, validation and test capped at 300 images so only the training set grows; export and
verify as in any build. Each run is a fresh process that builds in-process (no stage cache) and reports its own
peak RSS (``ru_maxrss``), the largest peak among its DataLoader workers, and training images per second (training
images x epochs / fine-tune stage seconds, which include one validation pass). Runs are interleaved by mode.

    .venv/bin/python benchmarks/data_scale.py [--modes memory,lazy,disk] [--scales 1,10] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_digits(root: Path, copies: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(10):
        (root / f"digit{c}").mkdir(parents=True, exist_ok=True)
    for k in range(copies):
        for j, (img, c) in enumerate(zip(d.images, d.target, strict=True)):
            Image.fromarray((img * 15.9).astype(np.uint8)).save(root / f"digit{c}" / f"{k}_{j}.png")
    return root


def recipe(path: Path, mode: str, workers: int | None) -> dict:
    return {
        "name": f"scale_{mode}",
        "seed": 0,
        "backbone": {"name": "timm:mobilenetv3_small_050", "pretrained": False, "input_size": 96},
        "data": {
            "kind": "folder",
            "path": str(path),
            "batch_size": 128,
            "max_val": 300,
            "max_test": 300,
            "decode": mode,
            "workers": workers,
            "augment": {"hflip": False},
        },
        "finetune": {"strategy": "full", "epochs": 1, "lr": 0.003, "lr_decay": 1.0},
        "verify": {"runs": 5, "warmup": 2},
    }


def one(path: str, mode: str, workers: int | None, out: str) -> None:
    """A single build in this process; prints its measurements as JSON."""
    import resource

    from edgetl.config import recipe_from_dict
    from edgetl.pipeline import build

    state = build(recipe_from_dict(recipe(Path(path), mode, workers)), Path(out), log=lambda s: None, cache=False)
    mb = 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "train": len(state.data.train),
                "finetune_s": state.timings["finetune"],
                "images_per_s": len(state.data.train) / state.timings["finetune"],
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mb,
                "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / mb,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="memory,lazy,disk")
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="data.workers (default: edgetl's)")
    ap.add_argument("--one", nargs=3, metavar=("PATH", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0], args.one[1], args.workers, args.one[2])

    import datetime
    import os

    from edgetl.runner import device_info

    info = device_info()
    print(f"# {datetime.date.today()}  CPU: {info.get('cpu')}  int8: {info.get('int8')}  cores: {os.cpu_count()}")
    modes, scales = args.modes.split(","), [int(s) for s in args.scales.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgetl-scale.") as tmp:
        tmp = Path(tmp)
        os.environ["EDGETL_CACHE_DIR"] = str(tmp / "cache")  # disk mode's decoded files, removed at the end
        sets = {s: write_digits(tmp / f"x{s}", s) for s in scales}
        results: dict = {}
        for _ in range(args.repeat):
            for s in scales:
                for m in modes:  # interleaved: every mode at this scale before the next repeat
                    cmd = [sys.executable, __file__, "--one", str(sets[s]), m, str(tmp / f"out_{m}_{s}")]
                    if args.workers is not None:
                        cmd += ["--workers", str(args.workers)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.exit(proc.stderr[-2000:])
                    results.setdefault((m, s), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'decode':8} {'scale':>5} {'train':>7} {'peak RSS MB':>12} {'workers MB':>11} {'images/s':>9}")
    for m in modes:
        for s in scales:
            rs = results[(m, s)]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(
                f"{m:8} {s:>4}x {int(med['train']):>7} {med['rss_mb']:>12.0f} {med['workers_rss_mb']:>11.0f} "
                f"{med['images_per_s']:>9.0f}"
            )
        if len(scales) > 1:
            lo, hi = (statistics.median(r["rss_mb"] for r in results[(m, s)]) for s in (scales[0], scales[-1]))
            speed = [statistics.median(r["images_per_s"] for r in results[(m, s)]) for s in (scales[0], scales[-1])]
            span = f"from {scales[0]}x to {scales[-1]}x"
            print(f"  {m}: peak RSS {hi / lo:.2f}x, images/s {speed[1] / speed[0]:.2f}x {span}")


if __name__ == "__main__":
    main()
