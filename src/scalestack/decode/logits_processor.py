"""The trie as a Hugging Face ``LogitsProcessor``, for ``model.generate(..., num_beams=M)``.

HF calls processors with the whole generated prefix of every row, so the state is recomputed from the
prefix: at most ``L`` gathers, no per-beam Python callback (``prefix_allowed_tokens_fn`` loops in Python).
"""

from __future__ import annotations

import torch

from .checks import token_map_for
from .trie_index import TrieIndex

try:  # subclassing makes isinstance checks in transformers happy; the protocol is only __call__
    from transformers import LogitsProcessor as _Base
except ImportError:  # pragma: no cover - transformers is optional
    _Base = object


class TrieLogitsProcessor(_Base):
    """Allow only tokens that extend the generated prefix towards an ID of ``index``.

    ``prompt_length`` is the (padded) prompt width passed to ``generate``; ``token_map[L, V]`` (or
    ``[V]``) maps codes to model tokens as in :func:`constrained_beam_search`. Generate exactly ``L``
    new tokens (``max_new_tokens=index.length``); past that only ``eos_token_id`` is allowed, if given.
    """

    def __init__(
        self,
        index: TrieIndex,
        prompt_length: int,
        token_map: torch.Tensor | None = None,
        eos_token_id: int | None = None,
    ):
        if not isinstance(index, TrieIndex):
            raise TypeError(f"index must be a TrieIndex, got {type(index).__name__}")
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"prompt_length must be a non-negative int, got {prompt_length!r}")
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
            raise ValueError(f"eos_token_id must be an int token id or None, got {eos_token_id!r}")
        token_map = token_map_for(token_map, index.length, index.vocab_size, "cpu")
        self.index, self.prompt_length, self.token_map, self.eos = index, prompt_length, token_map, eos_token_id
        self._codes: torch.Tensor | None = None  # per level: model token -> code (-1 if not a code)

    def _code_table(self, vocab: int, device: torch.device) -> torch.Tensor:
        if self._codes is None or self._codes.shape[1] != vocab or self._codes.device != device:
            if int(self.token_map.max()) >= vocab:
                raise ValueError(f"token_map names token {int(self.token_map.max())} beyond the vocabulary ({vocab})")
            codes = torch.full((self.index.length, vocab), -1, dtype=torch.int64)
            token_map = self.token_map.cpu()
            codes.scatter_(1, token_map, torch.arange(self.index.vocab_size).expand_as(token_map))
            self._codes, self.token_map = codes.to(device), self.token_map.to(device)
        return self._codes

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or scores.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"input_ids [rows, len] and scores [rows, vocab] must have the same rows, got "
                f"{tuple(input_ids.shape)} and {tuple(scores.shape)}"
            )
        if self.eos is not None and not 0 <= self.eos < scores.shape[1]:
            raise ValueError(f"eos_token_id {self.eos} is outside the vocabulary ({scores.shape[1]} tokens)")
        level = input_ids.shape[1] - self.prompt_length
        if level < 0:
            raise ValueError(f"input_ids are shorter ({input_ids.shape[1]}) than prompt_length {self.prompt_length}")
        if self.index.device != scores.device:
            raise ValueError(f"the index is on {self.index.device} but scores on {scores.device}: use index.to(device)")
        mask = torch.full_like(scores, float("-inf"))
        if level >= self.index.length:
            if self.eos is not None:
                mask[:, self.eos] = 0
            return scores + mask
        codes = self._code_table(scores.shape[1], scores.device)
        generated = input_ids[:, self.prompt_length :]
        prefix = codes[torch.arange(level, device=scores.device), generated]  # -1: not a code, walk rejects it
        state, found = self.index.walk(prefix)
        cand = self.index.candidates(level, state)
        allowed = cand.valid & found.unsqueeze(1)
        tokens = self.token_map[level][cand.tokens.clamp(max=self.index.vocab_size - 1)]
        fill = torch.where(allowed, 0.0, float("-inf")).to(scores.dtype)
        return scores + mask.scatter_reduce(1, tokens, fill, reduce="amax")
