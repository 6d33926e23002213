"""Runs the comparison: every (round, W, system) in fresh processes, so each peak is that system's alone,
with the order of systems rotated every round so that drift on a shared machine hits all of them alike."""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models.gpt import GPT, GPTConfig
from .counters import CommCounter, CopyCounter, peak_rss_bytes, reset_peak_rss, rss_bytes
from .systems import SYSTEMS, available, wrap

MODELS = {  # the reference GPT of the targets (~30M parameters), and smaller ones for quick runs and tests
    "gpt-30m": GPTConfig(vocab_size=8192, block_size=128, n_layer=8, n_head=8, n_embd=512),
    "gpt-12m": GPTConfig(vocab_size=4096, block_size=128, n_layer=6, n_head=6, n_embd=384),
    "gpt-tiny": GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64),
}
WARMUP_STEPS = 2  # lazy init and optimizer-state allocation happen here, outside the timing and the peak


@dataclass
class BenchResult:
    """One system at one W over all rounds: per-step times (the slowest rank's), the largest per-rank peak
    above the memory before the model was built, and per-step bytes (rank 0's)."""

    system: str
    world: int
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    phase_peaks: list[dict[str, int]] = field(default_factory=list)  # per round: forward, backward, update
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def peak(self) -> int:
        return max(self.peaks)

    @property
    def phases(self) -> dict[str, int]:
        return {k: max(p[k] for p in self.phase_peaks) for k in self.phase_peaks[0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, system: str, model_name: str, batch: int, steps: int,
            device_type: str, results) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cuda" if device_type == "cuda" else "cpu")  # fmt: skip
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    counter = CommCounter()  # before any system binds torch.distributed's functions
    if system == "deepspeed":
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
    config = MODELS[model_name]
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    torch.manual_seed(0)
    model = GPT(config).to(device)
    run = wrap(system, model, list(model.layers), device, 1e-4)
    g = torch.Generator().manual_seed(100 + rank)

    def batch_of_tokens() -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=g).to(device)

    def reset_peak() -> None:
        torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()

    def peak_now() -> int:
        return (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base

    times = []
    for i in range(steps + WARMUP_STEPS):
        dist.barrier()
        if i == WARMUP_STEPS:
            reset_peak()
        t0 = time.perf_counter()
        run.backward(run.forward(batch_of_tokens()))
        run.update()
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    peak = peak_now()
    counter.enabled = True  # one more step, counted, its peak phase by phase (the counters slow it: not timed)
    copies = CopyCounter(counter)
    phases = {}
    x = batch_of_tokens()
    with copies:
        reset_peak()
        loss = run.forward(x)
        phases["forward"] = peak_now()
        reset_peak()
        run.backward(loss)
        phases["backward"] = peak_now()
    reset_peak()
    run.update()
    phases["update"] = peak_now()
    counter.enabled = False
    if system == "ddp":  # one all-reduce of every gradient, in buckets
        counter.bytes["ar"] = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    results.put((rank, {"times": times, "peak": peak, "phases": phases, "copy": copies.bytes, **counter.bytes}))
    dist.destroy_process_group()


def _run_once(system: str, world: int, model: str, batch: int, steps: int, device: str, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, system, model, batch, steps, device, results))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    out = {}
    try:
        deadline = time.monotonic() + timeout
        while len(out) < world:
            if any(p.exitcode not in (None, 0) for p in procs):
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"{system} at W={world}: a rank failed (exit codes {codes}; traceback above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{system} at W={world} did not finish within {timeout:.0f} s")
            try:
                rank, res = results.get(timeout=1)
                out[rank] = res
            except Exception:  # queue.Empty: poll the processes again
                continue
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {
        "times": [max(ts) for ts in zip(*(out[r]["times"] for r in range(world)))],  # a step ends on the slowest
        "peak": max(out[r]["peak"] for r in range(world)),
        "phases": {k: max(out[r]["phases"][k] for r in range(world)) for k in out[0]["phases"]},
        "bytes": {k: out[0][k] for k in ("ag", "rs", "ar", "copy")},
    }


def run_bench(systems: list[str], worlds: list[int], *, model: str = "gpt-30m", batch: int = 4, rounds: int = 3,
              steps: int = 5, device: str = "cpu", timeout: float = 900.0, log=print) -> list[BenchResult]:  # fmt: skip
    """All (W, system) pairs, ``rounds`` times each, in rotated order; results in the order asked."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown systems {unknown}: choose from {', '.join(SYSTEMS)}")
    missing = [s for s in systems if not available(s)]
    if missing:
        raise ValueError(f"{', '.join(missing)} is not installed: pip install 'scalestack[bench]', or leave it out")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise ValueError(f"W={max(worlds)} needs that many GPUs; {torch.cuda.device_count()} are visible")
    if min(worlds) < 1 or rounds < 1 or steps < 1 or batch < 1:
        raise ValueError("worlds, rounds, steps and batch must all be at least 1")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by workers: freed tensors leave RSS
    results = {(w, s): BenchResult(s, w) for w in worlds for s in systems}
    for r in range(rounds):
        for w in worlds:
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for s in order:
                res = _run_once(s, w, model, batch, steps, device, timeout)
                acc = results[(w, s)]
                acc.times += res["times"]
                acc.peaks.append(res["peak"])
                acc.phase_peaks.append(res["phases"])
                acc.bytes = res["bytes"]
                log(f"  round {r + 1}  W={w}  {s:10s}  median step {statistics.median(res['times']) * 1e3:8.1f} ms"
                    f"  peak {res['peak'] / 2**20:7.1f} MiB")  # fmt: skip
    return [results[(w, s)] for w in worlds for s in systems]
