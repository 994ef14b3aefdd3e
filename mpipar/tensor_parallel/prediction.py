"""The cost model's prediction of a tensor-parallel job's step (its registered ``predict`` entry point)."""

from __future__ import annotations

from typing import Optional

from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.model import DEFAULT, Layout, Prediction
from mpipar.cost.options import TrainingOptions
from mpipar.cost.tensor import predict_tensor_grid

__all__ = ["predict"]


def predict(machine: Machine, profile: ModelProfile, *, model: str, batch_size: int, bucket_mb: float, settings,
            ranks: int, ranks_per_node: int, options: TrainingOptions = DEFAULT) -> Optional[Prediction]:
    """Replicas of groups of ``settings.tp`` ranks, ``batch_size`` per group, from the machine file's
    ``MODEL/tpT`` profile (:func:`~mpipar.cost.tensor.predict_tensor_grid`), at ``settings.zero`` (0-2) over
    the replicas; ``options``: only the optimizer's state is priced. Pure."""
    return predict_tensor_grid(machine, model, batch_size, Layout(ranks, ranks_per_node, tp=settings.tp),
                               bucket_mb=bucket_mb, zero=settings.zero, options=options)
