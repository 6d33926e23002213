"""MagCache (Ma et al., 2025): the norm of the block stack's residual changes by a nearly model-independent
ratio from one step to the next, so the error of reusing a residual is predicted offline. Skipping
accumulates |1 - product of ratios since the last computed call|; compute once that sum reaches the
threshold, after ``max_skips`` (K) skips in a row, and always in the first ``retention`` of the generation.

The calibration stores the mean log residual norm as a function of t, so the ratio between any two calls is
exp(L(t) - L(t_previous)): exact for any number of steps (the official code interpolates a per-step table).
Its error model sees t only: Heun's two calls at one t (the corrector, then the next step's predictor) count
as no change, so under Heun MagCache skips the second freely; use it with Euler, as the official code does."""

from __future__ import annotations

import torch

from .calibration import Calibration
from .step_cache import StepCache, StepSignals, check_calibration, check_fraction, check_max_skips, check_threshold


class MagCache(StepCache):
    def __init__(self, threshold: float, calibration: Calibration, max_skips: int = 3, retention: float = 0.2):
        self.threshold = check_threshold("threshold", threshold)
        self.max_skips = check_max_skips(max_skips)
        check_calibration(calibration, "MagCache")
        self.calibration, self.retention = calibration, check_fraction("retention", retention)
        self.reset()

    def reset(self) -> None:
        self.previous_t: torch.Tensor | None = None

    def decide(self, s: StepSignals) -> torch.Tensor:
        n = s.t.shape[0]
        if self.previous_t is None or self.previous_t.shape[0] != n:
            compute = torch.ones(n, dtype=torch.bool, device=s.t.device)
            self.ratio, self.steps, self.error = torch.ones(n), torch.zeros(n, dtype=torch.long), torch.zeros(n)
        else:
            log_norm = self.calibration.log_residual_norm
            ratio = torch.exp(log_norm(s.t.cpu()) - log_norm(self.previous_t.cpu()))
            self.ratio, self.steps = self.ratio * ratio, self.steps + 1
            self.error = self.error + (1 - self.ratio).abs()
            skip = (self.error < self.threshold) & (self.steps <= self.max_skips) & (s.progress >= self.retention)
            compute = ~skip.to(s.t.device)
            keep = skip.to(torch.float32)
            self.ratio, self.error = torch.where(skip, self.ratio, 1.0), self.error * keep
            self.steps = torch.where(skip, self.steps, 0)
        self.previous_t = s.t.detach().clone()
        return compute
