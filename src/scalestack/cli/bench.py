"""``scalestack bench``: one training step of the same GPT, data, AdamW and W under scalestack, PyTorch FSDP2,
FSDP1, DDP and DeepSpeed ZeRO-3 (when installed: ``pip install 'scalestack[bench]'``), alternated in one run.

Each (round, W, system) runs in fresh processes (one thread per rank on the CPU), so each peak is that
system's alone; the order of systems rotates every round. Printed per system and W:
  step (ms)        median step time (the slowest rank's), over rounds x timed steps, after 2 warm-up steps
  scalestack / it  scalestack's step time (or peak) over this system's: below 1, scalestack is faster (smaller)
  peak MiB/rank    peak memory per rank during the timed steps, above the process's memory before the model was
                   built: RSS on the CPU (glibc is told to return freed blocks of 64 KiB or more to the system,
                   for every system alike, so RSS follows live tensors), allocated bytes on CUDA
  AG / RS / AR     bytes all-gathered (output size), reduce-scattered (input size), all-reduced (tensor size)
                   per step: tensor sizes, not bytes on the wire (a ring all-reduce sends about twice its size)
  copy             bytes written by copy kernels outside collectives in forward + backward (copy_, _to_copy,
                   split_with_sizes_copy, chunk_cat, FSDP2's all_gather_copy_in; not cat or stack, which
                   the model's own forward and backward call under every system alike)
  by phase         one more step's peak per rank in forward, backward and the optimizer step, each from a reset
Writes bench.md, bench.png and bench.json into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="step time, memory and traffic vs FSDP2, FSDP1, DDP and DeepSpeed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--systems", help="comma-separated (default: scalestack,fsdp2,fsdp1,ddp and deepspeed if installed)")
    p.add_argument("--world", default="2", help="comma-separated numbers of ranks, e.g. 2,4 (default 2)")
    p.add_argument("--model", default="gpt-30m", help="gpt-30m (the reference, 29.4M parameters), gpt-12m, gpt-tiny")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every system once (default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run, after 2 warm-up steps (default 5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one rank per GPU, NCCL")
    p.add_argument("--out", default="runs/bench", help="directory for bench.md, bench.png, bench.json")
    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 2,4; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import SYSTEMS, available, run_bench
    from ..bench.runner import MODELS
    from ..bench.table import markdown, plot
    from ..models.gpt import GPT

    systems = args.systems.split(",") if args.systems else [s for s in SYSTEMS if available(s)]
    worlds = _ints(args.world, "--world")
    if args.model not in MODELS:
        raise ValueError(f"unknown --model {args.model!r}: choose from {', '.join(MODELS)}")
    cfg = MODELS[args.model]
    params = sum(p.numel() for p in GPT(cfg).parameters())
    backend = "NCCL/CUDA" if args.device == "cuda" else "gloo/CPU, 1 thread per rank"
    header = (f"model {args.model}: GPT {cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}, {params / 1e6:.1f}M "
              f"parameters; batch {args.batch} x {cfg.block_size} per rank; AdamW; {backend}; torch "
              f"{torch.__version__}; {args.rounds} rounds x {args.steps} timed steps")  # fmt: skip
    print(header, flush=True)
    results = run_bench(systems, worlds, model=args.model, batch=args.batch, rounds=args.rounds, steps=args.steps,
                        device=args.device, log=lambda line: print(line, flush=True))  # fmt: skip
    table = markdown(results)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(header + "\n\n" + table)
    plot(results, out / "bench.png", header)
    rows = [{"system": r.system, "world": r.world, "step_s": r.step_s, "times": r.times, "peak_bytes": r.peak,
             "phase_peak_bytes": r.phases, **r.bytes} for r in results]  # fmt: skip
    (out / "bench.json").write_text(json.dumps({"header": header, "results": rows}, indent=1))
    print(f"wrote {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench.json'}")
    return 0
