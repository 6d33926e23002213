"""A seeded synthetic generative-retrieval task: text queries -> semantic IDs of catalogue items.

Each item has a semantic ID of ``levels`` codes (category, subcategory, variant: the coarse-to-fine codes an
RQ-VAE would give) and an age in days. A query names the item's codes with one of two synonyms per code, in
random order; a *broad* query leaves the variant out, so several items answer it. "Fresh" items (age at
most ``fresh_days``) are the business rule the server enforces with a trie index.

Files (all plain text): ``items.ids`` and ``fresh.ids`` (one ID per line, codes separated by spaces),
``items.tsv`` (ID, age, name), ``queries.tsv`` (query, target ID).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from scalestack.decode.retriever import encode_queries

SPECIALS = ["<pad>", "<bos>", "<sep>", "<none>"]
LEVEL_NAMES = ("cat", "sub", "var")


@dataclass(frozen=True)
class RetrievalTask:
    """The catalogue and the vocabulary; the same seed gives the same task on every rank and machine."""

    seed: int = 0
    codes: int = 16
    levels: int = 3
    items: int = 1200
    fresh_days: int = 7
    max_age: int = 30

    def __post_init__(self) -> None:
        if self.levels != len(LEVEL_NAMES):
            raise ValueError(f"the synthetic task has {len(LEVEL_NAMES)} levels, got {self.levels}")
        if not 1 <= self.items <= self.codes**self.levels:
            raise ValueError(f"items must be in [1, codes**levels = {self.codes**self.levels}], got {self.items}")

    # ------------------------------------------------------------------ catalogue
    def catalogue(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids[items, levels]`` (distinct, sorted) and ``age[items]`` in days."""
        ids, age = self._catalogue
        return ids.clone(), age.clone()

    @functools.cached_property  # built once: training draws queries from it every step
    def _catalogue(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        flat = torch.randperm(self.codes**self.levels, generator=g)[: self.items].sort().values
        ids = torch.stack([(flat // self.codes ** (self.levels - 1 - lv)) % self.codes for lv in range(self.levels)], 1)
        age = torch.randint(0, self.max_age + 1, (self.items,), generator=g)
        return ids, age

    # ------------------------------------------------------------------ vocabulary
    @functools.cached_property
    def words(self) -> list[str]:
        """Query words: two synonyms per (level, code), e.g. ``cat3`` and ``cat3b``."""
        return [f"{name}{c}{syn}" for name in LEVEL_NAMES for c in range(self.codes) for syn in ("", "b")]

    @functools.cached_property
    def vocab(self) -> list[str]:
        """Model tokens: specials, query words, then one token per (level, code) of the semantic ID."""
        sid = [f"<{name}:{c}>" for name in LEVEL_NAMES for c in range(self.codes)]
        return SPECIALS + self.words + sid

    @functools.cached_property
    def token_map(self) -> torch.Tensor:
        """``[levels, codes]``: the model token of each code at each level."""
        first = len(SPECIALS) + len(self.words)
        return first + torch.arange(self.levels * self.codes).view(self.levels, self.codes)

    @property
    def query_len(self) -> int:
        return self.levels

    @functools.cached_property
    def stoi(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    # ------------------------------------------------------------------ queries
    def queries(self, n: int, generator: torch.Generator, broad: float = 0.3) -> tuple[list[list[str]], torch.Tensor]:
        """``n`` random queries (word lists) and their target IDs; a share ``broad`` omits the variant."""
        pick = torch.randint(0, self.items, (n,), generator=generator)
        syn = torch.randint(0, 2, (n, self.levels), generator=generator)
        is_broad = torch.rand(n, generator=generator) < broad
        orders = torch.argsort(torch.rand(n, self.levels, generator=generator), 1)
        target = self._catalogue[0][pick]
        out = []
        for codes, syns, wide, order in zip(target.tolist(), syn.tolist(), is_broad.tolist(), orders.tolist()):
            words = [f"{name}{c}{'b' if b else ''}" for name, c, b in zip(LEVEL_NAMES, codes, syns)]
            if wide:
                words[-1] = "<none>"
            out.append([words[j] for j in order])
        return out, target

    def encode(self, queries: list[list[str]]) -> torch.Tensor:
        """Prompts ``[n, query_len + 2]`` for word lists, in the format the retriever serves."""
        return encode_queries([" ".join(q) for q in queries], self.stoi, self.query_len)

    def sequences(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows: inputs ``prompt + ID[:-1]`` and targets (-100 except on the ID's tokens)."""
        queries, target = self.queries(n, generator)
        prompts = self.encode(queries)
        sid = self.token_map[torch.arange(self.levels), target]
        x = torch.cat([prompts, sid[:, :-1]], 1)
        y = torch.full_like(x, -100)
        y[:, prompts.shape[1] - 1 :] = sid
        return x, y


def write_ids(path: str | os.PathLike, ids: torch.Tensor) -> None:
    """One ID per line, codes separated by spaces."""
    Path(path).write_text("".join(" ".join(map(str, row)) + "\n" for row in ids.tolist()))


def write_task_files(task: RetrievalTask, out: str | os.PathLike, eval_queries: int = 200) -> Path:
    """Write the catalogue, the fresh subset and held-out queries under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, age = task.catalogue()
    write_ids(out / "items.ids", ids)
    write_ids(out / "fresh.ids", ids[age <= task.fresh_days])
    lines = ["id\tage_days\tname"]
    for row, a in zip(ids.tolist(), age.tolist()):
        lines.append(" ".join(map(str, row)) + f"\t{a}\t" + "-".join(f"{n}{c}" for n, c in zip(LEVEL_NAMES, row)))
    (out / "items.tsv").write_text("\n".join(lines) + "\n")
    queries, target = task.queries(eval_queries, torch.Generator().manual_seed(task.seed + 10**6), broad=0.0)
    rows = [" ".join(q) + "\t" + " ".join(map(str, t)) for q, t in zip(queries, target.tolist())]
    (out / "queries.tsv").write_text("query\ttarget\n" + "\n".join(rows) + "\n")
    return out
