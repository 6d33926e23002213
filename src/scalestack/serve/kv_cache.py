"""KV caches kept between turns: append-only per conversation, shared by the responses of one chain, under
one byte budget with LRU eviction of idle caches and a time to live.

A cache holds keys and values of every layer for a token sequence, in buffers that grow by doubling. A
response remembers (cache, length): its prefix. A continuation extends the cache in place when it starts
at the written frontier (the usual chain); a second branch from an earlier response copies the prefix
(copy on write), so no response's prefix is ever overwritten. An evicted cache is freed; responses that
pointed at it fall back to a full prefill of their token ids, which gives the same output.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

MIN_CAPACITY = 256


class KVCache:
    """Keys and values of one token sequence: per layer ``[1, kv_heads, capacity, head_dim]``."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.length = 0  # the written frontier: positions [0, length) hold valid keys and values
        self.users = 0  # generations extending it now (an in-use cache is never evicted)
        self.evicted = False

    @property
    def nbytes(self) -> int:
        layers, heads, dim = self.shape
        return 2 * layers * heads * dim * self.capacity * torch.finfo(self.dtype).bits // 8

    @staticmethod
    def capacity_after(capacity: int, length: int) -> int:
        """The capacity that holds ``length`` positions, grown from ``capacity`` by doubling."""
        return capacity if length <= capacity else max(length, 2 * capacity, MIN_CAPACITY)

    def capacity_for(self, length: int) -> int:
        return self.capacity_after(self.capacity, length)

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions (doubling, so appends cost amortized O(1))."""
        if length <= self.capacity:
            return
        capacity = self.capacity_for(length)
        layers, heads, dim = self.shape
        new = lambda: torch.empty(1, heads, capacity, dim, dtype=self.dtype, device=self.device)  # noqa: E731
        keys, values = [new() for _ in range(layers)], [new() for _ in range(layers)]
        for old, fresh in zip(self.keys + self.values, keys + values):
            fresh[:, :, : self.length] = old[:, :, : self.length]
        self.keys, self.values, self.capacity = keys, values, capacity

    def prefix_copy(self, length: int) -> KVCache:
        copy = KVCache(*self.shape, self.dtype, self.device)
        copy.reserve(length)
        for src, dst in zip(self.keys + self.values, copy.keys + copy.values):
            dst[:, :, :length] = src[:, :, :length]
        copy.length = length
        return copy

    def free(self) -> None:
        self.keys, self.values, self.capacity, self.length, self.evicted = [], [], 0, 0, True


class KVPool:
    """Every live cache, most recently used last; evicts idle ones beyond ``budget`` bytes or ``ttl`` seconds.
    Thread-safe: the engine allocates and extends, the server frees on DELETE."""

    def __init__(self, budget: int, ttl: float = 600.0):
        if budget < 0:
            raise ValueError(f"the KV budget must be >= 0 bytes, got {budget}")
        self.budget, self.ttl = budget, ttl
        self._caches: OrderedDict[int, tuple[KVCache, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self._caches)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(cache.nbytes for cache, _ in self._caches.values())

    def add(self, cache: KVCache) -> None:
        with self._lock:
            self._caches[id(cache)] = (cache, time.monotonic())

    def acquire(self, cache: KVCache) -> bool:
        """Mark a live cache in use (atomically with eviction); False if it was evicted already."""
        with self._lock:
            if cache.evicted:
                return False
            cache.users += 1
            return True

    def release(self, cache: KVCache) -> None:
        with self._lock:
            cache.users -= 1
        self.touch(cache)

    def touch(self, cache: KVCache) -> None:
        with self._lock:
            if id(cache) in self._caches:
                self._caches[id(cache)] = (cache, time.monotonic())
                self._caches.move_to_end(id(cache))

    def drop(self, cache: KVCache) -> None:
        """Free a cache no response refers to any more (unless a generation still extends it)."""
        with self._lock:
            if cache.users == 0 and self._caches.pop(id(cache), None) is not None:
                cache.free()

    def fit(self, extra: int = 0, force: bool = False) -> bool:
        """Make room for ``extra`` more bytes: evict idle caches past their time to live, then idle ones least
        recently used first, but only if that makes ``extra`` fit (or ``force``: as many as it takes).
        Whether it fits now."""
        now = time.monotonic()
        with self._lock:
            total = sum(cache.nbytes for cache, _ in self._caches.values())
            idle = [(key, cache, used) for key, (cache, used) in self._caches.items() if cache.users == 0]
            for key, cache, used in idle:
                if now - used > self.ttl:
                    total -= self._evict(key, cache)
            idle = [(key, cache) for key, cache, used in idle if not cache.evicted]
            reclaimable = sum(cache.nbytes for _, cache in idle)
            if total + extra > self.budget and (force or total - reclaimable + extra <= self.budget):
                for key, cache in idle:  # least recently used first
                    if total + extra <= self.budget:
                        break
                    total -= self._evict(key, cache)
            return total + extra <= self.budget

    def _evict(self, key: int, cache: KVCache) -> int:
        size = cache.nbytes
        del self._caches[key]
        cache.free()
        self.evictions += 1
        return size

    def measure(self) -> int:
        """The live bytes now (also kept as ``peak_bytes``)."""
        total = self.nbytes
        self.peak_bytes = max(self.peak_bytes, total)
        return total
