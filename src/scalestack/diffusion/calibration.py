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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .flow import sample, timesteps
from .stack import CachedStack, apply_step_cache, apply_step_cache_diffusers

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


Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, null_class: int, num_steps: int = 50,
              samples: int = 32, seed: int = 0, guidance: float = 2.0, velocity: Velocity | None = None,
              attach: Callable[[], CachedStack] | None = None) -> Calibration:  # fmt: skip
    """Calibrate on ``samples`` of the held-out ``images`` (N, C, H, W) with their ``labels`` (N,).

    velocity: f(x, t, y) with t in [0, 1] (default: ``model`` itself, as our DiT is called); attach: puts a
    recording ``CachedStack`` on the model (default ``apply_step_cache(model, record=True)``).
    ``calibrate_diffusers`` passes both for a diffusers transformer."""
    if num_steps < 2 or samples < 1:
        raise ValueError(f"need num_steps >= 2 and samples >= 1, got {num_steps} and {samples}")
    if images.dim() != 4 or images.shape[0] != labels.shape[0] or images.shape[0] < samples:
        raise ValueError(f"need images (N, C, H, W) with one label each and N >= samples={samples}, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")  # fmt: skip
    if getattr(model, "_step_cache", None) is not None:
        raise ValueError("calibrate the model without a step cache: call .remove() on it first")
    f_of = velocity or model
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images.shape[0], generator=generator)[:samples]
    noise = torch.randn(images[pick].shape, generator=generator).to(device, dtype)
    x0, y = images[pick].to(device, dtype), labels[pick].to(device)
    ts = timesteps(num_steps).tolist()
    jx, jt = [], []
    norm = lambda v: v.flatten(1).float().norm(dim=1)  # noqa: E731
    for t, t_next in zip(ts[:-1], ts[1:]):
        tv = lambda value: torch.full((samples,), value, device=device, dtype=dtype)  # noqa: E731
        x = (1 - t) * x0 + t * noise
        f = f_of(x, tv(t), y)
        x_next = x + (t_next - t) * f
        jx.append((norm(f_of(x_next, tv(t), y) - f) / norm(x_next - x).clamp_min(1e-30)).mean())
        jt.append((norm(f_of(x, tv(t_next), y) - f) / abs(t_next - t)).mean())
    stack = attach() if attach is not None else apply_step_cache(model, record=True, guidance="cond_first")
    try:
        sample(f_of, y, num_steps, shape=tuple(x0.shape[1:]), guidance=guidance, null_class=null_class, seed=seed)
        calls = stack.recorded
    finally:
        stack.remove()
    norms = torch.stack([norm(c["residual"]).clamp_min(1e-30).log().mean() for c in calls]).cpu()
    call_t = torch.stack([c["t"][0] for c in calls]).float().cpu()
    inputs = torch.cat([_relative_l1(b["modulated"], a["modulated"]) for a, b in zip(calls, calls[1:])])
    outputs = torch.cat([_relative_l1(b["residual"], a["residual"]) for a, b in zip(calls, calls[1:])])
    values = [torch.stack(jx), torch.stack(jt), norms, inputs, outputs]
    if not all(bool(torch.isfinite(v).all()) for v in values) or float(inputs.abs().max()) == 0:
        raise ValueError("the calibration measured no change or non-finite values: is the model trained (an "
                         "untrained adaLN-Zero DiT is the identity)? Calibrate the trained model")  # fmt: skip
    try:
        coefficients = np.polyfit(inputs.double().cpu().numpy(), outputs.double().cpu().numpy(),
                                  deg=min(4, len(calls) - 2))  # fmt: skip
    except np.linalg.LinAlgError as e:
        raise ValueError(f"the TeaCache fit failed ({e}): calibrate with more steps or samples") from None
    order = torch.argsort(call_t)
    return Calibration(torch.tensor(ts[:-1]), torch.stack(jx).float().cpu(), torch.stack(jt).float().cpu(),
                       call_t[order], norms[order].float(), [float(c) for c in coefficients], num_steps, samples,
                       seed)  # fmt: skip


def calibrate_diffusers(transformer: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, null_class: int,
                        **options: Any) -> Calibration:  # fmt: skip
    """``calibrate`` for a class-conditional diffusers transformer (``DiTTransformer2DModel``) called as
    ``transformer(hidden_states=x, timestep=1000 t, class_labels=y).sample``."""

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return transformer(hidden_states=x, timestep=t * 1000, class_labels=y).sample

    def attach() -> CachedStack:
        return apply_step_cache_diffusers(transformer, record=True, guidance="cond_first")

    return calibrate(transformer, images, labels, null_class=null_class, velocity=velocity, attach=attach, **options)
