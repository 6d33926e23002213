"""Distributed checkpoint save and load, side by side: scalestack.checkpoint vs PyTorch FSDP2 + DCP, same GPT
(~96M parameters, or a tiny one with --small), AdamW after one training step, W ranks on gloo.

  scalestack  scalestack.fully_shard per block and root; scalestack.checkpoint.save(path, model, opt), then
              scalestack.checkpoint.load(path, model, opt) into a fresh model and optimizer
  fsdp2       torch fully_shard per block and root; save = get_state_dict + dcp.save({"model", "optim"});
              load into a fresh model and optimizer = get_state_dict (initializes the optimizer state) +
              dcp.load + set_state_dict

Each (round, system) runs in fresh processes; rounds rotate the order of systems. Printed per system:
  save s, load s   median over rounds of the wall time between barriers around the call, max over ranks
  MiB written      sum of the file sizes in the checkpoint directory
  save peak MiB    peak resident memory during the save above the RSS just before it (max over ranks)
  save peak %      that peak as a share of the process's RSS at the save start (what training holds)
  train peak MiB   peak RSS of the training step above the RSS before the model was built (as scalestack bench)
  loaded == saved  after load, one parameter and its AdamW exp_avg equal (bitwise, local pieces) what was saved

    python benchmarks/checkpoint.py [--rounds 3] [--world 2] [--systems scalestack,fsdp2] [--small] [--dir D]
                                    [--no-verify]  (scalestack loads without its CRC-32 check of every file)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from scalestack.models.gpt import GPT, GPTConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import free_port, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

CFGS = {
    "full": GPTConfig(vocab_size=32768, block_size=256, n_layer=10, n_head=12, n_embd=768),
    "small": GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64),
}
LOCAL_BATCH = 4
NO_VERIFY = os.environ.get("SCALESTACK_BENCH_NO_VERIFY") == "1"  # set by --no-verify, inherited by workers
MIB = 2**20
COLUMNS = ("save s", "load s", "MiB written", "save peak MiB", "save peak % of RSS", "train peak MiB")
PROBE = "layers.0.mlp.c_fc.weight"  # the parameter compared after load


def build(system: str, cfg: GPTConfig, world: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh

    if system == "scalestack":
        from scalestack import fully_shard
    else:
        from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = GPT(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def probe(model, opt) -> tuple[torch.Tensor, torch.Tensor]:
    """Local pieces of PROBE and its exp_avg (PieceTensor / DTensor -> to_local), copied."""
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    return local(model.state_dict()[PROBE]), local(opt.state[dict(model.named_parameters())[PROBE]]["exp_avg"])


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def worker(rank: int, world: int, port: int, system: str, cfg: GPTConfig, path: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import scalestack.checkpoint as ssc

    base = rss_bytes()
    model, opt = build(system, cfg, world, seed=0)
    x = torch.randint(0, cfg.vocab_size, (LOCAL_BATCH, cfg.block_size), generator=torch.Generator().manual_seed(rank))
    dist.barrier()
    reset_peak_rss()
    model(x, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    res = {"train peak MiB": (peak_rss_bytes() - base) / MIB}
    saved = probe(model, opt)

    def save():
        if system == "scalestack":
            ssc.save(path, model, opt)
        else:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

    gc.collect()
    dist.barrier()
    start = rss_bytes()
    reset_peak_rss()
    res["save s"] = timed(save)
    res["save peak MiB"] = (peak_rss_bytes() - start) / MIB
    res["save peak % of RSS"] = 100 * (peak_rss_bytes() - start) / start
    res["MiB written"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / MIB
    del model, opt
    gc.collect()
    model, opt = build(system, cfg, world, seed=1)  # fresh, with other values than those saved

    def load():
        if system == "scalestack":
            ssc.load(path, model, opt, verify=not NO_VERIFY)
        else:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    res["load s"] = timed(load)
    res["ok"] = all(torch.equal(a, b) for a, b in zip(saved, probe(model, opt)))
    results.put((rank, res))
    dist.destroy_process_group()


def run(system: str, world: int, cfg: GPTConfig, path: str) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, system, cfg, path, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = [v for _, v in sorted(results.get(timeout=900) for _ in range(world))]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"{system} rank exited with {p.exitcode}")
    return {**{k: max(o[k] for o in out) for k in COLUMNS}, "ok": all(o["ok"] for o in out)}  # max over ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--systems", default="scalestack,fsdp2")
    ap.add_argument("--small", action="store_true", help="a tiny model, for a smoke test")
    ap.add_argument("--dir", help="where checkpoints are written (default: a temporary directory)")
    ap.add_argument("--no-verify", action="store_true", help="scalestack loads without checking CRC-32s")
    args = ap.parse_args()
    if args.no_verify:
        os.environ["SCALESTACK_BENCH_NO_VERIFY"] = "1"
    systems, cfg = args.systems.split(","), CFGS["small" if args.small else "full"]
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by workers: freed tensors leave RSS
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    with torch.device("meta"):
        nparams = sum(p.numel() for p in GPT(cfg).parameters())
    print(
        f"model: GPT {cfg.n_layer}x{cfg.n_embd}, vocab {cfg.vocab_size}, {nparams:,} params; W={args.world} gloo/CPU, "
        f"AdamW after 1 step (batch {LOCAL_BATCH}x{cfg.block_size}), torch {torch.__version__}; in {root}"
    )
    acc: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for s in systems[r % len(systems) :] + systems[: r % len(systems)]:
            path = root / f"{s}-round{r}"
            try:
                res = run(s, args.world, cfg, str(path))
            finally:
                shutil.rmtree(path, ignore_errors=True)
            acc[s].append(res)
            print(
                f"  round {r + 1}: {s:10s} save {res['save s']:.3f} s, load {res['load s']:.3f} s, "
                f"loaded == saved: {res['ok']}",
                flush=True,
            )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    agg = {k: statistics.median if k.endswith(" s") else max for k in COLUMNS}  # times: median; peaks: max
    rows = {s: {k: agg[k](x[k] for x in acc[s]) for k in COLUMNS} for s in systems}
    print(f"\n| system | {' | '.join(COLUMNS)} | loaded == saved |\n" + "|---" * (len(COLUMNS) + 2) + "|")
    for s in systems:
        cells = [f"{v:.3f}" if k.endswith(" s") else f"{v:.1f}" for k, v in rows[s].items()]
        print(f"| {s} | {' | '.join(cells)} | {all(x['ok'] for x in acc[s])} |")
    if "scalestack" in rows and "fsdp2" in rows:
        a, b = rows["scalestack"], rows["fsdp2"]
        cells = ["" if "%" in k else f"{a[k] / b[k]:.2f}x" for k in COLUMNS]
        print(f"| scalestack/fsdp2 | {' | '.join(cells)} | |")


if __name__ == "__main__":
    main()
