"""Where a rank's step time went (busy, communication, idle) and the measured bubble."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = ["StepTimes", "StepClock", "measured_bubble"]


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
    """Accumulates busy and communication time over one step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.busy = 0.0
        self.comm = 0.0

    @contextmanager
    def computing(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.busy += time.perf_counter() - begin

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
    longest = max(wall)
    return 0.0 if longest <= 0 else 1.0 - sum(busy) / (len(busy) * longest)
