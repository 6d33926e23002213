"""A generative retriever: a checkpointed GPT, its query vocabulary and an allowed-ID index that can be
swapped while serving (rebuild off to the side, then replace one reference)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..models.gpt import GPT, GPTConfig
from .beam_search import BeamSearchResult, constrained_beam_search
from .trie_index import TrieIndex

CHECKPOINT_FORMAT = "scalestack.retriever/1"


def save_retriever(
    path: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    config: GPTConfig,
    vocab: list[str],
    token_map: torch.Tensor,
    query_len: int,
) -> None:
    """Everything serving needs in one file: weights, model config, vocabulary and code-to-token map."""
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(config),
            "model": model_state,
            "vocab": list(vocab),
            "token_map": token_map.clone(),
            "query_len": query_len,
        },
        path,
    )


def read_ids(path: str | os.PathLike) -> torch.Tensor:
    """Allowed IDs from a text file: one ID per line, codes separated by spaces or commas; ``#`` comments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ID file at {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            rows.append([int(t) for t in line.split()])
        except ValueError:
            raise ValueError(f"{path}:{n}: an ID is integer codes separated by spaces, got {line!r}") from None
        if any(not 0 <= c < 2**31 for c in rows[-1]):
            raise ValueError(f"{path}:{n}: codes are non-negative and below 2**31, got {line!r}")
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(
                f"{path}:{n}: every ID needs {len(rows[0])} codes (as on the first line), got {len(rows[-1])}"
            )
    if not rows:
        raise ValueError(f"{path} holds no IDs: the allowed set is empty, so nothing could be retrieved")
    return torch.tensor(rows, dtype=torch.long)


def encode_queries(queries: list[str], stoi: dict[str, int], query_len: int) -> torch.Tensor:
    """``<bos> words... <none>* <sep>`` per query: the prompt format a retriever is trained and served with."""
    rows = []
    for q in queries:
        words = q.split()
        unknown = [w for w in words if w not in stoi or w.startswith("<") and w != "<none>"]
        if unknown or not 1 <= len(words) <= query_len:
            hint = f"; unknown: {unknown} (words look like cat3, sub7b, var0)" if unknown else ""
            raise ValueError(f"bad query {q!r}: it needs 1..{query_len} known words{hint}")
        words += ["<none>"] * (query_len - len(words))
        rows.append([stoi["<bos>"], *(stoi[w] for w in words), stoi["<sep>"]])
    return torch.tensor(rows, dtype=torch.long)


class Retriever:
    """Serve queries against a checkpoint; :meth:`set_allowed` swaps the constraint set atomically."""

    def __init__(self, checkpoint: str | os.PathLike):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a scalestack retriever checkpoint (expected {CHECKPOINT_FORMAT!r})")
        self.model = GPT(GPTConfig(**data["config"])).eval()
        self.model.load_state_dict(data["model"])
        self.vocab: list[str] = data["vocab"]
        self.stoi = {w: i for i, w in enumerate(self.vocab)}
        self.token_map: torch.Tensor = data["token_map"]
        self.levels, self.codes = self.token_map.shape
        self.query_len: int = data["query_len"]
        self._index: TrieIndex | None = None

    @property
    def index(self) -> TrieIndex | None:
        return self._index

    def set_allowed(self, allowed: torch.Tensor | TrieIndex | str | os.PathLike) -> TrieIndex:
        """Build (or load) the index for a new allowed set, then swap it in; in-flight queries keep the old one."""
        if isinstance(allowed, (str, os.PathLike)):
            p = Path(allowed)
            allowed = TrieIndex.load(p) if p.suffix == ".trie" else read_ids(p)
        index = allowed if isinstance(allowed, TrieIndex) else TrieIndex.build(allowed, self.codes)
        if (index.length, index.vocab_size) != (self.levels, self.codes):
            raise ValueError(
                f"allowed IDs have {index.length} codes from {index.vocab_size}, but the model decodes "
                f"{self.levels} codes from {self.codes}"
            )
        self._index = index  # one reference assignment: a query already running keeps the index it read
        return index

    def retrieve(self, queries: list[str], beams: int = 10, constrained: bool = True) -> BeamSearchResult:
        """The ``beams`` best IDs per query; constrained to the allowed set unless ``constrained=False``."""
        index = self._index
        if constrained and index is None:
            raise ValueError("no allowed set: call set_allowed(...) first, or pass constrained=False")
        return constrained_beam_search(
            self.model,
            encode_queries(queries, self.stoi, self.query_len),
            index if constrained else None,
            beams,
            token_map=self.token_map,
            length=self.levels,
            vocab_size=self.codes,
        )
