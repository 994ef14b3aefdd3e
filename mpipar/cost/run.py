"""A training run's predicted step (``--machine FILE``) and the predicted-beside-measured rows of a finished run
(:func:`~mpipar.report.analysis.report_rows`, the report's)."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

from mpipar import registry
from mpipar.cost.machine import Machine
from mpipar.cost.model import Prediction
from mpipar.cost.options import TrainingOptions
from mpipar.report.analysis import report_rows  # re-exported: the run's loop prints the rows too

__all__ = ["predict_run", "report_rows", "format_rows"]


def predict_run(machine: Machine, *, model: str, batch_size: int, bucket_mb: float, settings: Any, ranks: int,
                ranks_per_node: int, config: Any = None) -> Tuple[Optional[Prediction], str]:
    """The prediction of a job's step from its settings, or None and the reason there is none. Pure.

    The strategy whose settings ``settings`` are (None: data parallelism) predicts through its
    registered ``predict`` entry point (:mod:`mpipar.registry`): data parallelism; flushing pipelines
    and their grids (``mpipar/pipeline/prediction.py``); replicas of tensor-parallel groups
    (``batch_size`` per group, the machine file's ``MODEL/tpT`` profile); ZeRO stages
    (``mpipar/sharded/prediction.py``). Others have no model yet. ``config``: the run's config, whose
    optimizer, precision, wire, compression and recompute (:meth:`TrainingOptions.from_settings`) reach
    the entry points that take an ``options`` argument; the others predict fp32 with SGD.
    """
    if model not in machine.models:
        return None, f"the machine file has no layer times of {model} (mpipar-calibrate --model {model})"
    profile = machine.profile(model)
    try:
        spec = registry.for_settings(settings)
    except ValueError as exc:
        return None, str(exc)
    if spec.predict is None:
        return None, f"no cost model for {spec.name} yet"
    predict = registry.resolve(spec.predict)
    try:
        extra = {"options": TrainingOptions.from_settings(config)} if config is not None and (
            "options" in inspect.signature(predict).parameters) else {}
        prediction = predict(machine, profile, model=model, batch_size=batch_size, bucket_mb=bucket_mb,
                             settings=settings, ranks=ranks, ranks_per_node=ranks_per_node, **extra)
    except ValueError as exc:  # e.g. ranks across nodes and a machine file of one node
        return None, str(exc)
    if prediction is None:
        return None, f"no cost model for {spec.name} with these settings yet"
    return prediction, ""


def format_rows(rows: List[Tuple[str, float, float]]) -> str:
    """``predicted vs measured`` lines, with the ratio."""
    lines = ["predicted vs measured (median step after the first):"]
    for name, predicted, measured in rows:
        ratio = f"{measured / predicted:.2f}x" if predicted > 0 else "-"
        lines.append(f"  {name:16} predicted {predicted:.4f}  measured {measured:.4f}  measured/predicted {ratio}")
    return "\n".join(lines)
