"""What every step cache shares: the signals a decision sees and the interface a policy implements.

A step cache decides, per denoiser call and per sample, whether to run the transformer's block stack or to
reuse the residual (blocks(h) - h) it stored the last time that sample ran them. ``CachedStack``
(``stack.py``) does the running and storing; a policy only answers "which rows run now" from the signals,
and keeps its own per-sample state until ``reset`` (a new generation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepSignals:
    """One call, seen from the deciding rows (the conditional half under guidance).

    latent: the model's input latent (B, ...); t: flow time per row (B,), 1 = noise, 0 = data;
    progress: how far the generation is, (t_first - t) / t_first, in [0, 1]; modulated: the first block's
    modulated input (B, ...) when the policy asks for it; call: the calls made since the reset.
    """

    latent: torch.Tensor
    t: torch.Tensor
    progress: float
    call: int
    modulated: torch.Tensor | None = None


class StepCache:
    """A skip policy. ``decide`` returns a bool (B,) of the rows to compute; the others reuse their residual.
    A row is computed on its first call whatever ``decide`` says (there is nothing to reuse yet)."""

    needs_modulated_input = False

    def reset(self) -> None:
        """Forget everything about the last generation."""

    def decide(self, s: StepSignals) -> torch.Tensor:
        raise NotImplementedError


class NoCache(StepCache):
    """Always compute: the uncached reference, through the same code path."""

    def decide(self, s: StepSignals) -> torch.Tensor:
        return torch.ones(s.t.shape[0], dtype=torch.bool, device=s.t.device)


class FixedInterval(StepCache):
    """FORA / DeepCache: run the blocks every ``interval``-th call, reuse the residual in between."""

    def __init__(self, interval: int):
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1 (1 = never skip), got {interval!r}")
        self.interval = interval

    def decide(self, s: StepSignals) -> torch.Tensor:
        return torch.full((s.t.shape[0],), s.call % self.interval == 0, dtype=torch.bool, device=s.t.device)


def check_threshold(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or value != value or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (0 = never skip), got {value!r}")
    return float(value)


def check_max_skips(value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"max_skips (K) must be an int >= 0 (0 = never skip), got {value!r}")
    return value
