"""`scalestack plan`: published model shapes, the padding targets, the peers' rules, and bad input."""

from __future__ import annotations

import json

import pytest

from scalestack.cli.main import main
from scalestack.cli.plan import auto_unit, parse_granularity, plan_model
from scalestack.models.gpt import GPT, GPTConfig
from scalestack.planner.model_shapes import ConfigError, load_model_shapes
from scalestack.planner.peers import deepspeed_zero3, fsdp1, fsdp2, megatron_fsdp

pytestmark = pytest.mark.timeout(300)

PUBLISHED_BILLIONS = {
    "llama3-8b": 8.03,
    "llama3-70b": 70.55,
    "llama3-405b": 405.85,
    "deepseek-v3-671b": 671.0,  # without the multi-token-prediction layer
    "gpt-oss-120b": 116.8,
    "qwen3-235b-a22b": 235.1,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_builtin_models_have_their_published_size(name):
    assert load_model_shapes(name).numel / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=2e-3)


@pytest.mark.parametrize(
    ("name", "worlds"),
    [("llama3-70b", [64, 256, 1024]), ("gpt-oss-120b", [64, 256, 1024]), ("deepseek-v3-671b", [1024])],
)
def test_row_granularity_padding_target(name, worlds):
    model = load_model_shapes(name)
    for w in worlds:
        ours, peers, _ = plan_model(model, w, parse_granularity("row"), 1, 3, 4)
        assert (ours.total - model.numel) / model.numel <= 0.005, (name, w)
        assert ours.collectives <= 3 * len(model.units())


def test_peer_rules_on_a_small_example():
    shapes = [(1, 7), (1,), (5, 1), (5,)]  # 18 elements; FSDP2 at W=4 sent 48 in our measurement
    assert fsdp2(shapes, 4) == 48
    assert deepspeed_zero3(shapes, 4) == 8 + 4 + 8 + 8
    assert fsdp1(shapes, 4) == 8 + 4 + 8 + 8  # 16-byte aligned fp32, total a multiple of 4
    assert megatron_fsdp([(8, 6), (4, 4)], 2) == 72  # 64 elements, rows 6 and 4: multiple of 2*12


def run_cli(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_every_system(capsys):
    code, out, _ = run_cli(capsys, "llama3-8b", "--world", "8", "64", "--granularity", "block:16", "--per-unit")
    assert code == 0
    for name in ("scalestack", "FSDP2", "FSDP1", "DeepSpeed ZeRO-3", "Megatron-FSDP", "W=8", "W=64", "per unit"):
        assert name in out
    assert "dim 0" in out  # the rule each peer figure comes from


def test_cli_config_json_and_module(capsys, tmp_path):
    cfg = {
        "model_type": "qwen3",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = run_cli(capsys, str(path), "--world", "4", "--granularity", "muon")
    assert code == 0 and "config" in out
    code, out, _ = run_cli(capsys, "test_plan_cli:tiny_gpt", "--world", "3")
    assert code == 0 and "scalestack" in out


def tiny_gpt():
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_embd=16, n_head=2))


def test_module_callable_units_follow_blocks():
    shapes = load_model_shapes("test_plan_cli:tiny_gpt")
    assert len(shapes.blocks) == 2
    assert sum(n == "wte.weight" for n, _ in shapes.root) == 1  # tied head counted once


def test_plot(capsys, tmp_path):
    png = tmp_path / "padding.png"
    code, out, _ = run_cli(capsys, "llama3-8b", "--world", "64", "--plot", str(png))
    assert code == 0 and png.stat().st_size > 1000
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-model"], "unknown model"),
        (["llama3-8b", "--granularity", "rows"], "unknown granularity"),
        (["llama3-8b", "--granularity", "block:x"], "block:32"),
        (["missing/config.json"], "no such config file"),
        (["llama3-8b", "--align-bytes", "6"], "multiple of 4"),
    ],
)
def test_cli_bad_input_is_a_clear_error(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_rejects_non_positive_world(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "llama3-8b", "--world", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_malformed_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_shapes(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="missing 'num_hidden_layers'"):
        load_model_shapes(str(bad))
    bad.write_text(json.dumps({"model_type": "rnn", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 3}))
    with pytest.raises(ConfigError, match="unsupported model_type"):
        load_model_shapes(str(bad))


def test_auto_unit_is_the_fewest_blocks_meeting_the_target(capsys):
    """gpt-oss-120b, 128-row blocks, W=256: per-block units sit on the per-expert floor (31.9%)."""
    model = load_model_shapes("gpt-oss-120b")
    gran = parse_granularity("block:128")

    def padding(blocks):
        return (plan_model(model, 256, gran, blocks, 3, 4)[0].total - model.numel) / model.numel

    blocks, (ours, _, _) = auto_unit(model, 256, gran, 3, 4, 0.01)
    assert blocks > 1 and padding(blocks) <= 0.01 and padding(blocks // 2) > 0.01
    assert ours.total == plan_model(model, 256, gran, blocks, 3, 4)[0].total
    code, out, _ = run_cli(capsys, "gpt-oss-120b", "--world", "256", "--granularity", "block:128", "--unit", "auto",
                           "--max-buffers", "3")  # fmt: skip
    assert code == 0 and f"W=256: {blocks} block(s) per unit" in out
    code, _, err = run_cli(capsys, "llama3-8b", "--unit", "auto", "--target-padding", "-1")
    assert code == 2 and "--target-padding" in err


def test_split_root_wraps_embedding_and_head_apart():
    """torchtitan's wrapping: embedding, blocks, then final norm + head; no unit stays gathered for backward."""
    model = load_model_shapes("llama3-8b")
    merged, _, merged_units = plan_model(model, 64, parse_granularity("element"), 1, 1, 4)
    model.split_root = True
    units = model.units()
    assert [name for name, _ in units[0]] == ["embed_tokens.weight"]
    assert [name for name, _ in units[-1]] == ["norm.weight", "lm_head.weight"]
    split, _, split_units = plan_model(model, 64, parse_granularity("element"), 1, 1, 4)
    assert len(split_units) == len(merged_units) + 1
    assert split.all_gathered == 2 * split.total  # every unit gathered again in backward
    assert merged.all_gathered == 2 * merged.total - merged.root and merged.root > 0
