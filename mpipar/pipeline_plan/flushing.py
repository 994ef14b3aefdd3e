"""The flushing schedules: each batch enters an empty pipeline and leaves it empty (naive, GPipe, 1F1B, forward)."""

from __future__ import annotations

from typing import List

from mpipar.pipeline_plan.instructions import Backward, Forward, Instruction
from mpipar.pipeline_plan.kinds import ScheduleKind, register_schedule

__all__ = ["Naive", "GPipe", "OneForwardOneBackward", "ForwardOnly", "one_forward_one_backward"]


def one_forward_one_backward(stages: int, microbatches: int, stage: int) -> List[Instruction]:
    """1F1B order on ``stage``: ``stages - stage - 1`` warm-up forwards (at most ``microbatches``),
    then one forward and one backward in turn, then the cool-down backwards."""
    warmup = min(stages - stage - 1, microbatches)
    order: List[Instruction] = [Forward(stage, i) for i in range(warmup)]
    for i in range(microbatches - warmup):
        order += [Forward(stage, warmup + i), Backward(stage, i)]
    return order + [Backward(stage, i) for i in range(microbatches - warmup, microbatches)]


def _fill_drain_bubble(schedule) -> float:
    p, m = schedule.stages, schedule.microbatches
    return (p - 1) / (m + p - 1)


@register_schedule
class Naive(ScheduleKind):
    """One micro-batch goes all the way forward and back before the next starts (plain layer-partitioned
    model parallelism; one stage works at a time). Bubble ``(p-1)/p``."""

    name = "naive"
    help = "one micro-batch at a time"

    def compute_steps(self, schedule, stage):
        return [step for i in range(schedule.total_microbatches) for step in (Forward(stage, i), Backward(stage, i))]

    def ideal_bubble(self, schedule):
        return (schedule.stages - 1) / schedule.stages


@register_schedule
class GPipe(ScheduleKind):
    """All forwards, then all backwards (GPipe): a stage holds every micro-batch's activations at once."""

    name = "gpipe"
    help = "all forwards then all backwards"

    def compute_steps(self, schedule, stage):
        m = schedule.total_microbatches
        return [Forward(stage, i) for i in range(m)] + [Backward(stage, i) for i in range(m)]

    ideal_bubble = staticmethod(_fill_drain_bubble)


@register_schedule
class OneForwardOneBackward(ScheduleKind):
    """1F1B (PipeDream-flush, Megatron): after ``stages - stage - 1`` warm-up forwards a stage alternates one
    forward and one backward; at most ``stages - stage`` micro-batches are in flight on it."""

    name = "1f1b"
    help = "bounded in-flight micro-batches"

    def compute_steps(self, schedule, stage):
        return one_forward_one_backward(schedule.stages, schedule.total_microbatches, stage)

    ideal_bubble = staticmethod(_fill_drain_bubble)


@register_schedule
class ForwardOnly(ScheduleKind):
    """Forwards only (evaluation)."""

    name = "forward"
    trains = False

    def compute_steps(self, schedule, stage):
        return [Forward(stage, i) for i in range(schedule.total_microbatches)]

    ideal_bubble = staticmethod(_fill_drain_bubble)
