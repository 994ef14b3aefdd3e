"""ZB-V (Qi et al., 2024): zero bubble with the backward split, two chunks per rank placed in a V."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Type

from mpipar.pipeline_plan.instructions import BackwardInput, BackwardWeight, Forward, Instruction
from mpipar.pipeline_plan.kinds import register_schedule
from mpipar.pipeline_plan.placement import Placement, v_ranks
from mpipar.pipeline_plan.zero_bubble import ZeroBubble

__all__ = ["ZeroBubbleV", "zbv_order"]


def zbv_order(ranks: int, microbatches: int, rank: int) -> List[Instruction]:
    """ZB-V's order on ``rank`` of ``ranks``, which holds stage ``rank`` (the way down) and stage
    ``2 ranks - 1 - rank`` (the way up; the last stage, with the loss, is rank 0's).

    Warm-up: ``2 (p - r) - 1`` forwards down, then ``r`` pairs of forwards up and down; at the bend ``p - r``
    micro-batches turn round on the way-up stage (``F I W``); steady: ``F I W`` down then ``F I W`` up,
    until every forward ran; cool-down: ``r`` input gradients down and up in turn, then ``p - r`` down,
    each with the oldest ``W`` down; last the ``W`` s still due, up then down. The order is written for
    ``n = max(m, 2p - 1)`` micro-batches (the V full once) and the steps of micro-batches ``>= m`` are left
    out: a sub-order of a schedule without a cycle has none either.
    """
    p, m, r = ranks, microbatches, rank
    n = max(m, 2 * p - 1)
    down, up = r, 2 * p - 1 - r
    done: Dict[Tuple[Type[Instruction], int], int] = {}
    order: List[Instruction] = []

    def run(kind: Type[Instruction], stage: int) -> None:
        order.append(kind(stage, done.get((kind, stage), 0)))
        done[kind, stage] = done.get((kind, stage), 0) + 1

    def steps(plan: Sequence[Tuple[Type[Instruction], int]], times: int) -> None:
        for _ in range(times):
            for kind, stage in plan:
                run(kind, stage)

    steps([(Forward, down)], 2 * (p - r) - 1)
    steps([(Forward, up), (Forward, down)], r)
    steps([(Forward, up), (BackwardInput, up), (BackwardWeight, up)], p - r)
    while done[Forward, up] < n:
        if done[Forward, down] < n:
            run(Forward, down)
        steps([(BackwardInput, down), (BackwardWeight, down), (Forward, up), (BackwardInput, up),
               (BackwardWeight, up)], 1)
    steps([(BackwardInput, down), (BackwardInput, up)], r)
    steps([(BackwardInput, down), (BackwardWeight, down)], p - r)
    steps([(BackwardWeight, up)], n - done[BackwardWeight, up])
    steps([(BackwardWeight, down)], n - done[BackwardWeight, down])
    return [step for step in order if step.microbatch < m]


@register_schedule
class ZeroBubbleV(ZeroBubble):
    """ZB-V: ``2p`` stages on ``p`` ranks in a V (:meth:`Placement.v_shape`), each rank running
    :func:`zbv_order` over its two stages with the backward split as in ZB-H1 (``I`` on the critical path,
    ``W`` deferred). At unit costs (each of a stage's ``F``, ``I`` and ``W`` one tick) and ``m >= 2p - 1``
    the bubble is ``(p-1)/(6m + p-1)``: the ``p - 1`` ticks rank ``p - 1`` waits for its first input,
    nothing else (the paper's "zero bubble" at equal ``F``, ``B``, ``W``: the fill only; below ``2p - 1``
    micro-batches, the unit clock's); a rank holds at most ``2p`` micro-batches over its two stages, each
    half a stage of 1F1B (1F1B's first stage's activations). The caller steps its optimizer after the batch,
    after every ``W``. Needs two stages per rank (any placement of them; the V gives the bubble above)."""

    name = "zbv"
    virtual = True
    fixed_virtual_stages = 2
    help = "ZB-V: zero bubble on two chunks per rank placed in a V (rank r: chunks r and 2p-1-r), split backward"

    def validate(self, schedule):
        if schedule.virtual_stages != 2:
            raise ValueError(f"zbv runs two stages per rank (a V: Placement.v_shape), got {schedule.stages} stages "
                             f"as {schedule.virtual_stages} per rank; use 2 p stages on p ranks")

    def stage_ranks(self, ranks, virtual_stages):
        return v_ranks(ranks)

    def placement(self, balance, ranks):
        if len(balance) != 2 * ranks:
            raise ValueError(f"zbv places 2 chunks on each of {ranks} ranks (a V), got {len(balance)} chunks "
                             f"{list(balance)}; give {2 * ranks} layer counts")
        return Placement.chunked(balance, v_ranks(ranks))

    def worker_streams(self, schedule):
        return [zbv_order(schedule.ranks, schedule.total_microbatches, rank) for rank in range(schedule.ranks)]

    def compute_steps(self, schedule, stage):
        p = schedule.ranks
        return [step for step in zbv_order(p, schedule.total_microbatches, v_ranks(p)[stage]) if step.stage == stage]

    def ideal_bubble(self, schedule):
        p, m = schedule.ranks, schedule.total_microbatches
        return (p - 1) / (6 * m + p - 1) if m >= 2 * p - 1 else schedule.unit_bubble
