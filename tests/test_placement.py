"""Placements: layers to ranks, the stages they make, and validation (no MPI)."""

import pytest

from mpipar.pipeline.microbatch import check_microbatches, split
from mpipar.pipeline.placement import Placement, Segment, even_balance


def test_balance_gives_contiguous_stages():
    placement = Placement.from_balance([2, 3])
    assert placement.ranks == (0, 0, 1, 1, 1)
    assert placement.segments == (Segment(0, 0, 2), Segment(1, 2, 5))
    assert placement.stage_ranks == (0, 1)
    assert placement.is_contiguous
    assert placement.balance() == [2, 3]


def test_non_contiguous_placement_makes_a_stage_per_run():
    # fc1 and fc4 on rank 0, fc2 and fc3 on rank 1: activation 0 -> 1 -> 0
    placement = Placement.from_names(["fc1", "fc2", "fc3", "fc4"], {"fc1": 0, "fc4": 0, "fc2": 1, "fc3": 1})
    assert placement.ranks == (0, 1, 1, 0)
    assert placement.segments == (Segment(0, 0, 1), Segment(1, 1, 3), Segment(0, 3, 4))
    assert placement.stage_ranks == (0, 1, 0)
    assert not placement.is_contiguous
    assert placement.num_ranks == 2
    assert str(placement) == "layers 0 on rank 0 | layers 1-2 on rank 1 | layers 3 on rank 0"


def test_round_robin_and_reversed_placements():
    assert Placement((0, 1, 0, 1)).stage_ranks == (0, 1, 0, 1)
    assert Placement((1, 1, 0)).segments == (Segment(1, 0, 2), Segment(0, 2, 3))


@pytest.mark.parametrize("layers,parts,expected", [(7, 3, [3, 2, 2]), (4, 4, [1, 1, 1, 1]), (9, 2, [5, 4]),
                                                   (5, 1, [5])])
def test_even_balance(layers, parts, expected):
    assert even_balance(layers, parts) == expected
    assert Placement.even(layers, parts).balance() == expected


def test_validate_accepts_a_matching_model_and_world():
    Placement((0, 1, 1, 0)).validate(num_layers=4, world_size=2)


@pytest.mark.parametrize("ranks,layers,world,match", [
    ((0, 1, 1), 4, 2, "covers 3 layers but the model has 4"),
    ((0, 1, 2), 3, 2, r"uses rank\(s\) \[2\] but the communicator has 2 process\(es\); run with 3"),
    ((0, 0, 0), 3, 2, r"rank\(s\) \[1\] of 2 hold no layer"),
    ((0, 2, 2), 3, 3, r"rank\(s\) \[1\] of 3 hold no layer"),
])
def test_validate_rejects_with_values_and_a_hint(ranks, layers, world, match):
    with pytest.raises(ValueError, match=match):
        Placement(ranks).validate(num_layers=layers, world_size=world)


@pytest.mark.parametrize("bad,match", [((), "at least one layer"), ((0, -1), r"\(1, -1\)"),
                                       ((0, 1.0), r"\(1, 1.0\)"), ((0, True), "ints >= 0")])
def test_bad_rank_lists(bad, match):
    with pytest.raises(ValueError, match=match):
        Placement(bad)


def test_bad_balances_and_names():
    with pytest.raises(ValueError, match=r"got \[2, 0\]"):
        Placement.from_balance([2, 0])
    with pytest.raises(ValueError, match=r"missing \['fc2'\], unknown \['fc9'\]"):
        Placement.from_names(["fc1", "fc2"], {"fc1": 0, "fc9": 1})
    with pytest.raises(ValueError, match="use at most 2 ranks"):
        even_balance(2, 3)


def test_microbatch_split_and_errors():
    import torch

    assert [len(chunk) for chunk in split(torch.zeros(12, 3), 4)] == [3, 3, 3, 3]
    assert check_microbatches(12, 12) == 1
    with pytest.raises(ValueError,
                       match=r"12 samples does not split into 5 equal micro-batches.*\[1, 2, 3, 4, 6, 12\]"):
        check_microbatches(12, 5)
    with pytest.raises(ValueError, match="does not split into 8"):
        check_microbatches(4, 8)
    with pytest.raises(ValueError, match="int >= 1"):
        check_microbatches(4, 0)
