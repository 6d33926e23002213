"""A small GPT in the style of nanoGPT: a config dataclass and a model a reader holds in their head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 97
    block_size: int = 32
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 60
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class KVCache:
    """Keys and values of every layer for a batch of sequences decoded together.

    Preallocated to ``max_len`` positions so shapes stay fixed while decoding; ``reorder`` picks (and may
    repeat) batch rows, which is how beam search follows the beams it keeps.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if max_len > cfg.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {cfg.block_size}")
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.length = 0
        self.max_len = max_len

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> KVCache:
        """A cache over existing per-layer ``[batch, heads, max_len, head_dim]`` buffers holding ``length``
        positions (a server keeps its own buffers between requests)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.length, cache.max_len = keys, values, length, keys[0].shape[2]
        return cache

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (a row may appear several times: beams of one prompt)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_projection = True  # GPT-2's scaled init

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.keys[layer][:, :, :T] = k
                cache.values[layer][:, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = cache.length + T
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            # query i (absolute position length+i) sees keys 0..length+i
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(cache.length) if T > 1 else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:  # tied last, as Hugging Face does: the embedding's values are kept
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, m: nn.Module) -> None:
        """GPT-2's init of one module's own parameters (``scalestack.materialize`` replays it on meta models)."""
        if isinstance(m, nn.Linear):
            scaled = getattr(m, "residual_projection", False)
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer) if scaled else 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (default: block_size)."""
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size, p.dtype, p.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits for ``idx`` (or the loss against ``targets``). With ``cache``, ``idx`` continues the cached
        sequences: its tokens take the next positions and the cache grows by ``idx.shape[1]``."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        limit = self.cfg.block_size if cache is None else cache.max_len
        if start + T > limit:
            raise ValueError(f"sequence length {start + T} exceeds the limit {limit} (block_size or cache max_len)")
        x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))
        for i, block in enumerate(self.layers):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
