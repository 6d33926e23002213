"""Train a generative retriever with scalestack FSDP, then serve it under a changing business rule.

    torchrun --standalone --nproc_per_node=2 examples/retrieval/demo.py --out runs/retrieval
    scalestack retrieve --checkpoint runs/retrieval/retriever.pt --allowed runs/retrieval/fresh.ids \\
        --queries runs/retrieval/queries.tsv

Training writes the seeded task (catalogue, fresh subset, held-out queries) and the checkpoint under
``--out``; rank 0 then compares unconstrained and constrained decoding on the held-out queries.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from task import RetrievalTask, write_task_files

import scalestack as ss
from scalestack.decode.retriever import Retriever, save_retriever
from scalestack.models.gpt import GPT, GPTConfig
from scalestack.train import end_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/retrieval"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64, help="queries per rank per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beams", type=int, default=10)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --standalone --nproc_per_node=2 examples/retrieval/demo.py")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    task = RetrievalTask(seed=args.seed)
    if rank == 0:
        write_task_files(task, args.out)

    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=len(task.vocab), block_size=task.query_len + 2 + task.levels, n_layer=2, n_head=4,
                    n_embd=96, tie_embeddings=False)  # fmt: skip
    model = GPT(cfg)
    for block in model.layers:
        ss.fully_shard(block)
    ss.fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = task.sequences(args.batch, gen)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 100 == 0 or step == args.steps:
            v = loss.detach().clone()
            dist.all_reduce(v)
            if rank == 0:
                print(f"step {step:4d}  loss {v.item() / world:.3f}  {time.perf_counter() - t0:5.1f}s", flush=True)
    state = ss.full_state_dict(model)  # collective: every rank calls it
    if rank == 0:
        path = args.out / "retriever.pt"
        save_retriever(path, state, cfg, task.vocab, task.token_map, task.query_len)
        print(f"checkpoint: {path} ({world} ranks trained it with scalestack FSDP)")
        evaluate(Retriever(path), task, args.out, args.beams)
    end_worker()  # every rank: a barrier, then exit without the interpreter's teardown (see its docstring)


def evaluate(retriever: Retriever, task: RetrievalTask, out: Path, beams: int) -> dict[str, float]:
    """Held-out queries, unconstrained against constrained to the fresh items: validity and recall."""
    lines = (out / "queries.tsv").read_text().splitlines()[1:]
    queries = [line.split("\t")[0] for line in lines]
    targets = torch.tensor([[int(c) for c in line.split("\t")[1].split()] for line in lines])
    ids, age = task.catalogue()
    catalogue = {tuple(r) for r in ids.tolist()}
    fresh = {tuple(r) for r, a in zip(ids.tolist(), age.tolist()) if a <= task.fresh_days}
    retriever.set_allowed(out / "fresh.ids")
    target_fresh = torch.tensor([tuple(t) in fresh for t in targets.tolist()])
    stats = {}
    for name, constrained in (("unconstrained", False), ("constrained to fresh", True)):
        res = retriever.retrieve(queries, beams=beams, constrained=constrained)
        top = [[tuple(r) for r in q] for q in res.ids.tolist()]
        n = len(queries) * beams
        stats[name] = {
            "beams that are items": sum(t in catalogue for q in top for t in q) / n,
            "beams that are fresh items": sum(t in fresh for q in top for t in q) / n,
            "top-1 is the target (fresh targets)": sum(
                top[i][0] == tuple(targets[i].tolist()) for i in range(len(top)) if target_fresh[i]
            )
            / max(1, int(target_fresh.sum())),
            "top-1 is fresh (stale targets)": sum(top[i][0] in fresh for i in range(len(top)) if not target_fresh[i])
            / max(1, int((~target_fresh).sum())),
        }
    print(f"held-out queries: {len(queries)} ({int(target_fresh.sum())} with a fresh target), beams {beams}")
    for metric in next(iter(stats.values())):
        print(f"  {metric:40s}" + "".join(f"  {name}: {s[metric]:6.1%}" for name, s in stats.items()))
    return stats


if __name__ == "__main__":
    main()
