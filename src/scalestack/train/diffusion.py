"""``scalestack diffusion train``: a class-conditional DiT trained by flow matching on the shipped digits,
sharded with scalestack FSDP (each block a unit, then the root), on every rank of the job.

Each step draws one global batch (images, noise, times, dropped labels) from the seed and the step, and rank
r takes rows r::W, so the run is the same at any W (an unsharded run is the reference the tests hold it to).
The run directory gets ``dit.json`` (the model config), ``metrics.csv`` and DCP checkpoints that load
sharded at any W or into the plain model (``load_dit``)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import checkpoint
from ..checkpoint.directory import complete_checkpoints
from ..diffusion.data import load_digits
from ..diffusion.flow import flow_matching_loss
from ..models.dit import DiT, DiTConfig
from .apply_fsdp import apply_fsdp
from .trainer import _init_launched_group


@dataclass
class DiffusionTrainConfig:
    run_dir: str
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    label_dropout: float = 0.1
    seed: int = 0
    log_every: int = 100
    model: DiTConfig = dataclasses.field(default_factory=DiTConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.warmup < 0 or self.log_every < 1:
            raise ValueError(f"need steps >= 1, batch >= 1, warmup >= 0 and log_every >= 1, got {self.steps}, "
                             f"{self.batch}, {self.warmup} and {self.log_every}")  # fmt: skip
        if not 0 <= self.label_dropout < 1 or not self.lr > 0:
            raise ValueError(f"need 0 <= label_dropout < 1 and lr > 0, got {self.label_dropout} and {self.lr}")


def global_batch(images: torch.Tensor, labels: torch.Tensor, step: int, config: DiffusionTrainConfig,
                 null_class: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The step's (x0, labels with guidance dropout, noise, t), a function of the seed and the step only."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    idx = torch.randint(0, images.shape[0], (config.batch,), generator=g)
    y = labels[idx].clone()
    y[torch.rand(config.batch, generator=g) < config.label_dropout] = null_class
    noise = torch.randn((config.batch, *images.shape[1:]), generator=g)
    t = torch.rand(config.batch, generator=g)
    return images[idx], y, noise, t


def lr_factor(step: int, config: DiffusionTrainConfig) -> float:
    """Linear warmup, then cosine to a tenth."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_dit(config: DiffusionTrainConfig) -> list[float]:
    """Train (or resume) on every rank of the default group (a group of one without torchrun); the global mean
    loss of each step run here."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            _init_launched_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if config.batch % world:
        raise ValueError(f"batch {config.batch} is not a multiple of the {world} ranks")
    run_dir, ckpt_dir = Path(config.run_dir), Path(config.run_dir) / "checkpoints"
    images, labels = load_digits("train", config.model.image_size)
    torch.manual_seed(config.seed)
    model = DiT(config.model)
    apply_fsdp(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    start = 0
    done = complete_checkpoints(ckpt_dir)
    if done:
        start = int(checkpoint.load(done[-1].path, model, opt)["step"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "dit.json").write_text(json.dumps(dataclasses.asdict(config.model), indent=1))
        print(f"DiT {sum(p.numel() for p in model.parameters()) * world / 1e6:.2f}M parameters (about), {world} "
              f"rank(s), {config.batch} images per step, from step {start}", flush=True)  # fmt: skip
    losses, t0 = [], time.perf_counter()
    for step in range(start, config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config)
        x0, y, noise, t = (v[rank::world] for v in global_batch(images, labels, step, config, model.null_class))
        loss = flow_matching_loss(model, x0, y, noise, t)
        loss.backward()  # each rank's mean over its rows; FSDP averages the gradients over ranks
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if rank == 0 and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            print(f"step {step + 1}/{config.steps}  loss {losses[-1]:.4f}  {rate:.1f} steps/s", flush=True)
            with (run_dir / "metrics.csv").open("a", newline="") as f:
                csv.writer(f).writerow([step + 1, f"{losses[-1]:.6f}"])
    if start < config.steps:
        checkpoint.save(ckpt_dir / f"step_{config.steps}", model, opt, extra={"step": config.steps}, keep_last=1)
    return losses


def load_dit(run_dir: str | Path) -> DiT:
    """The plain (unsharded) DiT of a run directory's newest complete checkpoint, in eval mode."""
    from ..checkpoint.export import read_model_state

    root = Path(run_dir)
    card = root / "dit.json"
    if not card.is_file():
        raise FileNotFoundError(f"{root} is not a diffusion run directory (no dit.json): run `scalestack diffusion "
                                "train RUN_DIR` first")  # fmt: skip
    model = DiT(DiTConfig(**json.loads(card.read_text())))
    state = read_model_state(root / "checkpoints")
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"the checkpoint under {root} does not fit its dit.json: missing {missing[:3]}")
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    return model.eval()
