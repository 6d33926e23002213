"""``scalestack train`` end to end: a few steps at W=2 through torchrun, resuming from its checkpoint with
the same following losses, the same losses at W=1 (the data order does not depend on W), and bad configs
as one clear error."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = """
run_dir = "{run_dir}"
[model]
name = "gpt-tiny"
[data]
seq_len = 32
[train]
steps = {steps}
global_batch = 8
micro_batch = 2
warmup = 2
[checkpoint]
every = 3
"""


def train(tmp: Path, name: str, steps: int, nproc: int, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp / name
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(run_dir=run_dir, steps=steps))
    command = [sys.executable, "-m", "scalestack.cli.main", "train", str(config), "--nproc", str(nproc), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=240), run_dir


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_train_resume_and_world_size_independence(tmp_path):
    done, whole = train(tmp_path, "whole", 9, 2)
    assert done.returncode == 0, done.stderr[-2000:]
    a = losses(whole)
    assert sorted(a) == list(range(1, 10)) and a[9] < a[1]  # it learns
    # as if the job had died after step 6: its last checkpoint and metrics are step 6's
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step_9")
    rows = (part / "metrics.csv").read_text().splitlines()[:7]
    (part / "metrics.csv").write_text("\n".join(rows) + "\n")
    resumed, _ = train(tmp_path, "part", 9, 2)
    assert resumed.returncode == 0 and "resumed from step 6" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    b = losses(part)
    for step in range(7, 10):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    one, single = train(tmp_path, "single", 9, 1, "--checkpoint.every=0")
    assert one.returncode == 0, one.stderr[-2000:]
    for step, loss in losses(single).items():
        assert loss == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.stepz=3", "unknown key 'train.stepz': [train] takes steps"),
        ("--train.micro_batch=3", "not a multiple of train.micro_batch 3"),
        ("--train.global_batch=6", "does not split into micro-batches of 2 over 2 ranks"),
        ("--data.path=/nonexistent.txt", "data.path '/nonexistent.txt' not found"),
        ("--train.optimizer=sgd", "choose one of adamw, adamw8bit, muon"),
        ("--train.steps=many", "train.steps = 'many': expected int"),
    ],
)
def test_bad_configs_are_one_clear_error(tmp_path, override, message):
    out, _ = train(tmp_path, "bad", 3, 2, override)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
