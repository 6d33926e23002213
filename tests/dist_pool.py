"""A pool of gloo worker processes, started once per test module, that runs test functions on W ranks.

Workers join one process group on a loopback port the OS picked, and build sub-groups of sizes 1..N so a
test can run at any W <= N without new processes. A hang or an error on any rank fails the test within
``timeout`` seconds and the pool restarts, so later tests still run.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

_COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S)
    )
    groups = {w: dist.new_group(list(range(w))) for w in range(1, world + 1)}
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, w, args = task
        if rank >= w:
            results.put((rank, "ok", None))
            continue
        try:
            results.put((rank, "ok", fn(rank, w, groups[w], *args)))
        except BaseException:  # report everything, including assertion failures, to the parent
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int = 4, timeout: float = 120.0):
        self.world_size, self.timeout = world_size, timeout
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready")

    def _collect(self, what: str) -> list[Any]:
        out: dict[int, Any] = {}
        errors = []
        while len(out) < self.world_size:
            try:
                rank, status, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self.close()
                self._start()
                missing = sorted(set(range(self.world_size)) - out.keys())
                raise TimeoutError(f"ranks {missing} did not finish {what} within {self.timeout}s (hang?)") from None
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
                # other ranks may now wait forever in a collective: restart the pool
                self.close()
                self._start()
                raise AssertionError("a rank failed:\n" + "\n".join(errors))
            out[rank] = value
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
        """Run ``fn(rank, world, group, *args)`` on ranks ``0..world-1``; return their results."""
        if not 1 <= world <= self.world_size:
            raise ValueError(f"world must be in 1..{self.world_size}")
        for q in self._tasks:
            q.put((fn, world, args))
        return self._collect(fn.__name__)[:world]

    def close(self) -> None:
        for q in self._tasks:
            with contextlib.suppress(OSError, ValueError):
                q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
