"""A pipeline run's sampled step as measured, and the same schedule as it would ideally run.

Pure functions over :class:`~mpipar.report.reader.Run`: the measured forward and backward of
each micro-batch on each rank (from ``/events``), and the ideal timeline: the run's schedule
simulated by :func:`mpipar.pipeline_plan.schedule.simulate_step` (the one simulator; ``placement_bubble``
uses it too) with the measured mean forward and backward time of each stage and free communication.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mpipar.pipeline_plan.schedule import FLUSHING_SCHEDULES, Schedule, simulate_step
from mpipar.report.reader import Run

__all__ = ["Span", "Timeline", "is_pipeline", "measured_timeline", "stage_times", "ideal_timeline",
           "ideal_for_run", "stage_ranks_of"]


@dataclass(frozen=True)
class Span:
    """One forward (``kind`` "F"), backward ("B"), or a split backward's input or weight half ("I", "W"; measured:
    "B", "W") of ``microbatch`` on ``stage``, seconds from the timeline's start."""

    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


@dataclass
class Timeline:
    """Compute spans per row (a rank of the pipeline) from time 0 to ``makespan``."""

    rows: Dict[int, List[Span]]
    makespan: float

    @property
    def work(self) -> float:
        return float(sum(s.end - s.start for spans in self.rows.values() for s in spans))

    @property
    def bubble(self) -> float:
        """Idle share of the rows' time: ``1 - work / (rows * makespan)``."""
        return 1.0 - self.work / (len(self.rows) * self.makespan) if self.rows and self.makespan > 0 else float("nan")


def is_pipeline(run: Run) -> bool:
    return "schedule" in run.attrs and "stages" in run.attrs


def stage_ranks_of(placement: Sequence[int], boundaries: Sequence[int] = ()) -> List[int]:
    """The rank of each stage: maximal runs of consecutive layers on one rank, cut at ``boundaries`` (as
    ``Placement``; the run's ``stage_boundaries`` attribute, zbv's V)."""
    ranks: List[int] = []
    for layer, rank in enumerate(placement):
        if layer == 0 or rank != placement[layer - 1] or layer in boundaries:
            ranks.append(int(rank))
    return ranks


def _compute_events(run: Run, step: Optional[int] = None) -> Dict[str, np.ndarray]:
    events = run.events
    if not len(events.get("step", [])):
        return {}
    names = np.array(run.event_names)[events["name"]]
    keep = np.isin(names, ("forward", "backward", "backward_weight")) & (events["stage"] >= 0)
    if step is not None:
        keep &= events["step"] == step
    kinds = np.select([names[keep] == "forward", names[keep] == "backward_weight"], ["F", "W"], "B")
    return {"kind": kinds,
            **{k: events[k][keep] for k in ("step", "rank", "stage", "index", "start", "duration")}}


def stage_times(run: Run) -> Optional[List[Tuple[float, float]]]:
    """Mean (forward, backward) seconds of one micro-batch on each stage over the sampled steps;
    None without pipeline events (a stage with none: 0)."""
    found = _compute_events(run)
    if not found or not len(found["stage"]):
        return None
    stages = int(run.attrs.get("stages", int(found["stage"].max()) + 1))
    times = []
    for stage in range(stages):
        pair = []
        for kind in ("F", "B", "W"):
            mine = (found["stage"] == stage) & (found["kind"] == kind)
            pair.append(float(found["duration"][mine].mean()) if mine.any() else 0.0)
        times.append((pair[0], pair[1] + pair[2]))  # a split backward's (zero-bubble) input and weight halves
    return times


def measured_timeline(run: Run, step: Optional[int] = None) -> Optional[Timeline]:
    """The forwards and backwards of one sampled step (default: the last) on the ranks of the
    first pipeline (each stage's lowest rank with events), from the step's first forward."""
    found = _compute_events(run)
    if not found or not len(found["step"]):
        return None
    step = int(found["step"].max()) if step is None else step
    found = _compute_events(run, step)
    if not len(found["step"]):
        return None
    rank_of = {int(s): int(found["rank"][found["stage"] == s].min()) for s in np.unique(found["stage"])}
    mine = np.isin(found["rank"], list(rank_of.values())) & \
        np.array([rank_of[int(s)] == int(r) for s, r in zip(found["stage"], found["rank"])])
    start = found["start"][mine]
    origin = float(start.min())
    rows: Dict[int, List[Span]] = {}
    for kind, stage, index, begin, duration, rank in zip(found["kind"][mine], found["stage"][mine],
                                                          found["index"][mine], start, found["duration"][mine],
                                                          found["rank"][mine]):
        rows.setdefault(int(rank), []).append(Span(str(kind), int(stage), int(index), float(begin) - origin,
                                                   float(begin) - origin + float(duration)))
    return Timeline({r: sorted(spans, key=lambda s: s.start) for r, spans in sorted(rows.items())},
                    max(s.end for spans in rows.values() for s in spans))


def ideal_timeline(schedule: str, stage_ranks: Sequence[int], microbatches: int,
                   times: Sequence[Tuple[float, float]]) -> Timeline:
    """``schedule`` over ``microbatches`` on stages placed on ``stage_ranks``, each forward and
    backward of stage s lasting ``times[s]``, communication free: the spans of
    :func:`mpipar.pipeline_plan.schedule.simulate_step`, the one simulator (pure: reading runs needs
    no torch), one row per rank. Its :attr:`Timeline.bubble` is ``placement_bubble``
    of the same arguments."""
    spans = simulate_step(Schedule.on(schedule, stage_ranks, microbatches), stage_ranks, times)
    ranks = sorted(set(stage_ranks))
    rows: Dict[int, List[Span]] = {r: [] for r in ranks}
    for step, (start, end) in spans.items():
        rows[stage_ranks[step.stage]].append(Span(step.code, step.stage,
                                                  step.microbatch, start, end))
    makespan = max((end for _, end in spans.values()), default=0.0)
    return Timeline({r: sorted(row, key=lambda s: s.start) for r, row in rows.items()}, makespan)


def ideal_for_run(run: Run) -> Optional[Timeline]:
    """The ideal timeline of a flushing pipeline run with events (None otherwise)."""
    times = stage_times(run)
    if times is None or str(run.attrs.get("schedule")) not in FLUSHING_SCHEDULES or "placement" not in run.attrs:
        return None
    stage_ranks = stage_ranks_of(json.loads(str(run.attrs["placement"])),
                                 json.loads(str(run.attrs.get("stage_boundaries", "[]"))))
    return ideal_timeline(str(run.attrs["schedule"]), stage_ranks,
                          int(run.attrs["microbatches"]), times)
