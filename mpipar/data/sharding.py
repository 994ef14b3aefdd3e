"""Which samples each rank takes at each step: the same plan on every rank, fixed by the seed."""

from __future__ import annotations

from typing import List

import numpy as np

__all__ = ["step_bounds", "step_plan", "rank_batches", "steps_per_epoch"]


def _validate(num_samples: int, batch_size: int, world_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if num_samples < world_size:
        raise ValueError(
            f"{num_samples} samples cannot give each of {world_size} ranks at least one; "
            f"use fewer ranks or more data")


def step_bounds(num_samples: int, batch_size: int, world_size: int) -> List[int]:
    """Offsets into the epoch's permutation where each step's global batch starts/ends.

    Steps take ``batch_size * world_size`` samples. A remainder of at least
    ``world_size`` samples is one more, shorter step; a smaller remainder joins the
    last step, so every rank has at least one sample in every step and every sample
    is used exactly once per epoch.
    """
    _validate(num_samples, batch_size, world_size)
    global_batch = batch_size * world_size
    full, remainder = divmod(num_samples, global_batch)
    bounds = [i * global_batch for i in range(full + 1)]
    if remainder >= world_size or full == 0:
        bounds.append(num_samples)
    else:
        bounds[-1] = num_samples
    return bounds


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Number of optimizer steps in one epoch (the same on every rank)."""
    return len(step_bounds(num_samples, batch_size, world_size)) - 1


def step_plan(num_samples: int, batch_size: int, world_size: int, *, seed: int, epoch: int,
              shuffle: bool = True) -> List[List[np.ndarray]]:
    """Indices for every step and rank: ``plan[step][rank]``.

    Pure and deterministic: a function of its arguments only, so every rank
    computes the same plan with no communication. The shuffle is a permutation
    seeded by ``(seed, epoch)``. Within a step, ranks' shares differ by at most one.
    """
    bounds = step_bounds(num_samples, batch_size, world_size)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    return [np.array_split(order[start:stop], world_size)
            for start, stop in zip(bounds[:-1], bounds[1:])]


def rank_batches(num_samples: int, batch_size: int, world_size: int, rank: int, *, seed: int,
                 epoch: int, shuffle: bool = True) -> List[np.ndarray]:
    """This rank's index arrays, one per step of the epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    plan = step_plan(num_samples, batch_size, world_size, seed=seed, epoch=epoch, shuffle=shuffle)
    return [step[rank] for step in plan]
