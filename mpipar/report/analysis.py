"""Pure functions over :class:`~mpipar.report.reader.Run`: where the time went, who was slow,
how throughput scaled. No plotting, no I/O."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mpipar.report.reader import TIME_FIELDS, Run, read_run

__all__ = ["Straggler", "Scaling", "measured_steps", "time_split", "comm_share", "find_straggler", "throughput",
           "scaling", "straggler_sentence", "comm_sentence", "report_rows"]

STRAGGLER_THRESHOLD = 0.2


def measured_steps(run: Run) -> np.ndarray:
    """Indices of the steps to average: all but the first (warm-up) when there are more than 2."""
    n = run.num_steps
    return np.arange(1, n) if n > 2 else np.arange(n)


def time_split(run: Run) -> Dict[str, np.ndarray]:
    """Mean seconds per step for each rank (W,) of compute, comm, idle, data and the whole step,
    ignoring warm-up and steps a rank did not run (NaN)."""
    keep = measured_steps(run)
    split = {}
    for name in (*TIME_FIELDS, "step_time"):
        values = run.per_rank(name)[keep]
        with warnings.catch_warnings():  # a rank absent in every measured step: NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            split[name] = np.nanmean(values, axis=0) if len(values) else np.full(values.shape[1], np.nan)
    return split


def comm_share(run: Run) -> float:
    """Communication's share of the step time over all ranks and measured steps (NaN: no steps)."""
    keep = measured_steps(run)
    total = np.nansum(run.per_rank("step_time")[keep])
    return float(np.nansum(run.per_rank("comm_time")[keep]) / total) if total > 0 else float("nan")


@dataclass
class Straggler:
    """A rank slower than the others: ``slower_by`` 0.5 means 50% above the others' median."""

    rank: int
    measure: str        # "compute_time" or "step_time"
    slower_by: float
    seconds: float      # its mean per step
    others: float       # the others' median mean per step


def find_straggler(run: Run, threshold: float = STRAGGLER_THRESHOLD) -> Optional[Straggler]:
    """The rank whose mean compute (or step) time exceeds the median of the other ranks' by
    more than ``threshold``; the larger excess when both do, compute first on ties. None when
    no rank stands out, or with fewer than 2 ranks."""
    split = time_split(run)
    best: Optional[Straggler] = None
    for measure in ("compute_time", "step_time"):
        means = split[measure]
        ranks = np.flatnonzero(np.isfinite(means))
        if len(ranks) < 2:
            continue
        for rank in ranks:
            others = float(np.median(means[ranks[ranks != rank]]))
            if others <= 0:
                continue
            slower_by = float(means[rank]) / others - 1.0
            if slower_by > threshold and (best is None or slower_by > best.slower_by):
                best = Straggler(int(rank), measure, slower_by, float(means[rank]), others)
    return best


def throughput(run: Run) -> float:
    """Samples per second over the measured steps: samples / the slowest rank's summed step time."""
    keep = measured_steps(run)
    if not len(keep):
        return float("nan")
    seconds = np.nansum(run.per_rank("step_time")[keep], axis=0)
    seconds = seconds.max() if seconds.size else 0.0
    return float(np.asarray(run.steps["samples"])[keep].sum() / seconds) if seconds > 0 else float("nan")


@dataclass
class Scaling:
    """Runs ordered by ranks: throughput and efficiency relative to the smallest run
    (``(samples/s / ranks) / (base samples/s / base ranks)``; 1.0 is linear scaling)."""

    names: List[str]
    ranks: np.ndarray
    samples_per_s: np.ndarray
    efficiency: np.ndarray


def scaling(runs: Sequence[Run]) -> Scaling:
    ordered = sorted(runs, key=lambda r: (r.world_size, r.name))
    ranks = np.array([r.world_size for r in ordered], dtype=np.int64)
    rate = np.array([throughput(r) for r in ordered], dtype=np.float64)
    base = rate[0] / ranks[0] if len(ordered) else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        efficiency = (rate / ranks) / base
    return Scaling([r.name for r in ordered], ranks, rate, efficiency)


def straggler_sentence(run: Run, straggler: Optional[Straggler]) -> str:
    """Who was slow, in words."""
    if run.num_steps == 0:
        return "No steps recorded yet."
    if run.world_size < 2:
        return "One rank: no straggler to look for."
    if straggler is None:
        return (f"No straggler: no rank's mean compute or step time is more than "
                f"{100 * STRAGGLER_THRESHOLD:.0f}% above the median of the others.")
    what = "compute" if straggler.measure == "compute_time" else "step"
    return (f"Rank {straggler.rank} was the straggler: its mean {what} time per step "
            f"({1000 * straggler.seconds:.1f} ms) was {100 * straggler.slower_by:.0f}% above the median of "
            f"the other ranks ({1000 * straggler.others:.1f} ms).")


def comm_sentence(run: Run) -> str:
    """How much was communication (and waiting), in words."""
    if run.num_steps == 0:
        return ""
    split = time_split(run)
    step = np.nansum(split["step_time"])
    if not step > 0:
        return ""
    share = {k: np.nansum(split[k]) / step for k in TIME_FIELDS}
    return (f"Communication took {100 * share['comm_time']:.1f}% of the step time and waiting for other ranks "
            f"(idle) {100 * share['idle_time']:.1f}%; compute {100 * share['compute_time']:.1f}%, data loading "
            f"{100 * share['data_time']:.1f}%.")


def report_rows(run) -> List[Tuple[str, float, float]]:
    """(quantity, predicted, measured) of a run whose metrics file holds ``predicted_*`` attributes.

    ``run``: a :class:`~mpipar.report.reader.Run` or a path ``read_run`` accepts. Measured values are
    medians over the steps after the first (which includes warm-up): the step (the slowest rank's),
    compute (the busiest rank's), communication (the slowest rank's comm + idle, what the prediction
    calls exposed Allreduce plus bubble), and the bubble when the run stored one. [] without predictions.
    """
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
