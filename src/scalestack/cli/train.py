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
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restart all ranks up to this many times when one fails; each restart "
                        "resumes from the newest complete checkpoint")  # fmt: skip
    p.set_defaults(func=run, takes_overrides=True)


def run(args: argparse.Namespace) -> int:
    from ..train.config import check_world, load_config
    from ..train.shutdown import end_worker
    from ..train.trainer import preflight, train

    if args.max_restarts and args.nproc is None:
        raise ValueError("--max-restarts needs --nproc (under torchrun, pass --max-restarts to torchrun instead)")
    config = load_config(args.config, args.overrides)  # before any launch: a bad config fails once, clearly
    preflight(config)
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1 or args.max_restarts < 0:
            raise ValueError(f"need --nproc >= 1 and --max-restarts >= 0, got {args.nproc} and {args.max_restarts}")
        check_world(config, args.nproc)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   f"--max-restarts={args.max_restarts}",
                   "-m", "scalestack.cli.main", "train", args.config, *args.overrides]  # fmt: skip
        return subprocess.call(command)
    train(config)
    if "RANK" in os.environ:  # a torchrun worker
        end_worker()
    return 0
