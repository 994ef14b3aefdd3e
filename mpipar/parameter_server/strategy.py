"""The parameter server as a strategy of the one training loop: servers hold the weights, workers push gradients."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.averaging import average_tensors
from mpipar.data.arrays import ImageDataset
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import agreed
from mpipar.parameter_server.config import ParameterServerConfig
from mpipar.parameter_server.flat import FlatShares
from mpipar.parameter_server.one_sided import TICKET, VERSION, WindowShares, check_passive_progress, one_sided_step
from mpipar.parameter_server.server import UPDATE_COLUMNS, Server
from mpipar.parameter_server.tickets import Tickets
from mpipar.parameter_server.worker import Worker
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter, Table
from mpipar.run.strategy import StepRecord, StepShards, Strategy

__all__ = ["ParameterServerStrategy"]


class ParameterServerStrategy:
    """Ranks ``0..servers-1`` of ``comm`` are servers, each holding a share of the trainable
    parameters (whole tensors, balanced by size) and the optimizer over it; the others are
    workers, each with the whole model. A step's global batch is ``workers`` shards of
    ``batch_size``; workers take shards as tickets from server 0, compute the gradient, push
    it to the servers and take the weights back (:class:`Server`, :class:`Worker`). ``mode``
    (:class:`ParameterServerConfig`): ``sync`` equals data parallelism; ``async`` lets a fast
    worker compute more shards than a slow one; ``bounded`` caps the staleness.

    Steps: every rank runs every loop step; a server's step ends when every shard of it has
    been applied, a worker's when no shard of it is left to take, so the loop's collectives
    (metrics flushes, checkpoints, evaluation) are the only points where all ranks meet.
    At epoch ends and checkpoints the servers broadcast their weights to every rank and the
    workers' BatchNorm statistics are averaged into the servers' copies; evaluation then runs
    on every rank's identical model.

    Metrics: per step and rank ``updates`` (versions applied on a server, shards computed on a
    worker), ``staleness_mean`` / ``staleness_max``; at every flush the table ``/updates`` gets
    the rows since the last (one per applied gradient: server, worker, step, shard, base and
    applied version, staleness, bytes) and ``/updates/staleness_histogram`` is recounted.

    Collective contract: construction, :meth:`end_epoch`, :meth:`evaluate`,
    :meth:`state_dict` and :meth:`finish` are collective over ``comm``; :meth:`train_step`
    is point-to-point between workers and servers. Checkpoints are per rank and resume on
    the same layout (ranks and servers).

    Raises:
        ValueError: on every rank, when no rank is left for a worker, there are fewer
            trainable parameters than servers, or the straggler is not a worker.
    """

    name = "parameter_server"
    full_steps_only = False
    checkpoint_per_rank = True
    steps_optimizer = True
    shares_shards = True

    def __init__(self, comm: MPI.Intracomm, model: nn.Module, settings: ParameterServerConfig, *,
                 batch_size: int, weight_decay: float = 0.0, momentum: float = 0.0,
                 device: torch.device | str = "cpu"):
        size, rank = comm.Get_size(), comm.Get_rank()
        servers = settings.servers

        def check():
            if size - servers < 1:
                raise ValueError(f"--servers {servers} on {size} ranks leaves no worker; launch more ranks "
                                 f"or use fewer servers")
            if settings.straggler >= size:
                raise ValueError(f"--straggler {settings.straggler} is not a rank of this {size}-rank job")
            if settings.one_sided and (momentum or weight_decay or torch.device(device).type != "cpu"):
                raise ValueError(f"--one-sided updates are plain SGD on CPU: pass --momentum 0 --weight-decay 0 "
                                 f"(got {momentum}, {weight_decay}) and --device cpu (got {device})")
            FlatShares.check(model, servers)

        collective_check(comm, check, "parameter server layout")
        self.flat = FlatShares(model.to(device), servers)  # parameters become views into its buffers
        self.comm, self.model, self.settings = comm, model, settings
        self.is_server = rank < servers
        workers = list(range(servers, size))
        self.replicas = len(workers)
        self.replica = 0 if self.is_server else rank - servers
        self.wait_groups = [list(range(size))]
        self.layout = (size, servers)
        self.slowdown = settings.slowdown if rank == settings.straggler else 1.0
        self.server: Optional[Server] = None
        self.worker: Optional[Worker] = None
        self.shares: Optional[WindowShares] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._held: List[int] = []
        self._one_sided_rows: Dict[str, list] = {name: [] for name in UPDATE_COLUMNS}
        self._staleness_seen = [0, 0, 0]  # updates written to /updates by this rank: count, sum, max
        self.metrics_tables = [Table("updates", self._take_updates, histograms=("staleness",))]
        if settings.one_sided:
            self.shares = WindowShares(comm, self.flat, servers)
            check_passive_progress(comm, self.shares, servers)
        elif self.is_server:
            tickets = Tickets(len(workers), sync=settings.mode == "sync", bound=settings.bound) if rank == 0 else None
            self.server = Server(comm, rank, workers, self.flat, sync=settings.mode == "sync",
                                 weight_decay=weight_decay, staleness_lr=settings.staleness_lr, tickets=tickets)
        else:
            self.worker = Worker(comm, servers, self.flat)
        shares = [self.flat.numel(s) for s in range(servers)]
        self.metrics_attrs = {"parameters": sum(p.numel() for p in model.parameters()), "servers": servers,
                              "workers": len(workers), "mode": settings.mode, "staleness_bound": settings.staleness,
                              "server_shares": np.asarray(shares)}

    # -- what the loop asks -------------------------------------------------------------

    def parameters(self):
        return list(self.flat.params[self.comm.Get_rank()]) if self.is_server else []

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Servers step the loop's optimizer once per update; its weight decay is applied by the
        server in proportion to each update's share of a step instead (see :class:`Server`)."""
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.0
        self.optimizer = optimizer
        if self.server is not None:
            self.server.optimizer = optimizer

    def describe(self) -> str:
        shares = ", ".join(f"{self.flat.numel(s):,}" for s in range(self.settings.servers))
        bound = f" (staleness <= {self.settings.staleness})" if self.settings.mode == "bounded" else ""
        return (f"parameter server, {self.settings.mode}{bound}: {self.settings.servers} server(s) holding "
                f"[{shares}] parameters, {self.replicas} workers")

    def needs_batch(self) -> bool:
        return not self.is_server

    def train_step(self, shards: StepShards) -> StepRecord:
        if self.shares is not None:
            return self._one_sided(shards)
        if self.server is not None:
            self.server.serve(shards.step)
            times = self.server.take_times()
            staleness = times["staleness"]
            return StepRecord(loss=times["loss"], samples=0, compute_time=times["compute"],
                              comm_time=times["comm"], idle_time=times["idle"], bytes_sent=times["bytes"],
                              loss_weight=times["loss_samples"], extra=_staleness_fields(staleness))
        return self._work(shards)

    def _compute(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The gradient of one shard into ``flat.grads`` (slowed down on an experiment's straggler); its loss."""
        start = time.perf_counter()
        self.flat.zero_grads()
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        if self.slowdown > 1.0:  # an experiment's straggler: compute at 1/slowdown of the speed
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - start))
        return loss.item()

    def _one_sided(self, shards: StepShards) -> StepRecord:
        if self.is_server:  # the workers update the windows; the server only meets them in the loop's collectives
            return StepRecord(loss=0.0, samples=0, compute_time=0.0, loss_weight=0,
                              extra=_staleness_fields([]))
        assert self.shares is not None and self.optimizer is not None  # one-sided; the loop bound the optimizer
        start, timing = time.perf_counter(), {"data": 0.0}

        def compute(shard: int):
            fetch_start = time.perf_counter()
            images, labels = shards.fetch(shard)
            timing["data"] += time.perf_counter() - fetch_start
            return len(labels), self._compute(images, labels)

        result = one_sided_step(self.shares, self.flat, workers=self.replicas, step=shards.step, held=self._held,
                                compute=compute, lr=self.optimizer.param_groups[0]["lr"],
                                step_samples=shards.samples, worker_rank=self.comm.Get_rank())
        for name, values in result["rows"].items():
            self._one_sided_rows[name] += values
        samples = result["samples"]
        total = time.perf_counter() - start
        return StepRecord(loss=result["loss_sum"] / max(samples, 1), samples=samples,
                          compute_time=total - result["comm"] - timing["data"], comm_time=result["comm"],
                          idle_time=0.0, data_time=timing["data"], loss_weight=samples,
                          bytes_sent=sum(result["rows"]["bytes"]),
                          extra=_staleness_fields(result["rows"]["staleness"]))

    def _work(self, shards: StepShards) -> StepRecord:
        compute = data = loss_sum = 0.0
        samples = 0
        worker = self.worker
        assert worker is not None  # _work runs on the workers' ranks
        ticket = worker.exchange(shards.step)
        while ticket is not None:
            start = time.perf_counter()
            images, labels = shards.fetch(ticket[1])
            fetched = time.perf_counter()
            data += fetched - start
            value = self._compute(images, labels)
            compute += time.perf_counter() - fetched
            loss_sum, samples = loss_sum + value * len(labels), samples + len(labels)
            ticket = worker.exchange(shards.step, (ticket, len(labels), value, shards.samples))
        times = worker.take_times()
        return StepRecord(loss=loss_sum / max(samples, 1), samples=samples, compute_time=compute,
                          comm_time=times["comm"], idle_time=times["idle"], bytes_sent=times["bytes"],
                          data_time=data, loss_weight=samples,
                          extra=_staleness_fields(times["staleness"]))

    def end_epoch(self) -> None:
        self._synchronise(workers_too=True)

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        return evaluate(self.model, dataset, self.comm)

    def state_dict(self) -> dict:
        self._synchronise(workers_too=False)
        version = self.server.version if self.server is not None else None
        if self.shares is not None:
            version = self.shares.read_counter(VERSION) if self.comm.Get_rank() == 0 else None
        return {"model": self.model.state_dict(), "parameter_server": {"layout": self.layout, "version": version}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("parameter_server", {}).get("layout")
        if saved is None or tuple(saved) != self.layout:
            raise agreed(ValueError)(
                f"a parameter-server checkpoint resumes only on the ranks and --servers that wrote it (its (ranks, "
                f"servers): {None if saved is None else tuple(saved)}; this job: {self.layout}); resume with those")
        self.model.load_state_dict(state["model"])
        if self.shares is not None:
            self.shares.sync_own()  # the loaded share into the window's public copy, before any Get
        if self.server is not None:
            self.server.version = state["parameter_server"]["version"]
        if self.shares is not None and self.comm.Get_rank() == 0:
            self.shares.set_counter(TICKET, state["step"] * self.replicas)
            self.shares.set_counter(VERSION, state["parameter_server"]["version"])
        self.comm.Barrier()
        self._exchange_versions()

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        if self.server is not None:
            self.server.close()
        if self.shares is not None:
            self.shares.free()
        seen = collectives.gather(self.comm, self._staleness_seen, "parameter server: staleness", root=0)
        if seen is not None:
            count = sum(c for c, _, _ in seen)
            if count:
                say(f"parameter server: {count} updates applied in this run, staleness mean "
                    f"{sum(s for _, s, _ in seen) / count:.2f}, max {max(m for _, _, m in seen)}")

    def _take_updates(self) -> dict:
        """This rank's rows of ``/updates`` since the last call (:class:`Table`). Local."""
        if self.server is not None:
            columns = self.server.take_updates()
        else:
            columns = {name: np.asarray(values, dtype=np.int64) for name, values in self._one_sided_rows.items()}
            self._one_sided_rows = {name: [] for name in UPDATE_COLUMNS}
        staleness = columns["staleness"]
        if len(staleness):
            count, total, most = self._staleness_seen
            self._staleness_seen = [count + len(staleness), total + int(staleness.sum()),
                                    max(most, int(staleness.max()))]
        return columns

    # -- synchronisation points (collective) -----------------------------------------------

    def _synchronise(self, *, workers_too: bool) -> None:
        """Every rank takes the servers' weights; the servers take the workers' mean BatchNorm
        statistics, and with ``workers_too`` the workers as well (an epoch end, as data
        parallelism does; a checkpoint leaves the workers' own statistics, so saving never
        changes the run). Collective."""
        if self.shares is not None:
            self.shares.sync_own()  # the workers' Accumulates are done: every rank is here
        for server in range(self.settings.servers):
            mpi_tensor.bcast_(self.flat.weights[server], self.comm, root=server)
        self._exchange_versions()
        buffers = list(self.model.buffers())
        takes_mean = self.is_server or workers_too
        with torch.no_grad():  # servers weigh 0: the mean is the workers'; a checkpoint's workers average copies
            average_tensors(buffers if takes_mean else [b.clone() for b in buffers], self.comm,
                            weight=0.0 if self.is_server else 1.0, root=self.settings.servers)

    def _exchange_versions(self) -> None:
        versions = collectives.allgather(self.comm, None if self.server is None else self.server.version,
                                         "parameter server: versions")
        if self.worker is not None:
            self.worker.versions = versions[:self.settings.servers]


def _staleness_fields(staleness) -> dict:
    return {"updates": len(staleness), "staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
            "staleness_max": float(max(staleness)) if staleness else 0.0}


if TYPE_CHECKING:
    def _is_a_strategy(strategy: ParameterServerStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
