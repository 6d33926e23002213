"""Next-token choice: greedy at temperature 0, else temperature and nucleus (top-p) sampling from a
per-request generator, so a seeded request gives the same tokens whatever else is batched with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (not part of the output)
    stop_token_ids: set[int] = field(default_factory=set)  # end-of-turn tokens (not part of the output)

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    scaled = logits.double().cpu() / params.temperature  # float64: a tiny temperature stays finite
    probs = torch.softmax(scaled - scaled.max(), dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
