"""What a step costs besides time, counted the same way for every system: bytes through collectives (at
torch.distributed's Python API, which all of them call), bytes written by copy kernels outside
collectives, and peak memory per process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

COPY_OPS = {"copy_", "_foreach_copy_", "split_with_sizes_copy", "_chunk_cat", "chunk_cat", "_to_copy"}
COPY_IN_OPS = {"all_gather_copy_in"}  # FSDP2's custom op: it returns (the filled input, an empty output)


class CommCounter:
    """Bytes all-gathered (output size), reduce-scattered (input size) and all-reduced per step, counted by
    wrapping torch.distributed's functions; ``inside`` is true while a collective or a wait on one runs."""

    NAMES = {  # name: (kind, position and keyword of the argument whose size is the traffic)
        "all_gather_single": ("ag", 0, "output_tensor"),
        "all_gather_into_tensor": ("ag", 0, "output_tensor"),
        "_all_gather_base": ("ag", 0, "output_tensor"),
        "all_gather": ("ag", 0, "tensor_list"),
        "reduce_scatter_single": ("rs", 1, "input"),
        "reduce_scatter_tensor": ("rs", 1, "input"),
        "_reduce_scatter_base": ("rs", 1, "input"),
        "reduce_scatter": ("rs", 1, "input_list"),
        "all_reduce": ("ar", 0, "tensor"),
    }

    def __init__(self) -> None:
        self.bytes = {"ag": 0, "rs": 0, "ar": 0}
        self.enabled = False
        self.inside = False
        for module in (dist, dist.distributed_c10d):  # some systems call the functions through the latter
            for name, (kind, index, key) in self.NAMES.items():
                if hasattr(module, name):
                    setattr(module, name, self._wrap(getattr(module, name), kind, index, key))
        wait = dist.Work.wait

        def counted_wait(work, *args, **kwargs):
            self.inside = True
            try:
                return wait(work, *args, **kwargs)
            finally:
                self.inside = False

        dist.Work.wait = counted_wait

    def _wrap(self, fn, kind: str, index: int, key: str):
        def counted(*args, **kwargs):
            outer = not self.inside  # torch's deprecated names call the new ones: count the outer call only
            if self.enabled and outer:
                sized = args[index] if len(args) > index else kwargs[key]
                for t in sized if isinstance(sized, (list, tuple)) else [sized]:
                    self.bytes[kind] += t.numel() * t.element_size()
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = not outer

        return counted


class CopyCounter(TorchDispatchMode):
    """Bytes written by copy kernels (counted on their outputs), except inside a collective: gloo emulates
    reduce-scatter as all-reduce + a copy of the local chunk, which is part of the collective."""

    def __init__(self, comm: CommCounter) -> None:
        super().__init__()
        self.bytes = 0
        self.comm = comm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in COPY_IN_OPS:
            self.bytes += out[0].numel() * out[0].element_size()
        elif name in COPY_OPS and not self.comm.inside:
            targets = kwargs.get("out", out) if kwargs else out
            for t in targets if isinstance(targets, (list, tuple)) else [targets]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


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
