"""Scale by simulation: one process plays rank r of W ranks with torch's fake process group.

It builds a Llama from its published shapes on the meta device and shards the embedding, every decoder
layer, and the final norm with the head (torchtitan's wrapping; fp32, in which CPU GEMMs are fastest). It
gives the model storage, runs one training step on a few tokens, and reports per-rank memory (RSS
high-water mark against the plan), time, and every collective the step issued with its size, next to what
``scalestack plan MODEL --world W --granularity element --split-root`` predicts. The fake group's
collectives move no data, so the numbers are one rank's behaviour, not communication time.

    python benchmarks/scale.py                         # llama3-70b, W=1024, rank 5, to_empty + local init
    python benchmarks/scale.py --init exact            # scalestack.materialize: bitwise plain init (slow on CPU)
    python benchmarks/scale.py --small --json out.json # the CI-sized model (tests/test_scale.py)
    python benchmarks/scale.py --world 8192 --plan-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

MIB = 2**20
SMALL = dict(
    model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False,
)  # fmt: skip
ALIGN = 4  # elements: 16 bytes of fp32, the engine's alignment and scalestack plan's default


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the RSS high-water mark restarts from the current RSS


def planned(cfg: dict, world: int) -> dict:
    """What the planner predicts per rank: ``scalestack plan MODEL --world W --granularity element
    --split-root`` (the same code)."""
    from scalestack.cli.plan import plan_model
    from scalestack.planner.model_shapes import shapes_from_config

    shapes = shapes_from_config(cfg, "model")
    shapes.split_root = True
    ours, _, per_unit = plan_model(shapes, world, lambda n, s: "element", 1, 1, ALIGN)
    totals = [n + p for n, p, _ in per_unit]  # W*S of each unit
    return {
        "params": shapes.numel,
        "units": len(per_unit),
        "padding": (ours.total - shapes.numel) / shapes.numel,
        "shard_mib": ours.total / world * 4 / MIB,  # fp32 master
        "largest_unit_mib": max(totals) * 4 / MIB,
        "all_gathers": 2 * len(totals),  # every unit in forward and again in backward
        "all_gather_mib": ours.all_gathered * 4 / MIB,  # the plan's "all-gather GiB/step" column is this in bf16
        "reduce_scatters": len(totals),
        "reduce_scatter_mib": ours.total * 4 / MIB,
    }


def simulate(cfg: dict, world: int, rank: int, init: str, tokens: int, step: bool = True) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import LlamaConfig, LlamaForCausalLM

    import scalestack as ss

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    _reset_peak()
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()  # fp32 throughout: CPU GEMMs are fast in fp32 (a GPU run would compute in bf16)
    ss.fully_shard(model.model.embed_tokens)  # torchtitan's wrapping: no unit holds both embedding and head
    for layer in model.model.layers:
        ss.fully_shard(layer)
    ss.fully_shard([model.model.norm, model.lm_head])
    ss.fully_shard(model)
    t_shard = time.perf_counter() - t0
    units = ss.fsdp.api.units(model)  # the root holds no parameters, so it has no unit
    shard_mib = sum(b.layout.shard_size for u in units for b in u.buffers) * 4 / MIB
    largest_mib = max(b.layout.total_size for u in units for b in u.buffers) * 4 / MIB
    t0 = time.perf_counter()
    if init == "exact":
        torch.manual_seed(0)
        ss.materialize(model)
    else:  # FSDP2's flow: real local shards, an elementwise init on them, seeded per rank (pieces must differ)
        torch.manual_seed(rank)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
            model._init_weights(model.model.rotary_emb)  # recompute the rotary buffers
    t_init = time.perf_counter() - t0
    peak_init = _status_mib("VmHWM") - base
    ids = torch.randint(0, cfg["vocab_size"], (1, tokens))
    _reset_peak()
    base_step = _status_mib("VmRSS")
    t0 = time.perf_counter()
    with ss.record_collectives() as log:
        if step:
            model(ids, labels=ids).loss.backward()
    t_step = time.perf_counter() - t0
    peak_step = _status_mib("VmHWM") - base_step
    gathers = [c for c in log if c.kind == "all_gather"]
    reduces = [c for c in log if c.kind == "reduce_scatter"]
    return {
        "model_params": sum(math.prod(ss.shard_info(p).global_shape) for p in model.parameters()),
        "world": world,
        "rank": rank,
        "init": init,
        "units": len(units),
        "shard_mib": shard_mib,
        "largest_unit_mib": largest_mib,
        "build_s": t_build,
        "fully_shard_s": t_shard,
        "init_s": t_init,
        "init_peak_rss_mib": peak_init,
        "step_s": t_step,
        "step_peak_rss_mib": peak_step,
        "all_gathers": len(gathers),
        "all_gather_mib": sum(c.elements for c in gathers) * 4 / MIB,
        "all_gather_ranks": sorted({c.ranks for c in gathers}),
        "reduce_scatters": len(reduces),
        "reduce_scatter_mib": sum(c.elements for c in reduces) * 4 / MIB,
        "flag_all_reduces": sum(c.kind == "all_reduce_flags" for c in log),
        "collectives": [list(c) for c in log],
    }


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}" if abs(x) >= 100 else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    from scalestack.planner.model_shapes import BUILTIN

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    llamas = [n for n, c in BUILTIN.items() if c["model_type"] == "llama"]
    p.add_argument("--model", default="llama3-70b", choices=llamas)
    p.add_argument("--small", action="store_true", help="a 4-layer Llama (hidden 256) instead: for CI")
    p.add_argument("--world", type=int, default=1024)
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--init", choices=["local", "exact"], default="local",
                   help="local: to_empty + an elementwise init on the pieces; exact: materialize")  # fmt: skip
    p.add_argument("--tokens", type=int, default=4, help="tokens in the training step")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (a quick look)")
    p.add_argument("--plan-only", action="store_true", help="only the planner's per-rank prediction (any W)")
    p.add_argument("--no-step", action="store_true", help="build, shard and initialize only")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world:
        p.error(f"--rank must be in [0, {args.world})")
    cfg = dict(SMALL if args.small else BUILTIN[args.model])
    name = "small llama" if args.small else args.model
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
        name += f" ({args.layers} layers)"
    plan = planned(cfg, args.world)
    out = {"model": name, "plan": plan}
    print(f"{name}: {plan['params'] / 1e9:.3f}B parameters, {plan['units']} units, W={args.world}")
    print(f"plan: shard {plan['shard_mib']:.1f} MiB/rank (fp32), largest unit {plan['largest_unit_mib']:.1f} MiB, "
          f"padding {100 * plan['padding']:.4f}%")  # fmt: skip
    if not args.plan_only:
        sim = simulate(cfg, args.world, args.rank, args.init, args.tokens, not args.no_step)
        out["simulation"] = sim
        expected_peak = plan["shard_mib"] + (plan["largest_unit_mib"] if args.init == "exact" else 0)
        rows = [
            ("shard per rank, MiB", plan["shard_mib"], sim["shard_mib"]),
            ("largest unit, MiB", plan["largest_unit_mib"], sim["largest_unit_mib"]),
            (f"init peak RSS ({args.init}), MiB", expected_peak, sim["init_peak_rss_mib"]),
        ]
        if not args.no_step:
            rows += [
                ("all-gathers per step", plan["all_gathers"], sim["all_gathers"]),
                ("all-gathered per step, MiB (fp32)", plan["all_gather_mib"], sim["all_gather_mib"]),
                ("reduce-scatters per step", plan["reduce_scatters"], sim["reduce_scatters"]),
                ("reduce-scattered per step, MiB (fp32)", plan["reduce_scatter_mib"], sim["reduce_scatter_mib"]),
            ]
        print(f"| rank {args.rank} of {args.world} | planned | simulated |")
        print("|---|---:|---:|")
        for label, a, b in rows:
            print(f"| {label} | {_fmt(a)} | {_fmt(b)} |")
        print(f"build on meta {sim['build_s']:.2f} s, fully_shard {sim['fully_shard_s']:.2f} s, "
              f"init {sim['init_s']:.1f} s, step ({args.tokens} tokens) {sim['step_s']:.1f} s "
              f"(peak RSS +{sim['step_peak_rss_mib']:.0f} MiB); every all-gather spans "
              f"{sim['all_gather_ranks']} ranks")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
