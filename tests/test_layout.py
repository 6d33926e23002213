"""The first planner (model order): invariants on hand-made and random instances."""

from __future__ import annotations

import random

import pytest
import torch

from scalestack.planner.granularity import Cuts, cuts_for, resolve_granularity, row_length
from scalestack.planner.layout import TensorSpec
from scalestack.planner.search import plan_in_order


def spec(name, shape, gran="element"):
    return TensorSpec(name, tuple(shape), cuts_for(gran, shape))


def assert_valid(lay, tensors):
    lay.check()
    assert [s.name for s in lay.slots] == [t.name for t in tensors]
    # every element of every tensor is held by exactly one rank, at the right place
    for t, slot in zip(tensors, lay.slots):
        covered = []
        for r in range(lay.world_size):
            p = lay.pieces(r)[[s.name for s in lay.slots].index(t.name)]
            if p.numel:
                assert lay.window(r)[0] + p.local_offset == slot.offset + p.start
                assert p.local_offset + p.numel <= lay.shard_size
                assert t.cuts.allows(p.start)
                assert t.cuts.allows(p.end) or p.end == t.numel
                covered.append((p.start, p.end))
        covered.sort()
        assert covered[0][0] == 0 and covered[-1][1] == t.numel
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_largest_granule():
    assert cuts_for("element", (7, 22)).largest_granule == 1
    assert cuts_for("row", (7, 22)).largest_granule == 22
    assert cuts_for("row", (5,)).largest_granule == 1
    assert cuts_for(4, (7, 22)).largest_granule == 88
    assert cuts_for(16, (7, 22)).largest_granule == 7 * 22  # more rows than the tensor has: the whole tensor
    assert cuts_for("tensor", (3, 4, 5)).largest_granule == 60
    assert cuts_for("row", (4, 3, 5)).largest_granule == 5  # experts [E, out, in]: a row is a row of one expert
    assert cuts_for("matrix", (4, 3, 5)).largest_granule == 15  # one expert's matrix
    assert row_length((4, 3, 5)) == 5
    # 2-row blocks of 3-row expert matrices restart at every expert: cuts at rows 0 and 2 of each
    assert cuts_for(2, (4, 3, 5)) == Cuts(15, (0, 10))
    assert cuts_for(3, (4, 3, 5)) == Cuts.every(15)


@pytest.mark.parametrize("bad", ["rows", 0, -3, 1.5, None, True])
def test_unknown_granularity_is_rejected(bad):
    with pytest.raises(ValueError, match="granularity"):
        cuts_for(bad, (4, 4))


def test_callable_granularity_is_validated():
    p = torch.empty(3, 4)
    assert resolve_granularity(lambda n, t: "row", "w", p) == "row"
    with pytest.raises(ValueError, match="granularity\\('w'\\)"):
        resolve_granularity(lambda n, t: "blocks", "w", p)


def test_element_layout_has_only_alignment_padding():
    tensors = [spec("a", (97, 60)), spec("b", (60,)), spec("c", (60, 60))]
    lay = plan_in_order(tensors, 4, align=4)
    assert_valid(lay, tensors)
    assert lay.padding < 4 * 4  # all sizes are multiples of the alignment: only S's rounding pads


def test_row_layout_never_cuts_a_row():
    tensors = [spec("emb", (97, 60), "row"), spec("w", (180, 60), "row"), spec("b", (180,), "row")]
    for world in range(1, 9):
        lay = plan_in_order(tensors, world, align=4)
        assert_valid(lay, tensors)


def test_tensor_granularity_puts_each_tensor_on_one_rank():
    tensors = [spec(f"t{i}", (n,), "tensor") for i, n in enumerate([50, 30, 30, 20, 10])]
    lay = plan_in_order(tensors, 4, align=1)
    assert_valid(lay, tensors)
    for t in tensors:
        owners = [r for r in range(4) if lay.pieces(r)[int(t.name[1:])].numel]
        assert len(owners) == 1
    assert lay.shard_size >= 50


def test_big_tensor_spanning_many_windows():
    tensors = [spec("small", (3,)), spec("big", (1000, 8), "row"), spec("tail", (5, 8), 2)]
    lay = plan_in_order(tensors, 7, align=4)
    assert_valid(lay, tensors)


def test_random_instances_are_valid():
    rng = random.Random(0)
    for _ in range(300):
        tensors = []
        for i in range(rng.randint(1, 8)):
            shape = (rng.randint(1, 40), rng.randint(1, 12)) if rng.random() < 0.7 else (rng.randint(1, 50),)
            gran = rng.choice(["element", "row", "tensor", rng.randint(1, 5)])
            tensors.append(spec(f"t{i}", shape, gran))
        lay = plan_in_order(tensors, rng.randint(1, 8), align=rng.choice([1, 2, 4, 8]))
        assert_valid(lay, tensors)


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        plan_in_order([spec("a", (4,))], 0)
