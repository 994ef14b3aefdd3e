"""The automatic partitioner: balance by time against literal tables and brute force; profiling."""

import itertools
import random

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, assert_comm_still_usable
from mpipar.pipeline.partition import (
    auto_balance,
    balance_by_time,
    format_report,
    gather_stage_times,
    profile_layers,
    stage_sums,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("times,stages,expected", [
    ([1, 1, 1, 1], 2, [2, 2]),
    ([4, 1, 1, 1, 1], 2, [1, 4]),
    ([1, 2, 3, 4, 5], 3, [3, 1, 1]),
    ([1, 1, 1, 1, 1, 1, 6], 2, [6, 1]),
    ([5, 5, 5], 3, [1, 1, 1]),
    ([2, 0, 0, 2], 2, [1, 3]),
    ([3, 1, 1, 1], 1, [4]),
])
def test_balance_by_time_literal_tables(times, stages, expected):
    assert balance_by_time(times, stages) == expected


def brute_force_best(times, stages):
    n = len(times)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(times[a:b]) for a, b in zip(bounds[:-1], bounds[1:])))
    return best


def test_balance_by_time_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        times = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.5, 7.0]) for _ in range(n)]
        balance = balance_by_time(times, stages)
        assert len(balance) == stages and min(balance) >= 1 and sum(balance) == n
        assert max(stage_sums(times, balance)) == pytest.approx(brute_force_best(times, stages))


def test_balance_by_time_rejects_bad_input():
    with pytest.raises(ValueError, match="use at most 2 ranks"):
        balance_by_time([1, 2], 3)
    with pytest.raises(ValueError, match="layer times must be >= 0"):
        balance_by_time([1, -2], 2)
    with pytest.raises(ValueError, match="covers 3 layers, not 2"):
        stage_sums([1, 2], [1, 2])


def test_profile_layers_measures_every_layer_and_changes_no_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profiles = profile_layers(model, torch.randn(6, 8), repeats=2)
    assert [p.name for p in profiles] == ["0", "1", "2", "3"]
    assert [p.param_bytes for p in profiles] == [4 * (8 * 32 + 32), 4 * 64, 0, 4 * (32 * 4 + 4)]
    assert [p.activation_bytes for p in profiles] == [4 * 6 * 32] * 3 + [4 * 6 * 4]
    assert all(p.forward_time > 0 and p.backward_time >= 0 for p in profiles)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_heavy_layer_gets_a_stage_of_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 512), nn.Linear(512, 512), nn.Linear(512, 16))
    profiles = profile_layers(model, torch.randn(64, 16), repeats=2)
    # the profile is checked for shape, the split on fixed costs (multiply-adds): no wall-clock assertion
    assert len(profiles) == 4 and all(p.time > 0 for p in profiles)
    costs = [16 * 16, 16 * 512, 512 * 512, 512 * 16]
    balance = balance_by_time(costs, 3)
    assert balance == [2, 1, 1]  # the 512x512 layer (30x the others) gets a stage of its own
    report = format_report(balance, stage_sums(costs, balance), [0.001] * 3)
    assert report.splitlines()[0].startswith("stage  layers  predicted ms")
    assert "slowest/mean stage: predicted" in report


@pytest.mark.mpi(min_size=1)
def test_auto_balance_is_the_same_on_every_rank():
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    sample = torch.randn(4, 8) if comm.Get_rank() == 0 else None
    balance, profiles = auto_balance(model, sample, comm.Get_size(), comm, repeats=2)
    gathered = comm.allgather((balance, [p.name for p in profiles]))
    assert_all_ranks(comm, all(g == gathered[0] for g in gathered) and sum(balance) == 6
                     and len(balance) == comm.Get_size(), f"{gathered}")
    times = gather_stage_times(comm, {comm.Get_rank(): 1.0}, comm.Get_size())
    assert_all_ranks(comm, times == [1.0] * comm.Get_size(), f"{times}")


@pytest.mark.mpi(min_size=1)
def test_auto_balance_failure_is_raised_on_every_rank():
    comm = MPI.COMM_WORLD
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(9, 8))
    sample = torch.randn(4, 8) if comm.Get_rank() == 0 else None
    with pytest.raises(ValueError, match="automatic balance on rank 0 failed"):
        auto_balance(model, sample, 1, comm, repeats=1)
    assert_comm_still_usable(comm)


def test_among_equally_slow_splits_the_most_even_one_is_chosen():
    # the last layer (4) is the slowest stage in [1, 3, 1], [2, 2, 1] and [3, 1, 1]; [2, 2, 1]'s fastest is 2
    assert balance_by_time([1, 1, 1, 1, 4], 3) == [2, 2, 1]
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(2, 8)
        stages = rng.randint(1, n)
        times = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(n)]
        sums = stage_sums(times, balance_by_time(times, stages))
        splits = [stage_sums(times, [b - a for a, b in zip((0, *cuts), (*cuts, n))])
                  for cuts in itertools.combinations(range(1, n), stages - 1)]
        slowest = min(max(split) for split in splits)
        assert max(sums) == pytest.approx(slowest)
        assert min(sums) == pytest.approx(max(min(split) for split in splits if max(split) <= slowest + 1e-12))


def test_memory_limit_moves_layers_off_a_stage_with_many_micro_batches_in_flight():
    times, memory = [1, 1, 1, 1], [4, 1, 1, 1]  # the first layer keeps most activations
    assert balance_by_time(times, 2) == [2, 2]
    # 1F1B: stage 0 holds 2 micro-batches, stage 1 one; [2, 2] needs 2 * 5 = 10 on stage 0
    assert balance_by_time(times, 2, memory=memory, in_flight=[2, 1], memory_limit=8) == [1, 3]
    assert balance_by_time(times, 2, memory=memory, fixed_memory=[0, 0, 0, 5], in_flight=[2, 1],
                           memory_limit=8) == [1, 3]  # stage 1: 3 + 5 = 8 fits
    with pytest.raises(ValueError, match=r"within 0.0 MiB .*use more stages, fewer micro-batches"):
        balance_by_time(times, 2, memory=memory, in_flight=[2, 1], memory_limit=7)


def test_profile_counts_saved_activations_and_follows_skips():
    from mpipar.pipeline.partition import stage_memory
    from mpipar.pipeline.skip import AddSkip, SaveSkip, SkipSequential

    torch.manual_seed(0)
    model = SkipSequential(nn.Linear(8, 16), SaveSkip("r"), nn.Tanh(), nn.Linear(16, 16), AddSkip("r"),
                           nn.Linear(16, 4))
    profiles = profile_layers(model, torch.randn(6, 8), repeats=1)
    assert [p.activation_bytes for p in profiles] == [4 * 6 * 16] * 5 + [4 * 6 * 4]
    assert profiles[2].saved_bytes == 4 * 6 * 16  # tanh keeps its output
    assert profiles[3].saved_bytes == 4 * 6 * 16  # the linear keeps its input
    assert profiles[1].saved_bytes == 0 and profiles[4].saved_bytes == 0  # save and add keep nothing
    memory = stage_memory(profiles, [3, 3], [2, 1], param_copies=3)
    params = [p.param_bytes for p in profiles]
    assert memory == [2 * sum(p.saved_bytes for p in profiles[:3]) + 3 * params[0],
                      sum(p.saved_bytes for p in profiles[3:]) + 3 * (params[3] + params[5])]
