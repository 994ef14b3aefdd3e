"""The one registration point of pipeline schedules: a schedule is a :class:`ScheduleKind`, registered by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from mpipar.pipeline_plan.instructions import (
    Backward,
    Forward,
    Instruction,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    Update,
)
from mpipar.pipeline_plan.placement import Placement

if TYPE_CHECKING:
    from mpipar.pipeline_plan.schedule import Schedule

__all__ = ["ScheduleKind", "register_schedule", "schedule_kind", "schedule_names"]


class ScheduleKind:
    """One pipeline schedule, registered once (:func:`register_schedule`) in its own module.

    A subclass names the schedule and gives its order of compute steps on a stage; the defaults
    expand a compute step into its messages, chain forwards down and backwards up the stages,
    never update inside the stream and use the weights of the step. :class:`Schedule` delegates to
    it; the executor, ``--schedule``, ``PipelineConfig``, the cost model and the report read the
    registry. A schedule with other compute instructions (split backwards, virtual stages)
    overrides :meth:`compute_steps`, :meth:`is_compute`, :meth:`group` and :meth:`depends_on`.

    Class attributes: ``name`` (the ``--schedule`` value), ``asynchronous`` (never flushes: the
    stream spans batches, cut into windows, with :class:`Update` instructions inside it),
    ``trains`` (has backward passes), ``help`` (one line for ``--schedule``'s help), ``virtual`` (takes
    ``virtual_stages > 1``: its unit clock runs ranks of several stages, :meth:`worker_streams`, placed as
    :meth:`stage_ranks` says), ``fixed_virtual_stages`` (a schedule whose own placement always has this many
    chunks per rank, whatever ``--virtual-stages`` says: ``zbv``'s 2; 0 for the others).
    """

    name: ClassVar[str] = ""
    asynchronous: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    help: ClassVar[str] = ""
    virtual: ClassVar[bool] = False
    splits_backward: ClassVar[bool] = False  # BackwardInput and BackwardWeight instead of Backward
    fixed_virtual_stages: ClassVar[int] = 0

    def chunks_per_rank(self, virtual_stages: int = 1) -> int:
        """The chunks each rank holds in the schedule's own placement, given ``--virtual-stages``."""
        return self.fixed_virtual_stages or virtual_stages

    def stage_ranks(self, ranks: int, virtual_stages: int) -> Tuple[int, ...]:
        """The rank of each of the ``ranks * virtual_stages`` stages in the schedule's own placement: stage
        ``s`` on rank ``s % ranks`` (Megatron's looped chunks; one stage per rank at ``virtual_stages=1``)."""
        return tuple(stage % ranks for stage in range(ranks * virtual_stages))

    def placement(self, balance: Sequence[int], ranks: int) -> Placement:
        """The schedule's own placement of chunks of ``balance`` layers on ``ranks`` ranks: chunk ``c`` on rank
        ``c % ranks`` (:meth:`Placement.looped`).

        Raises:
            ValueError: a bad balance, or a number of chunks that is not a multiple of ``ranks``.
        """
        return Placement.looped(balance, ranks)

    def compute_steps(self, schedule: Schedule, stage: int) -> List[Instruction]:
        """The compute instructions of ``stage`` (``Forward``, ``Backward``), in the order it runs them."""
        raise NotImplementedError

    def validate(self, schedule: Schedule) -> None:
        """Raise ValueError for stages and micro-batches the schedule cannot order (none by default)."""

    def worker_streams(self, schedule: Schedule) -> List[List[Instruction]]:
        """The compute streams the unit clock runs, one per worker, each in order: one per stage by default
        (a schedule of virtual stages gives one per rank)."""
        return [self.compute_steps(schedule, stage) for stage in range(schedule.stages)]

    def step_seconds(self, step: Instruction, forward: float, backward: float) -> float:
        """How long ``step`` takes when its stage's forward and backward take ``forward`` and ``backward``."""
        return forward if isinstance(step, Forward) else backward

    def releases(self, step: Instruction) -> bool:
        """Whether ``step`` is the last of its micro-batch on its stage (what the forward kept is freed)."""
        return isinstance(step, Backward)

    def is_compute(self, step: Instruction) -> bool:
        """Whether ``step`` is a compute step (placed on the clock), not a message or an update."""
        return isinstance(step, (Forward, Backward))

    def group(self, schedule: Schedule, step: Instruction) -> List[Instruction]:
        """``step`` with the messages around it: receive, compute, send (and an :class:`Update`)."""
        stage, microbatch = step.stage, step.microbatch
        first, last = stage == 0, stage == schedule.stages - 1
        if isinstance(step, Forward):
            return ([] if first else [RecvActivation(stage, microbatch)]) + [step] + \
                ([] if last else [SendActivation(stage, microbatch)])
        group = ([] if last else [RecvGrad(stage, microbatch)]) + [step] + \
            ([] if first else [SendGrad(stage, microbatch)])
        return group + ([Update(stage, microbatch)] if self.updates_after(schedule, microbatch) else [])

    def depends_on(self, schedule: Schedule, step: Instruction) -> Tuple[Instruction, ...]:
        """The compute steps whose results ``step`` consumes (its data dependencies)."""
        s, i = step.stage, step.microbatch
        if isinstance(step, Forward):
            return (Forward(s - 1, i),) if s > 0 else ()
        return (Backward(s + 1, i),) if s < schedule.stages - 1 else (Forward(s, i),)

    def updates_after(self, schedule: Schedule, microbatch: int) -> bool:
        """Whether the backward of ``microbatch`` is followed by an :class:`Update` (never, by default:
        the caller steps its optimizer after the batch)."""
        return False

    def forward_version(self, schedule: Schedule, stage: int, microbatch: int) -> int:
        """The weight version the forward (and backward) of ``microbatch`` on ``stage`` uses; 0 by default."""
        return 0

    def ideal_bubble(self, schedule: Schedule) -> float:
        """Idle fraction of a stage with equal stage times and free communication."""
        raise NotImplementedError


_KINDS: Dict[str, ScheduleKind] = {}


def register_schedule(cls: Type[ScheduleKind]) -> Type[ScheduleKind]:
    """Class decorator: register ``cls`` under ``cls.name`` (once; names are unique)."""
    if not cls.name or cls.name in _KINDS:
        raise ValueError(f"a pipeline schedule needs a new name, got {cls.name!r} (registered: {list(_KINDS)})")
    _KINDS[cls.name] = cls()
    return cls


def schedule_names(*, asynchronous: Optional[bool] = None, trains: Optional[bool] = None) -> Tuple[str, ...]:
    """The registered schedules' names in registration order, those that flush or not (``asynchronous``)
    and that train or not (``trains``) when given."""
    return tuple(name for name, kind in _KINDS.items()
                 if asynchronous in (None, kind.asynchronous) and trains in (None, kind.trains))


def schedule_kind(name: str) -> ScheduleKind:
    """The registered schedule ``name``. Raises ValueError naming the registered ones."""
    if name not in _KINDS:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {schedule_names()}")
    return _KINDS[name]
