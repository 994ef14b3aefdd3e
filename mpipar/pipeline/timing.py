"""Where a rank's step time went (busy, communication, idle) and the measured bubble."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

__all__ = ["StepTimes", "StepClock", "measured_bubble", "bubble_per_step"]


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one step on one rank; ``busy + comm + idle == wall``.

    ``busy``: forward and backward compute. ``comm``: inside MPI moving data
    (posting sends, receiving a message whose sender has posted it, completing
    sends). ``idle``: the rest: waiting for a peer's message to be posted (the
    pipeline bubble), for other ranks in the per-step metadata exchange and the
    loss broadcast, and Python overhead.
    """

    wall: float
    busy: float
    comm: float
    idle: float


class StepClock:
    """Times one step: ``communicating()`` adds to ``comm``; the caller sets ``busy`` before ``finish()``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.busy = 0.0
        self.comm = 0.0

    @contextmanager
    def communicating(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.comm += time.perf_counter() - begin

    def finish(self) -> StepTimes:
        wall = time.perf_counter() - self.start
        return StepTimes(wall=wall, busy=self.busy, comm=self.comm,
                         idle=max(0.0, wall - self.busy - self.comm))


def measured_bubble(busy: Sequence[float], wall: Sequence[float]) -> float:
    """Fraction of the pipeline's rank-time not spent computing.

    ``1 - sum(busy) / (ranks * max(wall))``: with equal stages and free
    communication this approaches the ideal ``(p-1)/(m+p-1)``; unequal stages and
    communication add to it.
    """
    if not busy or len(busy) != len(wall):
        raise ValueError(f"need busy and wall times for the same ranks, got {len(busy)} and {len(wall)}")
    return float(bubble_per_step(np.asarray([busy], float), np.asarray([wall], float), len(busy))[0])


def bubble_per_step(busy: np.ndarray, wall: np.ndarray, stages: int, tp: int = 1) -> np.ndarray:
    """:func:`measured_bubble` of every step, averaged over the pipelines.

    Args:
        busy, wall: (steps, ranks) seconds per step and rank, ranks laid out as
            :class:`~mpipar.comm.topology.ProcessGrid` does: rank ``(r*stages + s)*tp + t``
            is stage ``s`` of pipeline ``(r, t)``.
        stages: ranks per pipeline.
        tp: tensor-parallel ranks per stage (each a pipeline of its own).

    Returns:
        (steps,) the bubble of each step, the mean over pipelines.
    """
    steps, ranks = busy.shape
    shape = (steps, ranks // (stages * tp), stages, tp)
    busy_sum = busy.reshape(shape).sum(2)
    longest = wall.reshape(shape).max(2)
    per_pipeline = np.where(longest > 0, 1.0 - busy_sum / (stages * np.where(longest > 0, longest, 1.0)), 0.0)
    return per_pipeline.reshape(steps, -1).mean(1)
