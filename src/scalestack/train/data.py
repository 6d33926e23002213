"""Training data: byte-level tokens (or a ``tokenizer.json``'s) of a text or JSON-lines file, and batches
whose order depends on the seed and the step only, never on the number of ranks (so a run resumed at another
W sees the same data)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

SHIPPED_TEXT = Path(__file__).resolve().parents[3] / "data" / "public_domain.txt"
BYTE_VOCAB = 256
PIECE_CHARS = 2**20  # a tokenizer encodes the text in pieces of about this size, cut at line ends (one
# that adds a prefix space adds it to each piece: one token per MiB of text)


def load_tokens(path: str | None, tokenizer: str | None = None) -> torch.Tensor:
    """The file's token ids: UTF-8 bytes (uint8), or the ids of a ``tokenizer.json`` (int32). A .jsonl file
    contributes the "text" field of each line, newline-joined."""
    source = Path(path) if path is not None else SHIPPED_TEXT
    if not source.is_file():
        raise FileNotFoundError(f"training data {str(source)!r} not found (data.path)")
    if source.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'{source}:{number}: expected a JSON object with a "text" field') from None
        text = "\n".join(texts)
    else:
        text = source.read_text(encoding="utf-8")
    if tokenizer is not None:  # in pieces of about 1 MiB cut at line ends: ids only, not one huge Encoding
        pieces = [text[i : j + 1] for i, j in _line_cuts(text, PIECE_CHARS)]
        encoded = load_tokenizer(tokenizer).encode_batch(pieces, add_special_tokens=False)
        data = torch.cat([torch.tensor(e.ids, dtype=torch.int32) for e in encoded])
    else:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)  # ids widen per batch
    if data.numel() < 2:
        raise ValueError(f"training data {str(source)!r} is empty")
    return data


def _line_cuts(text: str, size: int) -> list[tuple[int, int]]:
    """(first, last) character index of consecutive pieces of about ``size`` characters, each ending at a
    newline (or the text's end)."""
    cuts, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) - 1 if end < 0 else end
        cuts.append((start, end))
        start = end + 1
    return cuts


@functools.lru_cache(maxsize=4)  # preflight, the model's vocabulary and the tokens all ask for it
def load_tokenizer(path: str):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library: the hf extra)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("data.tokenizer needs the tokenizers package: pip install 'scalestack[hf]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for a file it cannot parse
        raise ValueError(f"data.tokenizer {str(path)!r} is not a tokenizer.json: {e}") from None


def vocab_size(tokenizer: str | None) -> int:
    return BYTE_VOCAB if tokenizer is None else load_tokenizer(tokenizer).get_vocab_size()


def global_batch(
    tokens: torch.Tensor, step: int, size: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` sequences of step ``step`` (inputs and next-token targets), the same on every rank."""
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"the training data has {tokens.numel()} tokens, fewer than data.seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed((seed << 32) + step)
    starts = torch.randint(tokens.numel() - seq_len - 1, (size,), generator=g)
    x = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()
    y = torch.stack([tokens[s + 1 : s + seq_len + 1] for s in starts.tolist()]).long()
    return x, y


def rank_micro_batches(x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
                       micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """This rank's contiguous share of the global batch, cut into micro-batches of ``micro`` sequences."""
    share = x.shape[0] // world
    xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    return [(xs[i : i + micro], ys[i : i + micro]) for i in range(0, share, micro)]
