"""One training step, side by side: scalestack vs PyTorch FSDP2 (each also with activation checkpointing on
every block) vs DDP, same model, data and W, on gloo (or NCCL with --device cuda).

Each (round, system) runs in fresh processes, so peak memory is that system's alone; rounds rotate the
order of systems so drift on a shared machine hits all of them alike. Printed per system:
  step       median wall time of a training step (forward, backward, optimizer) over all rounds
  peak MiB   peak resident memory per rank during the timed steps (after two warm-up steps), above the
             process's memory before the model was built (glibc is told to return freed blocks, so this
             follows live tensors); on CUDA, peak allocated bytes
  AG/RS/AR   bytes all-gathered (output size), reduce-scattered (input size), all-reduced, per step
  copy       bytes written in forward + backward by copy kernels outside collectives (copy_, _foreach_copy_,
             split_with_sizes_copy, chunk_cat, _to_copy); the model itself calls none, the optimizer is left out

    python benchmarks/step.py [--rounds 3] [--steps 6] [--world 2] [--systems scalestack,fsdp2,...] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from scalestack.models.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=4096, block_size=128, n_layer=6, n_head=6, n_embd=384)
LOCAL_BATCH = 4
COPY_OPS = {"copy_", "_foreach_copy_", "split_with_sizes_copy", "_chunk_cat", "chunk_cat", "_to_copy"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM) at the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


class CopyCounter(TorchDispatchMode):
    """Bytes written by copy kernels (counted on their outputs), except inside a collective: gloo emulates
    reduce-scatter as all-reduce + a copy of the local chunk, which is part of the collective."""

    def __init__(self, comm: CommCounter):
        super().__init__()
        self.bytes = 0
        self.comm = comm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in COPY_OPS and not self.comm.inside:
            targets = kwargs.get("out", out) if kwargs else out
            for t in targets if isinstance(targets, (list, tuple)) else [targets]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


class CommCounter:
    """Counts bytes of the collectives the frameworks call through torch.distributed's Python API."""

    NAMES = {
        "all_gather_single": "ag",
        "all_gather_into_tensor": "ag",
        "reduce_scatter_single": "rs",
        "reduce_scatter_tensor": "rs",
        "all_reduce": "ar",
    }

    def __init__(self):
        self.bytes = {"ag": 0, "rs": 0, "ar": 0}
        self.enabled = False
        self.inside = False  # True while a collective call or a wait on one runs
        for name, kind in self.NAMES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind))
        wait = dist.Work.wait

        def counted_wait(work, *args, **kwargs):
            self.inside = True
            try:
                return wait(work, *args, **kwargs)
            finally:
                self.inside = False

        dist.Work.wait = counted_wait

    def _wrap(self, fn, kind):
        def counted(*args, **kwargs):
            if self.enabled:
                # the tensor whose size is the traffic: the output of a gather, the input of a reduce
                index, key = {"ag": (0, "output_tensor"), "rs": (1, "input"), "ar": (0, "tensor")}[kind]
                t = args[index] if len(args) > index else kwargs[key]
                self.bytes[kind] += t.numel() * t.element_size()
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = False

        return counted


def build(system: str, world: int, device: torch.device):
    torch.manual_seed(0)
    model = GPT(CFG).to(device)
    system, _, ac = system.partition("+")
    if ac:  # activation checkpointing on every block, the same wrapper for both systems
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.layers = torch.nn.ModuleList(checkpoint_wrapper(b) for b in model.layers)
    if system in ("scalestack", "fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh

        if system == "scalestack":
            from scalestack import fully_shard
        else:
            from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif system == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    else:
        raise ValueError(f"unknown system {system!r}")
    return model


def ddp_counting_hook(counter: CommCounter):
    def hook(state, bucket):
        t = bucket.buffer()
        if counter.enabled:
            counter.bytes["ar"] += t.numel() * t.element_size()
        t.div_(dist.get_world_size())
        fut = dist.all_reduce(t, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return hook


def worker(rank: int, world: int, port: int, system: str, steps: int, device_type: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    counter = CommCounter()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    model = build(system, world, device)
    if system == "ddp":
        model.register_comm_hook(None, ddp_counting_hook(counter))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(100 + rank)

    def step(copies: CopyCounter | None = None):
        x = torch.randint(0, CFG.vocab_size, (LOCAL_BATCH, CFG.block_size), generator=g).to(device)
        if copies is None:
            model(x, x).backward()
        else:
            with copies:
                model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 2):
        dist.barrier()
        if i == 2:  # the training peak, not model construction or optimizer-state allocation
            torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps (optimizer state allocation, lazy init)
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    counter.enabled = True
    copies = CopyCounter(counter)
    grad_path = {}
    if system.startswith("scalestack"):
        import scalestack as ss

        ss.reset_traffic()
    step(copies)
    if system.startswith("scalestack"):
        t = ss.traffic()
        grad_path = {"zeroed": t.zero_bytes, "added": t.add_bytes}
    counter.enabled = False
    results.put((rank, {"times": times, "peak": peak, "copy": copies.bytes, **counter.bytes, **grad_path}))
    dist.destroy_process_group()


def run(system: str, world: int, steps: int, device_type: str) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, world, port, system, steps, device_type, results)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=900) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"{system} rank exited with {p.exitcode}")
    return {
        "times": [max(ts) for ts in zip(*(out[r]["times"] for r in range(world)))],  # a step ends on the slowest
        "peak": max(out[r]["peak"] for r in range(world)),
        **{k: out[0][k] for k in ("ag", "rs", "ar", "copy", "zeroed", "added") if k in out[0]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--systems", default="scalestack,fsdp2,scalestack+ac,fsdp2+ac,ddp", help="+ac: checkpointing")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one rank per GPU, NCCL")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    systems = args.systems.split(",")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by workers: freed tensors leave RSS
    nparams = sum(p.numel() for p in GPT(CFG).parameters())
    backend = "NCCL/CUDA" if args.device == "cuda" else "gloo/CPU"
    print(
        f"model: GPT {CFG.n_layer}x{CFG.n_embd}, vocab {CFG.vocab_size}, {nparams / 1e6:.1f}M params; "
        f"W={args.world} on {backend}, local batch {LOCAL_BATCH}x{CFG.block_size}, AdamW, torch {torch.__version__}"
    )
    acc = {s: {"times": [], "peak": []} for s in systems}
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for s in order:
            res = run(s, args.world, args.steps, args.device)
            acc[s]["times"] += res["times"]
            acc[s]["peak"].append(res["peak"])
            acc[s].update({k: v for k, v in res.items() if k not in ("times", "peak")})
            print(f"  round {r + 1}: {s:10s} median {statistics.median(res['times']) * 1e3:7.1f} ms", flush=True)
    ref = statistics.median(acc[systems[0]]["times"])
    ref_peak = max(acc[systems[0]]["peak"])
    mib = 2**20
    print()
    print(
        f"| system | step (ms) | step vs {systems[0]} | peak MiB/rank | peak vs {systems[0]} "
        "| AG MiB/step | RS MiB/step | AR MiB/step | copy MiB/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for s in systems:
        t, peak = statistics.median(acc[s]["times"]), max(acc[s]["peak"])
        a = acc[s]
        print(
            f"| {s} | {t * 1e3:.1f} | {t / ref:.2f}x | {peak / mib:.1f} | {peak / ref_peak:.2f}x | "
            f"{a['ag'] / mib:.2f} | {a['rs'] / mib:.2f} | {a['ar'] / mib:.2f} | {a['copy'] / mib:.2f} |"
        )
        summary[s] = {"step_s": t, "peak_bytes": peak, **{k: v for k, v in a.items() if k not in ("times", "peak")}}
    for s in systems:
        if "zeroed" in acc[s]:
            print(
                f"{s}: instead of copies, the gradient path zeroed {acc[s]['zeroed'] / mib:.2f} MiB (fresh grad "
                f"buffers) and autograd added {acc[s]['added'] / mib:.2f} MiB in place into their views per step"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
