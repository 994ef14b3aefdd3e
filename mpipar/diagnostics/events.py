"""Timed events of a few sampled steps, per rank, on one clock per run: the recorder every part of mpipar calls.

The loop makes one :class:`EventRecorder` per run when ``--trace-steps`` asks for it and
tells it where each step begins and ends; during a sampled step the recorder is
:func:`active` and anyone (the loop, the gradient reducer, the parameter server and its
one-sided windows, a pipeline's executor, the tensor-parallel maps) adds what it timed::

    recorder = events.active()          # None outside sampled steps: the cost is one call
    if recorder is not None:
        recorder.add("allreduce", launched, completed, nbytes=size, index=bucket)

Times are ``time.perf_counter()`` values of the calling rank; :meth:`EventRecorder.take`
moves them onto rank 0's clock with the offsets measured at construction, as seconds
since the recorder was built on rank 0. ``MetricsWriter`` stores the rows as the table
``/events`` (see :data:`COLUMNS`) with the vocabulary and the offsets as its attributes.
A new kind of event is a line at the end of :data:`VOCABULARY` (codes are positions, and a
file keeps the names of its own codes).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from mpipar.diagnostics import collectives, debug

__all__ = ["EventRecorder", "active", "VOCABULARY", "COLUMNS", "MAIN", "COMM"]

MAIN, COMM = 0, 1
"""Lanes: ``MAIN`` events of one rank nest or follow each other (what the rank's thread
did); ``COMM`` events are transfers in flight, which may overlap each other and the main lane."""

VOCABULARY: Dict[str, Tuple[int, int]] = {
    # name: (lane, level) -- level: nesting depth on the main lane (0: the whole step)
    "step": (MAIN, 0),              # the loop's step: data + train_step + optimizer (= /steps/step_time)
    "data": (MAIN, 1),              # loading the step's batch (a parameter-server worker: each shard, level 2)
    "train_step": (MAIN, 1),        # the strategy's step: forward, backward, gradient reduction
    "optimizer": (MAIN, 1),         # the loop's optimizer and schedule step
    "wait": (MAIN, 2),              # blocked in the gradient reducer (the step's wait_time)
    "wait_bucket": (MAIN, 3),       # inside a wait: one bucket's Allreduce completing (index: bucket)
    "allreduce": (COMM, 0),         # a bucket's Allreduce from launch to completion (index: bucket)
    "shard_data": (MAIN, 2),        # a parameter-server worker fetching one shard
    "exchange": (MAIN, 2),          # a parameter-server worker's round trip (push, ticket, pulls)
    "pull": (MAIN, 3),              # inside an exchange: a server's reply and weights (peer: server)
    "push": (COMM, 0),              # a worker's gradient to a server, posted to completed (peer: server)
    "server_wait": (MAIN, 2),       # a server waiting for the next request (its idle time)
    "receive_push": (MAIN, 2),      # a server receiving a gradient (peer: worker)
    "apply": (MAIN, 2),             # a server applying an update (index: the version it makes)
    "reply": (MAIN, 2),             # a server answering a request or pull (peer: worker)
    # a pipeline's executor: index the micro-batch (asynchronous schedules: numbered over the run),
    # stage the stage; peers are the run's ranks (translated from the pipeline's communicator)
    "forward": (MAIN, 2),           # a stage's forward of one micro-batch
    "backward": (MAIN, 2),          # a stage's backward of one micro-batch (with its weight-stash bookkeeping)
    "backward_weight": (MAIN, 2),   # a split backward's weight half (zero-bubble's W; its input half: backward)
    "recv_activation": (MAIN, 2),   # blocked receiving an activation, waiting included (peer: previous stage)
    "recv_grad": (MAIN, 2),         # blocked receiving a gradient, waiting included (peer: next stage)
    "send_activation": (COMM, 0),   # an activation in flight, posted to completed (peer, bytes)
    "send_grad": (COMM, 0),         # a gradient in flight, posted to completed (peer, bytes)
    "recv_skip": (MAIN, 2),         # blocked receiving a skip tensor (peer: the saving stage's rank)
    "recv_skip_grad": (MAIN, 2),    # blocked receiving a skip tensor's gradient (peer: the using stage's rank)
    "send_skip": (COMM, 0),         # a skip tensor in flight, posted to completed (peer, bytes)
    "send_skip_grad": (COMM, 0),    # a skip tensor's gradient in flight, posted to completed (peer, bytes)
    "update": (MAIN, 2),            # an asynchronous pipeline's stage update (compute; index: the micro-batch)
    "wait_sends": (MAIN, 2),        # a pipeline rank completing its posted sends (the step's, or the previous one's)
    # tensor parallelism (mappings): a split layer's collectives, blocked time (bytes: ring estimate)
    "tp_allreduce": (MAIN, 3),      # an Allreduce of a row-parallel output or a column-parallel input gradient
    "tp_gather": (MAIN, 3),         # an Allgather of split outputs or gradients
    # the one-sided parameter server: a worker's passive-target epochs (peer: server, bytes)
    "window_get": (MAIN, 3),        # reading a server's weights (Get_accumulate NO_OP, lock to unlock)
    "window_accumulate": (MAIN, 3),  # adding an update to a server's weights (Accumulate, lock to unlock)
}
NAMES = tuple(VOCABULARY)
_CODE = {name: code for code, name in enumerate(NAMES)}
COLUMNS = ("step", "rank", "name", "lane", "start", "duration", "bytes", "peer", "index", "stage")
"""The ``/events`` table: ``name`` is a code into the ``names`` attribute; ``start`` and
``duration`` are seconds on rank 0's clock (0: the recorder's construction there); ``peer``,
``index`` and ``stage`` are -1 where they do not apply (a file written before ``stage``
existed has no such column; readers take it as -1)."""

_active: Optional[EventRecorder] = None


def active() -> Optional[EventRecorder]:
    """The recorder of the step being sampled on this rank, else None."""
    return _active


class EventRecorder:
    """This rank's events of the steps ``first..last`` (inclusive; loop step indices).

    Collective contract: the constructor is collective over ``comm`` (it measures the
    offset of every rank's clock from rank 0's by ping-pong on a duplicate of ``comm``,
    keeping each rank's round trip of least delay); every rank must call
    :meth:`begin_step` / :meth:`end_step` for the same steps, so :attr:`buffered_steps`
    is the same everywhere, and the first sampled :meth:`begin_step` is collective too
    (the offsets are measured again there, so clocks that drift apart over a long run
    are aligned where the events are). Everything else is local. Size 1: the offset is 0.

    Args:
        comm: the run's ranks.
        steps: ``(first, last)`` step indices to sample, inclusive.
        rounds: ping-pong round trips per rank for the clock offsets.
    """

    def __init__(self, comm: MPI.Intracomm, steps: Tuple[int, int], *, rounds: int = 8):
        first, last = steps
        if first < 0 or last < first:
            raise ValueError(f"trace steps must be first <= last, both >= 0, got {steps}")
        self.first, self.last = first, last
        self.comm, self.rounds = comm, rounds
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._align()
        self.offsets_at_start = self.offsets
        self._origin0, self.origin_unix = collectives.bcast(comm, (time.perf_counter(), time.time()),
                                                            "events: clock origin", root=0)  # rank 0's
        self._shift = 0.0   # this run's origin after the file's (a resumed run)
        self._aligned_for_sampling = False
        self._rows: List[tuple] = []
        self._step: Optional[int] = None
        self.buffered_steps = 0

    # -- the loop --------------------------------------------------------------------

    def samples(self, step: int) -> bool:
        return self.first <= step <= self.last

    def begin_step(self, step: int) -> bool:
        """Start recording ``step`` when it is sampled (then this recorder is :func:`active`); True if so."""
        global _active
        if not self.samples(step):
            _active = None
            return False
        if not self._aligned_for_sampling:   # collective: every rank samples the same steps
            self._align()
            self._aligned_for_sampling = True
        self._step = step
        self.buffered_steps += 1
        _active = self
        return True

    def end_step(self) -> None:
        global _active
        _active = None
        self._step = None

    def continue_clock(self, origin_unix: Optional[float]) -> None:
        """Put this run's events on the clock of the run that started the file (a resumed run:
        ``origin_unix`` is the file's ``clock_origin_unix``; None: this run started it). Local;
        pass every rank the same value."""
        self._shift = 0.0 if origin_unix is None else self.origin_unix - float(origin_unix)

    def _align(self) -> None:
        offsets, delays = _clock_offsets(self.comm, self.rounds)
        self.offsets = np.asarray(offsets, dtype=np.float64)   # rank r's clock minus rank 0's, seconds
        self.delays = np.asarray(delays, dtype=np.float64)     # the round trip each offset came from

    # -- anyone, during a sampled step -------------------------------------------------

    def add(self, name: str, start: float, end: float, *, nbytes: float = 0.0, peer: int = -1,
            peer_comm: Optional[MPI.Comm] = None, index: int = -1, stage: int = -1,
            step: Optional[int] = None) -> None:
        """An event from ``start`` to ``end`` (``time.perf_counter()`` values) of the step being
        sampled, or of ``step`` (a transfer posted in a sampled step and seen completed later:
        keep the recorder and the step from the post). ``peer`` is a rank of ``peer_comm`` when
        given (a sub-communicator: a pipeline of a grid), stored as the run's rank. Local; cheap."""
        if peer_comm is not None and peer >= 0:
            peer = debug.comm_members(peer_comm, self.comm)[peer]  # cached on peer_comm
        self._rows.append((self._step if step is None else step, _CODE[name], start, end, nbytes, peer, index, stage))

    @property
    def step(self) -> Optional[int]:
        """The step being sampled (None between sampled steps)."""
        return self._step

    @contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        """Record the ``with`` block as an event ``name`` (keywords as in :meth:`add`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, start, time.perf_counter(), **args)

    # -- MetricsWriter -----------------------------------------------------------------

    def take(self) -> Dict[str, np.ndarray]:
        """The rows since the last call as the table's columns, times on the run's clock; resets."""
        rows, self._rows, self.buffered_steps = self._rows, [], 0
        table = np.array([r[:2] + r[4:] for r in rows], dtype=np.float64).reshape(-1, 6)
        times = np.array([r[2:4] for r in rows], dtype=np.float64).reshape(-1, 2)
        codes = table[:, 1].astype(np.int64)
        lanes = np.array([VOCABULARY[NAMES[c]][0] for c in codes], dtype=np.int64)
        start = times[:, 0] - self.offsets[self.rank] - self._origin0 + self._shift   # on the file's clock
        return {"step": table[:, 0].astype(np.int64), "rank": np.full(len(rows), self.rank, dtype=np.int64),
                "name": codes, "lane": lanes, "start": start,
                "duration": times[:, 1] - times[:, 0], "bytes": table[:, 2], "peer": table[:, 3].astype(np.int64),
                "index": table[:, 4].astype(np.int64), "stage": table[:, 5].astype(np.int64)}

    def attrs(self) -> dict:
        """The table's attributes: the vocabulary and how the clocks were aligned."""
        return {"names": json.dumps(NAMES), "levels": json.dumps([VOCABULARY[n][1] for n in NAMES]),
                "lanes": json.dumps([VOCABULARY[n][0] for n in NAMES]), "clock_offsets": self.offsets,
                "clock_round_trips": self.delays, "clock_offsets_at_start": self.offsets_at_start,
                "trace_steps": np.array([self.first, self.last]),
                "clock_origin_unix": self.origin_unix - self._shift,
                "clock": "seconds on rank 0's perf_counter since the recorder started (clock_origin_unix, its "
                         "time.time(); a resumed run's events follow on by wall time); rank r's clock minus "
                         "rank 0's is clock_offsets[r] (ping-pong at the first sampled step, least of the round "
                         "trips clock_round_trips; clock_offsets_at_start: the same at the run's start)"}


def _clock_offsets(comm: MPI.Intracomm, rounds: int) -> Tuple[List[float], List[float]]:
    """Each rank's clock minus rank 0's, from the ping-pong of least round trip with rank 0,
    and that round trip. Collective; the same lists on every rank."""
    size, rank = comm.Get_size(), comm.Get_rank()
    offsets, delays = [0.0] * size, [0.0] * size
    if size > 1:
        pingpong = comm.Dup()
        try:
            stamp = np.zeros(1)
            for peer in range(1, size):
                if rank == 0:
                    best = (float("inf"), 0.0)
                    for _ in range(rounds):
                        sent = time.perf_counter()
                        pingpong.Send(stamp, dest=peer)
                        pingpong.Recv(stamp, source=peer)
                        back = time.perf_counter()
                        best = min(best, (back - sent, float(stamp[0]) - (sent + back) / 2))
                    delays[peer], offsets[peer] = best
                elif rank == peer:
                    for _ in range(rounds):
                        pingpong.Recv(stamp, source=0)
                        stamp[0] = time.perf_counter()
                        pingpong.Send(stamp, dest=0)
        finally:
            pingpong.Free()
    return collectives.bcast(comm, (offsets, delays), "events: clock offsets", root=0)
