"""Models and a live server for the serving tests: a byte-level GPT, a tiny Hugging Face Llama directory
(weights, a BPE tokenizer.json trained here, a ChatML template), and uvicorn on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import torch

from scalestack.models.gpt import GPT, GPTConfig
from scalestack.serve import ServedModel, build_service, create_app
from scalestack.serve.chat import CHATML_TEMPLATE, ChatTemplate
from scalestack.serve.runners import GPTRunner
from scalestack.serve.tokenizer import ByteTokenizer

TEXT = (Path(__file__).resolve().parents[1] / "data" / "public_domain.txt").read_text(encoding="utf-8")[:200_000]


def tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT:
    """A random byte-level GPT whose matrices are scaled up 6x: at GPT-2's init scale a random model's greedy
    output is one repeated byte, here it depends on the whole context (so a wrong cache shows)."""
    torch.manual_seed(seed)
    return sharpen(GPT(GPTConfig(vocab_size=256, block_size=4096, n_layer=2, n_head=4, n_embd=64)).to(dtype).eval())


def sharpen(model: torch.nn.Module, scale: float = 6.0) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def served_gpt(model: GPT | None = None, name: str = "tiny-gpt") -> ServedModel:
    model = model if model is not None else tiny_gpt()
    return ServedModel(name, GPTRunner(model), ByteTokenizer(), ChatTemplate(CHATML_TEMPLATE), set(), ["<|im_end|>"])


def make_hf_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Llama saved with save_pretrained, a byte-level BPE tokenizer.json trained on the shipped text,
    and a ChatML chat template in tokenizer_config.json (its turn end is a special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator([TEXT], trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    settings = {"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tokenizer.token_to_id("<|im_end|>"))  # fmt: skip
    sharpen(LlamaForCausalLM(config)).save_pretrained(str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``service`` on a loopback port in a thread; ``url`` is the SDK's base_url."""

    def __init__(self, service, api_key: str | None = None, max_connection_age: float = 3600.0):
        import uvicorn

        self.service = service
        self.port = free_port()
        app = create_app(service, api_key=api_key, max_request_bytes=2**20, max_connection_age=max_connection_age)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", ws="websockets-sansio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(model: ServedModel, **kwargs) -> LiveServer:
    service_args = {
        k: kwargs.pop(k) for k in ("kv_budget", "kv_ttl", "max_batch", "prefill_chunk", "limits") if k in kwargs
    }
    return LiveServer(build_service(model, **service_args), **kwargs)


class ScriptedRunner:
    """A deterministic stand-in model for agent tests, with a real KV cache: each cache position holds its
    token id as a one-element key, so a sequence's context is read back from its cache (an evicted cache is
    rebuilt by prefill like any other). To a user message mentioning a city it answers with a tool call;
    to a tool output it answers with a sentence quoting it; otherwise it echoes the last user message, the
    number of user messages and the first one, as ``last|count|first`` (so a reply read from another
    conversation's cache shows)."""

    layers, kv_heads, head_dim = 1, 1, 1
    dtype, device = torch.float64, torch.device("cpu")
    max_positions = 1 << 20

    @staticmethod
    def reply(context: str) -> str:
        turns = context.split("<|im_start|>")
        last = turns[-2] if len(turns) >= 2 else ""
        role, _, content = last.partition("\n")
        content = content.removesuffix("<|im_end|>\n")
        if role == "tool":
            return f"The weather: {content}.<|im_end|>"
        if role == "user" and "weather in " in content and "# Tools" in context:
            city = content.split("weather in ", 1)[1].split("?")[0].strip()
            call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
            return f"<tool_call>\n{call}\n</tool_call><|im_end|>"
        users = [t.partition("\n")[2].removesuffix("<|im_end|>\n") for t in turns if t.startswith("user\n")]
        return f"{content}|{len(users)}|{users[0] if users else ''}<|im_end|>"  # the message, the count, the first

    def _script(self, cache) -> None:
        """Read the context back from the cache and fix this turn's reply (a prefill ends at the generation
        prompt; a continuation of a partial reply keeps its own place in the script)."""
        ids = cache.keys[0][0, 0, : cache.length, 0].long().tolist()
        context = bytes(ids).decode("utf-8", errors="replace")
        start = context.rfind("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        cache.script = self.reply(context[:start]).encode()
        cache.script_start = cache.length - len(context[start:].encode())

    @staticmethod
    def _logits(cache) -> torch.Tensor:
        written = cache.length - cache.script_start
        logits = torch.full((256,), -1e9, dtype=torch.float64)  # deterministic at any temperature
        logits[cache.script[written] if written < len(cache.script) else ord("\n")] = 0.0
        return logits

    def prefill(self, cache, ids: torch.Tensor) -> torch.Tensor:
        end = cache.length + ids.numel()
        cache.keys[0][0, 0, cache.length : end, 0] = ids.double()
        cache.length = end
        self._script(cache)
        return self._logits(cache)

    def decode(self, caches, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for cache, token in zip(caches, ids):
            cache.keys[0][0, 0, cache.length, 0] = float(token)
            cache.length += 1
            rows.append(self._logits(cache))
        return torch.stack(rows)


def served_script(name: str = "scripted") -> ServedModel:
    return ServedModel(name, ScriptedRunner(), ByteTokenizer(), ChatTemplate(CHATML_TEMPLATE), set(), ["<|im_end|>"])
