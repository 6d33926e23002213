"""Trie index and constrained beam search against brute force: Python sets of prefixes and a masked beam
search that reruns the whole sequence through the model at every step (no KV cache, no index)."""

from __future__ import annotations

import itertools

import pytest
import torch

from scalestack.decode import TrieIndex, TrieLogitsProcessor, constrained_beam_search
from scalestack.models.gpt import GPT, GPTConfig


def random_ids(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def prefix_set(ids: torch.Tensor) -> set[tuple[int, ...]]:
    rows = [tuple(r) for r in ids.tolist()]
    return {r[:k] for r in rows for k in range(ids.shape[1] + 1)}


def reference_search(logits_fn, prompts, allowed, length, vocab, beams, token_map):
    """Beam search with a dense mask from a set of prefixes, full forward per beam per step."""
    prefixes = prefix_set(torch.tensor(sorted(allowed))) if allowed is not None else None
    out = []
    for prompt in prompts.tolist():
        frontier = [((), 0.0)]
        for level in range(length):
            cands = []
            for seq, score in frontier:
                x = prompt + [int(token_map[lv][c]) for lv, c in enumerate(seq)]
                lp = torch.log_softmax(logits_fn(torch.tensor([x])).float(), -1)[0]
                for c in range(vocab):
                    if prefixes is None or seq + (c,) in prefixes:
                        cands.append((seq + (c,), score + float(lp[token_map[level][c]])))
            frontier = sorted(cands, key=lambda t: -t[1])[:beams]
        out.append(frontier)
    return out


def tiny_gpt(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


def gpt_logits(model):
    return lambda x: model(x)[:, -1]


def assert_matches_reference(result, ref, beams):
    for b, frontier in enumerate(ref):
        got = [tuple(r) for r in result.ids[b].tolist()]
        assert got[: len(frontier)] == [seq for seq, _ in frontier]
        torch.testing.assert_close(
            result.scores[b, : len(frontier)], torch.tensor([s for _, s in frontier]), atol=1e-4, rtol=1e-5
        )
        assert result.valid[b, : len(frontier)].all()
        assert not result.valid[b, len(frontier) :].any()
        assert (result.ids[b, len(frontier) :] == -1).all()


# ---------------------------------------------------------------------- the index
@pytest.mark.parametrize("dense_levels", [0, 1, 2, 4])
def test_index_membership_and_candidates_equal_prefix_sets(dense_levels):
    vocab, length = 5, 4
    ids = random_ids(60, length, vocab, seed=dense_levels)
    index = TrieIndex.build(ids, vocab, dense_levels)
    allowed = {tuple(r) for r in ids.tolist()}
    assert index.num_ids == len(allowed)
    every = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    assert index.contains(every).tolist() == [tuple(r) in allowed for r in every.tolist()]
    prefixes = prefix_set(ids)
    for level in range(length):
        known = sorted(p for p in prefixes if len(p) == level)
        state, found = index.walk(torch.tensor(known, dtype=torch.int64).view(len(known), level))
        assert found.all()
        cand = index.candidates(level, state)
        assert cand.tokens.shape[1] == index.width(level)
        for i, p in enumerate(known):
            got = {int(t) for t, ok in zip(cand.tokens[i], cand.valid[i]) if ok}
            assert got == {c for c in range(vocab) if p + (c,) in prefixes}
    assert index.max_branches[0] == len({r[0] for r in allowed})


def test_index_sorted_deduplicated_and_sizes():
    ids = torch.tensor([[3, 1, 2], [0, 0, 0], [3, 1, 2], [3, 1, 0], [0, 0, 0]])
    index = TrieIndex.build(ids, 4, dense_levels=1)
    assert index.num_ids == 3
    assert index.level_sizes == [1, 2, 2, 3]
    assert index.max_branches == [2, 1, 2]
    assert index.indptr[0] is None  # every depth-1 node has exactly one child
    assert index.nbytes == sum(t.nbytes for t in index._tensors())
    assert index.contains(torch.tensor([[3, 1, 0], [3, 1, 1], [0, 0, 0], [9, 0, 0], [-1, 0, 0]])).tolist() == [
        True,
        False,
        True,
        False,
        False,
    ]


def test_edge_sets_single_id_shared_prefix_and_one_wide_node():
    one = TrieIndex.build(torch.tensor([[2, 0, 1]]), 3)
    assert one.num_ids == 1 and one.max_branches == [1, 1, 1]
    assert one.contains(torch.tensor([[2, 0, 1], [2, 0, 0]])).tolist() == [True, False]

    shared = torch.cat([torch.tensor([[7, 7, 7]]).expand(10, 3), torch.arange(10).view(10, 1)], 1)
    index = TrieIndex.build(shared, 10, dense_levels=2)
    assert index.max_branches == [1, 1, 1, 10]
    assert index.contains(shared).all()

    wide = torch.cat([torch.zeros(500, 1, dtype=torch.long), torch.arange(500).view(-1, 1)], 1)  # node 0: 500 children
    wide = torch.cat([wide, torch.tensor([[1, 3], [2, 4]])])
    index = TrieIndex.build(wide, 500, dense_levels=0)
    assert index.max_branches == [3, 500]
    assert index.contains(wide).all()
    state, _ = index.walk(torch.tensor([[1], [0]]))
    cand = index.candidates(1, state)
    assert cand.valid.sum(1).tolist() == [1, 500]  # the narrow node reads 500 padded slots, all masked


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="empty"):
        TrieIndex.build(torch.zeros(0, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"row 1 holds 4"):
        TrieIndex.build(torch.tensor([[0, 1], [4, 0]]), 4)
    with pytest.raises(ValueError, match="holds -1"):
        TrieIndex.build(torch.tensor([[0, -1]]), 4)
    with pytest.raises(TypeError, match="integer"):
        TrieIndex.build(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="dense_levels"):
        TrieIndex.build(torch.zeros(2, 2, dtype=torch.long), 4, dense_levels=3)
    with pytest.raises(ValueError, match="fewer dense levels"):
        TrieIndex.build(torch.zeros(2, 3, dtype=torch.long), 2**16, dense_levels=3)
    with pytest.raises(ValueError, match="2-D"):
        TrieIndex.build(torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        TrieIndex.build(torch.zeros(2, 2, dtype=torch.long), True)
    unsigned = TrieIndex.build(torch.tensor([[3, 1], [0, 2]], dtype=torch.uint8), 300)
    assert unsigned.contains(torch.tensor([[3, 1], [0, 1]], dtype=torch.uint8)).tolist() == [True, False]
    with pytest.raises(TypeError, match="integer codes"):
        unsigned.contains(torch.tensor([[3.0, 1.0]]))
    with pytest.raises(ValueError, match="1-D"):
        unsigned.candidates(0, torch.zeros(2, 2, dtype=torch.long))


def test_save_load_memory_mapped(tmp_path):
    ids = random_ids(300, 5, 7, seed=3)
    index = TrieIndex.build(ids, 7)
    index.save(tmp_path / "c.trie")
    loaded = TrieIndex.load(tmp_path / "c.trie")
    assert loaded.nbytes == index.nbytes and loaded.max_branches == index.max_branches
    assert all(torch.equal(a, b) for a, b in zip(loaded._tensors(), index._tensors()))
    every = torch.tensor(list(itertools.product(range(7), repeat=5)))[::7]
    assert torch.equal(loaded.contains(every), index.contains(every))
    # a server still maps the old file while a rule update rewrites it: the old index keeps its bytes
    TrieIndex.build(random_ids(50, 5, 7, seed=9), 7).save(tmp_path / "c.trie")
    assert torch.equal(loaded.contains(every), index.contains(every))
    assert TrieIndex.load(tmp_path / "c.trie").num_ids <= 50
    (tmp_path / "bad.trie").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a scalestack TrieIndex"):
        TrieIndex.load(tmp_path / "bad.trie")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a scalestack TrieIndex"):
        TrieIndex.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        TrieIndex.load(tmp_path / "missing.trie")


# ---------------------------------------------------------------------- beam search on our GPT
@pytest.mark.parametrize("dense_levels", [0, 1, 2, 3])
def test_beam_search_equals_masked_brute_force(dense_levels):
    vocab, length, beams = 6, 3, 4
    model = tiny_gpt(20)
    token_map = torch.arange(length * vocab).view(length, vocab) + 2  # codes live at per-level token ranges
    ids = random_ids(40, length, vocab, seed=11)
    index = TrieIndex.build(ids, vocab, dense_levels)
    prompts = torch.tensor([[0, 1, 1], [1, 0, 1]])
    with torch.no_grad():
        result = constrained_beam_search(model, prompts, index, beams, token_map=token_map)
        allowed = {tuple(r) for r in ids.tolist()}
        ref = reference_search(gpt_logits(model), prompts, allowed, length, vocab, beams, token_map)
    assert_matches_reference(result, ref, beams)
    assert index.contains(result.ids.view(-1, length)).all()


def test_all_beams_exact_when_beams_cover_the_set():
    """With beams >= |C| beam search keeps everything: the result is all of C ranked by exact score."""
    vocab, length = 4, 3
    model = tiny_gpt(12, seed=1)
    token_map = torch.arange(12).view(3, 4)
    ids = random_ids(9, length, vocab, seed=5)
    allowed = sorted({tuple(r) for r in ids.tolist()})
    prompts = torch.tensor([[3, 2]])
    with torch.no_grad():
        result = constrained_beam_search(model, prompts, TrieIndex.build(ids, vocab), 16, token_map=token_map)
        exact = []
        for seq in allowed:
            x = torch.tensor([[3, 2, *(int(token_map[lv][c]) for lv, c in enumerate(seq))]])
            lp = torch.log_softmax(model(x).float(), -1)[0]
            exact.append((seq, sum(float(lp[1 + lv, token_map[lv][c]]) for lv, c in enumerate(seq))))
    exact.sort(key=lambda t: -t[1])
    assert int(result.valid.sum()) == len(allowed)
    assert [tuple(r) for r in result.ids[0, : len(allowed)].tolist()] == [s for s, _ in exact]
    torch.testing.assert_close(result.scores[0, : len(allowed)], torch.tensor([s for _, s in exact]), atol=1e-4, rtol=0)


def test_unconstrained_search_equals_brute_force_and_single_id_set():
    model = tiny_gpt(8, seed=2)
    prompts = torch.tensor([[1, 2, 3]])
    token_map = torch.arange(4).expand(2, 4)
    with torch.no_grad():
        free = constrained_beam_search(model, prompts, None, 3, length=2, vocab_size=4)
        ref = reference_search(gpt_logits(model), prompts, None, 2, 4, 3, token_map)
        assert_matches_reference(free, ref, 3)
        only = constrained_beam_search(model, prompts, TrieIndex.build(torch.tensor([[3, 1]]), 4), 5)
    assert only.ids[0, 0].tolist() == [3, 1] and only.valid[0].tolist() == [True] + [False] * 4


def test_beam_search_bad_input():
    model = tiny_gpt(8)
    index = TrieIndex.build(torch.tensor([[1, 2]]), 4)
    with pytest.raises(ValueError, match="beams"):
        constrained_beam_search(model, torch.tensor([[1]]), index, 0)
    with pytest.raises(ValueError, match="prompts"):
        constrained_beam_search(model, torch.tensor([1, 2]), index, 2)
    with pytest.raises(ValueError, match="token_map"):
        constrained_beam_search(model, torch.tensor([[1]]), index, 2, token_map=torch.arange(5))
    with pytest.raises(ValueError, match="vocabulary"):
        constrained_beam_search(model, torch.tensor([[1]]), index, 2, token_map=torch.arange(4) + 6)
    with pytest.raises(TypeError, match="cannot decode"):
        constrained_beam_search(torch.nn.Linear(2, 2), torch.tensor([[1]]), index, 2)
    with pytest.raises(ValueError, match="length= and vocab_size="):
        constrained_beam_search(model, torch.tensor([[1]]), None, 2)
    with pytest.raises(ValueError, match="same model token"):
        constrained_beam_search(model, torch.tensor([[1]]), index, 2, token_map=torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="block_size"):
        constrained_beam_search(model, torch.zeros(1, 16, dtype=torch.long), index, 2)
    with pytest.raises(ValueError, match="beams must be a positive int"):
        constrained_beam_search(model, torch.tensor([[1]]), index, True)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        constrained_beam_search(model, torch.tensor([[1]]), None, 2, length=2, vocab_size=0)
    with pytest.raises(ValueError, match=r"index.to\(device\)"):
        constrained_beam_search(model, torch.tensor([[1]]), index.to("meta"), 2)
    moved = index.to("meta")
    assert moved.device.type == "meta" and moved.nbytes == index.nbytes and index.device.type == "cpu"


# ---------------------------------------------------------------------- Hugging Face causal LMs
@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_beam_search_with_left_padding_equals_brute_force(llama):
    vocab, length, beams = 5, 3, 4
    token_map = torch.arange(length * vocab).view(length, vocab) + 10
    ids = random_ids(30, length, vocab, seed=7)
    index = TrieIndex.build(ids, vocab)
    prompts = [[1, 5, 6, 7], [1, 8]]
    padded = torch.tensor([[1, 5, 6, 7], [0, 0, 1, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        result = constrained_beam_search(llama, padded, index, beams, token_map=token_map, attention_mask=mask)
        allowed = {tuple(r) for r in ids.tolist()}
        for b, prompt in enumerate(prompts):
            ref = reference_search(
                lambda x: llama(x).logits[:, -1], torch.tensor([prompt]), allowed, length, vocab, beams, token_map
            )
            one = type(result)(result.ids[b : b + 1], result.scores[b : b + 1], result.valid[b : b + 1])
            assert_matches_reference(one, ref, beams)


def test_hf_generate_with_trie_logits_processor(llama):
    """HF's own beam search with our processor returns exactly our beams and scores (no length penalty)."""
    from transformers import LogitsProcessorList

    vocab, length, beams = 5, 3, 4
    token_map = torch.arange(length * vocab).view(length, vocab) + 10
    ids = random_ids(30, length, vocab, seed=7)
    index = TrieIndex.build(ids, vocab)
    prompts = torch.tensor([[1, 5, 6, 7], [0, 1, 9, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with torch.no_grad():
        out = llama.generate(
            prompts,
            attention_mask=mask,
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=length,
            do_sample=False,
            length_penalty=0.0,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([TrieLogitsProcessor(index, 4, token_map)]),
            pad_token_id=0,
        )
        ours = constrained_beam_search(llama, prompts, index, beams, token_map=token_map, attention_mask=mask)
    codes = (out.sequences[:, 4:] - 10) - torch.arange(length) * vocab
    assert index.contains(codes).all()  # 100% valid
    assert codes.view(2, beams, length).tolist() == ours.ids.tolist()
    torch.testing.assert_close(out.sequences_scores.view(2, beams), ours.scores, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="same rows"):
        TrieLogitsProcessor(index, 4, token_map)(prompts, torch.zeros(3, 40))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TrieLogitsProcessor(index, 4, token_map, eos_token_id=99)(prompts, torch.zeros(2, 40))


def test_hf_absolute_positions_with_left_padding():
    """GPT-2 has absolute position embeddings, so wrong position ids for left-padded rows would show."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    gpt2 = transformers.GPT2LMHeadModel(cfg).eval()
    vocab, length, beams = 5, 3, 3
    token_map = torch.arange(length * vocab).view(length, vocab) + 10
    ids = random_ids(30, length, vocab, seed=2)
    index = TrieIndex.build(ids, vocab)
    with torch.no_grad():
        padded = constrained_beam_search(
            gpt2, torch.tensor([[0, 0, 3, 4]]), index, beams, token_map=token_map,
            attention_mask=torch.tensor([[0, 0, 1, 1]]),
        )  # fmt: skip
        alone = constrained_beam_search(gpt2, torch.tensor([[3, 4]]), index, beams, token_map=token_map)
        with pytest.raises(ValueError, match="left-padded"):
            constrained_beam_search(
                gpt2, torch.tensor([[3, 4, 0]]), index, beams, token_map=token_map,
                attention_mask=torch.tensor([[1, 1, 0]]),
            )  # fmt: skip
    assert padded.ids.tolist() == alone.ids.tolist()
    torch.testing.assert_close(padded.scores, alone.scores, atol=1e-4, rtol=1e-5)


def test_decoding_step_compiles_without_graph_breaks():
    """fullgraph=True fails on any data-dependent Python branch or host sync in the step."""
    from scalestack.decode import beam_step

    ids = random_ids(200, 4, 9, seed=4)
    index = TrieIndex.build(ids, 9, dense_levels=1)

    def step(level, scores, logprobs, state):
        return beam_step(scores, logprobs, index.candidates(level, state), 5)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    scores, state = torch.zeros(2, 1), index.root_state(2)
    for level in range(4):
        lp = torch.log_softmax(torch.randn(scores.numel(), 9), -1)
        want = step(level, scores, lp, state)
        got = compiled(level, scores, lp, state)
        for a, b in zip(want, got):
            assert torch.equal(a, b)
        scores, _, _, state, _ = want
        state = state.flatten()


def test_dead_beams_never_carry_the_padding_token(monkeypatch):
    """Which -inf slot top-k picks is unspecified: with ties broken towards the padding slots, a dead beam
    must still get an in-range token and state (a CUDA gather on token V would fault)."""
    from scalestack.decode import beam_step

    index = TrieIndex.build(torch.tensor([[0, 0], [0, 1], [1, 0]]), 2, dense_levels=1)
    cand = index.candidates(1, torch.tensor([1, 0]))  # the last node has one child: its second slot is padding (2)
    assert int(cand.tokens[0, 1]) == 2 and not bool(cand.valid[0, 1])
    real_topk = torch.Tensor.topk

    def ties_to_padding(t, k, dim=-1, *a, **kw):  # a legal top-k that prefers the last -inf slots
        flipped = real_topk(t.flip(dim), k, dim, *a, **kw)
        return torch.return_types.topk((flipped.values, t.shape[dim] - 1 - flipped.indices))

    monkeypatch.setattr(torch.Tensor, "topk", ties_to_padding)
    scores, _, token, state, alive = beam_step(torch.zeros(1, 2), torch.zeros(2, 2), cand, 4)
    assert alive.tolist() == [[True, True, True, False]]
    assert token.max() < 2 and state.max() < index.level_sizes[2] and scores[0, 3] == float("-inf")


def test_allowed_ids_the_model_rules_out_are_still_found():
    """An allowed code with log-prob -inf at two levels counts FLOOR twice: finite, valid, ranked last."""

    class Banned:  # a decoder that bans code 1 at every level, history-free
        def prefill(self, prompts, attention_mask):
            self.rows = prompts.shape[0]
            return self.logits()

        def logits(self):
            return torch.tensor([[0.0, float("-inf")]]).expand(self.rows, 2)

        def step(self, tokens):
            self.rows = tokens.shape[0]
            return self.logits()

        def reorder(self, rows):
            pass

    index = TrieIndex.build(torch.tensor([[1, 1, 1], [0, 0, 0]]), 2)
    res = constrained_beam_search(Banned(), torch.tensor([[0]]), index, 3)
    assert res.ids[0].tolist() == [[0, 0, 0], [1, 1, 1], [-1, -1, -1]]
    assert res.valid[0].tolist() == [True, True, False]
    assert res.scores[0, 0] == 0 and -1e31 < res.scores[0, 1] < -1e30 and res.scores[0, 2] == float("-inf")
