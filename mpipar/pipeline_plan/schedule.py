"""A registered pipeline schedule on stages and micro-batches, as pure streams of instructions (no MPI).

A schedule orders, for each of ``stages`` pipeline stages, the forward and backward
passes of ``microbatches`` micro-batches. Each compute step expands into the
instructions a stage executes: ``RecvActivation``, ``Forward``, ``SendActivation``
on the way down; ``RecvGrad``, ``Backward``, ``SendGrad`` on the way up.

The schedules (naive, gpipe, 1f1b, forward; the asynchronous pipedream and 2bw) are
:class:`~mpipar.pipeline_plan.kinds.ScheduleKind` s registered in their own modules (``flushing.py``,
``weight_stashing.py``); :class:`Schedule` is one of them on a number of stages and micro-batches.

``window_program`` cuts an asynchronous stream into the fill, steady and drain windows
an executor runs one batch at a time; ``Schedule.version_table``, ``staleness`` and
``weight_versions`` read the weight versions off the stream.

``Schedule.ticks()`` places every compute step on a unit-time clock (each forward or
backward takes one tick and starts as soon as its stage is free and its input has
been produced); ``placement_bubble`` runs the same simulator with one worker per rank
and given step times. ``rank_program`` merges the streams of the stages a rank owns
in clock order; because every receive is matched by a send at an earlier tick, a
rank that posts its sends without blocking (``isend``) can never deadlock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mpipar.pipeline_plan.instructions import (
    Backward,
    BackwardInput,
    BackwardWeight,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    RecvSkipGrad,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    SkipInstruction,
    Update,
)
from mpipar.pipeline_plan.kinds import ScheduleKind, schedule_kind, schedule_names

__all__ = [
    "Instruction",
    "RecvActivation",
    "Forward",
    "SendActivation",
    "RecvGrad",
    "Backward",
    "BackwardInput",
    "BackwardWeight",
    "SendGrad",
    "SendSkip",
    "RecvSkip",
    "SendSkipGrad",
    "RecvSkipGrad",
    "Update",
    "SkipInstruction",
    "Schedule",
    "ScheduleKind",
    "SCHEDULES",
    "ASYNC_SCHEDULES",
    "TRAIN_SCHEDULES",
    "FLUSHING_SCHEDULES",
    "rank_program",
    "window_program",
    "placement_bubble",
    "simulate_step",
]

SCHEDULES = schedule_names()  # every registered schedule, in registration order
ASYNC_SCHEDULES = schedule_names(asynchronous=True)  # never flush: the pipeline stays full from batch to batch
TRAIN_SCHEDULES = schedule_names(trains=True)  # those with backward passes (not ``forward``)
FLUSHING_SCHEDULES = schedule_names(asynchronous=False, trains=True)  # one batch in, the pipeline empty again
WINDOWS = ("fill", "steady", "drain")


def _simulate(streams: Sequence[Sequence[Instruction]], depends_on: Callable[[Instruction], Sequence[Instruction]],
              duration: Callable[[Instruction], float],
              stuck: str, transfer: Optional[Callable[[Instruction, Instruction], float]] = None
              ) -> Dict[Instruction, Tuple[float, float]]:
    """(start, finish) of every compute step when each worker runs its stream in order.

    A worker (a stage, or a rank holding several stages) runs one step at a time;
    a step starts once its worker is free and its inputs (``depends_on(step)``) have arrived, and lasts
    ``duration(step)``. An input arrives ``transfer(input, step)`` seconds after it
    finished (communication is free when ``transfer`` is None). The result is in the
    order the steps were placed. Raises ``RuntimeError(stuck)`` when no worker can go on (a cycle).
    """
    spans: Dict[Instruction, Tuple[float, float]] = {}
    position = [0] * len(streams)
    free_at: List[float] = [0] * len(streams)
    while any(position[w] < len(stream) for w, stream in enumerate(streams)):
        progressed = False
        for w, stream in enumerate(streams):
            if position[w] == len(stream):
                continue
            step = stream[position[w]]
            needs = depends_on(step)
            if all(need in spans for need in needs):
                start = max([free_at[w]] + [spans[need][1] + (transfer(need, step) if transfer else 0)
                                            for need in needs])
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

    The flushing schedules (``naive``, ``gpipe``, ``1f1b``, ``forward``) run one batch of
    ``microbatches`` and end empty. The asynchronous ones never flush: ``pipedream``
    (1F1B without a flush, an :class:`Update` after every backward, weight stashing) and
    ``2bw`` (the same order, one :class:`Update` per batch, two weight versions); their
    stream covers ``batches`` consecutive batches (micro-batches ``0 .. batches *
    microbatches - 1``), and :func:`window_program` cuts it into the fill, steady and
    drain windows an executor runs, one batch per step.

    Every rule that differs between schedules (the order of compute steps, the updates, the
    weight versions, the ideal bubble) is its registered :class:`ScheduleKind`'s (:attr:`kind`).

    Args:
        name: one of ``SCHEDULES`` (the registered schedules).
        stages: number of pipeline stages (>= 1).
        microbatches: number of micro-batches per batch (>= 1; for ``pipedream`` and ``2bw``
            at least ``stages - 1``, so that a batch covers the micro-batches in flight).
        batches: batches in the stream (asynchronous schedules only; default 1).
        virtual_stages: stages per rank of a schedule of virtual stages (``interleaved``): the
            ``stages`` are ``stages / virtual_stages`` ranks' chunks, stage ``s`` on rank
            ``s % (stages / virtual_stages)``, and the unit clock runs the ranks; 1 otherwise.

    Raises:
        ValueError: unknown name, stages / microbatches / batches below 1, or too few
            micro-batches for an asynchronous schedule; ``virtual_stages`` above 1 for a
            schedule without virtual stages, or not dividing ``stages``.
    """

    name: str
    stages: int
    microbatches: int
    batches: int = 1
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        schedule_kind(self.name)  # raises ValueError for an unknown name
        for what, value in (("stages", self.stages), ("microbatches", self.microbatches),
                            ("batches", self.batches), ("virtual_stages", self.virtual_stages)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"a schedule needs {what} >= 1 (an int), got {value!r}")
        if self.virtual_stages > 1 and not self.kind.virtual:
            virtual = [name for name in SCHEDULES if schedule_kind(name).virtual]
            raise ValueError(f"{self.name} has no virtual stages (got virtual_stages={self.virtual_stages}); "
                             f"use one of {virtual}")
        if self.stages % self.virtual_stages:
            raise ValueError(f"{self.stages} stages cannot be {self.virtual_stages} virtual stages on each rank; "
                             f"use a multiple of {self.virtual_stages} stages")
        self.kind.validate(self)
        if self.batches > 1 and not self.is_async:
            raise ValueError(f"{self.name} flushes after every batch; batches={self.batches} needs one of "
                             f"{ASYNC_SCHEDULES}")
        if self.is_async and self.microbatches < self.stages - 1:
            raise ValueError(f"{self.name} with {self.stages} stages needs microbatches >= stages - 1 = "
                             f"{self.stages - 1}, got {self.microbatches}; use more micro-batches")

    @classmethod
    def on(cls, name: str, stage_ranks: Sequence[int], microbatches: int) -> Schedule:
        """Schedule ``name`` for stages placed on ``stage_ranks``: a schedule of virtual stages takes the
        stages per rank (every rank must hold as many), any other one ``virtual_stages=1``.

        Raises:
            ValueError: as the constructor, or ranks holding unequal numbers of stages for a schedule of
                virtual stages.
        """
        stages, ranks = len(stage_ranks), len(set(stage_ranks))
        if schedule_kind(name).virtual:
            counts = sorted({list(stage_ranks).count(rank) for rank in set(stage_ranks)})
            if len(counts) != 1:
                raise ValueError(f"{name} needs every rank to hold as many stages (virtual stages); stage ranks "
                                 f"{tuple(stage_ranks)} give {counts} stages per rank")
            return cls(name, stages, microbatches, virtual_stages=stages // ranks)
        return cls(name, stages, microbatches)

    @property
    def kind(self) -> ScheduleKind:
        """The registered schedule of this name."""
        return schedule_kind(self.name)

    @property
    def is_async(self) -> bool:
        """Whether the schedule never flushes (``pipedream``, ``2bw``)."""
        return self.kind.asynchronous

    @property
    def ranks(self) -> int:
        """Ranks of the schedule's own placement: ``stages / virtual_stages``."""
        return self.stages // self.virtual_stages

    @property
    def stage_ranks(self) -> Tuple[int, ...]:
        """The rank of each stage in the schedule's own placement (its kind's: ``s % ranks``, or ``zbv``'s V)."""
        return self.kind.stage_ranks(self.ranks, self.virtual_stages)

    @property
    def total_microbatches(self) -> int:
        """Micro-batches in the stream: ``batches * microbatches``."""
        return self.batches * self.microbatches

    def warmup(self, stage: int) -> int:
        """Forwards ``stage`` runs before its first backward in 1F1B order: ``stages - stage - 1``
        (at most the micro-batches in the stream); the micro-batches it holds across a batch's end
        in an asynchronous schedule."""
        return min(self.stages - stage - 1, self.total_microbatches)

    def updates_after(self, microbatch: int) -> bool:
        """Whether the backward of ``microbatch`` is followed by an :class:`Update`: after every one
        for ``pipedream``, after a batch's last one for ``2bw``, never for a flushing schedule (the
        caller steps its optimizer after the batch)."""
        return self.kind.updates_after(self, microbatch)

    @property
    def update_period(self) -> int:
        """Micro-batches from one :class:`Update` to the next (1 for ``pipedream``); a batch's for a
        schedule without updates in its stream."""
        return next((i + 1 for i in range(self.microbatches) if self.updates_after(i)), self.microbatches)

    def forward_version(self, stage: int, microbatch: int) -> int:
        """The weight version (updates applied on ``stage`` before it) that the forward of
        ``microbatch`` uses, and its backward too (weight stashing); any micro-batch number >= 0,
        not only those of the stream.

        ``pipedream``: the newest version when the forward runs in the steady stream,
        ``max(0, microbatch - warmup(stage))``; the rule is kept after a drain, so draining
        changes timing, never results. ``2bw``: batch ``k`` uses version ``max(0, k - 1)``
        on every stage (one version behind the newest, the same for the whole batch).
        Flushing schedules: 0 (the weights of the step).
        """
        return self.kind.forward_version(self, stage, microbatch)

    @property
    def has_backward(self) -> bool:
        return self.kind.trains

    def compute_order(self, stage: int) -> List[Tuple[str, int]]:
        """[('F', 0), ('B', 0), ...]: the forward/backward order on ``stage``."""
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage {stage} out of range for {self.stages} stages")
        return [(step.code, step.microbatch) for step in self._compute_steps(stage)]

    def _compute_steps(self, stage: int) -> List[Instruction]:
        """The compute instructions of ``stage`` (``Forward``, ``Backward``) in order: the kind's."""
        return self.kind.compute_steps(self, stage)

    def steps(self, stage: int) -> List[List[Instruction]]:
        """The instructions of ``stage`` grouped by compute step (receive, compute, send)."""
        return [self.kind.group(self, step) for step in self._compute_steps(stage)]

    def depends_on(self, step: Instruction) -> Tuple[Instruction, ...]:
        """The compute steps whose results ``step`` consumes."""
        return self.kind.depends_on(self, step)

    def instructions(self, stage: int) -> List[Instruction]:
        """The full instruction stream of ``stage`` (receives and sends included)."""
        return [instruction for group in self.steps(stage) for instruction in group]

    @cached_property
    def _ticks(self) -> Dict[Instruction, int]:
        """Start tick of every compute step, every step one tick, each worker (a stage, or a rank of a schedule
        of virtual stages) running its stream in order. A step starts after the steps it depends on, so the
        ticks order every dependency, whichever ranks the stages sit on."""
        streams = self.kind.worker_streams(self)
        spans = _simulate(streams, self.depends_on, lambda step: 1, f"schedule {self.name} has a dependency cycle")
        return {step: int(start) for step, (start, _) in spans.items()}  # unit durations: whole ticks

    def ticks(self, stage: int) -> List[int]:
        """The unit-time clock tick of each step of ``compute_order(stage)``."""
        return [self._ticks[step] for step in self._compute_steps(stage)]

    @property
    def length(self) -> int:
        """Number of unit ticks from the first forward to the last step."""
        return 1 + max(self._ticks.values())

    @property
    def unit_bubble(self) -> float:
        """Idle fraction of the unit clock's workers (every step one tick): ``1 - steps / (workers * length)``."""
        streams = self.kind.worker_streams(self)
        return 1.0 - sum(len(stream) for stream in streams) / (len(streams) * self.length)

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

    def rank_grid(self) -> str:
        """The grid of the schedule's own placement: one row per rank, a cell ``F0.1`` is the forward of
        micro-batch 0 on the rank's chunk 1 (its second stage in :attr:`stage_ranks`), ``.`` = idle."""
        rows = []
        for rank in range(self.ranks):
            cells = ["."] * self.length
            for chunk, stage in enumerate(s for s, owner in enumerate(self.stage_ranks) if owner == rank):
                for step in self._compute_steps(stage):
                    cells[self._ticks[step]] = f"{step}.{chunk}" if self.virtual_stages > 1 else str(step)
            width = max(len(c) for c in cells)
            rows.append(" ".join(c.ljust(width) for c in cells).rstrip())
        return "\n".join(rows)

    def max_in_flight(self, stage: int) -> int:
        """Most micro-batches whose activations ``stage`` holds at once."""
        in_flight = peak = 0
        for step in self._compute_steps(stage):
            in_flight += 1 if isinstance(step, Forward) else -1 if self.kind.releases(step) else 0
            peak = max(peak, in_flight)
        return peak if self.has_backward else 1

    @property
    def ideal_bubble(self) -> float:
        """Idle fraction of a stage with equal stage times and free communication.

        ``(p-1)/(m+p-1)`` for gpipe, 1f1b and forward; ``(p-1)/p`` for naive; 0 for
        pipedream and 2bw in steady state (they never flush; only a drain and the refill
        after it, at epoch ends and checkpoints, cost ``(p-1)`` ticks each).
        """
        return self.kind.ideal_bubble(self)

    # -- weight versions (asynchronous schedules) -------------------------------------

    def version_table(self, stage: int) -> List[Tuple[int, int, int]]:
        """``(micro-batch, forward version, applied version)`` of every micro-batch of the stream on
        ``stage``: the version its forward and backward use (:meth:`forward_version`) and the version
        its gradient is applied to (the :class:`Update` instructions before the one that applies
        it). Flushing schedules: ``(i, 0, 0)`` (the optimizer steps after the batch).

        Raises:
            RuntimeError: a forward would need a version its stage has not made yet.
        """
        if not self.is_async:
            return [(i, 0, 0) for i in range(self.total_microbatches)]
        forward: Dict[int, int] = {}
        applied: Dict[int, int] = {}
        live, waiting = 0, []
        for instruction in self.instructions(stage):
            if isinstance(instruction, Forward):
                version = self.forward_version(stage, instruction.microbatch)
                if version > live:
                    raise RuntimeError(f"{self}: the forward of micro-batch {instruction.microbatch} on stage "
                                       f"{stage} needs version {version}, but only {live} exists")
                forward[instruction.microbatch] = version
            elif isinstance(instruction, Backward):
                waiting.append(instruction.microbatch)
            elif isinstance(instruction, Update):
                applied.update((i, live) for i in waiting)
                waiting, live = [], live + 1
        return [(i, forward[i], applied[i]) for i in sorted(applied)]

    def _steady(self) -> Schedule:
        """The same schedule over three batches: its last batch is in steady state."""
        return Schedule(self.name, self.stages, self.microbatches, batches=3) if self.is_async else self

    def staleness(self) -> List[int]:
        """Steady-state staleness per stage: applied minus forward version of a micro-batch of the
        last of three batches. ``pipedream``: ``stages - stage - 1``; ``2bw``: 1; flushing: 0."""
        steady = self._steady()
        return [steady.version_table(s)[-1][2] - steady.version_table(s)[-1][1] for s in range(self.stages)]

    def weight_versions(self) -> List[int]:
        """Most weight versions each stage holds at once in steady state: the newest (the
        optimizer's) and every one that an in-flight micro-batch used in its forward and needs
        again in its backward. ``pipedream``: ``stages - stage``; ``2bw``: 2; flushing: 1."""
        steady, peaks = self._steady(), []
        for stage in range(self.stages):
            live, in_flight, peak = 0, {}, 1
            for instruction in steady.instructions(stage):
                if isinstance(instruction, Forward):
                    in_flight[instruction.microbatch] = steady.forward_version(stage, instruction.microbatch)
                    peak = max(peak, len(set(in_flight.values()) | {live}))
                elif isinstance(instruction, Backward):
                    del in_flight[instruction.microbatch]
                elif isinstance(instruction, Update):
                    live += 1
                    peak = max(peak, len(set(in_flight.values()) | {live}))
            peaks.append(peak)
        return peaks

    def __str__(self) -> str:
        virtual = f" ({self.virtual_stages} per rank)" if self.virtual_stages > 1 else ""
        return f"{self.name} schedule, {self.stages} stages{virtual}, {self.microbatches} micro-batches"


def _with_skips(group: List[Instruction], skips: Sequence[Tuple[int, int]], stage_ranks: Sequence[int],
                has_backward: bool) -> List[Instruction]:
    """``group`` (one compute step and its activation messages) with the skip messages it needs.

    A forward receives the skips its stage uses before it and sends those its stage
    saves after it; a backward receives the gradients of the skips its stage saved
    before it and sends those of the skips its stage used after it. Skips between two
    stages of one rank need no message (the executor hands them over in memory).
    """
    step = next((instruction for instruction in group
                 if isinstance(instruction, (Forward, Backward, BackwardInput))), None)
    if step is None:  # another kind of compute step (a schedule's own, a split backward's W): no skip crosses
        return group
    s, i = step.stage, step.microbatch
    crossing = [(k, producer, consumer) for k, (producer, consumer) in enumerate(skips)
                if stage_ranks[producer] != stage_ranks[consumer]]
    before: List[Instruction]
    after: List[Instruction]
    if isinstance(step, Forward):
        before = [RecvSkip(s, i, k, producer) for k, producer, consumer in crossing if consumer == s]
        after = [SendSkip(s, i, k, consumer) for k, producer, consumer in crossing if producer == s]
    elif has_backward:
        before = [RecvSkipGrad(s, i, k, consumer) for k, producer, consumer in crossing if producer == s]
        after = [SendSkipGrad(s, i, k, producer) for k, producer, consumer in crossing if consumer == s]
    else:
        before = after = []
    at = group.index(step)
    updates = [instruction for instruction in group if isinstance(instruction, Update)]
    rest = [instruction for instruction in group[at + 1:] if not isinstance(instruction, Update)]
    return group[:at] + before + [step] + rest + after + updates  # messages out before the update

def _is_local_message(instruction: Instruction, stage_ranks: Sequence[int]) -> bool:
    """Whether ``instruction`` is an activation or gradient message between two stages of one rank (adjacent
    stages cut by a placement's boundary): none is sent, the executor hands the tensor over in memory."""
    if isinstance(instruction, (RecvActivation, SendGrad)):
        return stage_ranks[instruction.stage - 1] == stage_ranks[instruction.stage]
    if isinstance(instruction, (SendActivation, RecvGrad)):
        return stage_ranks[instruction.stage + 1] == stage_ranks[instruction.stage]
    return False


def _keyed(schedule: Schedule, stage_ranks: Sequence[int], rank: int, skips: Sequence[Tuple[int, int]],
           window: Callable[[int], Tuple[int, Optional[int]]]) -> List[Instruction]:
    """The instructions of ``rank``'s stages whose compute step's position in the stage's order
    lies in ``window(stage)`` (a ``[start, stop)`` range), in (tick, stage) order."""
    if len(stage_ranks) != schedule.stages:
        raise ValueError(f"{len(stage_ranks)} stage owners given for {schedule.stages} stages")
    bad = [pair for pair in skips if not 0 <= pair[0] < pair[1] < schedule.stages]
    if bad:
        raise ValueError(f"skips must go from a stage to a later one among {schedule.stages} stages, got {bad}")
    keyed = []
    for stage, owner in enumerate(stage_ranks):
        if owner == rank:
            start, stop = window(stage)
            for tick, group in list(zip(schedule.ticks(stage), schedule.steps(stage)))[start:stop]:
                group = [instruction for instruction in _with_skips(group, skips, stage_ranks, schedule.has_backward)
                         if not _is_local_message(instruction, stage_ranks)]
                keyed += [((tick, stage, n), instruction) for n, instruction in enumerate(group)]
    return [instruction for _, instruction in sorted(keyed, key=lambda pair: pair[0])]


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
        The merged stream, ordered by (tick, stage), without messages between two stages of ``rank`` (its
        executor hands those tensors over in memory, as skips). Every receive's matching send
        sits at an earlier tick (a skip's user runs after its saver, and its
        backward before the saver's, as both lie on the chain of activations), so
        with non-blocking sends no order of ranks can deadlock. Empty when ``rank``
        owns no stage.
    """
    return _keyed(schedule, stage_ranks, rank, skips, lambda stage: (0, None))


def window_program(schedule: Schedule, stage_ranks: Sequence[int], rank: int, window: str,
                   skips: Sequence[Tuple[int, int]] = ()) -> List[Instruction]:
    """What ``rank`` runs of an asynchronous schedule in one step (one batch) or in a drain.

    Stage ``s`` holds ``w = warmup(s)`` micro-batches across a batch's end: a batch's
    window on it ends right after the backward of the batch's micro-batch ``m - 1 - w``,
    before the next batch's first forward. Micro-batches are numbered from the batch
    the window takes in (negative: the previous batch's, ``-1`` its last).

    * ``fill`` (the first batch after a start or a drain): warm-up forwards and the
      batch's 1F1B pairs, ``F0 .. F(m-1)`` and ``B0 .. B(m-1-w)``;
    * ``steady`` (every later batch): ``F0 .. F(m-1)`` with ``B(-w) .. B(m-1-w)``;
    * ``drain``: the backwards still due, ``B(-w) .. B(-1)``: afterwards nothing is in
      flight (before an evaluation or a checkpoint).

    Every receive of a window has its send in the same window or an earlier one (a
    send may be received in the next window: a gradient sent by the stage after ``s``
    for a micro-batch that ``s`` still holds), so ranks that run their windows in
    order, each in (tick, stage) order, cannot deadlock, and a collective between two
    windows cannot either. Update instructions follow the schedule's rule.
    """
    if not schedule.is_async:
        raise ValueError(f"{schedule.name} flushes every batch; windows are for {ASYNC_SCHEDULES}")
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {WINDOWS}")
    p, m = schedule.stages, schedule.microbatches
    frame = Schedule(schedule.name, p, m, batches=1 if window == "drain" else 2)
    fill_end = {stage: 2 * m - frame.warmup(stage) for stage in range(p)}
    bounds = {"fill": lambda s: (0, fill_end[s]), "steady": lambda s: (fill_end[s], fill_end[s] + 2 * m),
              "drain": lambda s: (fill_end[s], 2 * m)}[window]
    shift = 0 if window == "fill" else m
    program = _keyed(frame, stage_ranks, rank, skips, bounds)
    return [dataclasses.replace(instruction, microbatch=instruction.microbatch - shift) for instruction in program]


def placement_bubble(schedule: Schedule, stage_ranks: Sequence[int],
                     stage_times: Optional[Sequence[Tuple[float, float]]] = None) -> float:
    """Ideal bubble of ``schedule`` when the stages sit on ``stage_ranks``.

    Communication is free and each rank runs its :func:`rank_program` in order,
    one step at a time, each step starting once its input exists. ``stage_times``
    gives each stage's (forward, backward) duration per micro-batch; by default
    every compute step (a split backward's halves too) takes one unit. Returns the idle fraction ``1 - work / (ranks *
    makespan)``. With one stage per rank and equal stages this is
    :attr:`Schedule.ideal_bubble`; for ``pipedream`` and ``2bw`` it is the steady state's,
    ``1 - work / (ranks * the busiest rank's work)``; a rank holding several stages (``[0, 1, 0]``)
    cannot run them at once, and unequal ``stage_times`` (measured ones, say) give
    the bubble that the imbalance alone costs.
    """
    if stage_times is not None and (len(stage_times) != schedule.stages or
                                    any(t < 0 for pair in stage_times for t in pair)):
        raise ValueError(f"need (forward, backward) times >= 0 for {schedule.stages} stages, got {stage_times}")
    if schedule.is_async:  # steady state: the busiest rank sets the pace, the others wait for it
        per_rank: Dict[int, float] = {}
        for stage, rank in enumerate(stage_ranks):
            per_rank[rank] = per_rank.get(rank, 0.0) + (2.0 if stage_times is None else sum(stage_times[stage]))
        slowest = max(per_rank.values())
        return 0.0 if slowest <= 0 else 1.0 - sum(per_rank.values()) / (len(per_rank) * slowest)

    spans = simulate_step(schedule, stage_ranks, stage_times)
    work = sum(finish - start for start, finish in spans.values())
    makespan = max(finish for _, finish in spans.values())
    return 0.0 if makespan <= 0 else 1.0 - work / (len(set(stage_ranks)) * makespan)


def simulate_step(schedule: Schedule, stage_ranks: Sequence[int],
                  stage_times: Optional[Sequence[Tuple[float, float]]],
                  transfer_times: Optional[Sequence[float]] = None) -> Dict[Instruction, Tuple[float, float]]:
    """(start, finish) of every compute step of one batch of a flushing ``schedule``.

    Each rank runs its :func:`rank_program` in order, one step at a time; a stage's
    forward and backward take ``stage_times[stage]`` seconds (a split backward's halves, half each:
    the kind's ``step_seconds``; every step one unit when ``stage_times`` is None); an activation or gradient
    crossing the boundary after stage ``s`` between two ranks takes ``transfer_times[s]``
    seconds (none when both stages are on one rank; free when ``transfer_times`` is None).
    """

    def duration(step: Instruction) -> float:
        return 1.0 if stage_times is None else schedule.kind.step_seconds(step, *stage_times[step.stage])

    def transfer(source: Instruction, target: Instruction) -> float:
        if transfer_times is None or stage_ranks[source.stage] == stage_ranks[target.stage]:
            return 0.0
        return transfer_times[min(source.stage, target.stage)]

    if transfer_times is not None and len(transfer_times) != schedule.stages - 1:
        raise ValueError(f"need a transfer time for each of the {schedule.stages - 1} stage boundaries, "
                         f"got {len(transfer_times)}")
    ranks = sorted(set(stage_ranks))
    streams = [[step for step in rank_program(schedule, stage_ranks, r) if schedule.kind.is_compute(step)]
               for r in ranks]
    return _simulate(streams, schedule.depends_on, duration,
                     f"{schedule} deadlocks on stage ranks {tuple(stage_ranks)}", transfer)
