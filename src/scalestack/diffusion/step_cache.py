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
    progress: how far the generation is, in [0, 1): calls made / calls expected when the sampler said how
    many (``sample`` does), else (t_first - t) / t_first; call: the calls made since the reset; last: this is
    the generation's last call (known only when the sampler said how many); modulated: the first block's
    modulated input (B, ...) when the policy asks for it.
    """

    latent: torch.Tensor
    t: torch.Tensor
    progress: float
    call: int
    last: bool = False
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


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def check_calibration(calibration: object, method: str) -> None:
    from .calibration import Calibration

    if not isinstance(calibration, Calibration):
        raise TypeError(f"{method} needs a Calibration (Calibration.load(path), from `scalestack diffusion "
                        f"calibrate`), got {type(calibration).__name__}")  # fmt: skip


def check_max_skips(value: int) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"max_skips (K) must be an int >= 0 (0 = never skip), got {value!r}")
    return value
