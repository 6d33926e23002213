"""Offline calibration of the step caches, per timestep, on held-out samples; one JSON file.

- SenCache: J_x(t_k) = ||f(x_{k+1}, t_k) - f(x_k, t_k)|| / ||x_{k+1} - x_k|| along one Euler step, and
  J_t(t_k) = ||f(x_k, t_{k+1}) - f(x_k, t_k)|| / |t_{k+1} - t_k|, where x_k noises a held-out image to t_k
  and f is the conditional velocity; averaged over the samples (the official code's finite differences).
- MagCache: the mean log norm of the block stack's residual along uncached generations, as a function of t.
- TeaCache: a degree-4 polynomial from the relative L1 change of the first block's modulated input to that
  of the residual, fitted on the same generations.

Deterministic for a seed: the samples, the noise and the generations come from seeded generators.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .flow import sample, timesteps
from .stack import apply_step_cache

FORMAT = "scalestack step-cache calibration v1"


@dataclass
class Calibration:
    t: torch.Tensor  # (K,) the calibrated timesteps, from 1 down
    jx: torch.Tensor  # (K,)
    jt: torch.Tensor  # (K,)
    residual_log_norm_t: torch.Tensor  # (M,) increasing t
    residual_log_norm_value: torch.Tensor  # (M,)
    teacache_coefficients: list[float]
    num_steps: int
    samples: int
    seed: int

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """The index of the calibrated timestep nearest to each t."""
        return (t.float().reshape(-1, 1) - self.t.reshape(1, -1)).abs().argmin(dim=1)

    def log_residual_norm(self, t: torch.Tensor) -> torch.Tensor:
        """L(t), linearly interpolated (held constant past the ends)."""
        return torch.from_numpy(np.interp(t.double().numpy(), self.residual_log_norm_t.double().numpy(),
                                          self.residual_log_norm_value.double().numpy())).float()  # fmt: skip

    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "num_steps": self.num_steps, "samples": self.samples, "seed": self.seed,
                "t": self.t.tolist(), "jx": self.jx.tolist(), "jt": self.jt.tolist(),
                "residual_log_norm": {"t": self.residual_log_norm_t.tolist(),
                                      "value": self.residual_log_norm_value.tolist()},
                "teacache_coefficients": self.teacache_coefficients}  # fmt: skip
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no calibration file at {path}: run `scalestack diffusion calibrate`") from None
        except ValueError as e:
            raise ValueError(f"{path} is not a calibration file (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a calibration file of this version ({FORMAT!r})")
        t, jx, jt = (torch.tensor(data[k], dtype=torch.float32) for k in ("t", "jx", "jt"))
        curve = data["residual_log_norm"]
        if not (t.numel() == jx.numel() == jt.numel() > 0 and len(curve["t"]) == len(curve["value"]) > 0):
            raise ValueError(f"{path} is damaged: its per-timestep arrays are empty or of different lengths")
        if not all(torch.isfinite(v).all() for v in (t, jx, jt)):
            raise ValueError(f"{path} is damaged: its sensitivities are not all finite")
        return cls(t, jx, jt, torch.tensor(curve["t"]), torch.tensor(curve["value"]),
                   [float(c) for c in data["teacache_coefficients"]], int(data["num_steps"]),
                   int(data["samples"]), int(data["seed"]))  # fmt: skip


def _relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    return (now - before).flatten(1).abs().mean(1) / before.flatten(1).abs().mean(1).clamp_min(1e-12)


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, null_class: int, num_steps: int = 50,
              samples: int = 32, seed: int = 0, guidance: float = 2.0) -> Calibration:  # fmt: skip
    """Calibrate on ``samples`` of the held-out ``images`` (N, C, H, W) with their ``labels`` (N,)."""
    if num_steps < 2 or samples < 1:
        raise ValueError(f"need num_steps >= 2 and samples >= 1, got {num_steps} and {samples}")
    if images.shape[0] != labels.shape[0] or images.shape[0] < samples:
        raise ValueError(f"need at least samples={samples} images with one label each, got {images.shape[0]} "
                         f"images and {labels.shape[0]} labels")  # fmt: skip
    if getattr(model, "_step_cache", None) is not None:
        raise ValueError("calibrate the model without a step cache: call .remove() on it first")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images.shape[0], generator=generator)[:samples]
    x0, y = images[pick], labels[pick]
    noise = torch.randn(x0.shape, generator=generator)
    ts = timesteps(num_steps).tolist()
    jx, jt = [], []
    for t, t_next in zip(ts[:-1], ts[1:]):
        tv = lambda value: torch.full((samples,), value)  # noqa: E731
        x = (1 - t) * x0 + t * noise
        f = model(x, tv(t), y)
        x_next = x + (t_next - t) * f
        jx.append(((model(x_next, tv(t), y) - f).flatten(1).norm(dim=1) / (x_next - x).flatten(1).norm(dim=1)).mean())
        jt.append(((model(x, tv(t_next), y) - f).flatten(1).norm(dim=1) / abs(t_next - t)).mean())
    stack = apply_step_cache(model, record=True, guidance="cond_first")
    try:
        sample(model, y, num_steps, shape=tuple(x0.shape[1:]), guidance=guidance, null_class=null_class, seed=seed)
        calls = stack.recorded
    finally:
        stack.remove()
    log_norms = torch.stack([c["residual"].flatten(1).norm(dim=1).clamp_min(1e-30).log().mean() for c in calls])
    call_t = torch.stack([c["t"][0] for c in calls])
    inputs = torch.cat([_relative_l1(b["modulated"], a["modulated"]) for a, b in zip(calls, calls[1:])])
    outputs = torch.cat([_relative_l1(b["residual"], a["residual"]) for a, b in zip(calls, calls[1:])])
    coefficients = np.polyfit(inputs.double().numpy(), outputs.double().numpy(), deg=min(4, len(calls) - 2))
    order = torch.argsort(call_t)
    result = Calibration(torch.tensor(ts[:-1]), torch.stack(jx).float(), torch.stack(jt).float(),
                         call_t[order].float(), log_norms[order].float(), [float(c) for c in coefficients],
                         num_steps, samples, seed)  # fmt: skip
    if not all(math.isfinite(c) for c in result.teacache_coefficients):
        raise ValueError("the TeaCache fit is not finite: calibrate with more steps or samples")
    return result
