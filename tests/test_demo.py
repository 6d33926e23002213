"""`make demo` end to end, shortened: torchrun, 2 gloo ranks, a few steps on a small text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_pool import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.timeout(180)


def test_demo_runs_and_reports(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(EXAMPLES / "demo.py"), "--data", str(text), "--steps", "25",
        "--seq", "32", "--batch", "4",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any("rank 1:" in line and "of unsharded" in line for line in lines)
    assert any("copies outside collectives 0.00 MiB" in line for line in lines)
    losses = [float(line.split()[4]) for line in lines if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0]  # the loss falls
