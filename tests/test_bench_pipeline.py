"""The pure parts of ``benchmarks/bench_pipeline.py`` (``benchmarks/_pipeline_variants.py``): the chunk layouts at
p stages, torch's V shape, the skips a torch stage carries, the schedule tables and the best-of summary.
No launches: the benchmark itself runs under mpirun by hand."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _pipeline_variants as variants  # noqa: E402

from mpipar.models.skip import AddSkip, SaveSkip, SkipSequential, find_skips  # noqa: E402
from mpipar.pipeline_plan.placement import Placement, Segment  # noqa: E402
from mpipar.pipeline_plan.schedule import FLUSHING_SCHEDULES  # noqa: E402


def test_chunk_ranks_of_each_layout():
    assert variants.chunk_ranks("stages", 3) == (0, 1, 2)
    assert variants.chunk_ranks("looped", 2, 2) == (0, 1, 0, 1)
    assert variants.chunk_ranks("looped", 4, 2) == (0, 1, 2, 3, 0, 1, 2, 3)
    assert variants.chunk_ranks("v", 2) == (0, 1, 1, 0)
    assert variants.chunk_ranks("v", 4) == (0, 1, 2, 3, 3, 2, 1, 0)
    with pytest.raises(ValueError, match="unknown layout"):
        variants.chunk_ranks("zigzag", 2)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_v_shape_gives_rank_r_chunks_r_and_2p_minus_1_minus_r(size):
    ranks = variants.chunk_ranks("v", size)
    assert len(ranks) == 2 * size
    for rank in range(size):
        assert [chunk for chunk, r in enumerate(ranks) if r == rank] == [rank, 2 * size - 1 - rank]


def test_segments_keep_adjacent_chunks_of_one_rank_apart():
    chunks = variants.segments([2, 1, 1, 1], variants.chunk_ranks("v", 2))
    assert chunks == (Segment(0, 0, 2), Segment(1, 2, 3), Segment(1, 3, 4), Segment(0, 4, 5))
    assert variants.layer_ranks(chunks) == (0, 0, 1, 1, 0)
    with pytest.raises(ValueError, match="layer count >= 1 for each of 4 chunks"):
        variants.segments([2, 1, 1], variants.chunk_ranks("v", 2))


@pytest.mark.parametrize("size,virtual", [(2, 2), (3, 2), (4, 2), (2, 3)])
def test_looped_segments_are_mpipars_interleaved_placement(size, virtual):
    balance = [1 + chunk % 3 for chunk in range(size * virtual)]
    chunks = variants.segments(balance, variants.chunk_ranks("looped", size, virtual))
    assert chunks == Placement.looped(balance, size).segments


def test_mpipar_schedules_on_their_layouts():
    plan = variants.mpipar_schedule("interleaved", 4, 2, 8)
    assert (plan.stages, plan.virtual_stages, plan.ranks) == (8, 2, 4)
    assert plan.ideal_bubble == pytest.approx(3 / (2 * 8 + 3))
    assert variants.mpipar_schedule("1f1b", 4, 2, 8).ideal_bubble == pytest.approx(3 / 11)
    assert variants.mpipar_schedule("zero-bubble", 4, 2, 8).stages == 4
    why = variants.mpipar_schedule("interleaved", 4, 2, 6)  # Megatron's groups of p micro-batches
    assert isinstance(why, str) and "multiple of 4" in why


def test_tables_name_registered_schedules_and_known_layouts():
    assert set(variants.MPIPAR) <= set(FLUSHING_SCHEDULES)
    assert set(variants.MPIPAR.values()) | {layout for _, layout in variants.TORCH.values()} <= set(variants.LAYOUTS)
    assert all(set(torch_names) <= set(variants.TORCH) for torch_names in variants.COUNTERPARTS.values())
    assert variants.chosen("best") == (tuple(variants.MPIPAR), tuple(variants.TORCH))
    assert variants.chosen("zero-bubble") == (("zero-bubble",), ("zero-bubble", "zbv"))
    with pytest.raises(ValueError, match="unknown --schedule"):
        variants.chosen("pipedream")


def test_carried_skips_pass_through_the_stages_in_between():
    stage_of = [0, 0, 1, 1, 2, 2, 3, 3]
    skips = [("a", 1, 2), ("b", 1, 6), ("c", 4, 5)]  # a: one cut; b: three cuts; c: inside stage 2
    assert variants.carried_skips(stage_of, skips) == [
        ([], ["a", "b"]), (["a", "b"], ["b"]), (["b"], ["b"]), (["b"], [])]
    assert variants.carried_skips([0, 0, 0], [("a", 0, 2)]) == [([], [])]


def _long_skip_model():
    torch.manual_seed(0)
    return SkipSequential(nn.Linear(6, 6), SaveSkip("long"), nn.Linear(6, 6), nn.Tanh(), SaveSkip("short"),
                          nn.Linear(6, 6), AddSkip("short"), nn.Tanh(), nn.Linear(6, 6), AddSkip("long"),
                          nn.Linear(6, 3)).double()


@pytest.mark.parametrize("balance", [[2, 3, 3, 3], [1, 1, 1, 8], [4, 4, 2, 1], [6, 5]])
def test_torch_stages_carrying_skips_equal_the_unsplit_model(balance):
    """The benchmark's torch stages, chained with the skips each carries, give the unsplit model's output and
    gradients (float64), also for a skip crossing several cuts."""
    bench_pipeline = pytest.importorskip("bench_pipeline")  # needs torch.distributed.pipelining
    model = _long_skip_model()
    chunks = variants.segments(balance, variants.chunk_ranks("stages", len(balance)))
    stage_of = [index for index, chunk in enumerate(chunks) for _ in range(chunk.start, chunk.stop)]
    carried = variants.carried_skips(stage_of, [(e.name, e.producer, e.consumer) for e in find_skips(model)])
    stages = [bench_pipeline._TorchStage(copy.deepcopy(model)[c.start:c.stop], *carried[i])
              for i, c in enumerate(chunks)]
    x = torch.randn(5, 6, dtype=torch.float64)
    values = (x,)
    for stage in stages:
        output = stage(*values)
        values = output if isinstance(output, tuple) else (output,)
    assert len(values) == 1
    expected = model(x)
    torch.testing.assert_close(values[0], expected, rtol=0, atol=1e-12)
    values[0].square().sum().backward()
    expected.square().sum().backward()
    split_grads = [p.grad for stage in stages for p in stage.parameters()]
    torch.testing.assert_close(split_grads, [p.grad for p in model.parameters()], rtol=0, atol=1e-12)


def test_best_per_round_and_who_won():
    seconds = {"mpipar a": [3.0, 1.0, 2.5], "mpipar b": [2.0, 2.0, 2.0], "torch c": [0.5, 0.5, 0.5]}
    best = variants.best_per_round(seconds, ["mpipar a", "mpipar b"])
    assert best.seconds == [2.0, 1.0, 2.0]
    assert best.names == ["mpipar b", "mpipar a", "mpipar b"]
    assert best.wins() == [("mpipar b", 2), ("mpipar a", 1)]
    assert variants.best_per_round(seconds).names == ["torch c"] * 3
    with pytest.raises(ValueError, match="different numbers of rounds"):
        variants.best_per_round({"a": [1.0], "b": [1.0, 2.0]})
    with pytest.raises(ValueError, match="best of no variants"):
        variants.best_per_round(seconds, [])
