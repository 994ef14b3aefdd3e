"""Stall watchdog: report which ranks have not arrived when a rank waits on MPI too long."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
from typing import Dict, Optional, Tuple, Union, overload

from mpi4py import MPI

from mpipar.diagnostics import debug
from mpipar.diagnostics.agree import agree_on

__all__ = ["Watchdog", "Activity", "stall_report", "ENV_WARN", "ENV_ABORT"]

ENV_WARN = "MPIPAR_STALL_WARN"
ENV_ABORT = "MPIPAR_STALL_ABORT"
_TAG = 1
_STOP_TIMEOUT = 5.0  # seconds stop() waits for the last heartbeats


_Wait = Tuple[debug.Call, Tuple[int, ...], Optional[int], float]  # (call, members, peer, time)


class Activity:
    """This process's MPI activity: written by mpi_tensor's hooks, read by the watchdog thread.

    Calls nest (a ``debug.watched`` block around a call that makes mpi_tensor calls, or another
    ``watched``): every call entered and not yet left is kept, outermost first, so leaving an
    inner call makes the outer one current again, with the time it has waited since it began.
    The tuple is replaced, never changed in place, so the watchdog thread reads a consistent one.

    Args:
        watched: the watchdog's communicator; ranks are reported as its ranks.
    """

    def __init__(self, watched: MPI.Intracomm):
        self._watched = watched
        self.waits: Tuple[_Wait, ...] = ()  # (call, members, peer, since) of each call this rank is inside
        self.last: Optional[_Wait] = None  # (call, members, peer, left at)
        self.progress: Dict[tuple, int] = {}  # communicator members -> last collective started
        self.labels: Dict[str, object] = {}

    @property
    def current(self) -> Optional[_Wait]:
        """The innermost call this rank waits in, or None outside MPI."""
        waits = self.waits
        return waits[-1] if waits else None

    def started(self, call: debug.Call) -> None:
        self.progress[debug.comm_members(call.comm, self._watched)] = call.seq

    def enter(self, call: debug.Call) -> None:
        members = debug.comm_members(call.comm, self._watched)
        peer = members[call.peer] if call.peer is not None and 0 <= call.peer < len(members) else None
        self.waits = (*self.waits, (call, members, peer, time.monotonic()))

    def leave(self, call: debug.Call) -> None:
        waits = self.waits
        for index in range(len(waits) - 1, -1, -1):  # the call's own entry, the innermost if entered twice
            if waits[index][0] is call:
                self.last = (*waits[index][:3], time.monotonic())
                self.waits = waits[:index] + waits[index + 1:]
                return

    def snapshot(self, rank: int) -> dict:
        """A small picklable summary (seconds, not clock times: clocks differ between hosts): ``current``
        the innermost call waited in, ``enclosing`` the calls around it (outermost first)."""
        now = time.monotonic()
        waits, last = self.waits, self.last
        return {"rank": rank, "current": _op(waits[-1] if waits else None, now), "last": _op(last, now),
                "enclosing": [_op(wait, now) for wait in waits[:-1]],
                "progress": dict(self.progress), "labels": dict(self.labels)}


def _op(entry, now: float) -> Optional[dict]:
    if entry is None:
        return None
    call, members, peer, since = entry
    return {"what": call.describe(), "members": members, "peer": peer, "seq": call.seq,
            "p2p": call.peer is not None, "for": now - since}


class Watchdog:
    """Watch every rank of ``comm`` for stalls in MPI calls made through mpi_tensor.

    A daemon thread per rank sends a heartbeat (current MPI operation, how long it
    has waited, labels such as the step) to rank 0 every ``interval`` seconds on a
    private duplicate of ``comm``. Rank 0 prints a report to stderr when some rank
    has waited longer than ``warn_after`` (again every ``warn_after`` while the stall
    lasts), naming the operation and the ranks that have not arrived with what they
    are doing and when they were last heard from; past ``abort_after`` it prints the
    report and aborts the job. Every rank also aborts by itself once it has waited
    ``abort_after`` plus a grace period, in case rank 0 is the one stuck.

    Collective contract: ``start()`` is collective over ``comm`` (it duplicates it
    and compares the thresholds); ``label()`` is local; ``stop()`` should be called
    by every rank (it runs at exit otherwise) and never waits more than a few seconds.
    Needs ``MPI.THREAD_MULTIPLE`` (mpi4py's default); otherwise ``start()`` warns and
    does nothing. Size 1 runs the same code.

    Args:
        comm: the communicator whose ranks are watched (usually the job's world).
        warn_after: seconds of waiting before a report; default ``MPIPAR_STALL_WARN`` or 60.
        abort_after: seconds of waiting before aborting; default ``MPIPAR_STALL_ABORT`` or never.
        interval: seconds between heartbeats; default ``min(1, warn_after / 4)``.

    Raises:
        ValueError: for a threshold or interval that is not a positive number.
    """

    def __init__(self, comm: MPI.Intracomm, warn_after: Optional[float] = None,
                 abort_after: Optional[float] = None, interval: Optional[float] = None):
        self.comm = comm
        self.warn_after = _seconds(warn_after, ENV_WARN, 60.0)
        self.abort_after = _seconds(abort_after, ENV_ABORT, None)
        self.interval = _seconds(interval, None, min(1.0, self.warn_after / 4))
        self.activity = Activity(comm)
        self._rank = comm.Get_rank()
        self._private: Optional[MPI.Intracomm] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._heard: Dict[int, tuple] = {}  # rank 0: rank -> (snapshot, received at)
        self._next_report = 0.0

    def start(self) -> Watchdog:
        """Start watching (collective over ``comm``). Returns self."""
        agree_on(self.comm, "stall watchdog thresholds (warn, abort)", (self.warn_after, self.abort_after),
                 hint=f"set {ENV_WARN} and {ENV_ABORT} alike on every rank")
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            if self._rank == 0:
                warnings.warn("mpipar watchdog disabled: MPI was initialised without THREAD_MULTIPLE "
                              "(leave mpi4py.rc.thread_level at 'multiple')", RuntimeWarning, stacklevel=2)
            return self
        self._private = self.comm.Dup()
        debug.attach_activity(self.activity)
        self._thread = threading.Thread(target=self._run, args=(self._private,), name="mpipar-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def label(self, **labels) -> None:
        """Attach labels (e.g. ``step=12``) shown with this rank's operations in reports. Local."""
        self.activity.labels.update(labels)

    def stop(self) -> None:
        """Stop the thread after a last heartbeat; safe to call twice. Waits at most a few seconds."""
        if self._thread is None:
            return
        if debug.hooks is not None and debug.hooks.activity is self.activity:
            debug.attach_activity(None)
        self._stopping.set()
        self._thread.join(_STOP_TIMEOUT + 2 * self.interval + 1)
        self._thread = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the thread ---------------------------------------------------------------------

    def _run(self, comm: MPI.Intracomm) -> None:
        size, sends = comm.Get_size(), []
        while True:
            stopping = self._stopping.wait(self.interval)
            snapshot = self.activity.snapshot(self._rank)
            snapshot["final"] = stopping
            if self._rank == 0:
                self._receive(comm)
                self._heard[0] = (snapshot, time.monotonic())
                if not stopping:
                    self._inspect()
            else:
                sends.append(comm.isend(snapshot, dest=0, tag=_TAG))
                sends = [request for request in sends if not request.Test()]
                self._abort_if_stuck(snapshot)
            if stopping:
                break
        deadline, finished = time.monotonic() + _STOP_TIMEOUT, False
        while not finished and time.monotonic() < deadline:
            if self._rank == 0:
                self._receive(comm)
                finished = sum(1 for snap, _ in self._heard.values() if snap.get("final")) >= size
            else:
                sends = [request for request in sends if not request.Test()]
                finished = not sends
            time.sleep(0 if finished else 0.01)
        if finished:  # nothing left in flight on the private communicator
            comm.Free()

    def _receive(self, comm: MPI.Intracomm) -> None:
        while True:
            message = comm.improbe(source=MPI.ANY_SOURCE, tag=_TAG)
            if message is None:
                return
            snapshot = message.recv()
            self._heard[snapshot["rank"]] = (snapshot, time.monotonic())

    def _inspect(self) -> None:
        now = time.monotonic()
        states = {rank: _aged(snapshot, now - at) for rank, (snapshot, at) in self._heard.items()}
        longest = max((s["current"]["for"] for s in states.values() if s["current"]), default=0.0)
        if longest < self.warn_after:
            self._next_report = 0.0
            return
        aborting = self.abort_after is not None and longest >= self.abort_after
        if now < self._next_report and not aborting:
            return
        self._next_report = now + self.warn_after
        report = stall_report(states, self.comm.Get_size(), silent_after=max(5.0, 5 * self.interval))
        if aborting:
            report += f"\nmpipar watchdog: aborting the job ({ENV_ABORT}={self.abort_after:g} s)"
        sys.stderr.write(report + "\n")
        sys.stderr.flush()
        if aborting:
            self.comm.Abort(1)

    def _abort_if_stuck(self, snapshot: dict) -> None:
        """A rank other than 0 aborts by itself a little after rank 0 should have."""
        current = snapshot["current"]
        if self.abort_after is None or current is None:
            return
        if current["for"] >= self.abort_after + max(5.0, 5 * self.interval):
            sys.stderr.write(f"mpipar watchdog: rank {self._rank} has waited {current['for']:.1f} s in "
                             f"{current['what']}{_labels(snapshot)} and rank 0 has not aborted; aborting "
                             f"the job ({ENV_ABORT}={self.abort_after:g} s)\n")
            sys.stderr.flush()
            self.comm.Abort(1)


def _aged(snapshot: dict, age: float) -> dict:
    """A heartbeat as it stands ``age`` seconds after it was sent."""
    aged = dict(snapshot, heard=age)
    for key in ("current", "last"):
        if aged[key] is not None:
            aged[key] = dict(aged[key], **{"for": aged[key]["for"] + age})
    aged["enclosing"] = [dict(op, **{"for": op["for"] + age}) for op in snapshot.get("enclosing") or []]
    return aged


def stall_report(states: Dict[int, dict], size: int, silent_after: float = 5.0) -> str:
    """The report on the longest wait among ``states`` (rank -> aged heartbeat). Pure.

    A rank has arrived at a collective once it has started that operation
    (sequence number) on that communicator; at a Send/Recv once the peer waits in
    a Send/Recv with it. Ranks never heard from are listed as such.
    """
    waiting = {rank: s for rank, s in states.items() if s["current"] is not None}
    rank = max(waiting, key=lambda r: waiting[r]["current"]["for"])
    current = waiting[rank]["current"]
    if current["p2p"]:
        peer = current["peer"]
        peer_op = (states.get(peer) or {}).get("current")
        both = peer_op is not None and peer_op["p2p"] and peer_op["peer"] == rank
        expected = [rank] if peer is None else [rank, peer]
        arrived = expected if both else [rank]
    else:
        expected = [r for r in current["members"] if r >= 0]
        arrived = [r for r in expected
                   if r in states and states[r]["progress"].get(tuple(current["members"]), 0) >= current["seq"]]
    missing = [r for r in expected if r not in arrived]
    lines = [f"mpipar watchdog: rank {rank} has waited {current['for']:.1f} s in {current['what']}"
             f"{_inside(waiting[rank])}{_labels(waiting[rank])}; arrived: {_ranks(arrived)}; "
             f"not arrived: {_ranks(missing) or 'none'}"]
    for other in missing:
        lines.append(f"  rank {other}: {_whereabouts(states.get(other), silent_after)}")
    unheard = [r for r in range(size) if r not in states and r not in missing]
    if unheard:
        lines.append(f"  never heard from: {_ranks(unheard)}")
    return "\n".join(lines)


def _whereabouts(state: Optional[dict], silent_after: float) -> str:
    if state is None:
        return "never heard from (its watchdog did not start or it is stuck)"
    prefix = ""
    if state["heard"] > silent_after:
        prefix = f"not heard from for {state['heard']:.1f} s; last known: "
    current, last = state["current"], state["last"]
    if current is not None:
        where = f"waiting {current['for']:.1f} s in {current['what']}{_inside(state)}"
    elif last is not None:
        where = f"outside MPI for {last['for']:.1f} s since {last['what']}"
    else:
        where = "no MPI operation yet"
    heard = "" if prefix else f"; last heartbeat {state['heard']:.1f} s ago"
    return prefix + where + _labels(state) + heard


def _inside(state: dict) -> str:
    """The calls around the one waited in (nested calls), innermost first."""
    enclosing = state.get("enclosing") or []
    return "".join(f" inside {op['what']} ({op['for']:.1f} s)" for op in reversed(enclosing))


def _labels(state: dict) -> str:
    labels = state.get("labels") or {}
    return " at " + ", ".join(f"{k} {v}" for k, v in labels.items()) if labels else ""


def _ranks(ranks) -> str:
    ranks = list(ranks)
    if not ranks:
        return ""
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


@overload
def _seconds(value: Optional[float], env: Optional[str], default: float) -> float: ...


@overload
def _seconds(value: Optional[float], env: Optional[str], default: None) -> Optional[float]: ...


def _seconds(value: Union[float, str, None], env: Optional[str], default: Optional[float]) -> Optional[float]:
    source = "argument"
    if value is None and env is not None and os.environ.get(env, "").strip():
        value, source = os.environ[env].strip(), env
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"stall watchdog: {source} must be a positive number of seconds, got {value!r}")
    return seconds
