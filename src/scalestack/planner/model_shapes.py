"""Parameter shapes of published models, without weights: for planning and capacity estimates.

A model is described as Hugging Face ``config.json`` fields; the built-in names are such dicts with the
published values, so a user's ``config.json`` goes through the same code. Shapes follow the Hugging Face
checkpoints (``[out, in]`` linears, experts as separate tensors except gpt-oss, which fuses them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

Shape = tuple[int, ...]


@dataclass
class ModelShapes:
    name: str
    blocks: list[list[tuple[str, Shape]]]  # one list of (name, shape) per transformer block
    root: list[tuple[str, Shape]]  # embeddings, final norm, head: the root unit
    split_root: bool = False  # torchtitan's wrapping: the embedding one unit, the final norm and head another

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for unit in [*self.blocks, self.root] for _, s in unit)

    def units(self, blocks_per_unit: int = 1) -> list[list[tuple[str, Shape]]]:
        """Tensors per sharded unit: ``blocks_per_unit`` consecutive blocks each, then the root (with
        ``split_root``: the embedding first, the blocks, then the final norm and head)."""
        if blocks_per_unit < 1:
            raise ValueError(f"blocks per unit must be positive, got {blocks_per_unit}")
        units = [
            [t for block in self.blocks[i : i + blocks_per_unit] for t in block]
            for i in range(0, len(self.blocks), blocks_per_unit)
        ]
        if self.split_root:
            return [self.root[:1], *units, self.root[1:]]
        return [*units, self.root]


BUILTIN: dict[str, dict] = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "llama3-405b": dict(
        model_type="llama", hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
        num_attention_heads=128, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "deepseek-v3-671b": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, tie_word_embeddings=False,
    ),
    "gpt-oss-120b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_local_experts=128, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        vocab_size=201088, tie_word_embeddings=False,
    ),
    "qwen3-235b-a22b": dict(
        model_type="qwen3_moe", hidden_size=4096, moe_intermediate_size=1536, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, vocab_size=151936,
        tie_word_embeddings=False,
    ),
}  # fmt: skip


class ConfigError(ValueError):
    """A model description that cannot be turned into shapes; the message names the problem."""


def _get(cfg: dict, key: str, default: object = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"config is missing {key!r}, needed for model_type {cfg.get('model_type')!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"config field {key!r} must be a non-negative int, got {value!r}")
    return value


def _attention(cfg: dict, H: int) -> list[tuple[str, Shape]]:
    nh = _get(cfg, "num_attention_heads")
    nkv = _get(cfg, "num_key_value_heads", nh)
    hd = _get(cfg, "head_dim", H // max(nh, 1))
    out = [
        ("self_attn.q_proj.weight", (nh * hd, H)),
        ("self_attn.k_proj.weight", (nkv * hd, H)),
        ("self_attn.v_proj.weight", (nkv * hd, H)),
        ("self_attn.o_proj.weight", (H, nh * hd)),
    ]
    mt = cfg["model_type"]
    if mt in ("qwen2", "gpt_oss"):
        out += [("self_attn.q_proj.bias", (nh * hd,)), ("self_attn.k_proj.bias", (nkv * hd,))]
        out += [("self_attn.v_proj.bias", (nkv * hd,))]
    if mt == "gpt_oss":
        out += [("self_attn.o_proj.bias", (H,)), ("self_attn.sinks", (nh,))]
    if mt in ("qwen3", "qwen3_moe"):
        out += [("self_attn.q_norm.weight", (hd,)), ("self_attn.k_norm.weight", (hd,))]
    return out


def _mla(cfg: dict, H: int) -> list[tuple[str, Shape]]:
    nh, q_rank, kv_rank = _get(cfg, "num_attention_heads"), _get(cfg, "q_lora_rank"), _get(cfg, "kv_lora_rank")
    nope, rope, v = _get(cfg, "qk_nope_head_dim"), _get(cfg, "qk_rope_head_dim"), _get(cfg, "v_head_dim")
    return [
        ("self_attn.q_a_proj.weight", (q_rank, H)),
        ("self_attn.q_a_layernorm.weight", (q_rank,)),
        ("self_attn.q_b_proj.weight", (nh * (nope + rope), q_rank)),
        ("self_attn.kv_a_proj_with_mqa.weight", (kv_rank + rope, H)),
        ("self_attn.kv_a_layernorm.weight", (kv_rank,)),
        ("self_attn.kv_b_proj.weight", (nh * (nope + v), kv_rank)),
        ("self_attn.o_proj.weight", (H, nh * v)),
    ]


def _mlp(prefix: str, H: int, inter: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.gate_proj.weight", (inter, H)), (f"{prefix}.up_proj.weight", (inter, H))] + [
        (f"{prefix}.down_proj.weight", (H, inter))
    ]


def _experts(cfg: dict, H: int, n: int, inter: int) -> list[tuple[str, Shape]]:
    out = [("mlp.gate.weight", (n, H))]
    for e in range(n):
        out += _mlp(f"mlp.experts.{e}", H, inter)
    return out


def shapes_from_config(cfg: dict, name: str = "model") -> ModelShapes:
    """Shapes of a decoder-only transformer from Hugging Face config fields."""
    if not isinstance(cfg, dict):
        raise ConfigError("a model config must be a JSON object")
    mt = cfg.get("model_type")
    H, L, V = _get(cfg, "hidden_size"), _get(cfg, "num_hidden_layers"), _get(cfg, "vocab_size")
    norms = [("input_layernorm.weight", (H,)), ("post_attention_layernorm.weight", (H,))]
    blocks = []
    for layer in range(L):
        if mt in ("llama", "mistral", "qwen2", "qwen3"):
            block = _attention(cfg, H) + _mlp("mlp", H, _get(cfg, "intermediate_size"))
        elif mt == "qwen3_moe":
            block = _attention(cfg, H) + _experts(cfg, H, _get(cfg, "num_experts"), _get(cfg, "moe_intermediate_size"))
        elif mt == "mixtral":
            n, inter = _get(cfg, "num_local_experts"), _get(cfg, "intermediate_size")
            block = _attention(cfg, H) + [("block_sparse_moe.gate.weight", (n, H))]
            block += [t for e in range(n) for t in _mlp(f"block_sparse_moe.experts.{e}", H, inter)]
        elif mt == "deepseek_v3":
            block = _mla(cfg, H)
            if layer < _get(cfg, "first_k_dense_replace", 0):
                block += _mlp("mlp", H, _get(cfg, "intermediate_size"))
            else:
                n, inter = _get(cfg, "n_routed_experts"), _get(cfg, "moe_intermediate_size")
                block += _experts(cfg, H, n, inter) + [("mlp.gate.e_score_correction_bias", (n,))]
                block += _mlp("mlp.shared_experts", H, inter * _get(cfg, "n_shared_experts", 1))
        elif mt == "gpt_oss":
            n, inter = _get(cfg, "num_local_experts"), _get(cfg, "intermediate_size")
            block = _attention(cfg, H) + [("mlp.router.weight", (n, H)), ("mlp.router.bias", (n,))]
            block += [
                ("mlp.experts.gate_up_proj", (n, H, 2 * inter)),
                ("mlp.experts.gate_up_proj_bias", (n, 2 * inter)),
            ]
            block += [("mlp.experts.down_proj", (n, inter, H)), ("mlp.experts.down_proj_bias", (n, H))]
        else:
            raise ConfigError(
                f"unsupported model_type {mt!r}; supported: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, "
                "deepseek_v3, gpt_oss (or pass module:callable)"
            )
        blocks.append([(f"layers.{layer}.{n}", s) for n, s in block + norms])
    root = [("embed_tokens.weight", (V, H)), ("norm.weight", (H,))]
    if not cfg.get("tie_word_embeddings", False):
        root.append(("lm_head.weight", (V, H)))
    return ModelShapes(name, blocks, root)


def load_model_shapes(spec: str) -> ModelShapes:
    """A built-in name, a path to a Hugging Face ``config.json``, or ``module:callable`` returning a module."""
    if spec in BUILTIN:
        return shapes_from_config(BUILTIN[spec], spec)
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"no such config file: {spec}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{spec} is not valid JSON: {e}") from None
        return shapes_from_config(cfg, path.stem)
    if ":" in spec:
        return _shapes_from_callable(spec)
    raise ConfigError(
        f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN)}), a config.json path, or module:callable"
    )


def _shapes_from_callable(spec: str) -> ModelShapes:
    import importlib

    import torch
    import torch.nn as nn

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {spec!r}: {e}") from None
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    # blocks: the children of the largest ModuleList; everything else is the root unit
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    name, blocks_list = max(lists, key=lambda nm: len(nm[1]), default=(None, None))
    seen, blocks, root = set(), [], []
    if blocks_list is not None:
        for i, block in enumerate(blocks_list):
            params = []
            for n, p in block.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append((f"{name}.{i}.{n}", tuple(p.shape)))
            blocks.append(params)
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            root.append((n, tuple(p.shape)))
    return ModelShapes(spec, blocks, root)
