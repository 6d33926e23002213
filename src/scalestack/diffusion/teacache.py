"""TeaCache (Liu et al., CVPR 2025): accumulate the relative L1 change of the first block's modulated
input between calls, rescaled by a polynomial fitted offline to how much the block stack's residual then
changes; compute when the accumulated estimate reaches the threshold, then start again from zero. As in the
official code, the first and the last call always compute (the last one when the sampler says how many calls
it makes, as ``sample`` does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .step_cache import StepCache, StepSignals, check_threshold


class TeaCache(StepCache):
    needs_modulated_input = True

    def __init__(self, threshold: float, coefficients: Sequence[float] = (1.0, 0.0)):
        """``coefficients``: the rescaling polynomial, highest power first (numpy.polyval's order); the
        calibration fits it (``Calibration.teacache_coefficients``); the default is no rescaling."""
        self.threshold = check_threshold("threshold", threshold)
        if len(coefficients) < 1:
            raise ValueError("coefficients needs at least one value")
        self.coefficients = [float(c) for c in coefficients]
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None

    def decide(self, s: StepSignals) -> torch.Tensor:
        m = s.modulated.flatten(1).float()
        if self.previous is None or self.previous.shape != m.shape:
            compute = torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
            self.accumulated = torch.zeros(m.shape[0], device=m.device)
        else:
            change = (m - self.previous).abs().mean(1) / self.previous.abs().mean(1).clamp_min(1e-12)
            estimate = torch.zeros_like(change)
            for c in self.coefficients:  # Horner
                estimate = estimate * change + c
            self.accumulated = self.accumulated + estimate.clamp_min(0)
            compute = self.accumulated >= self.threshold  # always at threshold 0: the sum is >= 0
            if s.last:
                compute = torch.ones_like(compute)
            self.accumulated = torch.where(compute, torch.zeros_like(self.accumulated), self.accumulated)
        self.previous = m
        return compute
