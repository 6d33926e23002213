"""Batched beam search over semantic IDs, masked by a :class:`TrieIndex` with gathers only.

Each of the ``L`` levels is one model call on ``batch * beams`` rows (the prompt once, with a KV cache),
one fixed-shape candidate gather from the index, and one top-k. The loop runs over levels, a constant of
the index, so there is no host round-trip and no branch on data; every shape is known before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import positive_int, token_map_for
from .decoders import Decoder, as_decoder
from .trie_index import LevelCandidates, TrieIndex


@dataclass
class BeamSearchResult:
    """Per prompt, ``beams`` IDs best first: ``ids[B, beams, L]`` (codes; -1 where ``valid`` is False),
    ``scores[B, beams]`` (sum of the model's log-probs of the ID's tokens; -inf where not valid) and
    ``valid[B, beams]``, False only when fewer than ``beams`` allowed IDs exist."""

    ids: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
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
    """Decode the ``beams`` best IDs of ``index`` for each prompt (no autograd).

    ``model`` is a scalestack GPT, a Hugging Face causal LM, or any :class:`Decoder`. ``prompts`` is
    ``LongTensor[B, P]`` (left-padded, with ``attention_mask``, for HF models). ``token_map[L, V]`` (or
    ``[V]`` for every level) gives the model token of code ``c`` at level ``l``; by default code ``c`` is
    token ``c``. Level scores are the model's log-softmax over its whole vocabulary, read at those tokens;
    an allowed code the model rules out (-inf) counts ``FLOOR`` so that it still ranks above what C forbids.
    ``index=None`` decodes unconstrained (any code at any level); then pass ``length`` and ``vocab_size``.
    """
    length, vocab_size, beams = _check_args(prompts, index, beams, length, vocab_size)
    token_map = token_map_for(token_map, length, vocab_size, prompts.device)
    decoder = as_decoder(model, max_new_tokens=length - 1)
    batch = prompts.shape[0]

    logits = decoder.prefill(prompts, attention_mask)
    _check_logits(logits, token_map)
    scores = torch.zeros(batch, 1, device=prompts.device)
    state = torch.zeros(batch, dtype=torch.int64, device=prompts.device)
    ids = torch.zeros(batch, 1, 0, dtype=torch.int64, device=prompts.device)
    for level in range(length):
        logprobs = torch.log_softmax(logits.float(), dim=-1).index_select(1, token_map[level])
        cand = _candidates(index, level, state, vocab_size)
        scores, parent, token, state, alive = beam_step(scores, logprobs, cand, beams)
        ids = torch.cat([ids.gather(1, parent.unsqueeze(-1).expand(-1, -1, ids.shape[2])), token.unsqueeze(-1)], 2)
        state = state.flatten()
        if level + 1 < length:
            rows = parent + torch.arange(batch, device=parent.device).unsqueeze(1) * (1 if level == 0 else beams)
            decoder.reorder(rows.flatten())
            logits = decoder.step(token_map[level][token.flatten()])
    return BeamSearchResult(ids.masked_fill(~alive.unsqueeze(-1), -1), scores, alive)


FLOOR = -1e30  # the log-prob an allowed code counts when the model gives it -inf; L levels cannot overflow


def beam_step(
    scores: torch.Tensor, logprobs: torch.Tensor, cand: LevelCandidates, beams: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level: score every candidate of every beam, keep the best ``beams`` per prompt.

    ``scores`` is ``[B, m]`` (-inf marks a dead beam), ``logprobs`` ``[B*m, V]``; returns new scores, the
    parent beam, the token, the next state and liveness, each ``[B, beams]``. Dead results (fewer allowed
    candidates than beams) have score -inf, token 0 and state 0, so later gathers stay in bounds.
    """
    batch, m = scores.shape
    width = cand.tokens.shape[1]
    vocab = logprobs.shape[1]
    lp = logprobs if cand.dense else logprobs.gather(1, cand.tokens.clamp(max=vocab - 1))
    key = scores.reshape(-1, 1) + lp.clamp(min=FLOOR)  # dead beams stay -inf
    key = key.masked_fill_(~cand.valid, float("-inf")).view(batch, m * width)
    if m * width < beams:  # fewer candidates than beams (first levels of tiny indexes): pad
        key = torch.nn.functional.pad(key, (0, beams - m * width), value=float("-inf"))
    # One top-k over all beams of a prompt: on CPU this beats a per-beam cut first.
    top_key, top = key.topk(beams, dim=1)
    alive = top_key > float("-inf")
    top = top.clamp(max=m * width - 1)  # padding slots are never alive; keep their gathers in bounds
    token = top % width if cand.dense else cand.tokens.reshape(batch, m * width).gather(1, top).long()
    state = cand.next_state.reshape(batch, m * width).gather(1, top).long()
    return top_key, top // width, torch.where(alive, token, 0), torch.where(alive, state, 0), alive


def _candidates(index: TrieIndex | None, level: int, state: torch.Tensor, vocab_size: int) -> LevelCandidates:
    if index is not None:
        return index.candidates(level, state)
    n = state.shape[0]
    tokens = torch.arange(vocab_size, device=state.device).expand(n, vocab_size)
    return LevelCandidates(tokens, torch.ones_like(tokens, dtype=torch.bool), torch.zeros_like(tokens), dense=True)


def _check_args(
    prompts: torch.Tensor, index: TrieIndex | None, beams: int, length: int | None, vocab_size: int | None
) -> tuple[int, int, int]:
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] == 0:
        shape = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise ValueError(f"prompts must be a LongTensor [batch, prompt_len] with prompt_len >= 1, got {shape}")
    if prompts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompts must hold token ids (int64), got dtype {prompts.dtype}")
    beams = positive_int(beams, "beams")
    if index is None:
        if length is None or vocab_size is None:
            raise ValueError("unconstrained search (index=None) needs length= and vocab_size=")
        return positive_int(length, "length"), positive_int(vocab_size, "vocab_size"), beams
    if not isinstance(index, TrieIndex):
        raise TypeError(f"index must be a TrieIndex (or None for unconstrained), got {type(index).__name__}")
    if index.device != prompts.device:
        raise ValueError(f"the index is on {index.device} but prompts on {prompts.device}: use index.to(device)")
    return index.length, index.vocab_size, beams


def _check_logits(logits: torch.Tensor, token_map: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"the decoder must return logits [rows, vocab], got shape {tuple(logits.shape)}")
    hi = int(token_map.max())
    if hi >= logits.shape[1]:
        raise ValueError(
            f"token_map names model token {hi} but the model's vocabulary has {logits.shape[1]} tokens; "
            "pass a token_map into the model's vocabulary"
        )
