"""The batched generation engine: one thread that admits requests, prefills their new tokens on top of a
cached prefix (in chunks, between decode steps), and decodes all running sequences together, one token
per step (continuous batching: a sequence joins and leaves the batch at any step).

A request that fails (a bad sampling state, a model error in its own prefill) ends with an error alone;
only an error in the shared decode step fails the sequences decoded in it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache, KVPool
from .runners import Runner
from .sampling import SamplingParams, sample
from .text_stream import TextStream

log = logging.getLogger("scalestack.serve")
SWEEP_SECONDS = 1.0  # an idle engine still expires caches past their time to live


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
    cache_length: int = 0  # the cache's positions that belong to this response, when it finished
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
        r = runner
        self.bytes_per_token = 2 * r.layers * r.kv_heads * r.head_dim * torch.finfo(r.dtype).bits // 8
        self._inbox: queue.Queue[Generation | None] = queue.Queue()
        self._waiting: list[Generation] = []
        self._prefilling: list[Generation] = []
        self._decoding: list[Generation] = []
        self._thread = threading.Thread(target=self._run, name="scalestack-engine", daemon=True)
        self.steps = 0  # decode steps
        self.largest_batch = 0  # the most sequences decoded in one step
        self._swept = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, gen: Generation) -> None:
        self._inbox.put(gen)

    # --- the loop (engine thread) ---

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    while True:
                        idle = not (self._waiting or self._prefilling or self._decoding)
                        gen = self._inbox.get(block=idle, timeout=SWEEP_SECONDS if idle else None)
                        if gen is None:
                            return
                        self._waiting.append(gen)
                except queue.Empty:
                    if not (self._waiting or self._prefilling or self._decoding):
                        self._sweep()
                        continue
                try:
                    self._step()
                except Exception as e:  # a bug in the shared decode step: fail what it ran, keep serving
                    log.exception("engine step failed")
                    for gen in list(self._decoding):
                        self._finish(gen, _error(e))

    def _sweep(self) -> None:
        """Expire idle caches past their time to live, at most once per SWEEP_SECONDS."""
        now = time.monotonic()
        if now - self._swept >= SWEEP_SECONDS:
            self._swept = now
            self.pool.fit()

    def _step(self) -> None:
        self._sweep()
        for gen in [g for g in self._waiting + self._prefilling + self._decoding if g.cancelled]:
            self._finish(gen, "cancelled")
        self._admit()
        if self._prefilling:  # one chunk of one prompt per step: decoding sequences keep streaming
            gen = self._prefilling[0]
            try:
                self._prefill_chunk(gen)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(gen, _error(e))
        if self._decoding:
            self._decode_step()

    def _admit(self) -> None:
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.max_batch:
            gen = self._waiting[0]
            prefix = gen.prefix if gen.prefix is not None and self.pool.acquire(gen.prefix[0]) else None
            running = bool(self._prefilling or self._decoding)
            if not self.pool.fit(self._growth(gen, prefix), force=not running) and running:
                if prefix is not None:
                    self.pool.release(prefix[0])
                return  # over the KV budget: wait for running sequences to finish
            self._waiting.pop(0)
            try:
                self._attach(gen, prefix)
            except Exception as e:
                log.exception("admission failed")
                self._finish(gen, _error(e))
                continue
            if gen.cache.length < gen.ids.numel():
                self._prefilling.append(gen)
            else:  # a prefill-only request whose context is all cached already
                self._finish(gen, "stop")

    def tokens_needed(self, context: int, new: int) -> int:
        """Cache positions for a context and up to ``new`` generated tokens (the model's positions at most)."""
        return min(context + new, self.runner.max_positions)

    def _tokens_for(self, gen: Generation) -> int:
        return self.tokens_needed(gen.ids.numel(), gen.params.max_tokens if gen.generate else 0)

    def _growth(self, gen: Generation, prefix: tuple[KVCache, int] | None) -> int:
        """The bytes admitting ``gen`` adds: its prefix's cache grown in place, or a new cache (a copy)."""
        need = self._tokens_for(gen)
        if prefix is not None and self._in_place(*prefix):
            return (prefix[0].capacity_for(need) - prefix[0].capacity) * self.bytes_per_token
        return KVCache.capacity_after(0, need) * self.bytes_per_token

    @staticmethod
    def _in_place(cache: KVCache, length: int) -> bool:
        """A continuation extends its prefix's cache when nobody wrote past the prefix and nobody else
        extends it now (the caller holds one use)."""
        return cache.length == length and cache.users == 1

    def _attach(self, gen: Generation, prefix: tuple[KVCache, int] | None) -> None:
        """Give ``gen`` a cache (``prefix``'s is already held): extended in place, a copy of the prefix (a
        branch), or a new one (no prefix, or it was evicted)."""
        r = self.runner
        gen._generator = gen.params.generator()
        gen.stream = TextStream(gen.decode, gen.params.stop)
        if prefix is not None:
            cache, length = prefix
            if not self._in_place(cache, length):
                source, cache = cache, cache.prefix_copy(length)
                self.pool.release(source)
                self._adopt(cache)
        else:
            cache, length = KVCache(r.layers, r.kv_heads, r.head_dim, r.dtype, r.device), 0
            self._adopt(cache)
        gen.cache = cache
        if gen.generate and length == gen.ids.numel():  # nothing new: recompute the last token for its logits
            length -= 1
            cache.length = length
        cache.reserve(self._tokens_for(gen))
        self.pool.measure()
        gen.cached_tokens = length
        gen.emit("start", length)

    def _adopt(self, cache: KVCache) -> None:
        cache.users = 1  # in use before anyone else can see it
        self.pool.add(cache)

    def _prefill_chunk(self, gen: Generation) -> None:
        cache = gen.cache
        end = min(gen.ids.numel(), cache.length + self.prefill_chunk)
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
        self.largest_batch = max(self.largest_batch, len(batch))
        for gen, row in zip(batch, logits):
            self._take(gen, row)

    def _take(self, gen: Generation, logits: torch.Tensor) -> None:
        """Sample the next token, stream its text, and end the generation when it is due. The last sampled
        token is never fed back: the response's token ids hold it, and the next turn's prefill computes its
        keys along with the new tokens."""
        try:
            token = sample(logits, gen.params, gen._generator)
        except Exception as e:  # this request's sampling state (non-finite logits): it alone fails
            self._finish(gen, _error(e))
            return
        if token in gen.params.stop_token_ids:
            gen.stop_token = token
            self._flush(gen)
            self._finish(gen, "stop")
            return
        gen.output_ids.append(token)
        delta = gen.stream.push(token)
        if delta:
            gen.emit("text", delta)
        if gen.stream.stopped_by is not None:
            self._finish(gen, "stop")
        elif len(gen.output_ids) >= gen.params.max_tokens or gen.cache.length + 1 >= self.runner.max_positions:
            self._flush(gen)
            self._finish(gen, "length")
        else:
            gen._next = token

    @staticmethod
    def _flush(gen: Generation) -> None:
        rest = gen.stream.finish()  # text held back for a stop string that did not come
        if rest:
            gen.emit("text", rest)

    def _finish(self, gen: Generation, reason: str) -> None:
        for group in (self._waiting, self._prefilling, self._decoding):
            if gen in group:
                group.remove(gen)
        if gen.cache is not None:
            gen.cache_length = gen.cache.length  # read here, on the thread that writes it
            self.pool.release(gen.cache)
        gen.emit("done", reason)


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {e}"
