"""A run's sampled events (``/events``) as Chrome trace JSON, which Perfetto and ``chrome://tracing`` open.

One process track per rank (``pid`` = rank, named ``rank r (host)``); thread 0 holds the
rank's main lane (step, data, train_step, optimizer, waits: nested or one after the
other), threads 1, 2, ... its transfers in flight (bucket Allreduces, pushes), spread over
as few threads as keep each thread's events apart. Every event is complete (``"ph": "X"``)
with ``ts`` and ``dur`` in microseconds on rank 0's clock, and ``args`` with the step and,
where known, bytes, peer and index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from mpipar.report.reader import Run

__all__ = ["chrome_trace", "write_trace", "comm_lanes"]

MAIN_THREAD = 0


def comm_lanes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The lane (0, 1, ...) of each interval: the lowest whose last interval has ended (greedy
    by start), so intervals of one lane never overlap."""
    lanes = np.zeros(len(starts), dtype=np.int64)
    free_at: List[float] = []
    for i in np.argsort(starts, kind="stable"):
        lane = next((k for k, end in enumerate(free_at) if end <= starts[i]), len(free_at))
        if lane == len(free_at):
            free_at.append(0.0)
        free_at[lane] = ends[i]
        lanes[i] = lane
    return lanes


def chrome_trace(run: Run) -> dict:
    """The trace as a JSON-ready dict: ``{"traceEvents": [...], "displayTimeUnit": "ms", ...}``."""
    events = run.events
    names = run.event_names
    hosts = json.loads(run.attrs["hosts"]) if "hosts" in run.attrs else []
    trace: List[Dict] = []
    if not names or not len(events.get("step", [])):
        return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"run": str(run.path)}}
    ranks = np.unique(events["rank"])
    for rank in ranks.tolist():
        host = f" ({hosts[rank]})" if rank < len(hosts) else ""
        trace.append({"name": "process_name", "ph": "M", "pid": rank, "tid": MAIN_THREAD,
                      "args": {"name": f"rank {rank}{host}"}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": MAIN_THREAD,
                      "args": {"sort_index": rank}})
        trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": MAIN_THREAD, "args": {"name": "steps"}})
    start_us = events["start"] * 1e6
    dur_us = np.maximum(events["duration"], 0.0) * 1e6
    thread = np.full(len(start_us), MAIN_THREAD, dtype=np.int64)
    for rank in ranks.tolist():
        comm = np.flatnonzero((events["rank"] == rank) & (events["lane"] != 0))
        if len(comm):
            lanes = comm_lanes(start_us[comm], start_us[comm] + dur_us[comm])
            thread[comm] = 1 + lanes
            for lane in range(int(lanes.max()) + 1):
                trace.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1 + lane,
                              "args": {"name": f"transfers {lane}"}})
    # parents before children at equal start (longer first), as the viewers nest them
    order = np.lexsort((-dur_us, start_us, thread, events["rank"]))
    for i in order.tolist():
        args = {"step": int(events["step"][i])}
        if events["bytes"][i] > 0:
            args["bytes"] = int(events["bytes"][i])
        if events["peer"][i] >= 0:
            args["peer"] = int(events["peer"][i])
        if events["index"][i] >= 0:
            args["index"] = int(events["index"][i])
        if "stage" in events and events["stage"][i] >= 0:
            args["stage"] = int(events["stage"][i])
        name = names[int(events["name"][i])]
        ts = round(float(start_us[i]), 3)  # ends rounded too: a child never ends after its parent
        trace.append({"name": name, "cat": "comm" if thread[i] else "step", "ph": "X",
                      "ts": ts, "dur": max(0.0, round(float(start_us[i] + dur_us[i]), 3) - ts),
                      "pid": int(events["rank"][i]), "tid": int(thread[i]), "args": args})
    return {"traceEvents": trace, "displayTimeUnit": "ms",
            "otherData": {"run": str(run.path), "strategy": run.strategy, "world_size": run.world_size,
                          "clock": str(run.event_attrs.get("clock", ""))}}


def write_trace(run: Run, path) -> Path:
    """Write :func:`chrome_trace` to ``path``; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(run), separators=(",", ":")), encoding="utf-8")
    return path
