"""Interleaved 1F1B (Megatron's virtual pipeline stages): each of ``p`` ranks holds ``V`` non-adjacent chunks."""

from __future__ import annotations

from typing import List

from mpipar.pipeline_plan.instructions import Backward, Forward, Instruction
from mpipar.pipeline_plan.kinds import ScheduleKind, register_schedule

__all__ = ["Interleaved", "interleaved_order"]


def interleaved_order(ranks: int, chunks: int, microbatches: int, rank: int) -> List[Instruction]:
    """Megatron's interleaved 1F1B order on ``rank`` of ``ranks``, holding stages ``rank + c * ranks`` for
    chunks ``c < chunks``.

    Micro-batches go in groups of ``ranks`` (with several chunks ``ranks`` must divide ``microbatches``: a
    smaller last group can deadlock; :class:`Interleaved` checks): forwards run a group through
    chunk 0, then chunk 1, ...; backwards the same groups through the chunks in reverse. After
    ``2 (ranks - rank - 1) + (chunks - 1) ranks`` warm-up forwards (``ranks - rank - 1`` with one chunk:
    plain 1F1B) the rank alternates one forward and one backward, then drains the backwards.
    """
    m = microbatches
    groups = [range(start, min(start + ranks, m)) for start in range(0, m, ranks)]

    def stage_order(chunk_order) -> List[tuple]:
        return [(rank + chunk * ranks, i) for group in groups for chunk in chunk_order for i in group]

    forwards = [Forward(s, i) for s, i in stage_order(range(chunks))]
    backwards = [Backward(s, i) for s, i in stage_order(range(chunks - 1, -1, -1))]
    total = len(forwards)
    warmup = ranks - rank - 1 if chunks == 1 else 2 * (ranks - rank - 1) + (chunks - 1) * ranks
    warmup = min(warmup, total)
    order: List[Instruction] = list(forwards[:warmup])
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]


@register_schedule
class Interleaved(ScheduleKind):
    """Interleaved 1F1B (Narayanan et al., 2021): stage ``s`` of ``p V`` sits on rank ``s % p``; each rank runs
    :func:`interleaved_order` over its ``V`` chunks, so the fill and drain take chunks' times, not stages':
    bubble ``(p-1)/(V m + p-1)`` at equal chunk times when ``p`` divides ``m``, for a longer warm-up (rank 0
    holds ``1 + (p-1)/(pV)`` times 1F1B's activations). ``virtual_stages=1`` is 1F1B."""

    name = "interleaved"
    virtual = True
    help = "1F1B over --virtual-stages chunks per rank (Megatron), bubble (p-1)/(V m + p-1)"

    def validate(self, schedule):
        if schedule.virtual_stages > 1 and schedule.total_microbatches % schedule.ranks:
            raise ValueError(f"interleaved with {schedule.virtual_stages} virtual stages on {schedule.ranks} ranks "
                             f"needs micro-batches in whole groups of {schedule.ranks} (Megatron's rule), got "
                             f"{schedule.total_microbatches}; use a multiple of {schedule.ranks}")

    def worker_streams(self, schedule):
        return [interleaved_order(schedule.ranks, schedule.virtual_stages, schedule.total_microbatches, rank)
                for rank in range(schedule.ranks)]

    def compute_steps(self, schedule, stage):
        order = interleaved_order(schedule.ranks, schedule.virtual_stages, schedule.total_microbatches,
                                  stage % schedule.ranks)
        return [step for step in order if step.stage == stage]

    def ideal_bubble(self, schedule):
        p, v, m = schedule.ranks, schedule.virtual_stages, schedule.total_microbatches
        return (p - 1) / (v * m + p - 1)
