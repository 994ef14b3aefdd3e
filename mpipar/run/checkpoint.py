"""Checkpoints written atomically (temporary directory, then rename), one file per rank that holds its own state."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Collection, Dict, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import agreed

__all__ = ["Checkpointer", "rng_state", "set_rng_state", "check_same_run", "FREE_SETTINGS"]

_NAME = re.compile(r"^step-(\d{9})$")

FREE_SETTINGS = frozenset({"threads", "log_every", "flush_every", "checkpoint_every", "out"})
"""Settings a resumed run may change: they do not change the results."""


def rng_state() -> Dict[str, Any]:
    """This process's random number generator states (torch, numpy, random)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])


def check_same_run(saved: dict, current: dict, free: Collection[str] = FREE_SETTINGS) -> None:
    """A checkpoint resumes only the run that wrote it: settings that change results must match.

    Args:
        saved: the configuration stored in the checkpoint.
        current: this run's configuration.
        free: settings allowed to differ (threads, logging, output directory...).

    Raises:
        ValueError: (an ``AgreedError``: printed once) naming every differing setting
            with both values, on one line. Local: call it on every rank with the
            same arguments (e.g. after ``agree_on`` the saved configuration).
    """
    differing = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
                 if k not in free and saved.get(k) != current.get(k)}
    if differing:
        raise agreed(ValueError)("the checkpoint was written with other settings: " + ", ".join(
            f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differing.items()) + "; resume with the same flags")


class Checkpointer:
    """Save and find checkpoints under ``directory`` (``step-000000042/rank-R.pt``).

    A checkpoint is written into a temporary directory, every file is flushed to
    disk, and rank 0 renames the directory into place only after every writer
    finished, so a crash while writing never spoils the last good checkpoint
    (a half-written one keeps its ``.tmp-`` name and is ignored, then removed).

    Collective contract: :meth:`save`, :meth:`latest` and :meth:`load` are
    collective over ``comm``. With ``per_rank=False`` (data parallelism: replicas
    are identical) only rank 0 writes and every rank loads rank 0's file; with
    ``per_rank=True`` (model/pipeline partitions) each rank writes and loads its own.

    Args:
        directory: where checkpoints live (created by rank 0).
        comm: the ranks that save together.
        per_rank: whether every rank's state differs.
        keep: how many complete checkpoints to keep (older ones are removed).
    """

    def __init__(self, directory, comm: MPI.Intracomm, *, per_rank: bool = False, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.comm = comm
        self.per_rank = per_rank
        self.keep = keep
        self.rank = comm.Get_rank()

    def _writes(self) -> bool:
        return self.per_rank or self.rank == 0

    def _file(self, checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"rank-{rank}.pt"

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step``; returns its directory. Collective."""
        final = self.directory / f"step-{step:09d}"
        proposed = f"step-{step:09d}.tmp-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None
        tmp_name = collectives.bcast(self.comm, proposed, "checkpoint name")
        tmp = self.directory / tmp_name

        def write():
            if self.rank == 0:
                tmp.mkdir(parents=True, exist_ok=False)

        collective_check(self.comm, write, f"checkpoint {tmp}")

        def write_state():
            if self._writes():
                path = self._file(tmp, self.rank)
                with open(path, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())

        collective_check(self.comm, write_state, f"checkpoint {final}")

        def publish():
            if self.rank != 0:
                return
            meta = {"step": step, "world_size": self.comm.Get_size(), "per_rank": self.per_rank}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()

        collective_check(self.comm, publish, f"checkpoint {final}")
        return final

    def _complete(self):
        found = []
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                match = _NAME.match(entry.name)
                if match and (entry / "meta.json").exists():
                    found.append((int(match.group(1)), entry))
        return sorted(found)

    def _prune(self) -> None:
        for _, old in self._complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for entry in self.directory.iterdir():
            if ".tmp-" in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None (decided by rank 0). Collective."""
        newest = None
        if self.rank == 0:
            complete = self._complete()
            newest = str(complete[-1][1]) if complete else None
        newest = collectives.bcast(self.comm, newest, "latest checkpoint")
        return Path(newest) if newest else None

    def load(self, checkpoint: Path) -> Dict[str, Any]:
        """Read this rank's state from ``checkpoint``. Collective; raises on every
        rank when the checkpoint was written by a different number of ranks (the
        data position, the per-rank state and the metrics file's columns all depend
        on it; ``mpipar-consolidate`` gives the model for a fresh run instead)."""

        def read():
            meta = json.loads((checkpoint / "meta.json").read_text())
            if meta["world_size"] != self.comm.Get_size():
                raise ValueError(f"{checkpoint} was written by {meta['world_size']} ranks, this run has "
                                 f"{self.comm.Get_size()}; resume with {meta['world_size']} ranks, or start a "
                                 f"new run from its weights (mpipar-consolidate)")
            source = self._file(checkpoint, self.rank if meta["per_rank"] else 0)  # as it was written
            with open(source, "rb") as f:
                return torch.load(f, weights_only=False)

        return collective_check(self.comm, read, f"resuming from {checkpoint}")
