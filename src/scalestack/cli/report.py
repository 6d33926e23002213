"""``scalestack report RUN_DIR``: loss, throughput and memory of a ``scalestack train`` run as PNGs."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PLOTS = {  # file: (column, y label)
    "loss.png": ("loss", "training loss (global mean)"),
    "throughput.png": ("tokens_per_s", "tokens / s (all ranks)"),
    "memory.png": ("peak_mib", "peak memory of rank 0, MiB"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="draw a training run's loss, throughput and memory (PNGs)")
    p.add_argument("run_dir", help="the run_dir of scalestack train (holds metrics.csv)")
    p.add_argument("--out", help="where to write the PNGs (default: the run directory)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metrics = Path(args.run_dir) / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: pass the run_dir of a scalestack train run")
    with metrics.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{metrics} holds no steps yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("scalestack report needs matplotlib: pip install 'scalestack[plot]'") from None
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [int(r["step"]) for r in rows]
    for name, (column, label) in PLOTS.items():
        if column not in rows[0]:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [float(r[column]) for r in rows])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        print(f"wrote {out / name}")
    return 0
