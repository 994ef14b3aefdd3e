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
been produced); ``placement_bubble`` runs the same simulator with one worker per rank
and given step times. ``rank_program`` merges the streams of the stages a rank owns
in clock order; because every receive is matched by a send at an earlier tick, a
rank that posts its sends without blocking (``isend``) can never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Instruction",
    "RecvActivation",
    "Forward",
    "SendActivation",
    "RecvGrad",
    "Backward",
    "SendGrad",
    "SendSkip",
    "RecvSkip",
    "SendSkipGrad",
    "RecvSkipGrad",
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


@dataclass(frozen=True)
class SkipInstruction(Instruction):
    """A skip tensor (or its gradient) of ``microbatch`` between ``stage`` and stage ``peer``.

    ``skip`` numbers the skip among those that cross stages (the executor's list).
    """

    skip: int = 0
    peer: int = 0

    def __str__(self) -> str:
        return f"{self.code}{self.microbatch}.{self.skip}"


@dataclass(frozen=True)
class SendSkip(SkipInstruction):
    """Send skip ``skip`` of ``microbatch``, saved on ``stage``, to the later stage ``peer`` that uses it."""

    code = "ss"


@dataclass(frozen=True)
class RecvSkip(SkipInstruction):
    """Receive skip ``skip`` of ``microbatch`` for ``stage`` from the earlier stage ``peer`` that saved it."""

    code = "rs"


@dataclass(frozen=True)
class SendSkipGrad(SkipInstruction):
    """Send the gradient of skip ``skip`` of ``microbatch`` from ``stage`` (its user) back to stage ``peer``."""

    code = "sk"


@dataclass(frozen=True)
class RecvSkipGrad(SkipInstruction):
    """Receive the gradient of skip ``skip`` of ``microbatch`` for ``stage`` (which saved it) from stage ``peer``."""

    code = "rk"


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


def _depends_on(step: Instruction, stages: int) -> Tuple[Instruction, ...]:
    """The compute steps whose results ``step`` consumes (its data dependencies)."""
    s, i = step.stage, step.microbatch
    if isinstance(step, Forward):
        return (Forward(s - 1, i),) if s > 0 else ()
    return (Backward(s + 1, i),) if s < stages - 1 else (Forward(s, i),)


def _simulate(streams: Sequence[Sequence[Instruction]], stages: int, duration: Callable[[Instruction], float],
              stuck: str) -> Dict[Instruction, Tuple[float, float]]:
    """(start, finish) of every compute step when each worker runs its stream in order.

    A worker (a stage, or a rank holding several stages) runs one step at a time;
    a step starts once its worker is free and its inputs have finished, and lasts
    ``duration(step)``. Communication is free. The result is in the order the steps
    were placed. Raises ``RuntimeError(stuck)`` when no worker can go on (a cycle).
    """
    spans: Dict[Instruction, Tuple[float, float]] = {}
    position = [0] * len(streams)
    free_at = [0] * len(streams)
    while any(position[w] < len(stream) for w, stream in enumerate(streams)):
        progressed = False
        for w, stream in enumerate(streams):
            if position[w] == len(stream):
                continue
            step = stream[position[w]]
            needs = _depends_on(step, stages)
            if all(need in spans for need in needs):
                start = max([free_at[w]] + [spans[need][1] for need in needs])
                free_at[w] = start + duration(step)
                spans[step] = (start, free_at[w])
                position[w] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(stuck)
    return spans


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

    def _compute_steps(self, stage: int) -> List[Instruction]:
        """``compute_order(stage)`` as ``Forward`` / ``Backward`` instructions."""
        return [Forward(stage, i) if kind == "F" else Backward(stage, i) for kind, i in self.compute_order(stage)]

    def steps(self, stage: int) -> List[List[Instruction]]:
        """The instructions of ``stage`` grouped by compute step (receive, compute, send)."""
        first, last = stage == 0, stage == self.stages - 1
        groups = []
        for step in self._compute_steps(stage):
            microbatch = step.microbatch
            if isinstance(step, Forward):
                group = [] if first else [RecvActivation(stage, microbatch)]
                group.append(step)
                group += [] if last else [SendActivation(stage, microbatch)]
            else:
                group = [] if last else [RecvGrad(stage, microbatch)]
                group.append(step)
                group += [] if first else [SendGrad(stage, microbatch)]
            groups.append(group)
        return groups

    def instructions(self, stage: int) -> List[Instruction]:
        """The full instruction stream of ``stage`` (receives and sends included)."""
        return [instruction for group in self.steps(stage) for instruction in group]

    @cached_property
    def _ticks(self) -> Dict[Instruction, int]:
        """Start tick of every compute step, one stage per worker, every step one tick."""
        streams = [self._compute_steps(s) for s in range(self.stages)]
        spans = _simulate(streams, self.stages, lambda step: 1, f"schedule {self.name} has a dependency cycle")
        return {step: start for step, (start, _) in spans.items()}

    def ticks(self, stage: int) -> List[int]:
        """The unit-time clock tick of each step of ``compute_order(stage)``."""
        return [self._ticks[step] for step in self._compute_steps(stage)]

    @property
    def length(self) -> int:
        """Number of unit ticks from the first forward to the last step."""
        return 1 + max(self._ticks.values())

    def grid(self) -> str:
        """A compact grid: one row per stage, one column per tick, ``.`` = idle."""
        rows = []
        for s in range(self.stages):
            cells = ["."] * self.length
            for step in self._compute_steps(s):
                cells[self._ticks[step]] = str(step)
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


def _with_skips(group: List[Instruction], skips: Sequence[Tuple[int, int]], stage_ranks: Sequence[int],
                has_backward: bool) -> List[Instruction]:
    """``group`` (one compute step and its activation messages) with the skip messages it needs.

    A forward receives the skips its stage uses before it and sends those its stage
    saves after it; a backward receives the gradients of the skips its stage saved
    before it and sends those of the skips its stage used after it. Skips between two
    stages of one rank need no message (the executor hands them over in memory).
    """
    step = next(instruction for instruction in group if isinstance(instruction, (Forward, Backward)))
    s, i = step.stage, step.microbatch
    crossing = [(k, producer, consumer) for k, (producer, consumer) in enumerate(skips)
                if stage_ranks[producer] != stage_ranks[consumer]]
    if isinstance(step, Forward):
        before = [RecvSkip(s, i, k, producer) for k, producer, consumer in crossing if consumer == s]
        after = [SendSkip(s, i, k, consumer) for k, producer, consumer in crossing if producer == s]
    elif has_backward:
        before = [RecvSkipGrad(s, i, k, consumer) for k, producer, consumer in crossing if producer == s]
        after = [SendSkipGrad(s, i, k, producer) for k, producer, consumer in crossing if consumer == s]
    else:
        before = after = []
    at = group.index(step)
    return group[:at] + before + [step] + group[at + 1:] + after


def rank_program(schedule: Schedule, stage_ranks: Sequence[int], rank: int,
                 skips: Sequence[Tuple[int, int]] = ()) -> List[Instruction]:
    """The instructions ``rank`` executes, for the stages it owns, in clock order.

    Args:
        schedule: the schedule.
        stage_ranks: the rank that owns each stage (``len == schedule.stages``).
        rank: the rank whose program to build.
        skips: ``(saving stage, using stage)`` of every skip tensor that crosses stages
            (saving < using); instruction ``skip`` fields index this list.

    Returns:
        The merged stream, ordered by (tick, stage). Every receive's matching send
        sits at an earlier tick (a skip's user runs after its saver, and its
        backward before the saver's, as both lie on the chain of activations), so
        with non-blocking sends no order of ranks can deadlock. Empty when ``rank``
        owns no stage.
    """
    if len(stage_ranks) != schedule.stages:
        raise ValueError(f"{len(stage_ranks)} stage owners given for {schedule.stages} stages")
    bad = [pair for pair in skips if not 0 <= pair[0] < pair[1] < schedule.stages]
    if bad:
        raise ValueError(f"skips must go from a stage to a later one among {schedule.stages} stages, got {bad}")
    keyed = []
    for stage, owner in enumerate(stage_ranks):
        if owner == rank:
            for tick, group in zip(schedule.ticks(stage), schedule.steps(stage)):
                group = _with_skips(group, skips, stage_ranks, schedule.has_backward)
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

    def duration(step: Instruction) -> float:
        forward, backward = stage_times[step.stage]
        return backward if isinstance(step, Backward) else forward

    ranks = sorted(set(stage_ranks))
    streams = [[step for step in rank_program(schedule, stage_ranks, r) if isinstance(step, (Forward, Backward))]
               for r in ranks]
    spans = _simulate(streams, schedule.stages, duration, f"{schedule} deadlocks on stage ranks {tuple(stage_ranks)}")
    work = sum(duration(step) for step in spans)
    makespan = max(finish for _, finish in spans.values())
    return 0.0 if makespan <= 0 else 1.0 - work / (len(ranks) * makespan)
