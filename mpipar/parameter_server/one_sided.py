"""The lock-free parameter server: workers Accumulate into and Get from MPI windows on the servers."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np
import torch
from mpi4py import MPI

from mpipar.diagnostics import collectives, events
from mpipar.diagnostics.failure import agreed
from mpipar.parameter_server.flat import FlatShares
from mpipar.parameter_server.server import UPDATE_COLUMNS

__all__ = ["WindowShares", "check_passive_progress"]

TICKET, VERSION = 0, 1  # the two counters in server 0's counter window


class WindowShares:
    """Every server's flat weights exposed as an MPI window, plus two int64 counters (next ticket,
    version) on server 0. Workers update with passive-target epochs (``Lock(SHARED)``): the
    server ranks take no part in them. ``Accumulate`` of the same element from several workers is
    atomic (MPI guarantees it for accumulate operations); reads use ``Get_accumulate`` with
    ``NO_OP``, so a read never sees half of an update of an element. CPU float32/float64 only.

    Collective contract: construction and :meth:`free` are collective over ``comm``; the rest is
    one-sided, called by workers only.
    """

    def __init__(self, comm: MPI.Intracomm, flat: FlatShares, servers: int):
        self.comm, self.flat, self.servers = comm, flat, servers
        rank = comm.Get_rank()
        self.windows: List[MPI.Win] = []
        for server in range(servers):
            memory = flat.weights[server].numpy() if rank == server else np.zeros(0, dtype=np.float64)
            self.windows.append(MPI.Win.Create(memory, disp_unit=memory.itemsize, comm=comm))
        self.counters = np.zeros(2, dtype=np.int64) if rank == 0 else np.zeros(0, dtype=np.int64)
        self.counter_window = MPI.Win.Create(self.counters, disp_unit=8, comm=comm)
        self._one = np.ones(1, dtype=np.int64)

    def fetch_add(self, index: int, amount: int = 1) -> int:
        """Atomically add ``amount`` to counter ``index`` on server 0; returns its old value."""
        old = np.zeros(1, dtype=np.int64)
        self.counter_window.Lock(0, MPI.LOCK_SHARED)
        self.counter_window.Fetch_and_op(self._one * amount, old, 0, target_disp=index, op=MPI.SUM)
        self.counter_window.Unlock(0)
        return int(old[0])

    def read_counter(self, index: int) -> int:
        value = np.zeros(1, dtype=np.int64)
        self.counter_window.Lock(0, MPI.LOCK_SHARED)
        self.counter_window.Fetch_and_op(self._one, value, 0, target_disp=index, op=MPI.NO_OP)
        self.counter_window.Unlock(0)
        return int(value[0])

    def set_counter(self, index: int, value: int) -> None:
        """Server 0 only, outside any epoch (e.g. on resume, before a barrier)."""
        self.counter_window.Lock(0, MPI.LOCK_EXCLUSIVE)
        self.counters[index] = value
        self.counter_window.Unlock(0)

    def sync_own(self) -> None:
        """On a server: its window's private and public copies made the same (``Win.Sync`` inside
        a passive-target epoch on itself), so its own loads see the workers' ``Accumulate``s and
        their ``Get``s its own stores, in MPI's separate memory model as well as the unified one.
        Call it after the workers' updates are complete (a collective) and before this rank reads
        its share, and after it writes the share. Local; nothing on a worker."""
        rank = self.comm.Get_rank()
        if rank < self.servers:
            self.windows[rank].Lock(rank, MPI.LOCK_SHARED)
            self.windows[rank].Sync()
            self.windows[rank].Unlock(rank)

    def read(self, server: int) -> None:
        """This rank's ``flat.weights[server]`` := the server's current weights."""
        target = self.flat.weights[server].numpy()
        start = time.perf_counter()
        self.windows[server].Lock(server, MPI.LOCK_SHARED)
        self.windows[server].Get_accumulate(np.zeros_like(target), target, server, op=MPI.NO_OP)
        self.windows[server].Unlock(server)
        recorder = events.active()
        if recorder is not None:
            recorder.add("window_get", start, time.perf_counter(), nbytes=target.nbytes, peer=server)

    def accumulate(self, server: int, update: torch.Tensor) -> None:
        """The server's weights += ``update`` (element-wise atomic)."""
        start = time.perf_counter()
        self.windows[server].Lock(server, MPI.LOCK_SHARED)
        self.windows[server].Accumulate(update.numpy(), server, op=MPI.SUM)
        self.windows[server].Unlock(server)
        recorder = events.active()
        if recorder is not None:
            recorder.add("window_accumulate", start, time.perf_counter(),
                         nbytes=update.numel() * update.element_size(), peer=server)

    def free(self) -> None:
        for window in [*self.windows, self.counter_window]:
            window.Free()


def check_passive_progress(comm: MPI.Intracomm, shares: WindowShares, servers: int, wait: float = 2.0) -> None:
    """Refuse, on every rank, an MPI whose one-sided operations need the target to call MPI: the
    servers sleep ``wait`` seconds outside MPI while each worker reads a counter with a request it
    polls; a read still pending then means the updates would only move when the servers call MPI.
    (Generous: on a loaded, oversubscribed node a worker may get little CPU in that time.)
    Collective over ``comm``.

    Raises:
        RuntimeError: (agreed, every rank) naming the MPI library, when a read did not complete.
    """
    rank = comm.Get_rank()
    done = True
    if rank < servers:
        time.sleep(wait)
    else:
        value = np.zeros(1, dtype=np.int64)
        shares.counter_window.Lock(0, MPI.LOCK_SHARED)
        request = shares.counter_window.Rget(value, 0, target=(VERSION, 1, MPI.INT64_T))
        deadline = time.perf_counter() + wait
        while not request.Test():
            if time.perf_counter() > deadline:
                done = False
                break
            time.sleep(0.001)
    verdicts = collectives.allgather(comm, done, "one-sided progress check")
    if rank >= servers:
        if not done:
            request.Wait()  # the servers are in MPI now
        shares.counter_window.Unlock(0)
    if not all(verdicts):
        raise agreed(RuntimeError)(
            f"this MPI ({MPI.Get_library_version().splitlines()[0]}) did not complete a one-sided read while the "
            f"server rank was busy outside MPI (no passive-target progress); --one-sided would only move when the "
            f"servers call MPI. Use the two-sided parameter server (drop --one-sided)")


def one_sided_step(shares: WindowShares, flat: FlatShares, *, workers: int, step: int, held: List[int],
                   compute, lr: float, step_samples: int, worker_rank: int) -> Dict[str, Any]:
    """A worker's shards of loop step ``step``: take tickets from the counter (a ticket of a later
    step is kept in ``held`` for it), read the weights, compute (``compute(shard) -> (samples, loss)``
    leaving gradients in ``flat.grads``), accumulate ``-lr * share * gradient`` (share: of the step's
    ``step_samples``). Returns the
    step's record: samples, loss sum, update rows, seconds in MPI."""
    rows: Dict[str, list] = {name: [] for name in UPDATE_COLUMNS}
    samples = 0
    loss_sum = comm_time = 0.0
    while True:
        start = time.perf_counter()
        ticket = held.pop() if held else shares.fetch_add(TICKET)
        if ticket // workers != step:
            held.append(ticket)
            comm_time += time.perf_counter() - start
            break
        base = shares.read_counter(VERSION)
        for server in range(shares.servers):
            shares.read(server)
        comm_time += time.perf_counter() - start
        count, loss = compute(ticket % workers)
        start = time.perf_counter()
        share = count / step_samples
        for server in range(shares.servers):
            shares.accumulate(server, flat.grads[server] * (-lr * share))
        version = shares.fetch_add(VERSION)
        comm_time += time.perf_counter() - start
        for name, value in zip(UPDATE_COLUMNS, (-1, worker_rank, step, ticket % workers, base, version,
                                                version - base, sum(flat.numel(s) * flat.weights[s].element_size()
                                                                    for s in range(shares.servers)), step)):
            rows[name].append(value)
        samples, loss_sum = samples + count, loss_sum + loss * count
    return dict(samples=samples, loss_sum=loss_sum, rows=rows, comm=comm_time)
