"""The batched generation engine: one thread that admits requests, prefills their new tokens on top of a
cached prefix (in chunks, between decode steps), and decodes all running sequences together, one token
per step (continuous batching: a sequence joins and leaves the batch at any step).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from .kv_cache import MIN_CAPACITY, KVCache, KVPool
from .runners import Runner
from .sampling import SamplingParams, sample
from .text_stream import TextStream

log = logging.getLogger("scalestack.serve")


@dataclass(eq=False)  # compared by identity (its fields hold tensors)
class Generation:
    """One request to the engine. ``prefix`` is (cache, length) of a cached prefix of ``ids``, or None;
    events go to ``events`` on the submitting loop: ("start", cached_tokens), ("text", delta) and
    ("done", finish_reason) with reason "stop", "length", "cancelled" or "error: ..."."""

    ids: torch.Tensor  # the whole context, int64
    params: SamplingParams
    prefix: tuple[KVCache, int] | None = None
    generate: bool = True  # False: prefill only (warm the cache)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    decode: object = None  # ids -> text
    cancelled: bool = False
    # filled by the engine
    cache: KVCache | None = None
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    stop_token: int | None = None  # the end-of-turn token that ended it (in the token ids, not in the text)
    _generator: torch.Generator | None = None
    _next: int | None = None  # the sampled token not yet fed back

    def emit(self, *event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, runner: Runner, pool: KVPool, max_batch: int = 32, prefill_chunk: int = 512):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.runner, self.pool = runner, pool
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self._inbox: queue.Queue[Generation | None] = queue.Queue()
        self._waiting: list[Generation] = []
        self._prefilling: list[Generation] = []
        self._decoding: list[Generation] = []
        r = runner
        self.bytes_per_token = 2 * r.layers * r.kv_heads * r.head_dim * torch.finfo(r.dtype).bits // 8
        self._thread = threading.Thread(target=self._run, name="scalestack-engine", daemon=True)
        self.steps = 0
        self.prefilled_tokens = 0
        self.reused_tokens = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, gen: Generation) -> None:
        self._inbox.put(gen)

    @property
    def busy(self) -> int:
        return len(self._waiting) + len(self._prefilling) + len(self._decoding) + self._inbox.qsize()

    # --- the loop (engine thread) ---

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                idle = not (self._waiting or self._prefilling or self._decoding)
                try:
                    while True:
                        gen = self._inbox.get(block=idle)
                        if gen is None:
                            return
                        self._waiting.append(gen)
                        idle = False
                except queue.Empty:
                    pass
                try:
                    self._step()
                except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
                    log.exception("engine step failed")
                    for gen in self._prefilling + self._decoding:
                        self._finish(gen, f"error: {type(e).__name__}: {e}")
                    self._prefilling, self._decoding = [], []

    def _step(self) -> None:
        for gen in [g for g in self._waiting + self._prefilling + self._decoding if g.cancelled]:
            self._finish(gen, "cancelled")
        self._admit()
        if self._prefilling:  # one chunk of one prompt per step: decoding sequences keep streaming
            self._prefill_chunk(self._prefilling[0])
        if self._decoding:
            self._decode_step()

    def _admit(self) -> None:
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.max_batch:
            gen = self._waiting[0]
            if not self.pool.fit(self._bytes_for(gen)) and (self._prefilling or self._decoding):
                return  # over the KV budget: wait for running sequences to finish
            self._waiting.pop(0)
            self._attach(gen)
            if gen.cache.length < gen.ids.numel():
                self._prefilling.append(gen)
            else:  # a prefill-only request whose context is all cached already
                self._finish(gen, "stop")

    def _bytes_for(self, gen: Generation) -> int:
        """An upper bound of what admitting ``gen`` adds: a copied prefix or a capacity doubling each hold at
        most the tokens it needs, plus the minimum capacity."""
        return self.bytes_per_token * (2 * self.tokens_for(gen) + MIN_CAPACITY)

    def tokens_for(self, gen: Generation) -> int:
        return min(gen.ids.numel() + (gen.params.max_tokens if gen.generate else 0), self.runner.max_positions)

    def _attach(self, gen: Generation) -> None:
        """Give ``gen`` a cache: its prefix's, extended in place (the prefix ends at the written frontier and
        nobody else extends it), a copy of the prefix (a branch), or a new one (no prefix, or evicted)."""
        r = self.runner
        if gen.prefix is not None and not gen.prefix[0].evicted:
            cache, length = gen.prefix
            if cache.length != length or cache.users:
                cache = cache.prefix_copy(length)
                self.pool.add(cache)
        else:
            cache, length = KVCache(r.layers, r.kv_heads, r.head_dim, r.dtype, r.device), 0
            self.pool.add(cache)
        if gen.generate and length == gen.ids.numel():  # nothing new: recompute the last token for its logits
            length -= 1
            cache.length = length
        cache.users += 1
        self.pool.touch(cache)
        cache.reserve(self.tokens_for(gen))
        self.pool.measure()
        gen.cache, gen.cached_tokens = cache, length
        gen.stream = TextStream(gen.decode, gen.params.stop)
        gen._generator = gen.params.generator()
        self.reused_tokens += length
        gen.emit("start", length)

    def _prefill_chunk(self, gen: Generation) -> None:
        cache = gen.cache
        end = min(gen.ids.numel(), cache.length + self.prefill_chunk)
        self.prefilled_tokens += end - cache.length
        logits = self.runner.prefill(cache, gen.ids[cache.length : end])
        if cache.length < gen.ids.numel():
            return
        self._prefilling.remove(gen)
        if not gen.generate:
            self._finish(gen, "stop")
            return
        self._decoding.append(gen)
        self._take(gen, logits)

    def _decode_step(self) -> None:
        batch = list(self._decoding)
        logits = self.runner.decode([g.cache for g in batch], torch.tensor([g._next for g in batch]))
        self.steps += 1
        for gen, row in zip(batch, logits):
            self._take(gen, row)

    def _take(self, gen: Generation, logits: torch.Tensor) -> None:
        """Sample the next token, stream its text, and end the generation when it is due. The last sampled
        token is never fed back: the response's token ids hold it, and the next turn's prefill computes its
        keys along with the new tokens."""
        token = sample(logits, gen.params, gen._generator)
        if token in gen.params.stop_token_ids:
            gen.stop_token = token
            self._finish(gen, "stop")
            return
        gen.output_ids.append(token)
        delta = gen.stream.push(token)
        if delta:
            gen.emit("text", delta)
        if gen.stream.stopped_by is not None:
            self._finish(gen, "stop")
        elif len(gen.output_ids) >= gen.params.max_tokens or gen.cache.length + 1 >= self.runner.max_positions:
            rest = gen.stream.finish()
            if rest:
                gen.emit("text", rest)
            self._finish(gen, "length")
        else:
            gen._next = token

    def _finish(self, gen: Generation, reason: str) -> None:
        for group in (self._waiting, self._prefilling, self._decoding):
            if gen in group:
                group.remove(gen)
        if gen.cache is not None:
            gen.cache.users -= 1
            self.pool.touch(gen.cache)
        gen.emit("done", reason)
        self.pool.fit()
