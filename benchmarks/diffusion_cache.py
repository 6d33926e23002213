"""Step caches on a DiT trained here: speedup (model evaluations and wall-clock) against quality (PSNR, SSIM
and a Fréchet distance in a digits classifier's features, all against the uncached output of the same seeds)
for every method over a sweep of its threshold, at 25 and 50 Euler steps, measured side by side in one run.

    python benchmarks/diffusion_cache.py --run-dir runs/dit --out runs/diffusion-bench

Trains (scalestack FSDP, 2 ranks) and calibrates first when the run directory has no checkpoint or
calibration. diffusers' own block-stack caches (First Block Cache, its MagCache with ratios from its own
calibration mode) run on the same model beside ours, through diffusers' hooks. The cost of every method is
counted the same way, by a counter in every block: block-stack evaluations per sample. Writes results.json,
a table on stdout, and pareto.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from scalestack.diffusion import (
    Calibration,
    FixedInterval,
    MagCache,
    NoCache,
    SenCache,
    TeaCache,
    apply_step_cache,
    frechet_distance,
    psnr,
    sample,
    ssim,
    train_digit_classifier,
)
from scalestack.diffusion.data import load_digits
from scalestack.models.dit import DiTBlock
from scalestack.train.diffusion import load_dit

SWEEPS = {
    "fixed (FORA)": [2, 3, 4, 5],
    "TeaCache": [0.2, 0.5, 1.0, 2.0, 4.0],
    "MagCache K=3": [0.05, 0.1, 0.2, 0.4],
    "MagCache K=8": [0.1, 0.2, 0.4, 0.8],
    "SenCache K=3": [0.2, 0.3, 0.5, 0.8, 1.2, 2.0],
    "SenCache K=8": [0.3, 0.5, 0.8, 1.2, 2.0],
}
DIFFUSERS_SWEEPS = {
    "diffusers FBC": [0.02, 0.05, 0.1, 0.2, 0.4],
    "diffusers MagCache": [0.05, 0.1, 0.2, 0.4, 0.8],
}
QUALITY_BARS_DB = (25.0, 30.0, 35.0)


def make(method: str, knob: float, calibration: Calibration):
    if method == "fixed (FORA)":
        return FixedInterval(int(knob))
    if method == "TeaCache":
        return TeaCache(knob, calibration.teacache_coefficients)
    k = int(method.split("K=")[1])
    if method.startswith("MagCache"):
        return MagCache(knob, calibration, max_skips=k)
    return SenCache(knob, calibration, max_skips=k)


def prepare(run_dir: Path, steps: int) -> None:
    cli = [sys.executable, "-m", "scalestack.cli.main", "diffusion"]
    if not (run_dir / "dit.json").exists():
        subprocess.run([*cli, "train", str(run_dir), "--steps", str(steps), "--nproc", "2"], check=True)
    if not (run_dir / "calibration.json").exists():
        subprocess.run([*cli, "calibrate", str(run_dir)], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/dit")
    p.add_argument("--out", default="runs/diffusion-bench")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--steps", default="25,50")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--max-skips", type=int, default=3, help="K of diffusers' MagCache")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the fastest counts)")
    args = p.parse_args()
    torch.set_num_threads(1)
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare(run_dir, args.train_steps)
    model, calibration = load_dit(run_dir), Calibration.load(run_dir / "calibration.json")
    train_images, train_labels = load_digits("train")
    classifier = train_digit_classifier(train_images, train_labels)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    shape = (1, model.cfg.image_size, model.cfg.image_size)
    print(f"{len(labels)} digits per generation, guidance {args.guidance}, 1 torch thread")

    def timed(net, steps: int) -> tuple[torch.Tensor, float, float]:
        """Images, the fastest of the repeats' seconds, and block-stack evaluations per sample (counted in
        every block's MLP: rows that ran it, over rows per call and blocks)."""
        rows_run = []
        hooks = [b.fc2.register_forward_hook(lambda m, i, o: rows_run.append(i[0].shape[0])) for b in net.blocks]
        try:
            best = float("inf")
            for _ in range(args.repeats):
                rows_run.clear()
                reset = getattr(net, "_reset_diffusers_cache", None)
                if reset is not None:
                    reset()
                t0 = time.perf_counter()
                images = sample(net, labels, steps, shape=shape, guidance=args.guidance, null_class=10, seed=0)
                best = min(best, time.perf_counter() - t0)
            return images, best, sum(rows_run) / (2 * len(labels) * len(net.blocks))
        finally:
            for h in hooks:
                h.remove()

    def generate(cache, steps: int) -> tuple[torch.Tensor, float, float]:
        stack = apply_step_cache(model, cache)
        try:
            return timed(model, steps)
        finally:
            stack.remove()

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier.features(images)

    generate(NoCache(), 2)  # warm up: the first generation pays for allocations the others reuse
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        reference, base_s, base_evals = generate(NoCache(), steps)
        ref_features = features(reference)
        with torch.no_grad():
            accuracy = (classifier(reference).argmax(1) == labels).float().mean().item()
        print(f"\n{steps} steps: uncached {base_s:.2f} s, {base_evals:.0f} evaluations, classifier accuracy on the "
              f"uncached digits {accuracy:.1%}")  # fmt: skip
        print(f"{'method':<20}{'knob':>6}{'evals':>7}{'x evals':>9}{'x wall':>8}{'PSNR dB':>9}{'SSIM':>8}{'FD':>9}")
        ratios = diffusers_mag_ratios(model, timed, steps)
        settings = [(m, k) for sweeps in (SWEEPS, DIFFUSERS_SWEEPS) for m, knobs in sweeps.items() for k in knobs]
        for method, knob in settings:
            if method in SWEEPS:
                images, seconds, evals = generate(make(method, knob, calibration), steps)
            else:
                net = with_diffusers_cache(model, method, knob, steps, args.max_skips, ratios)
                images, seconds, evals = timed(net, steps)
            row = {"steps": steps, "method": method, "knob": knob, "evaluations": evals,
                   "speedup_evaluations": base_evals / evals, "speedup_wall": base_s / seconds,
                   "psnr": psnr(images, reference), "ssim": ssim(images, reference),
                   "frechet": frechet_distance(features(images), ref_features)}  # fmt: skip
            rows.append(row)
            print(f"{method:<20}{knob:>6g}{evals:>7.1f}{row['speedup_evaluations']:>8.2f}x{row['speedup_wall']:>7.2f}x"
                  f"{row['psnr']:>9.2f}{row['ssim']:>8.4f}{row['frechet']:>9.3f}", flush=True)  # fmt: skip
        print(f"\nbest evaluation speedup at {steps} steps with PSNR at least:")
        for bar in QUALITY_BARS_DB:
            best = {m: max((r["speedup_evaluations"] for r in rows if r["steps"] == steps and r["method"] == m
                            and r["psnr"] >= bar), default=1.0) for m in (*SWEEPS, *DIFFUSERS_SWEEPS)}  # fmt: skip
            print(f"  {bar:.0f} dB: " + ", ".join(f"{m} {v:.2f}x" for m, v in best.items()))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "pareto.png")
    print(f"\n-> {out / 'results.json'}, {out / 'pareto.png'}")


def _register_dit_block_with_diffusers() -> None:
    """diffusers' cache hooks find a block's hidden states through its registry: ours returns them alone."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(DiTBlock, TransformerBlockMetadata(return_hidden_states_index=0))


def with_diffusers_cache(model, method: str, knob: float, steps: int, k: int, ratios: list[float] | None):
    """A copy of ``model`` under diffusers' own cache hooks (one cache context: our one batched call per step)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    _register_dit_block_with_diffusers()
    net = copy.deepcopy(model)
    if method == "diffusers FBC":
        apply_first_block_cache(net, FirstBlockCacheConfig(threshold=knob))
    else:
        config = MagCacheConfig(threshold=knob, max_skip_steps=k, retention_ratio=0.2, num_inference_steps=steps,
                                mag_ratios=ratios, calibrate=ratios is None)  # fmt: skip
        apply_mag_cache(net, config)

    def reset() -> None:
        HookRegistry.check_if_exists_or_initialize(net).reset_stateful_hooks(recurse=True)
        _set_cache_context(net, CacheContext("cond"))

    net._reset_diffusers_cache = reset
    return net


def diffusers_mag_ratios(model, timed, steps: int) -> list[float]:
    """diffusers' MagCache calibration mode on an uncached run; it prints the ratios it measured."""
    net = with_diffusers_cache(model, "diffusers MagCache", 0.0, steps, 0, None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        timed(net, steps)
    found = re.findall(r"\[([-0-9.e, ]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios: {printed.getvalue()[-300:]!r}")
    return [float(v) for v in found[-1].split(",")]


def plot(rows: list[dict], path: Path, min_psnr: float = 20.0) -> None:
    """Speedup against quality; settings below ``min_psnr`` (collapsed images) are left off to keep the scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows})
    panels = [("psnr", "speedup_evaluations"), ("psnr", "speedup_wall"), ("frechet", "speedup_evaluations"),
              ("frechet", "speedup_wall")]  # fmt: skip
    fig, axes = plt.subplots(len(steps), len(panels), figsize=(4.2 * len(panels), 3.6 * len(steps)), squeeze=False)
    for i, n in enumerate(steps):
        for j, (quality, speed) in enumerate(panels):
            ax = axes[i][j]
            for method in (*SWEEPS, *DIFFUSERS_SWEEPS):
                pts = sorted((r[quality], r[speed]) for r in rows
                             if r["steps"] == n and r["method"] == method and r["psnr"] >= min_psnr)  # fmt: skip
                ax.plot([q for q, _ in pts], [s for _, s in pts], marker="o", label=method)
            ax.set_xlabel({"psnr": "PSNR vs uncached (dB, higher is better)",
                           "frechet": "Fréchet distance (lower is better)"}[quality])  # fmt: skip
            ax.set_ylabel({"speedup_evaluations": "speedup (model evaluations)",
                           "speedup_wall": "speedup (wall-clock)"}[speed])  # fmt: skip
            if quality == "frechet":
                ax.set_xscale("symlog", linthresh=0.01)
            ax.set_title(f"{n} Euler steps (PSNR >= {min_psnr:.0f} dB)")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
