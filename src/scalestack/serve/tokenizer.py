"""Text to token ids and back: UTF-8 bytes (our byte-level GPTs) or a ``tokenizer.json`` (Hugging Face
``tokenizers``), with the special tokens that end a turn."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """Token i is byte i: every text round-trips, and tokenizing pieces equals tokenizing their concatenation."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        return None  # no special tokens: turn ends are stop strings


class HFTokenizer:
    """A ``tokenizer.json``; special tokens written in a text (``<|im_end|>``) become their single ids."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)


def special_token_text(value: object) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
