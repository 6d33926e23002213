"""Batched beam search over semantic IDs, masked by a :class:`TrieIndex` with gathers only.

Each of the ``L`` levels is one model call on ``batch * beams`` rows (the prompt once, with a KV cache),
one fixed-shape candidate gather from the index, and one top-k. The loop runs over levels, a constant of
the index, so there is no host round-trip and no branch on data; every shape is known before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoders import Decoder, as_decoder
from .trie_index import LevelCandidates, TrieIndex


@dataclass
class BeamSearchResult:
    """Per prompt, ``beams`` IDs best first: ``ids[B, beams, L]`` (codes; -1 where ``valid`` is False),
    ``scores[B, beams]`` (sum of the model's log-probs of the ID's tokens) and ``valid[B, beams]``, False
    only when fewer than ``beams`` allowed IDs exist."""

    ids: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


def constrained_beam_search(
    model: torch.nn.Module | Decoder,
    prompts: torch.Tensor,
    index: TrieIndex | None,
    beams: int,
    *,
    token_map: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    length: int | None = None,
    vocab_size: int | None = None,
) -> BeamSearchResult:
    """Decode the ``beams`` best IDs of ``index`` for each prompt.

    ``model`` is a scalestack GPT, a Hugging Face causal LM, or any :class:`Decoder`. ``prompts`` is
    ``LongTensor[B, P]`` (left-padded, with ``attention_mask``, for HF models). ``token_map[L, V]`` (or
    ``[V]`` for every level) gives the model token of code ``c`` at level ``l``; by default code ``c`` is
    token ``c``. Level scores are the model's log-softmax over its whole vocabulary, read at those tokens.
    ``index=None`` decodes unconstrained (any code at any level); then pass ``length`` and ``vocab_size``.
    """
    length, vocab_size = _check_args(prompts, index, beams, length, vocab_size)
    token_map = _token_map(token_map, length, vocab_size, prompts.device)
    decoder = as_decoder(model)
    batch = prompts.shape[0]

    logits = decoder.prefill(prompts, attention_mask)
    _check_logits(logits, token_map)
    scores = torch.zeros(batch, 1, device=prompts.device)
    alive = torch.ones(batch, 1, dtype=torch.bool, device=prompts.device)
    state = torch.zeros(batch, dtype=torch.int64, device=prompts.device)
    ids = torch.zeros(batch, 1, 0, dtype=torch.int64, device=prompts.device)
    for level in range(length):
        logprobs = torch.log_softmax(logits.float(), dim=-1).index_select(1, token_map[level])
        cand = _candidates(index, level, state, vocab_size)
        scores, parent, token, state, alive = beam_step(scores, alive, logprobs, cand, beams, vocab_size)
        ids = torch.cat([ids.gather(1, parent.unsqueeze(-1).expand(-1, -1, ids.shape[2])), token.unsqueeze(-1)], 2)
        state = state.flatten()
        if level + 1 < length:
            rows = parent + torch.arange(batch, device=parent.device).unsqueeze(1) * (1 if level == 0 else beams)
            decoder.reorder(rows.flatten())
            logits = decoder.step(token_map[level][token.flatten()])
    ids = ids.masked_fill(~alive.unsqueeze(-1), -1)
    return BeamSearchResult(ids, scores.masked_fill(~alive, float("-inf")), alive)


def beam_step(
    scores: torch.Tensor,
    alive: torch.Tensor,
    logprobs: torch.Tensor,
    cand: LevelCandidates,
    beams: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level: score every candidate of every beam, keep the best ``beams`` per prompt.

    ``scores``/``alive`` are ``[B, m]``, ``logprobs`` ``[B*m, V]``; returns new scores, the parent beam,
    the token, the next state and liveness, each ``[B, beams]``.
    """
    batch, m = scores.shape
    width = cand.tokens.shape[1]
    lp = logprobs if cand.dense else logprobs.gather(1, cand.tokens.clamp(max=vocab_size - 1))
    # An allowed code the model rules out (-inf) still ranks above every disallowed one.
    key = scores.reshape(-1, 1) + lp.clamp(min=torch.finfo(lp.dtype).min)  # dead beams stay -inf
    key = key.masked_fill_(~cand.valid, float("-inf")).view(batch, m * width)
    if m * width < beams:  # fewer candidates than beams (first levels of tiny indexes): pad
        key = torch.nn.functional.pad(key, (0, beams - m * width), value=float("-inf"))
    # One top-k over all beams of a prompt: on CPU this beats a per-beam cut first.
    top_key, top = key.topk(beams, dim=1)
    top_ok = top_key > float("-inf")
    top = top.clamp(max=m * width - 1)  # padding slots are never ok; keep their gathers in bounds
    token = top % width if cand.dense else cand.tokens.reshape(batch, m * width).gather(1, top).long()
    state = cand.next_state.reshape(batch, m * width).gather(1, top).long()
    return top_key, top // width, token, torch.where(top_ok, state, 0), top_ok


def _candidates(index: TrieIndex | None, level: int, state: torch.Tensor, vocab_size: int) -> LevelCandidates:
    if index is not None:
        return index.candidates(level, state)
    n = state.shape[0]
    tokens = torch.arange(vocab_size, device=state.device).expand(n, vocab_size)
    return LevelCandidates(tokens, torch.ones_like(tokens, dtype=torch.bool), torch.zeros_like(tokens), dense=True)


def _check_args(
    prompts: torch.Tensor, index: TrieIndex | None, beams: int, length: int | None, vocab_size: int | None
) -> tuple[int, int]:
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] == 0:
        shape = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise ValueError(f"prompts must be a LongTensor [batch, prompt_len] with prompt_len >= 1, got {shape}")
    if prompts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompts must hold token ids (int64), got dtype {prompts.dtype}")
    if not isinstance(beams, int) or beams < 1:
        raise ValueError(f"beams must be a positive int, got {beams!r}")
    if index is None:
        if length is None or vocab_size is None:
            raise ValueError("unconstrained search (index=None) needs length= and vocab_size=")
        return length, vocab_size
    if not isinstance(index, TrieIndex):
        raise TypeError(f"index must be a TrieIndex (or None for unconstrained), got {type(index).__name__}")
    if index.device != prompts.device:
        raise ValueError(f"the index is on {index.device} but prompts on {prompts.device}: use index.to(device)")
    return index.length, index.vocab_size


def _token_map(token_map: torch.Tensor | None, length: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    if token_map is None:
        return torch.arange(vocab_size, device=device).expand(length, vocab_size)
    token_map = torch.as_tensor(token_map, device=device)
    if token_map.dim() == 1:
        token_map = token_map.expand(length, -1)
    if tuple(token_map.shape) != (length, vocab_size) or token_map.dtype.is_floating_point:
        raise ValueError(
            f"token_map must be an integer tensor [{length}, {vocab_size}] (levels x codes) or [{vocab_size}], "
            f"got {tuple(token_map.shape)} {token_map.dtype}"
        )
    return token_map.long()


def _check_logits(logits: torch.Tensor, token_map: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"the decoder must return logits [rows, vocab], got shape {tuple(logits.shape)}")
    lo, hi = int(token_map.min()), int(token_map.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(
            f"token_map names model tokens in [{lo}, {hi}] but the model's vocabulary has {logits.shape[1]} "
            "tokens; pass a token_map into the model's vocabulary"
        )
