"""The optimizers on the demo GPT, side by side in one run (gloo on this machine's CPUs).

1. Optimizer step at W = 2 and 4: median wall time of ``opt.step()`` (same given gradients, systems
   alternated round by round) and bytes each rank sends per step, for
     adamw          torch.optim.AdamW (foreach) on every parameter
     adamw8bit      scalestack AdamW8bit on every parameter (layout: AdamW8bit.granularity(256))
     muon           scalestack Muon on the block matrices (owner per matrix, two all-to-alls) + AdamW on the rest
     muon-matrix    the same on a whole-matrix layout (granularity "matrix" for the matrices: no traffic)
     muon-naive     every full matrix all-gathered to every rank, Newton-Schulz everywhere (one collective
                    per matrix: what a user of FSDP2 writes first) + AdamW on the rest
2. Optimizer state bytes per rank at W = 2: AdamW vs AdamW8bit (and torchao's AdamW8bit on the unsharded
   model when torchao imports).
3. The demo's training at W = 2 with AdamW, AdamW8bit and Muon (+ AdamW): final losses and a PNG of the
   curves (``--png``).
4. Code maps (``--maps``, one process): the demo GPT's fp32 AdamW moments after 200 steps, quantized by
   block of 256 with our maps and with alternatives; the error of the resulting update ``m / (sqrt(v) + eps)``.

    python benchmarks/optim.py [--rounds 5] [--train-steps 600] [--png docs/optim_loss.png] [--skip-train]
    python benchmarks/optim.py --maps
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import scalestack as ss  # noqa: E402
from scalestack.models.gpt import GPT, GPTConfig  # noqa: E402
from scalestack.optim import AdamW8bit, Muon, muon_param_groups  # noqa: E402
from scalestack.optim.newton_schulz import DEFAULT_COEFFICIENTS, orthogonalize  # noqa: E402

TEXT = (ROOT / "data" / "public_domain.txt").read_text(encoding="utf-8")
CHARS = sorted(set(TEXT))
CFG = GPTConfig(vocab_size=len(CHARS), block_size=96, n_layer=4, n_head=4, n_embd=128)  # the demo's model
SYSTEMS = ("adamw", "adamw8bit", "muon", "muon-matrix", "muon-naive")


def code_maps(steps: int = 200) -> None:
    """Part 4: quantize real AdamW moments with several maps and compare the updates they give."""
    from scalestack.optim import quantization as q

    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    stoi = {c: i for i, c in enumerate(CHARS)}
    data = torch.tensor([stoi[c] for c in TEXT], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(len(data) - CFG.block_size - 1, (8,), generator=g)
        x = torch.stack([data[i : i + CFG.block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + CFG.block_size + 1] for i in ix])
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    flat = {k: torch.cat([s[k].reshape(-1) for s in opt.state.values()]) for k in ("exp_avg", "exp_avg_sq")}
    n = flat["exp_avg"].numel() // 256 * 256
    m, v = flat["exp_avg"][:n].view(-1, 256), flat["exp_avg_sq"][:n].view(-1, 256)

    def with_table(x, table):
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        bounds = (table[1:] + table[:-1]) / 2
        return table[torch.bucketize(x / scale, bounds)] * scale

    linear_signed, linear_unsigned = torch.linspace(-1, 1, 255), torch.linspace(0, 1, 256)
    with_zero = torch.cat([torch.zeros(1), q.code_map("unsigned_nonzero")[1:]])  # the smallest entry -> 0
    maps = {
        "ours: dynamic signed m, dynamic v without zero": (q.code_map("signed"), q.code_map("unsigned_nonzero")),
        "dynamic signed m, dynamic v with zero": (q.code_map("signed"), with_zero),
        "linear m and v (256 levels)": (linear_signed, linear_unsigned),
    }
    exact = m / (v.sqrt() + 1e-8)
    print(f"\n4. code maps on the demo GPT's AdamW moments after {steps} steps ({n} values, blocks of 256)")
    for name, (mt, vt) in maps.items():
        update = with_table(m, mt) / (with_table(v, vt).sqrt() + 1e-8)
        err = (update - exact).norm() / exact.norm()
        worst = (update - exact).abs().max()
        print(f"  {name:48s} update error {err.item():.4f} (relative, all values), largest {worst.item():.3g}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(granularity="element") -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    for block in model.layers:
        ss.fully_shard(block, granularity=granularity)
    return ss.fully_shard(model, granularity=granularity)


def whole_matrices(name: str, p: torch.Tensor) -> str:
    """Granularity: the blocks' 2-D weights (Muon's) whole on one rank, elements for the rest."""
    return "matrix" if p.dim() == 2 and name.split(".")[0] in ("attn", "mlp") else "element"


class NaiveMuon:
    """Muon the way it is first written on FSDP: all-gather each full matrix to every rank (uneven pieces
    padded to the largest), Newton-Schulz on every rank, keep this rank's piece."""

    def __init__(self, params, lr=0.02, weight_decay=0.1, momentum=0.95):
        self.params, self.lr, self.wd, self.mu = list(params), lr, weight_decay, momentum
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.sent_bytes = 0

    @torch.no_grad()
    def step(self):
        world = dist.get_world_size()
        for p, buf in zip(self.params, self.bufs):
            buf.lerp_(p.grad, 1 - self.mu)
            u = p.grad.lerp(buf, self.mu).reshape(-1)
            info = ss.shard_info(p)
            ranges = [info.range_of(r) for r in range(world)]
            longest = max(b - a for a, b in ranges)
            padded = torch.zeros(longest)
            padded[: u.numel()] = u
            gathered = torch.empty(world * longest)
            (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(gathered, padded)
            self.sent_bytes += (world - 1) * longest * 4
            full = torch.cat([gathered[r * longest : r * longest + b - a] for r, (a, b) in enumerate(ranges)])
            rows, cols = info.global_shape
            o = orthogonalize(full.view(1, rows, cols), DEFAULT_COEFFICIENTS, 5, 1e-7)[0].reshape(-1)
            p.mul_(1 - self.lr * self.wd)
            p.add_(o[info.start : info.end].view(p.shape), alpha=-self.lr * math.sqrt(max(1, rows / cols)))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def optimizers(system: str, model: GPT):
    if system == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)]
    if system == "adamw8bit":
        return [AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.1)]
    muon, rest = muon_param_groups(model)
    adamw = torch.optim.AdamW([p for _, p in rest], lr=3e-3, weight_decay=0.1)
    if system == "muon-naive":
        return [NaiveMuon([p for _, p in muon]), adamw]
    return [Muon([p for _, p in muon], lr=0.02, weight_decay=0.1), adamw]


def set_grads(model: GPT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def step_timing(rank: int, world: int, rounds: int, reps: int) -> dict:
    models = {
        "adamw": build(),
        "adamw8bit": build(AdamW8bit.granularity(256)),
        "muon": build(),
        "muon-matrix": build(whole_matrices),
        "muon-naive": build(),
    }
    opts = {s: optimizers(s, m) for s, m in models.items()}
    times = {s: [] for s in SYSTEMS}
    sent = {}
    for r in range(rounds):
        order = SYSTEMS[r % len(SYSTEMS) :] + SYSTEMS[: r % len(SYSTEMS)]
        for s in order:
            for i in range(reps + 1):
                set_grads(models[s], seed=rank * 1000 + i)
                for o in opts[s]:
                    if isinstance(o, NaiveMuon):
                        o.sent_bytes = 0
                ss.reset_traffic()
                dist.barrier()
                t0 = time.perf_counter()
                for o in opts[s]:
                    o.step()
                elapsed = time.perf_counter() - t0
                if i:  # the first step of each round warms up (lazy state, exchange plan)
                    times[s].append(elapsed)
                naive = sum(o.sent_bytes for o in opts[s] if isinstance(o, NaiveMuon))
                sent[s] = ss.traffic().all_to_all_bytes + naive
    return {s: (statistics.median(times[s]), sent[s]) for s in SYSTEMS}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Allocated optimizer state (AdamW8bit: its arrays, the padding of each piece's last block included)."""
    if isinstance(opt, AdamW8bit):
        arrays = [t for b in opt._blocks for t in (b.m_codes, b.v_codes, b.m_scales, b.v_scales, b.row_owner)]
        return sum(t.numel() * t.element_size() for t in arrays)
    total = 0
    for state in opt.state.values():
        for k, t in state.items():
            if isinstance(t, torch.Tensor) and k != "step":
                total += t.numel() * t.element_size()
    return total


def state_memory(rank: int, world: int) -> dict:
    out = {}
    for name in ("adamw", "adamw8bit"):
        model = build(AdamW8bit.granularity(256) if name == "adamw8bit" else "element")
        opt = optimizers(name, model)[0]
        set_grads(model, 0)
        opt.step()
        out[name] = state_bytes(opt)
    try:
        sys.path.insert(0, "/tmp/ao")
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        torch.manual_seed(0)
        plain = GPT(CFG)
        opt = TorchaoAdamW8bit(plain.parameters(), lr=3e-3)
        set_grads(plain, 0)
        opt.step()
        total = 0
        for state in opt.state.values():
            for k, t in state.items():
                if isinstance(t, torch.Tensor) and k != "step":
                    inner = [getattr(t, a) for a in ("codes", "scale", "qmap") if hasattr(t, a)]
                    total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
        out["torchao (unsharded)"] = total
    except Exception as e:  # noqa: BLE001 - optional peer: report why it did not run
        out["torchao"] = f"not run: {type(e).__name__}: {str(e)[:80]}"
    return out


def train(rank: int, world: int, system: str, steps: int) -> list[float]:
    """The demo's loop (batch 8 x 96 characters per rank, OneCycle, clipping) with another optimizer."""
    stoi = {c: i for i, c in enumerate(CHARS)}
    data = torch.tensor([stoi[c] for c in TEXT], dtype=torch.long)
    granularity = AdamW8bit.granularity(256) if system == "adamw8bit" else "element"
    model = build(granularity)
    opts = optimizers(system, model)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=steps, pct_start=0.1)
        for o in opts
    ]
    g = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for _ in range(steps):
        ix = torch.randint(len(data) - CFG.block_size - 1, (8,), generator=g)
        x = torch.stack([data[i : i + CFG.block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + CFG.block_size + 1] for i in ix])
        loss = model(x, y)
        loss.backward()
        ss.clip_grad_norm_(model, 1.0)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
            o.zero_grad(set_to_none=True)
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / world)
    return losses


def worker(rank: int, world: int, port: int, job: str, args: dict, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    if job == "step":
        out = step_timing(rank, world, args["rounds"], args["reps"])
    elif job == "state":
        out = state_memory(rank, world)
    else:
        out = train(rank, world, args["system"], args["steps"])
    if rank == 0:
        results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, job: str, **args):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, job, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get(timeout=3600)
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="timed steps per system per round")
    ap.add_argument("--train-steps", type=int, default=600, help="the demo trains 600 steps")
    ap.add_argument("--png", type=Path, default=None, help="where to draw the loss curves")
    ap.add_argument("--skip-train", action="store_true", help="only parts 1 and 2")
    ap.add_argument("--maps", action="store_true", help="only part 4: compare code maps")
    args = ap.parse_args()
    if args.maps:
        torch.set_num_threads(2)
        return code_maps()
    model = GPT(CFG)
    n, matrices = sum(p.numel() for p in model.parameters()), len(muon_param_groups(model)[0])
    print(f"demo GPT: {n / 1e6:.2f}M parameters, {matrices} Muon matrices; gloo, {os.cpu_count()} CPUs")

    print("\n1. optimizer step (median ms; bytes sent per rank per step)")
    for world in (2, 4):
        out = run(world, "step", rounds=args.rounds, reps=args.reps)
        base = out["adamw"][0]
        for s in SYSTEMS:
            ms, sent = out[s]
            print(f"  W={world} {s:12s} {ms * 1e3:8.2f} ms  {ms / base:5.2f}x AdamW  sent {sent / 2**20:7.3f} MiB")

    print("\n2. optimizer state per rank, W=2")
    out = run(2, "state")
    base = out["adamw"]
    for name, b in out.items():
        print(f"  {name:20s} " + (f"{b / 2**20:8.3f} MiB  {b / base:5.3f}x AdamW" if isinstance(b, int) else b))

    if args.skip_train:
        return
    print(f"\n3. the demo's training, W=2, {args.train_steps} steps (final loss: mean of the last 20 steps)")
    curves = {}
    for system in ("adamw", "adamw8bit", "muon"):
        t0 = time.perf_counter()
        curves[system] = run(2, "train", system=system, steps=args.train_steps)
        final = statistics.mean(curves[system][-20:])
        ref = statistics.mean(curves["adamw"][-20:])
        took = time.perf_counter() - t0
        print(f"  {system:10s} final loss {final:.4f}  ({final / ref - 1:+.2%} vs AdamW)  {took:.0f}s")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for system, losses in curves.items():
            smooth = [statistics.mean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
            ax.plot(smooth, label=system)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (10-step mean)")
        ax.set_title("demo GPT, W=2 gloo: AdamW vs AdamW8bit vs Muon (+AdamW)")
        ax.legend()
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"  curves: {args.png}")


if __name__ == "__main__":
    main()
