"""The cost model's prediction of a ZeRO job's step and memory (its registered ``predict`` entry point)."""

from __future__ import annotations

from typing import Optional

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import Layout, Prediction
from mpipar.cost.options import TrainingOptions
from mpipar.cost.sharded import predict_sharded

__all__ = ["predict"]


def predict(machine: Machine, profile: ModelProfile, *, model: str, batch_size: int, bucket_mb: float, settings,
            ranks: int, ranks_per_node: int, options: Optional[TrainingOptions] = None) -> Optional[Prediction]:
    """Every rank a replica at ZeRO stage ``settings.zero``, ``batch_size`` per rank. Pure."""
    return predict_sharded(profile, batch_size, Layout(ranks, ranks_per_node), machine, zero=settings.zero,
                           bucket_mb=bucket_mb, options=options or TrainingOptions())
