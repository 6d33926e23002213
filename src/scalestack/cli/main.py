"""The ``scalestack`` command line."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint.directory import CheckpointError
from ..planner.model_shapes import ConfigError
from . import bench, diffusion, export, plan, report, retrieve, serve, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scalestack", description="scalestack: ragged, structure-aware FSDP")
    sub = parser.add_subparsers(dest="command", required=True)
    plan.add_parser(sub)
    export.add_parser(sub)
    retrieve.add_parser(sub)
    train.add_parser(sub)
    report.add_parser(sub)
    bench.add_parser(sub)
    serve.add_parser(sub)
    diffusion.add_parser(sub)
    args, extra = parser.parse_known_args(argv)
    takes = getattr(args, "takes_overrides", False)  # train: --section.key=value after its own options
    unknown = [a for a in extra if not (takes and a.startswith("--") and "=" in a)]
    if unknown:
        hint = " (train takes overrides as --section.key=value)" if takes else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.overrides = extra
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, argparse.ArgumentTypeError) as e:
        print(f"scalestack {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
