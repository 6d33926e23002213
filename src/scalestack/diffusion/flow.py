"""Flow matching (rectified flow): x_t = (1 - t) x_0 + t noise, the model predicts v = noise - x_0, and
sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (data) with Euler or Heun's second-order method,
under classifier-free guidance: v = v_uncond + w (v_cond - v_uncond), both branches in one batched call
(conditional rows first), so a step cache decides on the conditional half and mirrors it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stack import reset_step_cache

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("euler", "heun")


def flow_matching_loss(model: Denoiser, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean squared error of the predicted velocity at x_t (noise, t and any label dropout drawn by the caller,
    so every rank of a data-parallel job can take its slice of one global draw)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    return torch.mean((model(x_t, t, y) - (noise - x0)) ** 2)


def timesteps(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 times from 1 to 0; ``shift`` > 1 spends more steps near the noise (SD3's time shift)."""
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"need num_steps >= 1 and shift > 0, got {num_steps} and {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def guided_velocity(model: Denoiser, guidance: float, null_class: int, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """v_uncond + w (v_cond - v_uncond) from one call on [conditional; unconditional] rows."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    v_cond, v_uncond = out.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(model: Denoiser, labels: torch.Tensor, num_steps: int, *, shape: tuple[int, ...], guidance: float = 1.0,
           null_class: int | None = None, solver: str = "euler", seed: int = 0,
           shift: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Images for ``labels`` (B,), drawn from seeded noise of ``shape`` per image and integrated in ``num_steps``
    steps. A step cache attached to ``model`` (``apply_step_cache``) is reset first: each call is one generation."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if guidance != 1.0 and null_class is None:
        raise ValueError("guidance != 1 needs null_class, the label of the unconditional branch")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    reset_step_cache(model, evaluations(num_steps, solver))
    param = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
    device = param.device if param is not None else labels.device
    dtype = param.dtype if param is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((labels.numel(), *shape), generator=generator).to(device, dtype)
    labels = labels.to(device)
    f = model if guidance == 1.0 else (lambda x, t, y: guided_velocity(model, guidance, null_class, x, t, y))
    ts = timesteps(num_steps, shift).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = f(x, torch.full((x.shape[0],), t, device=device, dtype=dtype), labels)
        x_euler = x + (t_next - t) * v
        if solver == "euler" or t_next == 0.0:
            x = x_euler
        else:  # Heun: average the slopes at both ends (the last step, at t = 0, stays Euler)
            v_next = f(x_euler, torch.full((x.shape[0],), t_next, device=device, dtype=dtype), labels)
            x = x + (t_next - t) * (v + v_next) / 2
    return x


def evaluations(num_steps: int, solver: str) -> int:
    """Model calls one generation makes (each a batched call over both guidance branches)."""
    return num_steps if solver == "euler" else 2 * num_steps - 1
