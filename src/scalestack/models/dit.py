"""A small class-conditional diffusion transformer (DiT, Peebles & Xie 2023), plain PyTorch.

Patchify, a learned position embedding, a timestep and a class embedding summed into one conditioning
vector ``c``, then blocks whose LayerNorms are shifted and scaled by ``c`` with a gate that starts at zero
(adaLN-Zero: every block begins as the identity), then an adaLN head. Class ``num_classes`` is the null
class classifier-free guidance conditions the unconditional branch on.

The forward is ``embed -> for block in blocks: h = block(h, c) -> head``: the block stack is one plain loop,
the shape step caches (``scalestack.diffusion``) wrap and FSDP shards (``apply_fsdp`` finds ``blocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiTConfig:
    image_size: int = 16
    channels: int = 1
    patch: int = 2
    width: int = 96
    depth: int = 6
    heads: int = 4
    num_classes: int = 10
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if min(self.image_size, self.channels, self.patch, self.width, self.depth, self.heads) < 1:
            raise ValueError(f"every size of a DiTConfig must be >= 1, got {self}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of flow time t in [0, 1] (scaled to 0..1000, as diffusion models embed steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.ada = nn.Linear(d, 6 * d)  # shift, scale, gate for attention, then for the MLP

    def modulated_input(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The attention's input after the conditioning's shift and scale: what TeaCache measures."""
        shift, scale = self.ada(F.silu(c)).chunk(6, dim=-1)[:2]
        return _modulate(self.norm1(h), shift, scale)

    def forward(self, hidden_states: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The input is named ``hidden_states``, as diffusers names a block's input, so its cache hooks find it."""
        h = hidden_states
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        b, n, d = h.shape
        q, k, v = (
            self.qkv(_modulate(self.norm1(h), shift1, scale1)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        )
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + gate1[:, None] * self.proj(a.transpose(1, 2).reshape(b, n, d))
        m = self.fc2(F.gelu(self.fc1(_modulate(self.norm2(h), shift2, scale2)), approximate="tanh"))
        return h + gate2[:, None] * m


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch
        self.tokens = (cfg.image_size // p) ** 2
        self.patch_embed = nn.Linear(cfg.channels * p * p, d)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, d))
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, d)  # the last row: the null class of guidance
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, cfg.channels * p * p)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def reset_parameters(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, and zero for every gate and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_mlp[0], self.t_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for m in [*(b.ada for b in self.blocks), self.ada_out, self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, width) of the image patches and the conditioning (B, width) of time and class."""
        p, s = self.cfg.patch, self.cfg.image_size // self.cfg.patch
        b = x.shape[0]
        patches = x.reshape(b, -1, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, -1)
        c = self.t_mlp(timestep_embedding(t, 256).to(x.dtype)) + self.y_embed(y)
        return self.patch_embed(patches) + self.pos, c

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        p, s, ch = self.cfg.patch, self.cfg.image_size // self.cfg.patch, self.cfg.channels
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        out = self.out(_modulate(self.norm_out(h), shift, scale))
        return out.reshape(h.shape[0], s, s, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, ch, s * p, s * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity at images ``x`` (B, C, H, W), times ``t`` (B,) and classes ``y`` (B,)."""
        if x.dim() != 4 or x.shape[1:] != (self.cfg.channels, self.cfg.image_size, self.cfg.image_size):
            want = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
            raise ValueError(f"DiT takes images of shape (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h, c)


__all__ = ["DiT", "DiTBlock", "DiTConfig", "timestep_embedding"]
