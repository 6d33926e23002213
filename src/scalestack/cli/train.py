"""``scalestack train CONFIG.toml [--section.key=value ...] [--nproc N]``: the main job.

Under torchrun (or SLURM's srun with torchrun) every rank runs this same command. ``--nproc N`` outside
torchrun starts N local ranks through torchrun (``--standalone``), with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a TOML config (the main job)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", help="a TOML file: [model], [data], [train], [checkpoint] sections and run_dir")
    p.add_argument("--nproc", type=int, help="local ranks to launch through torchrun (outside torchrun)")
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from ..train.config import check_world, load_config
    from ..train.trainer import preflight, train

    config = load_config(args.config, args.overrides)  # before any launch: a bad config fails once, clearly
    preflight(config)
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
        check_world(config, args.nproc)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "scalestack.cli.main", "train", args.config, *args.overrides]  # fmt: skip
        return subprocess.call(command)
    train(config)
    return 0
