"""The run's HDF5 metrics file: per step and rank, where the time went; per epoch, accuracy.

Layout of ``metrics.h5`` (``S`` steps so far, ``W`` ranks):

* root attributes: ``strategy``, ``world_size``, ``config`` (JSON), ``hosts`` (JSON,
  one per rank), ``mpi_library``, ``mpi4py_version``, ``torch_version``,
  ``mpipar_version``, ``python_version``, ``started_at``, plus any the strategy adds.
* ``/steps/loss`` (S,): sample-weighted mean loss over ranks; ``/steps/samples`` (S,).
* ``/steps/{compute_time,comm_time,idle_time,data_time,step_time,bytes_sent,rank_loss,rank_samples,
  max_rss_bytes}`` (S, W); ``max_rss_bytes`` is the rank's peak resident memory so far (``ru_maxrss``),
  NaN in the rows of a file of an older mpipar that a run resumed. ``comm_time`` is time
  blocked on MPI that is transfer, ``idle_time`` the part that is waiting for other ranks.
  Strategies record what they know directly
  (a pipeline's point-to-point transfers and waits) and the time blocked in
  collectives as a wait: every rank of a collective waits at least as long as the
  rank that arrived last, so per step a wait adds the least wait over the ranks
  that reduce together (``wait_groups``) to ``comm_time`` and this rank's excess
  over it to ``idle_time``.
* ``/steps/wall_clock`` (S,): seconds since the start, on rank 0; ``/steps/world_size`` (S,):
  the ranks that ran the step (a data-parallel run may resume on another number: per-rank
  datasets then have as many columns as the most ranks, and the others read NaN, or 0
  for sample counts).
* ``/epochs/{epoch,train_loss,test_loss,test_accuracy,wall_time,last_step}`` (E,).
* tables a strategy adds rows to as it runs (:class:`Table`: ``/updates``, one row per
  parameter-server update; ``/pipeline_updates``), appended at every flush, each with a ``step``
  column so a resumed run drops the rows after its checkpoint (and recounts their histograms).
* ``/events`` (with ``--trace-steps``): the timed events of the sampled steps, one row per event
  and rank (:data:`mpipar.diagnostics.events.COLUMNS`: step, rank, name code, lane, start and
  duration in seconds on rank 0's clock, bytes, peer, index); its attributes hold the names,
  lanes and levels of the codes and each rank's measured clock offset from rank 0.
* ``/p2p`` (runs with point-to-point traffic: pipelines, the two-sided parameter server): bytes
  each rank sent to each peer with ``mpi_tensor.send``/``isend``, one row per (rank, peer) and
  flush (``step``: the flush's last step; evaluation's transfers included): ``step, rank, peer,
  bytes``; their sum over rows is the run's rank x rank matrix.

Steps are buffered in memory and written by rank 0 at each flush (every
``flush_every`` steps and at each epoch end); the file is opened, appended and
closed each time, so a run killed part-way leaves a readable file with everything
up to the last flush, and a run still going can be read between flushes (a flush
that finds a reader holding the file waits for it).
"""

from __future__ import annotations

import datetime
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import mpi4py
import numpy as np
import torch
from mpi4py import MPI

from mpipar import __version__
from mpipar.comm import mpi_tensor
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.events import EventRecorder
from mpipar.diagnostics.failure import AgreedError
from mpipar.run.launch import mpi_library

__all__ = ["MetricsWriter", "NonFiniteLossError", "PER_RANK_FIELDS", "Table"]

PER_RANK_FIELDS = ("compute_time", "comm_time", "idle_time", "data_time", "step_time", "bytes_sent",
                   "rank_loss", "rank_samples", "max_rss_bytes")
EPOCH_FIELDS = ("epoch", "train_loss", "test_loss", "test_accuracy", "wall_time", "last_step")


class NonFiniteLossError(AgreedError, FloatingPointError):
    """The loss became NaN or Inf; raised on every rank after the metrics are flushed."""


@dataclass(frozen=True)
class Table:
    """A table a strategy adds rows to as it runs: at every flush :class:`MetricsWriter` appends
    ``take()``, this rank's rows since the last call (columns by name, a ``step`` column among
    them; the same names on every rank), with :meth:`MetricsWriter.write_table`'s ``histograms``
    and ``attrs``."""

    name: str
    take: Callable[[], Dict[str, np.ndarray]]
    histograms: Tuple[str, ...] = ()
    attrs: Dict[str, object] = field(default_factory=dict)


class MetricsWriter:
    """Buffer per-step measurements on every rank; rank ``root`` writes them to HDF5.

    Collective contract: the constructor, :meth:`flush`, :meth:`maybe_flush` and
    :meth:`close` are collective over ``comm``; every rank records the same number
    of steps between flushes. :meth:`record_step` and :meth:`record_epoch` are local.

    Args:
        path: the HDF5 file to create (an existing file is an error unless ``resume``).
        comm: the communicator whose ranks are the columns of per-rank datasets.
        strategy: e.g. ``"data_parallel"``; stored as a root attribute.
        config: the run's whole configuration, stored as JSON.
        attrs: further root attributes.
        flush_every: steps between flushes.
        resume: append to an existing file instead of refusing it (a missing file
            is created).
        resume_at_step: with ``resume``, drop rows after this many steps (and epochs
            that ended after it), so a run resumed from a checkpoint of that step
            continues the file with no duplicated or missing steps.
        wait_groups: the ranks that wait in collectives together (data-parallel
            groups); default: all ranks of ``comm``.
        events: this rank's :class:`~mpipar.diagnostics.events.EventRecorder` (on every rank
            or none): its rows are appended to ``/events`` at each flush.
        tables: the strategy's :class:`Table` s (the same on every rank), appended at each flush.

    Raises:
        FileExistsError, PermissionError, OSError: on every rank, before any
            training, when the file cannot be created.
    """

    def __init__(self, path, comm: MPI.Intracomm, *, strategy: str, config: dict,
                 attrs: Optional[dict] = None, flush_every: int = 50, root: int = 0, resume: bool = False,
                 resume_at_step: Optional[int] = None, wait_groups: Optional[List[List[int]]] = None,
                 events: Optional[EventRecorder] = None, tables: Sequence[Table] = ()):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self.comm = comm
        self.root = root
        self.is_root = comm.Get_rank() == root
        self.flush_every = flush_every
        self.events = events
        self.tables = list(tables)
        self.world_size = comm.Get_size()
        self.wait_groups = wait_groups or [list(range(self.world_size))]
        if sorted(rank for group in self.wait_groups for rank in group) != list(range(self.world_size)):
            raise ValueError(f"wait_groups must hold every rank of the communicator once, got {self.wait_groups}")
        self._start = time.perf_counter()
        self._steps: List[dict] = []
        self._epochs: List[dict] = []
        self.steps_written = 0
        mpi_tensor.take_sent(comm)  # /p2p counts from here (not an earlier run's or test's in this process)
        hosts = collectives.allgather(comm, MPI.Get_processor_name(), "metrics: host names")
        if self.is_root:
            all_attrs = {
                "strategy": strategy,
                "world_size": self.world_size,
                "config": json.dumps(config, sort_keys=True, default=str),
                "hosts": json.dumps(hosts),
                "mpi_library": mpi_library(),
                "mpi_version": "{}.{}".format(*MPI.Get_version()),
                "mpi4py_version": mpi4py.__version__,
                "torch_version": torch.__version__,
                "mpipar_version": __version__,
                "python_version": platform.python_version(),
                "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                **(attrs or {}),
            }
        self.steps_written = collective_check(
            comm, lambda: self._create(all_attrs, resume, resume_at_step) if self.is_root else 0, "metrics file")
        self.steps_written = collectives.bcast(comm, self.steps_written, "metrics: steps written", root=root)
        if events is not None:   # a resumed run's events continue the file's clock
            origin = self._events_origin() if self.is_root and resume else None
            events.continue_clock(collectives.bcast(comm, origin, "metrics: events clock", root=root))

    def _events_origin(self) -> Optional[float]:
        with _open(self.path, "r") as f:
            origin = f["events"].attrs.get("clock_origin_unix") if "events" in f else None
        return None if origin is None else float(origin)

    def _create(self, attrs: dict, resume: bool, resume_at_step: Optional[int]) -> int:
        if self.path.exists() and not resume:
            raise FileExistsError(f"{self.path} already exists; choose another --out directory or remove it "
                                  f"(runs are never overwritten)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        with _open(self.path, "a" if resume else "w-") as f:
            if existed and "steps/loss" in f:
                steps = len(f["steps/loss"])
                if resume_at_step is not None and resume_at_step < steps:
                    _truncate(f, resume_at_step)
                    steps = resume_at_step
                return steps
            if not existed:
                for key, value in attrs.items():
                    f.attrs[key] = str(value) if isinstance(value, str) else value  # TorchVersion: a str subclass
        return 0

    # -- recording (local) -----------------------------------------------------------

    def record_step(self, *, loss: float, samples: int, step_time: float, data_time: float = 0.0,
                    compute_time: Optional[float] = None, comm_time: float = 0.0, idle_time: Optional[float] = None,
                    wait_time: float = 0.0, bytes_sent: float = 0.0, **extra: float) -> None:
        """Record this rank's step. Local.

        ``comm_time`` and ``idle_time`` are known transfer and waiting; ``wait_time``
        (blocked in collectives) is split between them at the flush (see the module
        docstring). ``compute_time`` None: what the step's time leaves; ``idle_time``
        None: what is left after compute (0 when compute is None). Extra keywords
        become further (S, W) datasets. The process's peak resident bytes so far are
        recorded with the step (``max_rss_bytes``)."""
        known = data_time + comm_time + wait_time
        if compute_time is None:
            compute_time = max(0.0, step_time - known - (idle_time or 0.0))
        if idle_time is None:
            idle_time = max(0.0, step_time - known - compute_time)
        self._steps.append(dict(loss=float(loss), samples=int(samples), step_time=step_time,
                                wait_time=wait_time, compute_time=compute_time, comm_time=comm_time,
                                idle_time=idle_time, data_time=data_time, bytes_sent=float(bytes_sent),
                                wall_clock=time.perf_counter() - self._start,
                                max_rss_bytes=peak_resident_bytes(), **extra))

    def record_epoch(self, *, epoch: int, train_loss: float, test_loss: float, test_accuracy: float,
                     wall_time: float) -> None:
        """Record an epoch's results (the values of rank ``root`` are written)."""
        self._epochs.append(dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss,
                                 test_accuracy=test_accuracy, wall_time=wall_time,
                                 last_step=self.steps_written + len(self._steps)))

    # -- flushing (collective) ---------------------------------------------------------

    def maybe_flush(self, stop: bool = False) -> bool:
        """Flush when ``flush_every`` steps are buffered. Collective.

        Returns:
            True on every rank when some rank passed ``stop=True`` to this flush
            (e.g. Slurm's warning signal arrived there); False when no flush was due.
        """
        if len(self._steps) >= self.flush_every:
            return self.flush(stop=stop)
        return False

    def flush(self, stop: bool = False) -> bool:
        """Gather buffered steps to ``root`` and append them to the file. Collective.

        Returns:
            True on every rank when any rank passed ``stop=True``.

        Raises:
            NonFiniteLossError: on every rank, after writing, if a loss was NaN/Inf.
        """
        gathered = collectives.gather(self.comm, (self._steps, bool(stop)), "metrics flush", root=self.root)
        verdict = None
        if self.is_root:
            assert gathered is not None  # the root's gather
            rows = [steps for steps, _ in gathered]
            if any(len(r) != len(rows[0]) for r in rows):
                counts = [len(r) for r in rows]
                raise RuntimeError(f"ranks recorded different numbers of steps since the last flush: {counts}")
            verdict = (self._write(rows, self._epochs), any(flag for _, flag in gathered))
        bad_step, stop_anywhere = collectives.bcast(self.comm, verdict, "metrics flush", root=self.root)
        if self.events is not None and self.events.buffered_steps:  # the same on every rank
            self.write_table("events", self.events.take(), attrs=self.events.attrs())
        self.write_tables()
        self._write_point_to_point(max(0, self.steps_written + len(self._steps) - 1))
        self.steps_written += len(self._steps)
        self._steps, self._epochs = [], []
        if bad_step is not None:
            raise NonFiniteLossError(f"the loss became {bad_step[1]} at step {bad_step[0]}; stopped. "
                                     f"Metrics up to that step are in {self.path}. Try a lower learning rate.")
        return stop_anywhere

    def write_tables(self) -> None:
        """Append the rows each :class:`Table` has taken since the last flush. Collective (every
        flush does it; a strategy whose last rows come after the final flush calls it again)."""
        for table in self.tables:
            self.write_table(table.name, table.take(), attrs=table.attrs, histograms=table.histograms)

    def _write_point_to_point(self, step: int) -> None:
        """Append this rank's point-to-point bytes since the last flush to ``/p2p``. Collective."""
        sent = mpi_tensor.take_sent(self.comm)
        peers = np.array(sorted(sent), dtype=np.int64)
        self.write_table("p2p", {"step": np.full(len(peers), step, dtype=np.int64),
                                 "rank": np.full(len(peers), self.comm.Get_rank(), dtype=np.int64),
                                 "peer": peers, "bytes": np.array([sent[p] for p in peers.tolist()], dtype=np.float64)},
                         attrs={"about": "bytes sent by rank to peer (ranks of the run) with mpi_tensor.send/isend "
                                         "since the previous row's flush; step: the flush's last step"})

    def close(self) -> None:
        """Final flush. Collective."""
        self.flush()

    def write_derived(self, derive: Callable[[Dict[str, np.ndarray]], tuple]) -> dict:
        """Add what a strategy computes from the whole run (e.g. the pipeline bubble).

        Collective; call after :meth:`close`. On ``root``, ``derive`` gets every
        ``/steps`` dataset as an array and returns ``(datasets, attrs)``: (S,) or
        (S, W) arrays stored as ``/steps/<name>`` (replacing earlier ones) and root
        attributes. Returns ``attrs`` on every rank.
        """
        attrs = None
        if self.is_root:
            with _open(self.path, "a") as f:
                steps = {name: data[...] for name, data in f["steps"].items()} if "steps" in f else {}
                datasets, attrs = derive(steps)
                for name, values in datasets.items():
                    if f"steps/{name}" in f:
                        del f[f"steps/{name}"]
                    _append(f, f"steps/{name}", np.asarray(values))  # resizable, as resume truncates it
                for key, value in attrs.items():
                    f.attrs[key] = value
        return collectives.bcast(self.comm, attrs, "metrics: derived values", root=self.root)

    def write_table(self, name: str, columns: Dict[str, np.ndarray], attrs: Optional[dict] = None,
                    histograms: Sequence[str] = ()) -> None:
        """Append this rank's rows to the table ``/<name>`` (one dataset per column, the rows of
        all ranks in rank order), set ``attrs`` (``root``'s) on the group, and store for each
        column in ``histograms`` the counts of its whole stored (integer) column as
        ``/<name>/<column>_histogram``. Collective; every rank passes the same column names,
        with a ``step`` column (a resumed run drops the rows of steps after its checkpoint). Rows of no
        rank: nothing is written (a table that never had rows does not exist). A column the stored
        table lacks (a file of an older mpipar, resumed) reads -1 (NaN for floats) in its earlier rows."""
        gathered = collectives.gather(self.comm, columns, f"metrics: table {name}", root=self.root)
        if gathered is not None and any(  # the root's gather
                len(np.asarray(c).reshape(-1)) for cols in gathered for c in cols.values()):
            with _open(self.path, "a") as f:
                before = len(f[f"{name}/step"]) if f"{name}/step" in f else 0
                for column in gathered[0]:
                    values = np.concatenate([np.asarray(cols[column]).reshape(-1) for cols in gathered])
                    # a column newer than the file's rows: -1 / NaN in them
                    _append(f, f"{name}/{column}", values, rows_before=before, missing=-1)
                for column in histograms:
                    _store_histogram(f[name], column)
                for key, value in (attrs or {}).items():
                    f[name].attrs[key] = value
        collectives.bcast(self.comm, None, f"metrics: table {name}", root=self.root)

    def _write(self, gathered: List[List[dict]], epochs: List[dict]):
        n = len(gathered[0])
        columns: Dict[str, np.ndarray] = {}
        bad_step = None
        if n:
            def per_rank(key):  # NaN where a row lacks ``key`` (a column reported from a later step on)
                return np.array([[row.get(key, np.nan) for row in rows] for rows in gathered], dtype=np.float64).T

            samples = per_rank("samples")
            losses = per_rank("loss")
            weights = np.where(samples.sum(1, keepdims=True) > 0, samples, 1.0)
            columns["loss"] = (losses * weights).sum(1) / weights.sum(1)
            columns["samples"] = samples.sum(1).astype(np.int64)
            columns["world_size"] = np.full(n, self.world_size, dtype=np.int64)
            columns["wall_clock"] = np.array([row["wall_clock"] for row in gathered[self.root]])
            columns["rank_loss"], columns["rank_samples"] = losses, samples.astype(np.int64)
            waits = per_rank("wait_time")
            least = np.empty_like(waits)
            for group in self.wait_groups:
                least[:, group] = waits[:, group].min(1, keepdims=True)
            columns["comm_time"] = per_rank("comm_time") + least
            columns["idle_time"] = per_rank("idle_time") + waits - least
            for key in ("compute_time", "data_time", "step_time", "bytes_sent"):
                columns[key] = per_rank(key)
            known = {"loss", "samples", "step_time", "wait_time", "compute_time", "comm_time", "idle_time",
                     "data_time", "bytes_sent", "wall_clock"}
            extra = dict.fromkeys(key for rows in gathered for row in rows for key in row if key not in known)
            for key in extra:
                columns[key] = per_rank(key)
            finite = np.isfinite(losses).all(1)
            if not finite.all():
                first = int(np.argmin(finite))
                bad_step = (self.steps_written + first, "nan" if np.isnan(losses[first]).any() else "inf")
        with _open(self.path, "a") as f:
            before = len(f["steps/loss"]) if "steps/loss" in f else 0
            for key, values in columns.items():   # a column newer than the file's rows: NaN / 0 before
                _append(f, f"steps/{key}", values, rows_before=before)
            if n:   # a column of the file this flush lacks (a strategy stopped reporting it): NaN / 0 rows
                for key, dataset in list(f["steps"].items()) if "steps" in f else []:
                    if key not in columns and len(dataset) == before:
                        _append(f, f"steps/{key}", _blank((n, *dataset.shape[1:]), dataset.dtype))
            for key in EPOCH_FIELDS:
                if epochs:
                    _append(f, f"epochs/{key}", np.array([e[key] for e in epochs], dtype=np.float64))
        return bad_step


def peak_resident_bytes() -> float:
    """This process's peak resident set so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS). Local."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1.0 if sys.platform == "darwin" else 1024.0)


def _open(path: Path, mode: str, patience: float = 30.0) -> h5py.File:
    """Open the file for writing; while a reader (``mpipar-report``, ``mpipar-summary`` on a run
    still going) holds HDF5's lock on it, try again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return h5py.File(path, mode)
        except BlockingIOError:   # "unable to lock file": a reader has it open for a moment
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _truncate(f: h5py.File, steps: int) -> None:
    """Drop step rows beyond ``steps``, epochs that ended after it, and table rows of later steps."""
    for dataset in f["steps"].values():
        dataset.resize(steps, axis=0)
    for name, group in f.items():
        if name not in ("steps", "epochs") and isinstance(group, h5py.Group) and "step" in group:
            rows = np.flatnonzero(group["step"][...] < steps)
            for column in [c for c in group if not c.endswith("_histogram")]:
                kept = group[column][...][rows]
                group[column].resize(len(kept), axis=0)
                group[column][...] = kept
            for histogram in [c for c in group if c.endswith("_histogram")]:
                _store_histogram(group, histogram[:-len("_histogram")])
    if "epochs/last_step" in f:
        epochs = int((f["epochs/last_step"][...] <= steps).sum())
        for dataset in f["epochs"].values():
            dataset.resize(epochs, axis=0)


def _store_histogram(group: h5py.Group, column: str) -> None:
    """``<column>_histogram``: the counts of the whole stored (integer) column, by value."""
    counts = np.bincount(np.maximum(group[column][...].astype(np.int64), 0))
    if f"{column}_histogram" in group:
        del group[f"{column}_histogram"]
    group.create_dataset(f"{column}_histogram", data=counts)


def _blank(shape: Tuple[int, ...], dtype: np.dtype, missing: int = 0) -> np.ndarray:
    """Entries that were never measured: NaN (floats) or ``missing`` (counts)."""
    return np.full(shape, np.nan if dtype.kind == "f" else missing, dtype=dtype)


def _append(f: h5py.File, name: str, values: np.ndarray, rows_before: int = 0, missing: int = 0) -> None:
    """Append rows; (S, W) datasets may change width (a run resumed on another number of
    ranks): missing entries read NaN (floats) or ``missing`` (counts). A dataset this creates
    starts with ``rows_before`` missing rows, so it stays aligned with the datasets already
    holding that many (a column newer than the file's rows)."""
    blank = np.nan if values.dtype.kind == "f" else missing
    if name not in f:
        if rows_before:
            values = np.concatenate([_blank((rows_before, *values.shape[1:]), values.dtype, missing), values])
        f.create_dataset(name, data=values, maxshape=(None,) * values.ndim, fillvalue=blank,
                         chunks=(max(1, min(1024, len(values))), *values.shape[1:]))
        return
    dataset = f[name]
    old = dataset.shape[0]
    if values.ndim == 2 and values.shape[1] > dataset.shape[1]:
        if dataset.maxshape[1] is not None and dataset.maxshape[1] < values.shape[1]:
            raise ValueError(f"{f.filename}: {name} has room for {dataset.maxshape[1]} ranks, not "
                             f"{values.shape[1]} (a file of mpipar 0.1 cannot grow; resume with its ranks)")
        dataset.resize(values.shape[1], axis=1)
    if values.ndim == 2 and values.shape[1] < dataset.shape[1]:
        values = np.concatenate([values, np.full((len(values), dataset.shape[1] - values.shape[1]), blank,
                                                 dtype=values.dtype)], axis=1)
    dataset.resize(old + len(values), axis=0)
    dataset[old:] = values
