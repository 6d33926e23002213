"""``scalestack plan``: padding, collectives, memory and traffic of a model's units against the peers."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from ..planner.granularity import ElementBlocks, check_granularity, cuts_for
from ..planner.layout import TensorSpec
from ..planner.model_shapes import BUILTIN, ModelShapes, load_model_shapes
from ..planner.peers import PEERS, RULES
from ..planner.search import plan_buffers

GIB = 2**30
# bytes per element of the per-rank shard: fp32 master + fp32 grad, then optimizer state
OPTIMIZERS = {"AdamW": 8.0, "8-bit AdamW": 2.0 + 2 * 4 / 256, "Muon": 4.0}


def parse_granularity(text: str):
    """element | row | matrix | tensor | block:K (K rows) | elements:K (K elements) | muon (matrices whole)."""
    if text == "muon":
        return lambda name, shape: "tensor" if len(shape) == 2 else ("matrix" if len(shape) > 2 else "element")
    if text.startswith("elements:"):
        try:
            spec = ElementBlocks(int(text.split(":", 1)[1]))
        except ValueError:
            msg = f"element blocks need a positive int, e.g. elements:256, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        return lambda name, shape: spec
    if text.startswith("block:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"block granularity needs an int, e.g. block:32, got {text!r}") from None
        text = k
    try:
        spec = check_granularity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; on the command line also block:K, elements:K and muon") from None
    return lambda name, shape: spec


@dataclass
class SystemResult:
    total: int  # elements over all ranks, all units
    collectives: int  # buffers over all units (each: one all-gather per gather, one reduce-scatter)
    root: int = 0  # elements over all ranks of the root unit (the last): it stays gathered for backward

    @property
    def all_gathered(self) -> int:
        """Elements all-gathered per step: every unit in forward, all but the root again in backward."""
        return 2 * self.total - self.root


def plan_model(model: ModelShapes, world: int, granularity, blocks_per_unit: int, max_buffers: int, align: int):
    ours = SystemResult(0, 0)
    peers = {name: SystemResult(0, 0) for name in PEERS}
    per_unit = []
    for unit in model.units(blocks_per_unit):
        specs = [TensorSpec(n, s, cuts_for(granularity(n, s), s)) for n, s in unit]
        plan = plan_buffers(specs, world, align, max_buffers)
        ours.total += plan.total_size
        ours.collectives += plan.collectives
        ours.root = 0 if model.split_root else plan.total_size  # split: the root holds no parameters
        per_unit.append((plan.numel, plan.padding, plan.collectives))
        shapes = [s for _, s in unit]
        for name, rule in PEERS.items():
            size = rule(shapes, world)
            peers[name].total += size
            peers[name].collectives += 1
            peers[name].root = 0 if model.split_root else size
    return ours, peers, per_unit


def auto_unit(model: ModelShapes, world: int, granularity, max_buffers: int, align: int, target: float):
    """The fewest blocks per unit (1, 2, 4, ...) whose padding is at most ``target`` (a fraction); if none
    gets there, the size with the least padding. Coarse granules at large W need larger units: their floor
    falls as a unit's share per rank grows."""
    best = None
    size = 1
    while True:
        result = plan_model(model, world, granularity, size, max_buffers, align)
        pad = (result[0].total - model.numel) / model.numel
        if best is None or pad < best[0]:
            best = (pad, size, result)
        if pad <= target or size >= len(model.blocks):
            break
        size = min(2 * size, len(model.blocks))
    return best[1], best[2]


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        print()
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


def run(args: argparse.Namespace) -> int:
    model = load_model_shapes(args.model)
    model.split_root = args.split_root
    granularity = parse_granularity(args.granularity)
    align = args.align_bytes // 4
    numel = model.numel
    unit_text = (
        f"the fewest blocks per unit with padding <= {args.target_padding}%"
        if args.unit == "auto"
        else (f"{args.unit} block(s) per unit")
    )
    print(f"{model.name}: {numel / 1e9:.2f}B parameters, {len(model.blocks)} blocks, granularity {args.granularity}, "
          f"{unit_text}, up to {args.max_buffers} buffer(s) per unit")  # fmt: skip
    sweep = {}
    for world in args.world:
        t0 = time.perf_counter()
        blocks, (ours, peers, per_unit) = _plan_world(model, world, granularity, args, align)
        elapsed = time.perf_counter() - t0
        if args.unit == "auto":
            print(f"W={world}: {blocks} block(s) per unit")
        sweep[world] = (ours, peers)
        systems = {"scalestack": ours, **peers}
        rows = []
        for name, res in systems.items():
            per_rank = res.total / world
            pad = (res.total - numel) / numel
            row = [name, f"{100 * pad:.3f}%", f"{res.collectives}", f"{per_rank * 8 / GIB:.2f}"]
            row += [f"{per_rank * (8 + b) / GIB:.2f}" for b in OPTIMIZERS.values()]
            row += [f"{res.all_gathered * 2 / GIB:.2f}"]
            rows.append(row)
        columns = ["system", "padding", "buffers", "params+grads GiB/rank"]
        columns += [f"+{o} GiB/rank" for o in OPTIMIZERS] + ["all-gather GiB/step"]
        _table(f"W={world}  (planned {len(per_unit)} units in {elapsed:.2f}s)", columns, rows)
        if args.per_unit:
            unit_rows = [
                [str(i), f"{n / 1e6:.1f}M", f"{100 * p / n:.3f}%", str(c)] for i, (n, p, c) in enumerate(per_unit)
            ]
            _table(f"W={world} per unit", ["unit", "params", "padding", "buffers"], unit_rows)
    print("Memory: fp32 master params + fp32 grads per rank, plus the optimizer's state (AdamW 8 B/elem, 8-bit")
    print("AdamW 2 B/elem + block scales, Muon momentum 4 B/elem). All-gather: bf16, forward and backward")
    print("(the root unit stays gathered for backward, as in FSDP2).")
    print("Buffers: scalestack's collectives per unit gather (each system's 'buffers' column); peers use one per unit.")
    print("Peer rules (documented behaviour, computed here):")
    for name, rule in RULES.items():
        print(f"  {name}: {rule}")
    if args.plot:
        plot(model, sweep, args)
    return 0


def _plan_world(model: ModelShapes, world: int, granularity, args: argparse.Namespace, align: int):
    if args.unit == "auto":
        return auto_unit(model, world, granularity, args.max_buffers, align, args.target_padding / 100)
    return args.unit, plan_model(model, world, granularity, args.unit, args.max_buffers, align)


def plot(model: ModelShapes, sweep: dict, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'scalestack[plot]'") from None
    worlds = sorted(sweep)
    if len(worlds) < 3:  # a curve needs more points: sweep powers of two up to the largest W
        granularity = parse_granularity(args.granularity)
        for w in (2**i for i in range(3, int(math.log2(max(worlds))) + 1)):
            if w not in sweep:
                _, (ours, peers, _) = _plan_world(model, w, granularity, args, args.align_bytes // 4)
                sweep[w] = (ours, peers)
        worlds = sorted(sweep)
    fig, ax = plt.subplots(figsize=(8, 5))
    numel = model.numel
    names = ["scalestack", *PEERS]
    for name in names:
        ys = [
            100 * ((sweep[w][0] if name == "scalestack" else sweep[w][1][name]).total - numel) / numel for w in worlds
        ]
        ax.plot(worlds, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("world size W")
    ax.set_ylabel("padding, % of parameters")
    ax.set_title(f"{model.name}, granularity {args.granularity}, max {args.max_buffers} buffer(s) per unit")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="padding, collectives, memory and traffic of a model's sharded units, against FSDP2/FSDP1/DS/Megatron",
        description=f"MODEL: a built-in name ({', '.join(BUILTIN)}), a Hugging Face config.json, or "
        "module:callable returning an nn.Module (built on the meta device).",
    )
    p.add_argument("model")
    p.add_argument("--world", type=_positive, nargs="+", default=[64, 256, 1024], help="world size(s) W")
    p.add_argument("--granularity", default="row", help="element | row | matrix | tensor | block:K | elements:K | muon")
    p.add_argument(
        "--unit",
        type=_unit,
        default=1,
        help="blocks per sharded unit (default 1), or auto: per W, the fewest blocks (1, 2, 4, ...) per unit whose "
        "padding is at most --target-padding",
    )
    p.add_argument("--target-padding", type=float, default=1.0, help="percent, for --unit auto (default 1.0)")
    p.add_argument("--max-buffers", type=_positive, default=1, help="buffers (collectives) a unit may use")
    p.add_argument("--align-bytes", type=_positive, default=16, help="alignment of offsets and S, in bytes (fp32)")
    p.add_argument("--per-unit", action="store_true", help="also print every unit")
    p.add_argument("--split-root", action="store_true",
                   help="torchtitan's wrapping: the embedding one unit, the final norm and head another")  # fmt: skip
    p.add_argument("--plot", help="draw padding against W for every system into this PNG")
    p.set_defaults(func=_run_checked)


def _run_checked(args: argparse.Namespace) -> int:
    parse_granularity(args.granularity)  # fail before any work
    if args.align_bytes % 4:
        raise ValueError("--align-bytes must be a multiple of 4 (fp32 elements)")
    if not args.target_padding >= 0:
        raise ValueError(f"--target-padding is a percentage >= 0, got {args.target_padding}")
    return run(args)


def _unit(text: str) -> int | str:
    return "auto" if text == "auto" else _positive(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
