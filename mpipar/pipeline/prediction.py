"""The cost model's prediction of a pipeline job's step (its registered ``predict`` entry point)."""

from __future__ import annotations

from typing import Optional

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import DEFAULT, Layout, Prediction, predict_pipeline
from mpipar.cost.options import TrainingOptions
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline_plan.placement import even_balance
from mpipar.pipeline_plan.schedule import ASYNC_SCHEDULES

__all__ = ["predict"]


def predict(machine: Machine, profile: ModelProfile, *, model: str, batch_size: int, bucket_mb: float,
            settings: PipelineConfig, ranks: int, ranks_per_node: int,
            options: TrainingOptions = DEFAULT) -> Optional[Prediction]:
    """A flushing pipeline (and its data-parallel grid) with ``tp`` 1 and a ``balance`` (even, auto or
    given) over its ``stages * virtual_stages`` chunks; ``options``: the run's optimizer, precision, wire
    and recompute; ``settings.zero`` 1: the stages' optimizer state sharded over the replicas and their
    all-gather. None for a ``placement``, tensor-parallel stages or an asynchronous schedule. Pure."""
    if settings.tp != 1 or settings.placement is not None or settings.schedule in ASYNC_SCHEDULES:
        return None
    chunks = settings.stages * settings.chunks_per_rank
    if isinstance(settings.balance, str):  # "even" or "auto"
        balance = even_balance(profile.num_layers, chunks) if settings.balance == "even" else None
    else:
        balance = list(settings.balance)
    return predict_pipeline(profile, batch_size, Layout(ranks, ranks_per_node, pp=settings.stages), machine,
                            microbatches=settings.microbatches, schedule=settings.schedule, balance=balance,
                            options=options, virtual_stages=settings.chunks_per_rank, zero=settings.zero)
