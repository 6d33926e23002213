"""``scalestack diffusion train|calibrate|sample``: a class-conditional DiT on the shipped digits, trained with
scalestack FSDP, its step caches calibrated, and PNG grids sampled with or without a cache."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CACHES = ("none", "fixed", "teacache", "magcache", "sencache")


def add_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="train, calibrate and sample a DiT with step caches (SenCache, ...)",
                       description=__doc__)  # fmt: skip
    verbs = p.add_subparsers(dest="verb", required=True)

    t = verbs.add_parser("train", help="train a DiT on the digits with scalestack FSDP")
    t.add_argument("run_dir")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=128, help="global batch (images per step, over all ranks)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--width", type=int, default=96)
    t.add_argument("--depth", type=int, default=6)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--nproc", type=int, help="local ranks to launch through torchrun (outside torchrun)")
    t.set_defaults(func=run_train)

    c = verbs.add_parser("calibrate", help="J_x, J_t (SenCache), residual norms (MagCache), TeaCache's polynomial")
    c.add_argument("run_dir")
    c.add_argument("--steps", type=int, default=50, help="calibrated timesteps")
    c.add_argument("--samples", type=int, default=32, help="held-out digits to calibrate on")
    c.add_argument("--guidance", type=float, default=2.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="the calibration file (default RUN_DIR/calibration.json)")
    c.set_defaults(func=run_calibrate)

    s = verbs.add_parser("sample", help="a PNG grid, one row per class; with --cache, its cost and quality")
    s.add_argument("run_dir")
    s.add_argument("--out", default=None, help="the PNG (default RUN_DIR/samples.png)")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--solver", choices=("euler", "heun"), default="euler")
    s.add_argument("--guidance", type=float, default=2.0)
    s.add_argument("--per-class", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache", choices=CACHES, default="none")
    s.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the cache's knob: the interval (fixed), the threshold (teacache, magcache), eps (sencache)",
    )
    s.add_argument("--max-skips", type=int, default=3, help="K: skips in a row at most (magcache, sencache)")
    s.add_argument("--calibration", help="calibration file (default RUN_DIR/calibration.json)")
    s.set_defaults(func=run_sample)


def run_train(args: argparse.Namespace) -> int:
    from ..models.dit import DiTConfig
    from ..train.diffusion import DiffusionTrainConfig, train_dit

    config = DiffusionTrainConfig(run_dir=args.run_dir, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                  model=DiTConfig(width=args.width, depth=args.depth, heads=args.heads))  # fmt: skip
    if args.nproc is not None and "RANK" not in os.environ:
        if args.nproc < 1 or args.batch % args.nproc:
            raise ValueError(f"--nproc must be >= 1 and divide --batch {args.batch}, got {args.nproc}")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "scalestack.cli.main", *_rank_command(args)]  # fmt: skip
        return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    train_dit(config)
    if "RANK" in os.environ:  # a torchrun worker
        from ..train.shutdown import end_worker

        end_worker()
    return 0


def _rank_command(args: argparse.Namespace) -> list[str]:
    """The same train command for each launched rank (without --nproc)."""
    return ["diffusion", "train", args.run_dir, "--steps", str(args.steps), "--batch", str(args.batch), "--lr",
            str(args.lr), "--width", str(args.width), "--depth", str(args.depth), "--heads", str(args.heads),
            "--seed", str(args.seed)]  # fmt: skip


def run_calibrate(args: argparse.Namespace) -> int:
    from ..diffusion.calibration import calibrate
    from ..diffusion.data import load_digits
    from ..train.diffusion import load_dit

    model = load_dit(args.run_dir)
    images, labels = load_digits("held_out", model.cfg.image_size)
    t0 = time.perf_counter()
    result = calibrate(model, images, labels, null_class=model.null_class, num_steps=args.steps,
                       samples=args.samples, seed=args.seed, guidance=args.guidance)  # fmt: skip
    out = Path(args.out or Path(args.run_dir) / "calibration.json")
    result.save(out)
    print(
        f"calibrated {args.steps} timesteps on {args.samples} held-out digits in {time.perf_counter() - t0:.1f} s: "
        f"J_x {result.jx.min():.3g}..{result.jx.max():.3g}, J_t {result.jt.min():.3g}..{result.jt.max():.3g} -> {out}"
    )
    return 0


def make_cache(name: str, threshold: float | None, max_skips: int, calibration_path: str | Path):
    """The named step cache with its knob (each has a default); calibrated ones read the calibration file."""
    from ..diffusion import Calibration, FixedInterval, MagCache, NoCache, SenCache, TeaCache

    if name == "none":
        return NoCache()
    if name == "fixed":
        interval = 2 if threshold is None else threshold
        if interval != int(interval):
            raise ValueError(f"--threshold for the fixed cache is its interval, a whole number; got {threshold}")
        return FixedInterval(int(interval))
    calibration = Calibration.load(calibration_path)
    if name == "teacache":
        return TeaCache(0.1 if threshold is None else threshold, calibration.teacache_coefficients)
    if name == "magcache":
        return MagCache(0.1 if threshold is None else threshold, calibration, max_skips=max_skips)
    return SenCache(0.05 if threshold is None else threshold, calibration, max_skips=max_skips)


def save_grid(images, path: str | Path, columns: int) -> None:
    """Images in [-1, 1] (N, 1, H, W) as a grid PNG, each pixel scaled up 4x."""
    import numpy as np
    import torch
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1), dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = pixels[i]
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from ..diffusion import apply_step_cache, psnr, sample, ssim
    from ..train.diffusion import load_dit

    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    model = load_dit(args.run_dir)
    cache = make_cache(args.cache, args.threshold, args.max_skips,
                       args.calibration or Path(args.run_dir) / "calibration.json")  # fmt: skip
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(args.per_class)
    shape = (model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    run = lambda: sample(model, labels, args.steps, shape=shape, guidance=args.guidance,  # noqa: E731
                         null_class=model.null_class, solver=args.solver, seed=args.seed)  # fmt: skip
    stack = apply_step_cache(model, cache)
    t0 = time.perf_counter()
    images = run()
    seconds = time.perf_counter() - t0
    out = Path(args.out or Path(args.run_dir) / "samples.png")
    save_grid(images, out, args.per_class)
    line = (
        f"{len(labels)} digits, {args.steps} {args.solver} steps, {stack.last.evaluations:.1f} block-stack evaluations"
    )
    if args.cache != "none":
        stack.remove()
        t0 = time.perf_counter()
        reference = run()
        base = time.perf_counter() - t0
        line += (f" (uncached {stack.last.calls}), {seconds:.2f} s vs {base:.2f} s uncached, PSNR "
                 f"{psnr(images, reference):.1f} dB, SSIM {ssim(images, reference):.4f}")  # fmt: skip
    print(f"{line} -> {out}")
    return 0
