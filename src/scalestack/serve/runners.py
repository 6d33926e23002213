"""The model behind the engine: prefill a sequence's new tokens on top of its KV cache, and decode one token
for a batch of sequences of different lengths, each against its own cache.

Our GPT decodes *ragged*: the projections and MLPs run as one batch, attention runs per sequence against its
own cache, so nothing is padded or copied. A Hugging Face model decodes a left-padded batch through its own
``DynamicCache`` (its attention is not ours to split).
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
import torch.nn.functional as F

from ..models.gpt import GPT
from ..models.gpt import KVCache as GPTCache
from .kv_cache import KVCache


class Runner(Protocol):
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_positions: int

    def prefill(self, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[vocab]`` after ``ids`` (1-D), appended at ``cache.length`` (the cache has room)."""

    def decode(self, caches: list[KVCache], ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, vocab]`` after one token per sequence, appended to each cache."""


class GPTRunner:
    def __init__(self, model: GPT):
        cfg = model.cfg
        self.model = model.eval()
        self.layers, self.kv_heads, self.head_dim = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        p = model.lm_head.weight
        self.dtype, self.device = p.dtype, p.device
        self.max_positions = cfg.block_size

    def prefill(self, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
        view = GPTCache.over(cache.keys, cache.values, cache.length)
        logits = self.model(ids[None].to(self.device), cache=view)[0, -1]
        cache.length = view.length
        return logits

    def decode(self, caches: list[KVCache], ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        positions = torch.tensor([c.length for c in caches], device=self.device)
        x = m.wte(ids.to(self.device)) + m.wpe(positions)  # [B, C]
        B, C = x.shape
        H, D = self.kv_heads, self.head_dim
        for layer, block in enumerate(m.layers):
            q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, 3, H, D).unbind(1)
            out = torch.empty(B, H, D, dtype=x.dtype, device=x.device)
            for b, cache in enumerate(caches):  # ragged: each sequence against its own cache, no padding
                end = cache.length + 1
                keys, values = cache.keys[layer][0], cache.values[layer][0]
                keys[:, end - 1], values[:, end - 1] = k[b], v[b]
                out[b] = F.scaled_dot_product_attention(q[b][:, None], keys[:, :end], values[:, :end])[:, 0]
            x = x + block.attn.c_proj(out.reshape(B, C))
            x = x + block.mlp(block.ln_2(x))
        for cache in caches:
            cache.length += 1
        return m.lm_head(m.ln_f(x))


class HFRunner:
    def __init__(self, model: torch.nn.Module):
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise ValueError(f"{type(model).__name__} uses sliding-window attention, which this server does not "
                             "cache yet; serve a model with full attention")  # fmt: skip
        self.model = model.eval()
        self.layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.max_positions = getattr(cfg, "max_position_embeddings", None) or 2**31
        params = inspect.signature(model.forward).parameters  # transformers 5.x renamed past_key_values
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def _cache(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()
        if keys and keys[0].shape[2]:  # an empty prefix is an empty cache
            for layer, (k, v) in enumerate(zip(keys, values)):
                cache.update(k, v, layer)
        return cache

    def _run(self, past, **inputs):
        """The model's logits; ``past`` (a DynamicCache) has grown by the new tokens."""
        return self.model(**inputs, **{self.cache_arg: past}, use_cache=True).logits

    @staticmethod
    def _new_kv(cache, start: int, end: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = cache.layers
        return [layer.keys[:, :, start:end] for layer in layers], [layer.values[:, :, start:end] for layer in layers]

    def prefill(self, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
        start, n = cache.length, ids.numel()
        past = self._cache([k[:, :, :start] for k in cache.keys], [v[:, :, :start] for v in cache.values])
        positions = torch.arange(start, start + n, device=self.device)[None]
        logits = self._run(past, input_ids=ids[None].to(self.device), position_ids=positions, logits_to_keep=1)
        keys, values = self._new_kv(past, start, start + n)
        for dst, src in zip(cache.keys + cache.values, keys + values):
            dst[:, :, start : start + n] = src
        cache.length = start + n
        return logits[0, -1]

    def decode(self, caches: list[KVCache], ids: torch.Tensor) -> torch.Tensor:
        lengths = [c.length for c in caches]
        B, L = len(caches), max(lengths)
        keys, values = [], []
        for layer in range(self.layers):  # left-padded: every sequence's last key at position L-1
            k = torch.zeros(B, self.kv_heads, L, self.head_dim, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            for b, cache in enumerate(caches):
                k[b, :, L - lengths[b] :] = cache.keys[layer][0, :, : lengths[b]]
                v[b, :, L - lengths[b] :] = cache.values[layer][0, :, : lengths[b]]
            keys.append(k)
            values.append(v)
        mask = torch.zeros(B, L + 1, dtype=torch.long, device=self.device)
        for b, n in enumerate(lengths):
            mask[b, L - n :] = 1
        positions = torch.tensor(lengths, device=self.device)[:, None]
        past = self._cache(keys, values)
        logits = self._run(past, input_ids=ids[:, None].to(self.device), attention_mask=mask, position_ids=positions)
        new_keys, new_values = self._new_kv(past, L, L + 1)
        for b, cache in enumerate(caches):
            for layer in range(self.layers):
                cache.keys[layer][0, :, lengths[b]] = new_keys[layer][b, :, 0]
                cache.values[layer][0, :, lengths[b]] = new_values[layer][b, :, 0]
            cache.length += 1
        return logits[:, -1]
