"""One worker rank: computes gradients of the shards it is given, pushes them, pulls weights."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import events
from mpipar.parameter_server import protocol
from mpipar.parameter_server.flat import FlatShares

__all__ = ["Worker"]


class Worker:
    """The worker side of the protocol (:class:`~mpipar.parameter_server.server.Server`).

    :meth:`exchange` pushes the gradient of the shard just computed (if any) to every server,
    asks server 0 for the next ticket of ``step`` and, when one is granted, takes the weights:
    server 0's with the grant, the other servers' by a pull after it (so, in bounded mode, the
    weights a ticket starts from are never older than its grant). Point-to-point only.

    Time: each exchange's round trip is split into communication (the transfers: the pushed
    gradients, as the servers report the time they took receiving them, the weights received and
    the wait for this rank's sends to complete) and idle (the rest: waiting for the servers to
    take the request, for other workers, the bound or the update).
    """

    def __init__(self, comm: MPI.Intracomm, servers: int, flat: FlatShares):
        self.comm, self.servers, self.flat = comm, servers, flat
        self.versions = [0] * servers  # of the weights this rank holds, per server
        self.bytes_per_push = [flat.numel(s) * flat.weights[s].element_size() for s in range(servers)]
        self.idle = self.comm_time = 0.0
        self.bytes_sent = 0
        self.staleness: List[int] = []  # of this worker's pushes, as server 0 applied them

    def exchange(self, step: int, push: Optional[Tuple[Tuple[int, int], int, float, int]] = None):
        """Push ``(ticket, samples, loss, step_samples)``'s gradient (``flat.grads``, with
        ``flat.present``) and ask for a ticket of ``step``. Returns the granted ticket
        ``(step, shard)`` or None (none left in the step)."""
        start = time.perf_counter()
        raw, ops = [], []  # control records (kept alive until sent), tensor sends
        if push is not None:
            (ticket_step, shard), samples, loss, step_samples = push
            for server in range(self.servers):
                kind = protocol.PUSH | (protocol.REQUEST if server == 0 else 0)
                record = protocol.control(kind, ticket_step, shard, self.versions[server], samples, loss, step_samples,
                                          self.flat.present[server])
                raw.append((self.comm.Isend(record, dest=server, tag=protocol.TAG_CONTROL), record))
                ops.append(mpi_tensor.isend(self.flat.grads[server], self.comm, server, protocol.TAG_GRADIENT))
                self.bytes_sent += self.bytes_per_push[server]
        else:
            record = protocol.control(protocol.REQUEST, step)
            raw.append((self.comm.Isend(record, dest=0, tag=protocol.TAG_CONTROL), record))
        posted = time.perf_counter()
        answer, transfer = self._receive(0)
        ticket = answer.ticket
        if push is not None and answer.staleness >= 0:
            self.staleness.append(answer.staleness)
        if ticket is not None:
            for server in range(1, self.servers):
                record = protocol.control(protocol.PULL, step)
                raw.append((self.comm.Isend(record, dest=server, tag=protocol.TAG_CONTROL), record))
                _, server_transfer = self._receive(server)
                transfer += server_transfer
        sending = time.perf_counter()
        MPI.Request.Waitall([request for request, _ in raw])
        mpi_tensor.wait_all(ops)
        end = time.perf_counter()
        round_trip = end - start
        transfer += end - sending
        recorder = events.active()
        if recorder is not None:
            recorder.add("exchange", start, end, index=step)
            for server in range(self.servers if push is not None else 0):  # completion seen at the wait
                recorder.add("push", posted, end, peer=server, nbytes=self.bytes_per_push[server])
        communication = min(transfer, round_trip)
        self.comm_time += communication
        self.idle += round_trip - communication
        return ticket

    def _receive(self, server: int):
        """A reply from ``server`` and, with a grant or to a pull, its weights. Returns the reply
        and the seconds of transfer: the server's receiving of pushes it reports, the weights'."""
        start = time.perf_counter()
        header = np.zeros(len(protocol.REPLY_FIELDS))
        protocol.wait_any([self.comm.Irecv(header, source=server, tag=protocol.TAG_REPLY)])
        answer = protocol.Reply(header)
        weights = answer.ticket is not None or server > 0
        replied = time.perf_counter()
        if weights:
            mpi_tensor.recv_(self.flat.weights[server], self.comm, server, protocol.TAG_WEIGHTS)
            self.versions[server] = answer.version
        done = time.perf_counter()
        recorder = events.active()
        if recorder is not None:
            recorder.add("pull", start, done, peer=server, index=answer.version if weights else -1)
        return answer, answer.transfer + done - replied

    def take_times(self) -> dict:
        times = dict(idle=self.idle, comm=self.comm_time, bytes=self.bytes_sent, staleness=self.staleness)
        self.idle = self.comm_time = 0.0
        self.bytes_sent, self.staleness = 0, []
        return times
