"""The asynchronous schedules: 1F1B that never flushes, with weight stashing (PipeDream, PipeDream-2BW)."""

from __future__ import annotations

from mpipar.pipeline_plan.flushing import one_forward_one_backward
from mpipar.pipeline_plan.kinds import ScheduleKind, register_schedule

__all__ = ["PipeDream", "TwoBufferedWeights"]


class _Asynchronous(ScheduleKind):
    """1F1B over all the stream's micro-batches; 0 bubble in steady state (only a drain and the refill
    after it, at epoch ends and checkpoints, cost ``p - 1`` ticks each)."""

    asynchronous = True

    def compute_steps(self, schedule, stage):
        return one_forward_one_backward(schedule.stages, schedule.total_microbatches, stage)

    def ideal_bubble(self, schedule):
        return 0.0


@register_schedule
class PipeDream(_Asynchronous):
    """An :class:`Update` after every backward; a forward uses the newest version when it runs in the
    steady stream, ``max(0, microbatch - warmup(stage))``, kept after a drain (draining changes timing,
    never results): ``stages - stage`` stashed versions."""

    name = "pipedream"
    help = "never flushes, an update per micro-batch, weight stashing"

    def updates_after(self, schedule, microbatch):
        return True

    def forward_version(self, schedule, stage, microbatch):
        return max(0, microbatch - (schedule.stages - stage - 1))


@register_schedule
class TwoBufferedWeights(_Asynchronous):
    """One :class:`Update` per batch, after its last backward; batch ``k`` uses version ``max(0, k - 1)`` on
    every stage: two versions, staleness 1."""

    name = "2bw"
    help = "never flushes, an update per batch, two weight versions"

    def updates_after(self, schedule, microbatch):
        return microbatch % schedule.microbatches == schedule.microbatches - 1

    def forward_version(self, schedule, stage, microbatch):
        return max(0, microbatch // schedule.microbatches - 1)
