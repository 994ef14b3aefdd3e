"""A training run's predicted step (``--machine FILE``) and the predicted-beside-measured rows of a finished run."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from mpipar.cost.machine import Machine
from mpipar.cost.model import Layout, Prediction, predict_data_parallel, predict_pipeline

__all__ = ["predict_run", "report_rows", "format_rows"]


def predict_run(machine: Machine, *, model: str, batch_size: int, bucket_mb: float, settings: Any, ranks: int,
                ranks_per_node: int) -> Tuple[Optional[Prediction], str]:
    """The prediction of a job's step from its settings, or None and the reason there is none. Pure.

    Data parallelism when ``settings`` is None; a flushing pipeline (grid) for a
    :class:`~mpipar.pipeline.config.PipelineConfig` with ``tp`` 1 (``balance`` even, auto or given;
    a ``placement`` is not modelled); replicas of tensor-parallel groups for a
    :class:`~mpipar.tensor_parallel.strategy.TensorParallelConfig` (``batch_size`` per group; the machine
    file's ``MODEL/tpT`` profile, :func:`~mpipar.cost.tensor.predict_tensor_grid`); other strategies have
    no model yet.
    """
    if model not in machine.models:
        return None, f"the machine file has no layer times of {model} (mpipar-calibrate --model {model})"
    profile = machine.profile(model)
    kind = type(settings).__name__
    try:
        if settings is None:
            return predict_data_parallel(profile, batch_size, Layout(ranks, ranks_per_node), machine,
                                         bucket_mb=bucket_mb), ""
        if kind == "PipelineConfig" and settings.tp == 1 and settings.placement is None \
                and settings.schedule in ("gpipe", "1f1b", "naive"):
            from mpipar.pipeline.placement import even_balance
            balance = (even_balance(profile.num_layers, settings.stages) if settings.balance == "even"
                       else None if settings.balance == "auto" else list(settings.balance))
            layout = Layout(ranks, ranks_per_node, pp=settings.stages)
            return predict_pipeline(profile, batch_size, layout, machine, microbatches=settings.microbatches,
                                    schedule=settings.schedule, balance=balance), ""
        if kind == "TensorParallelConfig":
            from mpipar.cost.tensor import predict_tensor_grid
            return predict_tensor_grid(machine, model, batch_size, Layout(ranks, ranks_per_node, tp=settings.tp),
                                       bucket_mb=bucket_mb), ""
    except ValueError as exc:  # e.g. ranks across nodes and a machine file of one node
        return None, str(exc)
    return None, f"no cost model for {kind} with these settings yet"


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
