"""The trainer's pure parts: the FLOPs estimate behind MFU against torch's own FLOP counter, the progress
display on a terminal and in a log, and tokens from a ``tokenizer.json``."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scalestack.models.gpt import GPT, GPTConfig
from scalestack.train.data import SHIPPED_TEXT, load_tokens, vocab_size
from scalestack.train.flops import flops_per_token
from scalestack.train.progress import Progress


def counted_flops_per_token(model: torch.nn.Module, seq: int, vocab: int) -> float:
    """torch's FLOP counter over a forward and backward of one sequence (matmuls and attention only; attention
    in its math form, whose matmuls the counter sees on the CPU)."""
    ids = torch.randint(0, vocab, (1, seq))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().sum().backward()
    return counter.get_total_flops() / seq


def test_flops_per_token_matches_torchs_flop_counter():
    from transformers import LlamaConfig, LlamaForCausalLM

    seq = 64
    gpt = GPT(GPTConfig(vocab_size=512, block_size=seq, n_layer=3, n_head=4, n_embd=64))
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    llama = LlamaForCausalLM(config)
    for model in (gpt, llama):
        # the counter counts attention as if every key were visible, as PaLM's 12 * layers * width * seq does
        assert flops_per_token(model, seq) == pytest.approx(counted_flops_per_token(model, seq, 512), rel=0.02)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_logs_lines_elsewhere():
    log = io.StringIO()
    bar = Progress(total=10, start=2, log_every=4, stream=log)
    for done in range(3, 11):
        bar.update(done, 2.5, 1234.0, 300.0, 0.0123)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/10", "4/10", "8/10", "10/10"]  # first, every 4th, last
    assert "loss 2.5000 | 1,234 tok/s | 300 MiB | MFU 1.2%" in lines[0] and "[####################]" in lines[-1]
    term = Terminal()
    bar = Progress(total=4, start=0, log_every=100, stream=term)
    for done in range(1, 3):
        bar.update(done, 1.0, 10.0, 1.0, 0.5)
    bar.close()  # stopped at 2 of 4: the line still ends
    text = term.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "2/4 [##########.........." in text


def test_tokens_from_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train([str(SHIPPED_TEXT)], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ids = load_tokens(None, str(path))
    text = SHIPPED_TEXT.read_text(encoding="utf-8")
    assert ids.dtype == torch.int32 and ids.tolist() == tok.encode(text).ids
    assert vocab_size(str(path)) == tok.get_vocab_size() and int(ids.max()) < vocab_size(str(path))
    assert len(text.encode()) / ids.numel() > 1.5  # merges: fewer tokens than bytes
    assert vocab_size(None) == 256 and load_tokens(None).dtype == torch.uint8
    import scalestack.train.data as data

    small, data.PIECE_CHARS = data.PIECE_CHARS, 1000  # pieces cut at line ends: the text survives whole
    try:
        pieces = load_tokens(None, str(path))
    finally:
        data.PIECE_CHARS = small
    assert tok.decode(pieces.tolist()) == tok.decode(ids.tolist()) == text and abs(pieces.numel() - ids.numel()) < 20
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a tokenizer.json"):
        load_tokens(None, str(tmp_path / "bad.json"))
    assert math.isfinite(float(ids.float().mean()))


def test_line_cuts_cover_the_text_at_line_ends():
    from scalestack.train.data import _line_cuts

    text = "ab\ncdef\ng\n\nhij"
    pieces = [text[i : j + 1] for i, j in _line_cuts(text, 2)]
    assert "".join(pieces) == text and pieces == ["ab\n", "cdef\n", "g\n\n", "hij"]  # the first line end after 2
    assert _line_cuts("", 4) == [] and _line_cuts("x", 4) == [(0, 0)]
