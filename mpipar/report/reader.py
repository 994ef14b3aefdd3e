"""Read a run's ``metrics.h5`` (see :mod:`mpipar.run.metrics` for the layout) into arrays.

The one reading code for the tools that look at finished (or killed) runs:
``mpipar-summary`` and ``mpipar-report``. Imports only h5py and numpy, so reading a
run does not load torch or MPI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import h5py
import numpy as np

__all__ = ["Run", "read_run", "metrics_path"]

TIME_FIELDS = ("compute_time", "comm_time", "idle_time", "data_time")


@dataclass
class Run:
    """One run's metrics. ``steps`` maps each ``/steps`` dataset to its array: (S,) or (S, W),
    NaN (floats) or 0 (counts) where a rank did not run the step; ``epochs`` likewise (E,);
    ``events`` the ``/events`` table's columns (empty without ``--trace-steps``; ``stage`` -1
    throughout in a file written before that column existed) and ``event_attrs`` its
    attributes; ``p2p`` the ``/p2p`` table's columns (point-to-point bytes, see :meth:`p2p_matrix`)."""

    path: Path
    attrs: Dict[str, Any] = field(default_factory=dict)
    steps: Dict[str, np.ndarray] = field(default_factory=dict)
    epochs: Dict[str, np.ndarray] = field(default_factory=dict)
    events: Dict[str, np.ndarray] = field(default_factory=dict)
    event_attrs: Dict[str, Any] = field(default_factory=dict)
    p2p: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run directory's name (or the file's, when it is not called metrics.h5)."""
        return self.path.parent.name if self.path.name == "metrics.h5" else self.path.stem

    @property
    def strategy(self) -> str:
        return str(self.attrs.get("strategy", "?"))

    @property
    def world_size(self) -> int:
        if "world_size" in self.attrs:
            return int(self.attrs["world_size"])
        return self.steps["step_time"].shape[1] if "step_time" in self.steps else 0

    @property
    def num_steps(self) -> int:
        return len(self.steps.get("loss", []))

    @property
    def config(self) -> dict:
        """The run's configuration (the ``config`` attribute, JSON); {} when absent."""
        text = self.attrs.get("config")
        return json.loads(text) if text else {}

    def per_rank(self, name: str) -> np.ndarray:
        """An (S, W) dataset as floats; an (S, 0) array when the run has none."""
        values = self.steps.get(name)
        return np.zeros((self.num_steps, 0)) if values is None else np.asarray(values, dtype=np.float64)

    def rank_peaks(self, name: str) -> Optional[np.ndarray]:
        """Each rank's largest value of an (S, W) dataset over the run (e.g. ``max_rss_bytes``), NaN for
        a rank with none; None when the run has none (a file of an older mpipar)."""
        values = self.per_rank(name)
        if values.shape[1] == 0 or not np.isfinite(values).any():
            return None
        peaks = np.max(np.where(np.isfinite(values), values, -np.inf), axis=0)
        return np.where(np.isfinite(peaks), peaks, np.nan)

    @property
    def event_names(self) -> List[str]:
        """The names of the ``/events`` codes."""
        return json.loads(self.event_attrs["names"]) if "names" in self.event_attrs else []

    @property
    def event_levels(self) -> List[int]:
        """Each code's nesting depth on the main lane."""
        return json.loads(self.event_attrs["levels"]) if "levels" in self.event_attrs else []

    @property
    def traced_steps(self) -> np.ndarray:
        """The steps with events, in order."""
        return np.unique(self.events["step"]) if "step" in self.events else np.zeros(0, dtype=np.int64)

    def p2p_matrix(self) -> Optional[np.ndarray]:
        """Bytes each rank sent to each peer point to point over the run, (W, W) with rows the
        senders; None when the run recorded no point-to-point traffic."""
        if not len(self.p2p.get("bytes", [])):
            return None
        size = max(self.world_size, int(self.p2p["rank"].max()) + 1, int(self.p2p["peer"].max()) + 1)
        matrix = np.zeros((size, size))
        np.add.at(matrix, (self.p2p["rank"].astype(np.int64), self.p2p["peer"].astype(np.int64)), self.p2p["bytes"])
        return matrix

    def sizes(self) -> np.ndarray:
        """The ranks that ran each step (S,): ``/steps/world_size``, else the run's world size."""
        if "world_size" in self.steps:
            return np.asarray(self.steps["world_size"], dtype=np.int64)
        return np.full(self.num_steps, self.world_size, dtype=np.int64)


def metrics_path(path: Union[str, Path]) -> Path:
    """A run directory's ``metrics.h5``, or ``path`` itself when it is a file."""
    path = Path(path)
    return path / "metrics.h5" if path.is_dir() else path


def read_run(path: Union[str, Path], *, patience: float = 10.0) -> Run:
    """Load a run directory or metrics file: whatever was flushed (no steps or epochs yet is fine).

    A run still going: its rank 0 holds the file (and HDF5's lock on it) only while it
    appends a flush, so an open that fails is tried again for up to ``patience`` seconds;
    columns caught between two appends are cut to the rows every column has.

    Raises:
        OSError: the file is missing or not HDF5 (or stayed locked for ``patience`` seconds).
    """
    path = metrics_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such metrics file")
    deadline = time.monotonic() + patience
    while True:
        try:
            return _read(path)
        except BlockingIOError:   # "unable to lock file": rank 0 is appending a flush
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read(path: Path) -> Run:
    with h5py.File(path, "r") as f:
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        steps = _group(f, "steps")
        epochs = _group(f, "epochs")
        events = _group(f, "events", skip="_histogram")
        event_attrs = {key: _plain(value) for key, value in f["events"].attrs.items()} if "events" in f else {}
        p2p = _group(f, "p2p")
    if events and "stage" not in events:
        events["stage"] = np.full(len(events["step"]), -1, dtype=np.int64)
    return Run(path=path, attrs=attrs, steps=steps, epochs=epochs, events=events, event_attrs=event_attrs, p2p=p2p)


def _group(f: h5py.File, name: str, skip: Optional[str] = None) -> Dict[str, np.ndarray]:
    """A group's datasets, cut to the rows all of them have (a flush may be under way)."""
    if name not in f:
        return {}
    columns = {k: f[name][k][...] for k in f[name] if not (skip and k.endswith(skip))}
    rows = min((len(v) for v in columns.values()), default=0)
    return {k: v[:rows] for k, v in columns.items()}


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value
