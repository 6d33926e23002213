"""SenCache (Haghighi & Alahi, CVPR 2026): skip a call when a first-order bound on how much the denoiser's
output moved since the last computed call (the reference, x_r at t_r) is small:

    S = J_x(t_r) * ||x_t - x_r||_2 + J_t(t_r) * |t - t_r|  <  eps * sqrt(numel(x) per sample)

with J_x and J_t calibrated offline per timestep by finite differences (``calibrate``; the nearest
calibrated timestep to t_r, frozen while skipping), at most ``max_skips`` (K) skips in a row, and a stricter
``eps_start`` in the first ``start_fraction`` of the generation, where errors compound the most. Each sample
decides alone; under guidance the conditional half decides for both (``CachedStack``)."""

from __future__ import annotations

import math

import torch

from .calibration import Calibration
from .step_cache import StepCache, StepSignals, check_calibration, check_fraction, check_max_skips, check_threshold


class SenCache(StepCache):
    def __init__(self, eps: float, calibration: Calibration, max_skips: int = 3, eps_start: float | None = None,
                 start_fraction: float = 0.2):  # fmt: skip
        """``eps_start`` defaults to eps / 10 (the official Wan defaults are 0.005 early, 0.07 after)."""
        self.eps = check_threshold("eps", eps)
        self.eps_start = self.eps / 10 if eps_start is None else check_threshold("eps_start", eps_start)
        self.max_skips = check_max_skips(max_skips)
        check_calibration(calibration, "SenCache")
        self.calibration, self.start_fraction = calibration, check_fraction("start_fraction", start_fraction)
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None

    def sensitivity(self, s: StepSignals) -> torch.Tensor:
        """S per row against the reference point."""
        k = self.calibration.nearest(self.reference_t.cpu())
        jx, jt = self.calibration.jx[k].to(s.t.device), self.calibration.jt[k].to(s.t.device)
        moved = (s.latent.flatten(1).float() - self.reference).norm(dim=1)
        return jx * moved + jt * (s.t.float() - self.reference_t).abs()

    def decide(self, s: StepSignals) -> torch.Tensor:
        n = s.t.shape[0]
        if self.reference is None or self.reference.shape[0] != n:
            compute = torch.ones(n, dtype=torch.bool, device=s.t.device)
            self.reference, self.reference_t = s.latent.flatten(1).float().clone(), s.t.float().clone()
            self.skips = torch.zeros(n, dtype=torch.long, device=s.t.device)
            return compute
        eps = self.eps_start if s.progress < self.start_fraction else self.eps
        scale = math.sqrt(s.latent[0].numel())
        skip = (self.sensitivity(s) < eps * scale) & (self.skips < self.max_skips)
        compute = ~skip
        self.reference[compute] = s.latent.flatten(1).float()[compute]
        self.reference_t[compute] = s.t.float()[compute]
        self.skips = torch.where(compute, 0, self.skips + 1)
        return compute
