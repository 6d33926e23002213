"""``scalestack bench`` end to end on a tiny GPT: it writes its table, plot and JSON, the traffic it counts
is what the model's size says, and bad arguments are one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scalestack.bench.runner import MODELS
from scalestack.models.gpt import GPT

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scalestack.cli.main", "bench", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_bench_writes_table_plot_and_counts_traffic(tmp_path):
    out = bench("--model", "gpt-tiny", "--systems", "scalestack,fsdp2,ddp", "--rounds", "2", "--steps", "1",
                "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| scalestack |" in out.stdout and "| fsdp2 |" in out.stdout and "| ddp |" in out.stdout
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| system | step (ms)" in (tmp_path / "bench.md").read_text()
    rows = {r["system"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    model = GPT(MODELS["gpt-tiny"])
    param_bytes = 4 * sum(p.numel() for p in model.parameters())  # fp32, tied weights once
    block_bytes = 4 * sum(p.numel() for p in model.layers.parameters())
    assert rows["ddp"]["ag"] == rows["ddp"]["rs"] == 0  # DDP gathers nothing (its all-reduces run in C++)
    for system in ("scalestack", "fsdp2"):  # blocks gathered in forward and again in backward, the root once
        assert rows[system]["ag"] == pytest.approx(param_bytes + block_bytes, rel=0.05), system
        assert rows[system]["rs"] == pytest.approx(param_bytes, rel=0.05), system
    assert rows["scalestack"]["copy"] == 0  # zero-copy in fp32; FSDP2 copies in before and out after each gather
    assert rows["fsdp2"]["copy"] >= rows["fsdp2"]["ag"] * (1 + 1 / 2)
    assert all(len(r["times"]) == 2 and r["peak_bytes"] > 0 for r in rows.values())  # 2 rounds x 1 step
    assert all(set(r["phase_peak_bytes"]) == {"forward", "backward", "update"} for r in rows.values())
    assert "peak MiB/rank by phase" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--systems", "megatron"), "unknown systems ['megatron']"),
        (("--world", "two"), "--world takes comma-separated integers"),
        (("--model", "gpt-huge"), "unknown --model 'gpt-huge'"),
        (("--rounds", "0"), "must all be at least 1"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, capsys, args, message):
    from scalestack.cli.main import main

    assert main(["bench", *args, "--out", str(tmp_path / "out")]) == 2  # in this process: nothing starts
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
