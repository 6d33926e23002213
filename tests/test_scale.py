"""The scale simulation (benchmarks/scale.py) at W=1024 with torch's fake process group, on a small Llama:
the engine's per-rank shard, largest unit and every collective of a step agree with the planner's prediction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("init", ["exact", "local"])
def test_rank_of_1024_matches_the_plan(tmp_path, init):
    out = tmp_path / "scale.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--small", "--world", "1024", "--rank", "1000",
         "--init", init, "--json", str(out)],
        check=True, timeout=100, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    plan, sim = result["plan"], result["simulation"]
    assert sim["units"] == plan["units"] == 6  # embedding, 4 layers, norm + head
    assert sim["shard_mib"] == pytest.approx(plan["shard_mib"], rel=1e-12)
    assert sim["largest_unit_mib"] == pytest.approx(plan["largest_unit_mib"], rel=1e-12)
    for key in ("all_gathers", "reduce_scatters"):
        assert sim[key] == plan[key], key
    for key in ("all_gather_mib", "reduce_scatter_mib"):
        assert sim[key] == pytest.approx(plan[key], rel=1e-12), key
    assert sim["all_gather_ranks"] == [1024]
    if init == "exact":  # one unit in full at a time, on top of the shards (64 MiB: the allocator's slack)
        assert sim["init_peak_rss_mib"] < plan["shard_mib"] + plan["largest_unit_mib"] + 64
    assert sim["flag_all_reduces"] == plan["units"]


def test_plan_only_at_8192(tmp_path):
    out = tmp_path / "plan.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--world", "8192", "--plan-only", "--json", str(out)],
        check=True,
        timeout=100,
        capture_output=True,
    )
    plan = json.loads(out.read_text())["plan"]
    assert plan["units"] == 82 and 0 <= plan["padding"] < 0.01
    assert plan["shard_mib"] * 8192 == pytest.approx((1 + plan["padding"]) * plan["params"] * 4 / 2**20)
