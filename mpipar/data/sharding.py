"""Which samples each rank takes at each step: the same plan on every rank, fixed by the seed."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

__all__ = ["step_bounds", "step_plan", "rank_batches", "steps_per_epoch"]


def _global_batch(num_samples: int, batch_size: int, world_size: int, global_batch: Optional[int]) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if num_samples < world_size:
        raise ValueError(
            f"{num_samples} samples cannot give each of {world_size} ranks at least one; "
            f"use fewer ranks or more data")
    if global_batch is None:
        return batch_size * world_size
    if global_batch < world_size:
        raise ValueError(f"a global batch of {global_batch} cannot give each of {world_size} ranks a sample")
    return global_batch


def step_bounds(num_samples: int, batch_size: int, world_size: int, *,
                global_batch: Optional[int] = None) -> List[int]:
    """Offsets into the epoch's permutation where each step's global batch starts/ends.

    Steps take ``global_batch`` samples (default ``batch_size * world_size``; a run
    resumed on another number of ranks keeps its global batch, so its steps cover the
    same samples). A remainder of at least ``world_size`` samples is one more, shorter
    step; a smaller remainder joins the last step, so every rank has at least one
    sample in every step and every sample is used exactly once per epoch.
    """
    global_batch = _global_batch(num_samples, batch_size, world_size, global_batch)
    full, remainder = divmod(num_samples, global_batch)
    bounds = [i * global_batch for i in range(full + 1)]
    if remainder >= world_size or full == 0:
        bounds.append(num_samples)
    else:
        bounds[-1] = num_samples
    return bounds


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, *,
                    global_batch: Optional[int] = None) -> int:
    """Number of optimizer steps in one epoch (the same on every rank)."""
    return len(step_bounds(num_samples, batch_size, world_size, global_batch=global_batch)) - 1


def step_plan(num_samples: int, batch_size: int, world_size: int, *, seed: int, epoch: int,
              shuffle: bool = True, global_batch: Optional[int] = None) -> List[List[np.ndarray]]:
    """Indices for every step and rank: ``plan[step][rank]``.

    Pure and deterministic: a function of its arguments only, so every rank
    computes the same plan with no communication. The shuffle is a permutation
    seeded by ``(seed, epoch)``. Within a step, ranks' shares differ by at most one.
    """
    bounds = step_bounds(num_samples, batch_size, world_size, global_batch=global_batch)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    else:
        order = np.arange(num_samples)
    return [np.array_split(order[start:stop], world_size)
            for start, stop in zip(bounds[:-1], bounds[1:])]


def rank_batches(num_samples: int, batch_size: int, world_size: int, rank: int, *, seed: int,
                 epoch: int, shuffle: bool = True, global_batch: Optional[int] = None) -> List[np.ndarray]:
    """This rank's index arrays, one per step of the epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    plan = step_plan(num_samples, batch_size, world_size, seed=seed, epoch=epoch, shuffle=shuffle,
                     global_batch=global_batch)
    return [step[rank] for step in plan]
