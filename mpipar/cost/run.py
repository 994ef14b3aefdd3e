"""A training run's predicted step (``--machine FILE``) and the predicted-beside-measured rows of a finished run."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from mpipar import registry
from mpipar.cost.machine import Machine
from mpipar.cost.model import Prediction

__all__ = ["predict_run", "report_rows", "format_rows"]


def predict_run(machine: Machine, *, model: str, batch_size: int, bucket_mb: float, settings: Any, ranks: int,
                ranks_per_node: int) -> Tuple[Optional[Prediction], str]:
    """The prediction of a job's step from its settings, or None and the reason there is none. Pure.

    The strategy whose settings ``settings`` are (None: data parallelism) predicts through its
    registered ``predict`` entry point (:mod:`mpipar.registry`): data parallelism; flushing pipelines
    and their grids (``mpipar/pipeline/prediction.py``); replicas of tensor-parallel groups
    (``batch_size`` per group, the machine file's ``MODEL/tpT`` profile). Others have no model yet.
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
    try:
        prediction = registry.resolve(spec.predict)(machine, profile, model=model,
                                                    batch_size=batch_size, bucket_mb=bucket_mb, settings=settings,
                                                    ranks=ranks, ranks_per_node=ranks_per_node)
    except ValueError as exc:  # e.g. ranks across nodes and a machine file of one node
        return None, str(exc)
    if prediction is None:
        return None, f"no cost model for {spec.name} with these settings yet"
    return prediction, ""


def report_rows(run) -> List[Tuple[str, float, float]]:
    """(quantity, predicted, measured) of a run whose metrics file holds ``predicted_*`` attributes.

    ``run``: a :class:`~mpipar.report.reader.Run` or a path ``read_run`` accepts. Measured values are
    medians over the steps after the first (which includes warm-up): the step (the slowest rank's),
    compute (the busiest rank's), communication (the slowest rank's comm + idle, what the prediction
    calls exposed Allreduce plus bubble), and the bubble when the run stored one. [] without predictions.
    """
    from mpipar.report.reader import read_run

    if not hasattr(run, "attrs"):
        run = read_run(run)
    attrs, steps = run.attrs, run.steps
    if "predicted_step_seconds" not in attrs or "step_time" not in steps or len(steps["step_time"]) == 0:
        return []
    later = slice(1, None) if len(steps["step_time"]) > 1 else slice(None)

    def median_of(name, reduce):
        return float(np.median(reduce(steps[name][later], axis=1))) if name in steps else float("nan")

    step = median_of("step_time", np.nanmax)
    compute = median_of("compute_time", np.nanmax)
    rows = [("step s", float(attrs["predicted_step_seconds"]), step),
            ("compute s", float(attrs["predicted_compute_seconds"]), compute),
            ("not computing s", float(attrs["predicted_step_seconds"]) - float(attrs["predicted_compute_seconds"]),
             step - compute)]
    if "bubble_measured" in steps and float(attrs.get("predicted_bubble", 0.0)) > 0:
        rows.append(("bubble", float(attrs["predicted_bubble"]), float(np.nanmedian(steps["bubble_measured"][later]))))
    return rows


def format_rows(rows: List[Tuple[str, float, float]]) -> str:
    """``predicted vs measured`` lines, with the ratio."""
    lines = ["predicted vs measured (median step after the first):"]
    for name, predicted, measured in rows:
        ratio = f"{measured / predicted:.2f}x" if predicted > 0 else "-"
        lines.append(f"  {name:16} predicted {predicted:.4f}  measured {measured:.4f}  measured/predicted {ratio}")
    return "\n".join(lines)
