"""What ``scalestack serve MODEL`` serves: a run directory of ``scalestack train`` (its ``model.json`` and
newest complete checkpoint) or a local Hugging Face model directory (config, weights, ``tokenizer.json``,
chat template). Nothing is downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.gpt import GPT, GPTConfig
from .chat import CHATML_TEMPLATE, ChatTemplate
from .runners import GPTRunner, HFRunner, Runner
from .tokenizer import ByteTokenizer, HFTokenizer, special_token_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # common templates' turn ends


@dataclass
class ServedModel:
    name: str
    runner: Runner
    tokenizer: ByteTokenizer | HFTokenizer
    template: ChatTemplate
    stop_token_ids: set[int] = field(default_factory=set)
    stop: list[str] = field(default_factory=list)  # turn ends written as text (byte-level models)


def load_model(path: str | Path, dtype: str | None = None, name: str | None = None,
               device: str | torch.device = "cpu") -> ServedModel:  # fmt: skip
    """The model at ``path``, ready to serve (``dtype`` casts its weights: float32, bfloat16, float16, float64)."""
    root = Path(path)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cast = DTYPES.get(dtype)
    if (root / "model.json").is_file():
        model, tokenizer_file, folder = _load_run(root)
    elif (root / "config.json").is_file():
        model, tokenizer_file, folder = _load_hf(root), root / "tokenizer.json", root
    else:
        raise FileNotFoundError(f"{root} is neither a scalestack run directory (model.json) nor a Hugging Face "
                                "model directory (config.json)")  # fmt: skip
    model = model.to(device=device, dtype=cast) if cast is not None else model.to(device)
    if tokenizer_file is not None and not tokenizer_file.is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} not found (a Hugging Face directory needs its "
                                "tokenizer.json)")  # fmt: skip
    tokenizer = HFTokenizer(tokenizer_file) if tokenizer_file is not None else ByteTokenizer()
    runner: Runner = GPTRunner(model) if isinstance(model, GPT) else HFRunner(model)
    settings = read_json(folder / "tokenizer_config.json")
    template = ChatTemplate(_template_source(folder, settings), special_token_text(settings.get("bos_token")) or "",
                            special_token_text(settings.get("eos_token")) or "")  # fmt: skip
    stop_ids, stop_text = _turn_ends(folder, settings, tokenizer, template)
    return ServedModel(name or root.resolve().name, runner, tokenizer, template, stop_ids, stop_text)


def _load_run(root: Path) -> tuple[torch.nn.Module, Path | None, Path]:
    from ..checkpoint.export import read_model_state

    card = json.loads((root / "model.json").read_text())
    if card.get("architecture") == "gpt":
        model = GPT(GPTConfig(**card["config"]))
    elif card.get("architecture") == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**card["config"])
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(f"{root / 'model.json'}: unknown architecture {card.get('architecture')!r}")
    state = read_model_state(root / "checkpoints")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"the checkpoint under {root} does not fit its model.json: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")  # fmt: skip
    tokenizer = card.get("tokenizer")
    return model, Path(tokenizer) if tokenizer else None, Path(tokenizer).parent if tokenizer else root


def _load_hf(root: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise FileNotFoundError(f"{root} has a config.json but no weights (*.safetensors)")
    return AutoModelForCausalLM.from_pretrained(str(root), local_files_only=True)


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when the file is absent (optional model files)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _template_source(folder: Path, settings: dict) -> str:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else CHATML_TEMPLATE


def _turn_ends(folder: Path, settings: dict, tokenizer, template: ChatTemplate) -> tuple[set[int], list[str]]:
    """End-of-sequence ids (generation_config, config, tokenizer) and the template's turn end: a token id
    where the tokenizer has it, else a stop string."""
    ids: set[int] = set()
    for source in (read_json(folder / "generation_config.json"), read_json(folder / "config.json")):
        eos = source.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    stop = []
    for text in (special_token_text(settings.get("eos_token")), *END_OF_TURN):
        if text and (text in template.source or text == special_token_text(settings.get("eos_token"))):
            token = tokenizer.token_id(text)
            if token is not None:
                ids.add(token)
            else:
                stop.append(text)
    return ids, stop
