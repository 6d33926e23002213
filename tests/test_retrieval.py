"""The generative-retrieval example end to end: train with scalestack FSDP on 2 gloo ranks (torchrun), then
serve with `scalestack retrieve` under allowed sets that change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_pool import free_port

from scalestack.cli.main import main as cli
from scalestack.decode.retriever import Retriever, read_ids

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "retrieval"
sys.path.insert(0, str(EXAMPLE))
from task import RetrievalTask, write_ids  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("retrieval")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(EXAMPLE / "demo.py"), "--out", str(out), "--steps", "200",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def ids_of(path: Path) -> set[tuple[int, ...]]:
    return {tuple(r) for r in read_ids(path).tolist()}


def test_training_report_shows_constraints_hold(trained):
    _, stdout = trained
    losses = [float(line.split()[3]) for line in stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < 0.5 * losses[0]
    fresh_line = next(line for line in stdout.splitlines() if "beams that are fresh items" in line)
    assert fresh_line.rstrip().endswith("constrained to fresh: 100.0%")
    recall_line = next(line for line in stdout.splitlines() if "top-1 is the target" in line)
    assert float(recall_line.split()[-1].rstrip("%")) >= 80.0  # the model learned the task


def test_cli_returns_only_allowed_ids_and_follows_a_new_set(trained, capsys, tmp_path):
    out, _ = trained
    queries = out / "queries.tsv"
    for allowed in (out / "fresh.ids", out / "items.ids"):
        assert cli(["retrieve", "--checkpoint", str(out / "retriever.pt"), "--allowed", str(allowed),
                    "--queries", str(queries), "--beams", "5", "--top", "5"]) == 0  # fmt: skip
        lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
        assert len(lines) == 200
        got = {tuple(int(c) for c in hit.split(" (")[0].split()) for line in lines for hit in line.split("\t")[1:]}
        assert got and got <= ids_of(allowed)

    # a saved index serves the same answers as the text file it came from
    trie = tmp_path / "fresh.trie"
    cli(["retrieve", "--checkpoint", str(out / "retriever.pt"), "--allowed", str(out / "fresh.ids"),
         "--queries", str(queries), "--save-index", str(trie)])  # fmt: skip
    from_text = capsys.readouterr().out.splitlines()[1:]
    cli(["retrieve", "--checkpoint", str(out / "retriever.pt"), "--allowed", str(trie), "--queries", str(queries)])
    assert capsys.readouterr().out.splitlines()[1:] == from_text


def test_retriever_swaps_the_allowed_set(trained):
    out, _ = trained
    retriever = Retriever(out / "retriever.pt")
    items = read_ids(out / "items.ids")
    retriever.set_allowed(items[:1])
    only = retriever.retrieve(["cat1 sub2 var3"], beams=3)
    assert only.ids[0, 0].tolist() == items[0].tolist() and only.valid[0].tolist() == [True, False, False]
    retriever.set_allowed(items[5:])
    swapped = retriever.retrieve(["cat1 sub2 var3"], beams=3)
    assert swapped.valid.all() and tuple(swapped.ids[0, 0].tolist()) in {tuple(r) for r in items[5:].tolist()}
    with pytest.raises(ValueError, match="codes"):
        retriever.set_allowed(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown"):
        retriever.retrieve(["cat1 nope"])


def test_bad_files_and_queries_are_named(tmp_path, trained, capsys):
    out, _ = trained
    (tmp_path / "empty.ids").write_text("# nothing allowed today\n")
    with pytest.raises(ValueError, match="empty"):
        read_ids(tmp_path / "empty.ids")
    (tmp_path / "ragged.ids").write_text("1 2 3\n4 5\n")
    with pytest.raises(ValueError, match="ragged.ids:2"):
        read_ids(tmp_path / "ragged.ids")
    (tmp_path / "text.ids").write_text("1 x 3\n")
    with pytest.raises(ValueError, match="integer codes"):
        read_ids(tmp_path / "text.ids")
    write_ids(tmp_path / "wide.ids", torch.tensor([[1, 2, 99]]))
    code = cli(["retrieve", "--checkpoint", str(out / "retriever.pt"), "--allowed", str(tmp_path / "wide.ids")])
    assert code == 2 and "vocab_size=16" in capsys.readouterr().err
    assert cli(["retrieve", "--checkpoint", str(tmp_path / "none.pt"), "--unconstrained"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    torch.save({"x": 1}, tmp_path / "other.pt")
    assert cli(["retrieve", "--checkpoint", str(tmp_path / "other.pt"), "--unconstrained"]) == 2
    assert "not a scalestack retriever checkpoint" in capsys.readouterr().err


def test_task_is_seeded_and_encodes_queries():
    a, b = RetrievalTask(seed=3), RetrievalTask(seed=3)
    assert torch.equal(a.catalogue()[0], b.catalogue()[0]) and not torch.equal(
        a.catalogue()[0], RetrievalTask().catalogue()[0]
    )
    ids, _ = a.catalogue()
    assert len({tuple(r) for r in ids.tolist()}) == a.items
    x, y = a.sequences(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, a.query_len + 2 + a.levels - 1) and (y[:, : a.query_len + 1] == -100).all()
    with pytest.raises(ValueError, match="unknown: ..dog"):
        a.encode([["cat1", "dog"]])
    with pytest.raises(ValueError, match="items"):
        RetrievalTask(items=10**6)


def test_watch_rebuilds_when_the_allowed_file_changes(trained, capsys, monkeypatch, tmp_path):
    out, _ = trained
    items = read_ids(out / "items.ids")
    allowed = tmp_path / "allowed.ids"
    write_ids(allowed, items[:600])

    def touch():  # a new mtime even on coarse clocks
        os.utime(allowed, ns=(0, allowed.stat().st_mtime_ns + 10**9))

    def queries():  # a client; between its queries the rule changes: once caught mid-write, then for real
        yield "cat1 sub2 var3\n"
        allowed.write_text("1 2 3\n4 5\n")
        touch()
        yield "cat1 sub2 var3\n"
        write_ids(allowed, items[600:])
        touch()
        yield "cat1 sub2 var3\n"

    monkeypatch.setattr(sys, "stdin", queries())
    args = ["retrieve", "--checkpoint", str(out / "retriever.pt"), "--allowed", str(allowed), "--watch", "--top", "3"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.startswith("# allowed: 600 IDs") for line in lines] == [True, False, False, True, False]
    assert "keeping the previous allowed set" in captured.err and "allowed.ids:2" in captured.err
    answers = [{tuple(int(c) for c in h.split(" (")[0].split()) for h in line.split("\t")[1:]} for line in lines]
    old, new = {tuple(r) for r in items[:600].tolist()}, {tuple(r) for r in items[600:].tolist()}
    assert answers[1] <= old and answers[2] == answers[1] and answers[4] <= new
