"""The cost model's prediction of a data-parallel job's step (its registered ``predict`` entry point)."""

from __future__ import annotations

from typing import Optional

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import DEFAULT, Layout, Prediction, predict_data_parallel
from mpipar.cost.options import TrainingOptions

__all__ = ["predict"]


def predict(machine: Machine, profile: ModelProfile, *, model: str, batch_size: int, bucket_mb: float, settings,
            ranks: int, ranks_per_node: int, options: TrainingOptions = DEFAULT) -> Optional[Prediction]:
    """Every rank a replica, ``batch_size`` per rank, buckets of ``bucket_mb``; ``options``: the run's
    optimizer, precision, wire, compression and recompute. Pure."""
    return predict_data_parallel(profile, batch_size, Layout(ranks, ranks_per_node), machine, bucket_mb=bucket_mb,
                                 options=options)
