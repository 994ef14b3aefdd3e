"""Pipeline schedules as pure streams of small named instructions (no MPI here).

A schedule orders, for each of ``stages`` pipeline stages, the forward and backward
passes of ``microbatches`` micro-batches. Each compute step expands into the
instructions a stage executes: ``RecvActivation``, ``Forward``, ``SendActivation``
on the way down; ``RecvGrad``, ``Backward``, ``SendGrad`` on the way up.

Schedules:

* ``naive``: one micro-batch goes all the way forward and back before the next
  starts (plain layer-partitioned model parallelism; only one stage works at a time).
* ``gpipe``: all forwards, then all backwards (GPipe); a stage holds the
  activations of all ``microbatches`` at once.
* ``1f1b``: after ``stages - stage - 1`` warm-up forwards a stage alternates one
  forward and one backward (PipeDream-flush / Megatron 1F1B); at most
  ``stages - stage`` micro-batches are in flight on a stage.
* ``forward``: forwards only (evaluation).

``Schedule.ticks()`` places every compute step on a unit-time clock (each forward or
backward takes one tick and starts as soon as its stage is free and its input has
been produced). ``rank_program`` merges the streams of the stages a rank owns in
clock order; because every receive is matched by a send at an earlier tick, a rank
that posts its sends without blocking (``isend``) can never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Instruction",
    "RecvActivation",
    "Forward",
    "SendActivation",
    "RecvGrad",
    "Backward",
    "SendGrad",
    "Schedule",
    "SCHEDULES",
    "rank_program",
    "placement_bubble",
]

SCHEDULES = ("naive", "gpipe", "1f1b", "forward")


@dataclass(frozen=True)
class Instruction:
    """One step of a stage's stream, for one micro-batch."""

    stage: int
    microbatch: int
    code = "?"

    def __str__(self) -> str:
        return f"{self.code}{self.microbatch}"


@dataclass(frozen=True)
class RecvActivation(Instruction):
    """Receive the input activation of ``microbatch`` from stage ``stage - 1``."""

    code = "ra"


@dataclass(frozen=True)
class Forward(Instruction):
    """Run the stage's layers on ``microbatch`` (and the loss, on the last stage)."""

    code = "F"


@dataclass(frozen=True)
class SendActivation(Instruction):
    """Send the output activation of ``microbatch`` to stage ``stage + 1``."""

    code = "sa"


@dataclass(frozen=True)
class RecvGrad(Instruction):
    """Receive the gradient of this stage's output from stage ``stage + 1``."""

    code = "rg"


@dataclass(frozen=True)
class Backward(Instruction):
    """Back-propagate ``microbatch`` through the stage, accumulating into ``.grad``."""

    code = "B"


@dataclass(frozen=True)
class SendGrad(Instruction):
    """Send the gradient of this stage's input to stage ``stage - 1``."""

    code = "sg"


def _compute_order(name: str, stages: int, microbatches: int, stage: int) -> List[Tuple[str, int]]:
    """The order of ('F', i) and ('B', i) steps on ``stage``."""
    m = microbatches
    if name == "forward":
        return [("F", i) for i in range(m)]
    if name == "naive":
        return [step for i in range(m) for step in (("F", i), ("B", i))]
    if name == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    # 1f1b: warm-up forwards, steady one-forward-one-backward, cool-down backwards.
    warmup = min(stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(m - warmup, m)]
    return order


@dataclass(frozen=True)
class Schedule:
    """The order of forward and backward steps of every stage.

    Args:
        name: one of ``SCHEDULES``.
        stages: number of pipeline stages (>= 1).
        microbatches: number of micro-batches per step (>= 1).

    Raises:
        ValueError: unknown name, or stages / microbatches below 1.
    """

    name: str
    stages: int
    microbatches: int

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {self.name!r}; choose one of {SCHEDULES}")
        for what, value in (("stages", self.stages), ("microbatches", self.microbatches)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"a schedule needs {what} >= 1 (an int), got {value!r}")

    @property
    def has_backward(self) -> bool:
        return self.name != "forward"

    def compute_order(self, stage: int) -> List[Tuple[str, int]]:
        """[('F', 0), ('B', 0), ...]: the forward/backward order on ``stage``."""
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage {stage} out of range for {self.stages} stages")
        return _compute_order(self.name, self.stages, self.microbatches, stage)

    def steps(self, stage: int) -> List[List[Instruction]]:
        """The instructions of ``stage`` grouped by compute step (receive, compute, send)."""
        first, last = stage == 0, stage == self.stages - 1
        groups = []
        for kind, microbatch in self.compute_order(stage):
            if kind == "F":
                group = [] if first else [RecvActivation(stage, microbatch)]
                group.append(Forward(stage, microbatch))
                group += [] if last else [SendActivation(stage, microbatch)]
            else:
                group = [] if last else [RecvGrad(stage, microbatch)]
                group.append(Backward(stage, microbatch))
                group += [] if first else [SendGrad(stage, microbatch)]
            groups.append(group)
        return groups

    def instructions(self, stage: int) -> List[Instruction]:
        """The full instruction stream of ``stage`` (receives and sends included)."""
        return [instruction for group in self.steps(stage) for instruction in group]

    @cached_property
    def _ticks(self) -> Dict[Tuple[str, int, int], int]:
        orders = [self.compute_order(s) for s in range(self.stages)]
        done: Dict[Tuple[str, int, int], int] = {}  # (kind, stage, microbatch) -> tick
        position = [0] * self.stages
        free_at = [0] * self.stages
        while any(position[s] < len(orders[s]) for s in range(self.stages)):
            progressed = False
            for s in range(self.stages):
                if position[s] == len(orders[s]):
                    continue
                kind, i = orders[s][position[s]]
                if kind == "F":
                    needs = [("F", s - 1, i)] if s > 0 else []
                else:
                    needs = [("B", s + 1, i)] if s < self.stages - 1 else [("F", s, i)]
                if all(need in done for need in needs):
                    start = max([free_at[s]] + [done[need] + 1 for need in needs])
                    done[(kind, s, i)] = start
                    free_at[s] = start + 1
                    position[s] += 1
                    progressed = True
            if not progressed:  # cannot happen for the schedules above
                raise RuntimeError(f"schedule {self.name} has a dependency cycle")
        return done

    def ticks(self, stage: int) -> List[int]:
        """The unit-time clock tick of each step of ``compute_order(stage)``."""
        return [self._ticks[(kind, stage, i)] for kind, i in self.compute_order(stage)]

    @property
    def length(self) -> int:
        """Number of unit ticks from the first forward to the last step."""
        return 1 + max(self._ticks.values())

    def grid(self) -> str:
        """A compact grid: one row per stage, one column per tick, ``.`` = idle."""
        rows = []
        for s in range(self.stages):
            cells = ["."] * self.length
            for (kind, i), tick in zip(self.compute_order(s), self.ticks(s)):
                cells[tick] = f"{kind}{i}"
            width = max(len(c) for c in cells)
            rows.append(" ".join(c.ljust(width) for c in cells).rstrip())
        return "\n".join(rows)

    def max_in_flight(self, stage: int) -> int:
        """Most micro-batches whose activations ``stage`` holds at once."""
        in_flight = peak = 0
        for kind, _ in self.compute_order(stage):
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        return peak if self.has_backward else 1

    @property
    def ideal_bubble(self) -> float:
        """Idle fraction of a stage with equal stage times and free communication.

        ``(p-1)/(m+p-1)`` for gpipe, 1f1b and forward; ``(p-1)/p`` for naive.
        """
        p, m = self.stages, self.microbatches
        return (p - 1) / p if self.name == "naive" else (p - 1) / (m + p - 1)

    def __str__(self) -> str:
        return f"{self.name} schedule, {self.stages} stages, {self.microbatches} micro-batches"


def rank_program(schedule: Schedule, stage_ranks: Sequence[int], rank: int) -> List[Instruction]:
    """The instructions ``rank`` executes, for the stages it owns, in clock order.

    Args:
        schedule: the schedule.
        stage_ranks: the rank that owns each stage (``len == schedule.stages``).
        rank: the rank whose program to build.

    Returns:
        The merged stream, ordered by (tick, stage). Every receive's matching send
        sits at an earlier tick, so with non-blocking sends no order of ranks can
        deadlock. Empty when ``rank`` owns no stage.
    """
    if len(stage_ranks) != schedule.stages:
        raise ValueError(f"{len(stage_ranks)} stage owners given for {schedule.stages} stages")
    keyed = []
    for stage, owner in enumerate(stage_ranks):
        if owner == rank:
            for tick, group in zip(schedule.ticks(stage), schedule.steps(stage)):
                keyed += [((tick, stage, n), instruction) for n, instruction in enumerate(group)]
    return [instruction for _, instruction in sorted(keyed, key=lambda pair: pair[0])]


def placement_bubble(schedule: Schedule, stage_ranks: Sequence[int],
                     stage_times: Optional[Sequence[Tuple[float, float]]] = None) -> float:
    """Ideal bubble of ``schedule`` when the stages sit on ``stage_ranks``.

    Communication is free and each rank runs its :func:`rank_program` in order,
    one step at a time, each step starting once its input exists. ``stage_times``
    gives each stage's (forward, backward) duration per micro-batch; by default
    every step takes one unit. Returns the idle fraction ``1 - work / (ranks *
    makespan)``. With one stage per rank and equal stages this is
    :attr:`Schedule.ideal_bubble`; a rank holding several stages (``[0, 1, 0]``)
    cannot run them at once, and unequal ``stage_times`` (measured ones, say) give
    the bubble that the imbalance alone costs.
    """
    if stage_times is None:
        stage_times = [(1.0, 1.0)] * schedule.stages
    if len(stage_times) != schedule.stages or any(t < 0 for pair in stage_times for t in pair):
        raise ValueError(f"need (forward, backward) times >= 0 for {schedule.stages} stages, got {stage_times}")
    ranks = sorted(set(stage_ranks))
    programs = {r: [i for i in rank_program(schedule, stage_ranks, r) if isinstance(i, (Forward, Backward))]
                for r in ranks}
    finish: Dict[Tuple[str, int, int], float] = {}
    position = {r: 0 for r in ranks}
    free_at = {r: 0.0 for r in ranks}
    work = 0.0
    last = schedule.stages - 1
    while any(position[r] < len(programs[r]) for r in ranks):
        progressed = False
        for r in ranks:
            if position[r] == len(programs[r]):
                continue
            step = programs[r][position[r]]
            s, i = step.stage, step.microbatch
            if isinstance(step, Forward):
                needs = [("F", s - 1, i)] if s > 0 else []
            else:
                needs = [("B", s + 1, i)] if s < last else [("F", s, i)]
            if all(need in finish for need in needs):
                duration = stage_times[s][0 if isinstance(step, Forward) else 1]
                start = max([free_at[r]] + [finish[need] for need in needs])
                finish[(step.code, s, i)] = free_at[r] = start + duration
                work += duration
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule} deadlocks on stage ranks {tuple(stage_ranks)}")
    makespan = max(finish.values())
    return 0.0 if makespan <= 0 else 1.0 - work / (len(ranks) * makespan)
