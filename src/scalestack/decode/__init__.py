"""Constrained decoding for generative retrieval: a vectorized trie index and beam search over it."""

from .beam_search import BeamSearchResult, beam_step, constrained_beam_search
from .decoders import Decoder, GPTDecoder, HFDecoder, as_decoder
from .logits_processor import TrieLogitsProcessor
from .trie_index import LevelCandidates, TrieIndex

__all__ = [
    "BeamSearchResult",
    "Decoder",
    "GPTDecoder",
    "HFDecoder",
    "LevelCandidates",
    "TrieIndex",
    "TrieLogitsProcessor",
    "as_decoder",
    "beam_step",
    "constrained_beam_search",
]
