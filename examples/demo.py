"""The demo: a character-level GPT trained with scalestack on local ranks, on public-domain text.

    torchrun --standalone --nproc_per_node=2 examples/demo.py [--steps 600] [--data FILE]

Prints the loss falling, per-rank memory of parameters + gradients + AdamW state against the unsharded
figure, communication per step, and a sample from the trained model.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import scalestack as ss
from scalestack.models.gpt import GPT, GPTConfig
from scalestack.train import end_worker

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "public_domain.txt"


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --standalone --nproc_per_node=2 examples/demo.py")
    if not args.data.is_file():
        raise SystemExit(f"training text not found at {args.data}; pass --data FILE")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()

    text = args.data.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]

    torch.manual_seed(0)  # every rank builds the same model
    cfg = GPTConfig(vocab_size=len(chars), block_size=args.seq, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    for block in model.layers:
        ss.fully_shard(block)
    ss.fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    log(f"text: {len(text):,} characters, vocabulary {len(chars)}; model: {n_params / 1e6:.2f}M parameters")
    log(f"ranks: {world} (gloo); global batch {args.batch * world} x {args.seq} characters")
    g = torch.Generator().manual_seed(1000 + rank)

    def batch(source: torch.Tensor, gen: torch.Generator):
        ix = torch.randint(len(source) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([source[i : i + args.seq] for i in ix])
        y = torch.stack([source[i + 1 : i + args.seq + 1] for i in ix])
        return x, y

    def global_mean(v: torch.Tensor) -> float:
        v = v.detach().clone()
        dist.all_reduce(v)
        return v.item() / world

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ss.reset_traffic()
        x, y = batch(train, g)
        loss = model(x, y)
        loss.backward()
        ss.clip_grad_norm_(model, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            report_memory(model, n_params, rank, world)
            t = ss.traffic()
            log(
                f"communication per step (per rank): all-gather {mib(t.all_gather_bytes)} in {t.all_gathers} "
                f"collectives, reduce-scatter {mib(t.reduce_scatter_bytes)} in {t.reduce_scatters}, "
                f"copies outside collectives {mib(t.copy_bytes)}"
            )
        if step % 25 == 0 or step == 1:
            train_loss = global_mean(loss)
            with torch.no_grad():
                val_loss = global_mean(model(*batch(val, torch.Generator().manual_seed(step))))
            elapsed = time.perf_counter() - t0
            log(f"step {step:4d}  train loss {train_loss:.3f}  val loss {val_loss:.3f}  {elapsed:6.1f}s")

    prompt = [stoi[c] for c in "To be" if c in stoi] or [0]
    sample = generate(model, prompt, 200, cfg.block_size)
    log("sample: " + repr("".join(chars[i] for i in sample)))
    end_worker()  # every rank: a barrier, then exit without the interpreter's teardown (see its docstring)


def report_memory(model: torch.nn.Module, n_params: int, rank: int, world: int) -> None:
    """Bytes this rank holds for parameters, gradients and optimizer state, against the unsharded model."""
    local = sum(p.numel() for p in model.parameters())
    padding = sum(ss.layout(m).padding for m in model.modules() if isinstance(m, ss.FSDPModule))
    per_rank = torch.tensor([local * 4 * 4.0])  # fp32 params + grads + AdamW exp_avg + exp_avg_sq
    everyone = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(everyone, per_rank)
    if rank == 0:
        full = n_params * 4 * 4
        print(f"parameters + gradients + AdamW state: unsharded {mib(full)} per rank")
        for r, b in enumerate(everyone):
            print(f"  rank {r}: {mib(b.item())} ({b.item() / full:.1%} of unsharded)")
        print(f"  padding across all units: {padding} elements")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], n: int, block_size: int) -> list[int]:
    """Greedy sampling with a fixed seed: every rank runs the same forwards (the all-gathers are collective)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([prompt])
    for _ in range(n):
        logits = model(idx[:, -block_size:])[:, -1, :]
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0].tolist()


if __name__ == "__main__":
    main()
