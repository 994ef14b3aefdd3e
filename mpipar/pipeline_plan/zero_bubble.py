"""Zero bubble, ZB-H1 (Qi et al., 2023): the backward split into the input gradient and the weight gradient."""

from __future__ import annotations

from collections import deque
from typing import Deque, List

from mpipar.pipeline_plan.instructions import (
    BackwardInput,
    BackwardWeight,
    Forward,
    Instruction,
    RecvGrad,
    SendGrad,
)
from mpipar.pipeline_plan.kinds import ScheduleKind, register_schedule

__all__ = ["ZeroBubble", "zero_bubble_order"]


def zero_bubble_order(stages: int, microbatches: int, stage: int) -> List[Instruction]:
    """ZB-H1 order on ``stage``: 1F1B's with each backward split into ``I`` (input gradient) and ``W`` (weight
    gradient), where stage ``s`` holds back its ``W`` s by ``s`` micro-batches (the last stage's fill the drain's
    bubble) and runs them, oldest first, after later ``I`` s and at the end."""
    m = microbatches
    warmup = min(stages - stage - 1, m)
    order: List[Instruction] = [Forward(stage, i) for i in range(warmup)]
    pending: Deque[int] = deque()
    for k in range(m):
        if warmup + k < m:
            order.append(Forward(stage, warmup + k))
        order.append(BackwardInput(stage, k))
        pending.append(k)
        if k >= stage or warmup + k >= m:
            order.append(BackwardWeight(stage, pending.popleft()))
    return order + [BackwardWeight(stage, i) for i in pending]


@register_schedule
class ZeroBubble(ScheduleKind):
    """ZB-H1: :func:`zero_bubble_order`. At unit costs (forward, input and weight gradient one tick each) the
    bubble is ``(p-1)/(3m + p-1)`` for ``m >= p`` (below, the unit clock's), a third of 1F1B's; a stage
    holds a micro-batch from its forward to its ``W`` (the deferred W's memory), at most ``min(p, m)`` on
    every stage: 1F1B's first stage's on all. The caller steps its optimizer after the batch, after every
    ``W``."""

    name = "zero-bubble"
    splits_backward = True
    help = "ZB-H1: backward split into input (I) and weight (W) gradients, W deferred into the bubble"

    def compute_steps(self, schedule, stage):
        return zero_bubble_order(schedule.stages, schedule.total_microbatches, stage)

    def is_compute(self, step):
        return isinstance(step, (Forward, BackwardInput, BackwardWeight))

    def group(self, schedule, step):
        stage, microbatch = step.stage, step.microbatch
        if isinstance(step, BackwardInput):
            return ([] if stage == schedule.stages - 1 else [RecvGrad(stage, microbatch)]) + [step] + \
                ([] if stage == 0 else [SendGrad(stage, microbatch)])
        if isinstance(step, BackwardWeight):
            return [step]
        return super().group(schedule, step)

    def depends_on(self, schedule, step):
        s, i = step.stage, step.microbatch
        if isinstance(step, BackwardInput):
            return (BackwardInput(s + 1, i),) if s < schedule.stages - 1 else (Forward(s, i),)
        if isinstance(step, BackwardWeight):
            return (BackwardInput(s, i),)
        return super().depends_on(schedule, step)

    def step_seconds(self, step, forward, backward):
        return forward if isinstance(step, Forward) else backward / 2  # I and W: half a backward each

    def releases(self, step):
        return isinstance(step, BackwardWeight)

    def ideal_bubble(self, schedule):
        p, m = schedule.stages, schedule.total_microbatches
        return (p - 1) / (3 * m + p - 1) if m >= p else schedule.unit_bubble  # the paper's formula needs m >= p
