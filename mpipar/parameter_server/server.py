"""One server rank: its share of the weights, the optimizer over them, and the service loop."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.diagnostics import events
from mpipar.parameter_server import protocol
from mpipar.parameter_server.flat import FlatShares
from mpipar.parameter_server.tickets import NONE_LEFT, WAIT, Tickets

__all__ = ["Server", "UPDATE_COLUMNS"]

UPDATE_COLUMNS = ("server", "worker", "step", "shard", "base_version", "version", "staleness", "bytes",
                  "server_step")  # server_step: the loop step the server was in (its learning rate)


@dataclass
class _Push:
    worker: int       # rank
    step: int
    shard: int
    base_version: int
    samples: int
    loss: float
    step_samples: int    # the samples of the push's step (short at an epoch's end)
    present: np.ndarray  # per parameter of this server's share: it has a gradient


class Server:
    """Server ``index`` of a parameter-server job: holds ``flat.weights[index]`` and answers the
    workers over point-to-point messages (tagged by type, :mod:`protocol`).

    Updates: in sync mode the pushes of a step are combined once all of them have arrived (one
    version per step: data parallelism); otherwise each push is applied when it arrives. Either
    way a gradient is weighted by its share of its step's samples (so a step's pushes move the
    weights as far as one synchronous step, a short last step included) and, with
    ``staleness_lr``, divided by its staleness. Weight decay is added per update in proportion
    to that share (not once per update), so it too matches the synchronous run. A parameter no
    push of an update has a gradient for is left alone (``.grad`` None: no decay, no momentum),
    as data parallelism leaves one no rank has a gradient for.

    Server 0 also hands out the tickets (:class:`Tickets`). A worker's request is answered
    only after its push has been applied, so the weights it gets include its own gradient.

    Collective contract: none; :meth:`serve` is point-to-point with the workers, which follow
    :class:`~mpipar.parameter_server.worker.Worker`'s protocol. :meth:`close` cancels the posted
    receives (call it on every server before finalising).
    """

    def __init__(self, comm: MPI.Intracomm, index: int, workers: List[int], flat: FlatShares, *,
                 sync: bool, weight_decay: float, staleness_lr: bool,
                 tickets: Optional[Tickets]):
        self.comm, self.index, self.workers, self.flat = comm, index, workers, flat
        self.weights, self.grads = flat.weights[index], flat.grads[index]
        self.sync, self.weight_decay = sync, weight_decay
        self.staleness_lr, self.tickets = staleness_lr, tickets
        self.optimizer: Optional[torch.optim.Optimizer] = None  # bound by ParameterServerStrategy
        self.version = 0
        self.shards = len(workers)
        self.bytes_per_push = self.weights.numel() * self.weights.element_size()
        self._buffers = {w: torch.empty_like(self.weights) for w in workers}  # one push in flight per worker
        self._pending: Dict[int, _Push] = {}           # worker -> received, not applied
        self._by_step: Dict[int, List[_Push]] = {}     # sync: a step's pushes
        self._waiting: List[tuple] = []                # (worker, Control, arrival) not answered yet
        self._applied: Counter[int] = Counter()        # step -> pushes applied
        self._done_through: Optional[int] = None       # sync: every step up to this one applied
        self._outgoing: Dict[int, list] = {w: [] for w in workers}
        self._control = {w: np.zeros(len(protocol.CONTROL_FIELDS) + len(flat.params[index])) for w in workers}
        self._requests = [comm.Irecv(self._control[w], source=w, tag=protocol.TAG_CONTROL) for w in workers]
        self.updates: Dict[str, list] = {name: [] for name in UPDATE_COLUMNS}
        self._serving = -1                             # the loop step being served
        self._last_staleness: Dict[int, int] = {}      # worker -> staleness of its last applied push
        self._transfer: Dict[int, float] = defaultdict(float)  # worker -> seconds receiving its pushes, not yet told
        self._reset_times()

    def _reset_times(self) -> None:
        self.idle = self.comm_time = self.compute = 0.0
        self.bytes_sent = 0
        self.loss_sum, self.loss_samples = 0.0, 0
        self.step_updates: List[int] = []  # staleness of each update applied since the last reset

    # -- the service loop -------------------------------------------------------------

    def serve(self, step: int) -> None:
        """Serve requests until every shard of ``step`` has been applied and (server 0) every
        worker has been told that none is left, so no worker still waits on this step when the
        loop goes on to a collective; requests of later steps are served as they come.
        Point-to-point only."""
        if self._done_through is None:
            self._done_through = step - 1
        self._serving = step
        while self._applied[step] < self.shards or (self.tickets is not None and not self.tickets.finished(step)):
            start = time.perf_counter()
            slot = protocol.wait_any(self._requests)
            arrival = time.perf_counter()
            self.idle += arrival - start
            recorder = events.active()
            if recorder is not None:
                recorder.add("server_wait", start, arrival)
            worker = self.workers[slot]
            message = protocol.Control(self._control[worker].copy())
            self._requests[slot] = self.comm.Irecv(self._control[worker], source=worker, tag=protocol.TAG_CONTROL)
            if message.kind & protocol.PUSH:
                mpi_tensor.recv_(self._buffers[worker], self.comm, worker, protocol.TAG_GRADIENT)
                received = time.perf_counter()
                self.comm_time += received - arrival
                self._transfer[worker] += received - arrival
                if recorder is not None:
                    recorder.add("receive_push", arrival, received, peer=worker, nbytes=self.bytes_per_push)
                push = _Push(worker, message.step, message.shard, message.base_version, message.samples,
                             message.loss, message.step_samples, message.present)
                self._pending[worker] = push
                if self.sync:
                    self._by_step.setdefault(push.step, []).append(push)
            if message.kind & (protocol.REQUEST | protocol.PULL):
                self._waiting.append((worker, message, arrival))
            self._progress()
        self._applied.pop(step, None)
        if self.tickets is not None:
            self.tickets.forget(step)

    def _progress(self) -> None:
        """Apply what may be applied, then answer what may be answered."""
        start = time.perf_counter()
        if self.sync:
            for step in sorted(self._by_step):
                if len(self._by_step[step]) == self.shards:
                    self._apply(sorted(self._by_step.pop(step), key=lambda p: p.shard))
                    assert self._done_through is not None  # set by serve()
                    self._done_through = max(self._done_through, step)
        else:
            for worker in list(self._pending):
                self._apply([self._pending[worker]])
        self.compute += time.perf_counter() - start
        still = []
        for worker, message, arrival in self._waiting:
            if worker in self._pending or not self._answer(worker, message, arrival):
                still.append((worker, message, arrival))
        self._waiting = still

    def _apply(self, pushes: List[_Push]) -> None:
        """One update (one version) from ``pushes``: sample-weighted gradients, the optimizer's step
        over the parameters some push has a gradient for."""
        start = time.perf_counter()
        share_sum = 0.0
        self.grads.zero_()
        for push in pushes:
            staleness = self.version - push.base_version
            share = push.samples / push.step_samples
            share_sum += share
            scale = share / staleness if self.staleness_lr and staleness > 1 else share
            self.grads.add_(self._buffers[push.worker], alpha=scale)
            self._record(push, staleness)
        if self.weight_decay:
            self.grads.add_(self.weights, alpha=self.weight_decay * share_sum)
        self.flat.attach_grads(self.index, present=np.logical_or.reduce([p.present for p in pushes]))
        assert self.optimizer is not None, "ParameterServerStrategy.bind_optimizer binds it before the first step"
        with torch.no_grad():
            self.optimizer.step()
        self.version += 1
        for push in pushes:
            self._pending.pop(push.worker, None)
            self._applied[push.step] += 1
        if self.tickets is not None:
            self.tickets.applied([(p.step, p.shard) for p in pushes])
        recorder = events.active()
        if recorder is not None:
            recorder.add("apply", start, time.perf_counter(), index=self.version)

    def _record(self, push: _Push, staleness: int) -> None:
        for name, value in zip(UPDATE_COLUMNS, (self.index, push.worker, push.step, push.shard, push.base_version,
                                                self.version, staleness, self.bytes_per_push, self._serving)):
            self.updates[name].append(value)
        self.step_updates.append(staleness)
        self.loss_sum, self.loss_samples = self.loss_sum + push.loss * push.samples, self.loss_samples + push.samples
        self._last_staleness[push.worker] = staleness

    def _answer(self, worker: int, message: protocol.Control, arrival: float) -> bool:
        """Reply to a request (server 0: a ticket) or a pull; False: not yet."""
        ticket = None
        if message.kind & protocol.REQUEST:
            assert self.tickets is not None  # requests go to server 0, which holds the tickets
            decision = self.tickets.grant(self.workers.index(worker), message.step)
            if decision == WAIT:
                return False
            ticket = None if decision == NONE_LEFT else decision
        elif self.sync and self._done_through is not None and self._done_through < message.step - 1:
            return False  # sync: the weights must include every earlier step
        start = time.perf_counter()
        for op in self._outgoing[worker]:
            op.wait()
        staleness = self._last_staleness.pop(worker, -1)
        header = protocol.reply(self.version, self._transfer.pop(worker, 0.0), ticket, staleness)
        ops: list = [_Hold(self.comm.Isend(header, dest=worker, tag=protocol.TAG_REPLY), header)]
        if ticket is not None or message.kind & protocol.PULL:
            ops.append(mpi_tensor.isend(self.weights.clone(), self.comm, worker, protocol.TAG_WEIGHTS))
            self.bytes_sent += self.bytes_per_push
        self._outgoing[worker] = ops
        end = time.perf_counter()
        self.comm_time += end - start
        recorder = events.active()
        if recorder is not None:
            recorder.add("reply", start, end, peer=worker, nbytes=self.bytes_per_push if len(ops) > 1 else 0)
        return True

    def take_times(self) -> dict:
        """Seconds idle / communicating / computing, bytes sent, the staleness of each gradient
        applied and their mean loss and samples, since the last call."""
        times = dict(idle=self.idle, comm=self.comm_time, compute=self.compute, bytes=self.bytes_sent,
                     staleness=list(self.step_updates), loss=self.loss_sum / max(self.loss_samples, 1),
                     loss_samples=self.loss_samples)
        self._reset_times()
        return times

    def take_updates(self) -> Dict[str, np.ndarray]:
        """The update records since the last call, as columns."""
        columns = {name: np.asarray(values, dtype=np.int64) for name, values in self.updates.items()}
        self.updates = {name: [] for name in UPDATE_COLUMNS}
        return columns

    def close(self) -> None:
        """Cancel the posted receives and finish the replies. Local."""
        for request in self._requests:
            request.Cancel()
        MPI.Request.Waitall(self._requests)
        for ops in self._outgoing.values():
            for op in ops:
                op.wait()


class _Hold:
    """A raw request and the buffer it sends (kept alive until it completes)."""

    def __init__(self, request: MPI.Request, buffer: np.ndarray):
        self.request, self.buffer = request, buffer

    def wait(self) -> None:
        self.request.Wait()
