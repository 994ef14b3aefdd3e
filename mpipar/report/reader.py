"""Read a run's ``metrics.h5`` (see :mod:`mpipar.run.metrics` for the layout) into arrays.

The one reading code for the tools that look at finished (or killed) runs:
``mpipar-summary`` and ``mpipar-report``. Imports only h5py and numpy, so reading a
run does not load torch or MPI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Union

import h5py
import numpy as np

__all__ = ["Run", "read_run", "metrics_path"]

TIME_FIELDS = ("compute_time", "comm_time", "idle_time", "data_time")


@dataclass
class Run:
    """One run's metrics. ``steps`` maps each ``/steps`` dataset to its array: (S,) or (S, W),
    NaN (floats) or 0 (counts) where a rank did not run the step; ``epochs`` likewise (E,)."""

    path: Path
    attrs: Dict[str, object] = field(default_factory=dict)
    steps: Dict[str, np.ndarray] = field(default_factory=dict)
    epochs: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run directory's name (or the file's, when it is not called metrics.h5)."""
        return self.path.parent.name if self.path.name == "metrics.h5" else self.path.stem

    @property
    def strategy(self) -> str:
        return str(self.attrs.get("strategy", "?"))

    @property
    def world_size(self) -> int:
        return int(self.attrs.get("world_size", self.steps["step_time"].shape[1] if "step_time" in self.steps else 0))

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

    def sizes(self) -> np.ndarray:
        """The ranks that ran each step (S,): ``/steps/world_size``, else the run's world size."""
        if "world_size" in self.steps:
            return np.asarray(self.steps["world_size"], dtype=np.int64)
        return np.full(self.num_steps, self.world_size, dtype=np.int64)


def metrics_path(path: Union[str, Path]) -> Path:
    """A run directory's ``metrics.h5``, or ``path`` itself when it is a file."""
    path = Path(path)
    return path / "metrics.h5" if path.is_dir() else path


def read_run(path: Union[str, Path]) -> Run:
    """Load a run directory or metrics file: whatever was flushed (no steps or epochs yet is fine).

    Raises:
        OSError: the file is missing or not HDF5.
    """
    path = metrics_path(path)
    with h5py.File(path, "r") as f:
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        steps = {k: f["steps"][k][...] for k in f["steps"]} if "steps" in f else {}
        epochs = {k: f["epochs"][k][...] for k in f["epochs"]} if "epochs" in f else {}
    return Run(path=path, attrs=attrs, steps=steps, epochs=epochs)


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value
