"""Sharding: every sample exactly once per epoch, the same plan on every rank."""

import numpy as np
import pytest

from mpipar.data.sharding import rank_batches, step_bounds, step_plan, steps_per_epoch


@pytest.mark.parametrize("num_samples,batch_size", [(60000, 128), (1000, 7), (101, 10), (10, 3), (37, 100)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_sample_once_and_every_rank_busy(num_samples, batch_size, world_size):
    if num_samples < world_size:
        pytest.skip("covered by the error test")
    plan = step_plan(num_samples, batch_size, world_size, seed=3, epoch=1)
    used = np.concatenate([part for step in plan for part in step])
    assert np.array_equal(np.sort(used), np.arange(num_samples))
    assert len(plan) == steps_per_epoch(num_samples, batch_size, world_size)
    for step in plan:
        sizes = [len(part) for part in step]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert max(sizes) <= batch_size + 1


def test_sixty_thousand_on_seven_ranks_unequal_shards():
    per_rank = [sum(len(b) for b in rank_batches(60000, 128, 7, r, seed=0, epoch=0)) for r in range(7)]
    assert sum(per_rank) == 60000
    assert len(set(per_rank)) == 2  # unequal shards: weighting matters


def test_shards_of_n_and_n_plus_one_have_equal_step_counts():
    counts = [len(rank_batches(9, 2, 2, r, seed=0, epoch=0)) for r in range(2)]
    sizes = [sum(len(b) for b in rank_batches(9, 2, 2, r, seed=0, epoch=0)) for r in range(2)]
    assert counts[0] == counts[1] and sorted(sizes) == [4, 5]


def test_shuffle_fixed_by_seed_and_varies_by_epoch():
    a = step_plan(100, 5, 3, seed=1, epoch=0)
    b = step_plan(100, 5, 3, seed=1, epoch=0)
    c = step_plan(100, 5, 3, seed=1, epoch=1)
    d = step_plan(100, 5, 3, seed=2, epoch=0)
    flat = [np.concatenate([p for s in plan for p in s]) for plan in (a, b, c, d)]
    assert np.array_equal(flat[0], flat[1])
    assert not np.array_equal(flat[0], flat[2]) and not np.array_equal(flat[0], flat[3])


def test_small_remainder_joins_last_step():
    assert step_bounds(10, 2, 4) == [0, 10]      # 8 + remainder 2 < 4 ranks
    assert step_bounds(13, 2, 4) == [0, 8, 13]   # remainder 5 >= 4 ranks: own step


@pytest.mark.parametrize("args,match", [((3, 2, 4), "cannot give each"), ((10, 0, 2), "batch_size"),
                                        ((10, 2, 0), "world_size")])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        step_plan(*args, seed=0, epoch=0)
    with pytest.raises(ValueError, match="outside"):
        rank_batches(10, 2, 2, 2, seed=0, epoch=0)


@pytest.mark.parametrize("before,after", [(4, 2), (4, 3), (2, 4), (3, 1)])
@pytest.mark.parametrize("switch", [0, 3, 7])
def test_changing_the_number_of_ranks_mid_epoch_uses_every_sample_once(before, after, switch):
    """A run resumed on another number of ranks keeps the global batch: the steps before the
    switch (old ranks) and after it (new ranks) take every sample of the epoch exactly once."""
    num_samples, global_batch = 101, 12
    old = step_plan(num_samples, global_batch // before, before, seed=5, epoch=2, global_batch=global_batch)
    new = step_plan(num_samples, global_batch // before, after, seed=5, epoch=2, global_batch=global_batch)
    assert len(old) == len(new) == steps_per_epoch(num_samples, 1, after, global_batch=global_batch)
    used = [i for step in old[:switch] for share in step for i in share]
    used += [i for step in new[switch:] for share in step for i in share]
    assert sorted(used) == list(range(num_samples))
    for step in new:  # shares differ by at most one, every rank has samples
        sizes = [len(share) for share in step]
        assert len(sizes) == after and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
