"""Incremental decoding behind one small interface, so beam search runs any causal LM with a KV cache."""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from ..models.gpt import GPT


@runtime_checkable
class Decoder(Protocol):
    """A causal LM that keeps its own KV cache across calls."""

    def prefill(self, prompts: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompts; return the logits of the last position, ``[B, vocab]``."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next logits, ``[rows, vocab]``."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (repeats allowed), in that order."""


class GPTDecoder:
    """scalestack's GPT with its preallocated :class:`~scalestack.models.gpt.KVCache`."""

    def __init__(self, model: GPT, max_new_tokens: int | None = None):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.cache = None

    def prefill(self, prompts: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("scalestack GPT prompts cannot be padded: pass prompts of equal length")
        block = self.model.cfg.block_size
        room = block - prompts.shape[1] if self.max_new_tokens is None else self.max_new_tokens
        if prompts.shape[1] + room > block:
            raise ValueError(
                f"a prompt of {prompts.shape[1]} tokens plus {room} decoded tokens exceeds the model's block_size "
                f"{block}: shorten the prompts"
            )
        # a cache only as long as this search needs: beam reorders copy all of it every step
        self.cache = self.model.new_cache(prompts.shape[0], prompts.shape[1] + room)
        return self.model(prompts, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.unsqueeze(1), cache=self.cache)[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


class HFDecoder:
    """A Hugging Face causal LM (``transformers``), left-padded prompts welcome."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # transformers 5.x renames ``past_key_values`` to ``cache`` (argument and output); accept both
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no [B, P, vocab] logits
        self.cache = None
        self.mask = None
        self.position = None

    def prefill(self, prompts: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask.long()
        if mask.shape != prompts.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal prompts {tuple(prompts.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("prompts must be left-padded (the last position of every row real): decoding appends")
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(
            input_ids=prompts, attention_mask=mask, position_ids=position, use_cache=True, **self.last_only
        )
        self.cache, self.mask, self.position = getattr(out, self.cache_arg), mask, position[:, -1]
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        self.position = self.position + 1
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=self.mask,
            position_ids=self.position.unsqueeze(1),
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        self.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        if hasattr(self.cache, "reorder_cache"):
            self.cache.reorder_cache(rows)
        else:  # legacy tuple-of-tuples caches
            self.cache = tuple(tuple(t.index_select(0, rows) for t in layer) for layer in self.cache)
        self.mask, self.position = self.mask.index_select(0, rows), self.position.index_select(0, rows)


def as_decoder(model: object, max_new_tokens: int | None = None) -> Decoder:
    """Wrap a model for incremental decoding; a :class:`Decoder` passes through."""
    if isinstance(model, GPT):
        return GPTDecoder(model, max_new_tokens)
    if hasattr(model, "prepare_inputs_for_generation") and isinstance(model, torch.nn.Module):
        return HFDecoder(model)
    if isinstance(model, Decoder):
        return model
    raise TypeError(
        f"cannot decode with {type(model).__name__}: pass a scalestack GPT, a Hugging Face causal LM, or an "
        "object with prefill/step/reorder (scalestack.decode.Decoder)"
    )
