"""Planner quality and speed on published models: padding (% of parameters) for every unit, single buffer
(veScale's setting) beside up to 3 buffers per unit, next to FSDP2's dim-0 rule; and the time to plan a model.

    python benchmarks/planner.py [--models llama3-70b,deepseek-v3-671b,gpt-oss-120b] [--worlds 64,256,1024,8192]
"""

from __future__ import annotations

import argparse
import time

from scalestack.cli.plan import parse_granularity, plan_model
from scalestack.planner.model_shapes import load_model_shapes
from scalestack.planner.search import clear_caches


def pct(total: int, numel: int) -> str:
    return f"{100 * (total - numel) / numel:.3f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama3-70b,deepseek-v3-671b,gpt-oss-120b")
    ap.add_argument("--worlds", default="64,256,1024,8192")
    ap.add_argument("--granularities", default="row,block:32,block:128")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    print("| model | granularity | W | 1 buffer | <=3 buffers | FSDP2 | plan time (3 buffers) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = load_model_shapes(name)
        for gtext in args.granularities.split(","):
            gran = parse_granularity(gtext)
            for w in worlds:
                one, peers, _ = plan_model(model, w, gran, 1, 1, 4)
                clear_caches()  # time planning from cold caches
                t0 = time.perf_counter()
                many, _, _ = plan_model(model, w, gran, 1, 3, 4)
                elapsed = time.perf_counter() - t0
                print(
                    f"| {name} | {gtext} | {w} | {pct(one.total, model.numel)} | {pct(many.total, model.numel)} | "
                    f"{pct(peers['FSDP2'].total, model.numel)} | {elapsed:.2f}s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
