"""ZeRO-1 for a model whose gradients are averaged elsewhere: each replica steps its shard, then all-gathers."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mpi4py import MPI
from torch import nn

from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import CommStats
from mpipar.diagnostics.agree import agree_on
from mpipar.run.strategy import memory_record, tensor_bytes  # what every strategy records of memory
from mpipar.sharded.consolidate import GRID_KEY, shard_optimizer_state
from mpipar.sharded.layout import FlatLayout, Piece

__all__ = ["ShardedUpdate", "GRID_KEY", "allgather_shards", "flatten_into", "piece_parameters", "step_pieces",
           "tensor_bytes", "memory_record"]


def flatten_into(params: Sequence[nn.Parameter], layout: FlatLayout) -> List[torch.Tensor]:
    """One zero-padded flat buffer per group of ``layout`` holding ``params``' values, each parameter's
    ``.data`` made a view into it (so optimizer steps and all-gathers on the buffer are the model's). Local."""
    device = params[0].device if params else torch.device("cpu")
    flats: List[torch.Tensor] = []
    with torch.no_grad():
        for group in layout.groups:
            flat = torch.zeros(group.padded, dtype=params[group.params[0]].dtype, device=device)
            for index, offset in zip(group.params, group.offsets):
                p = params[index]
                view = flat[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
            flats.append(flat)
    return flats


def piece_parameters(shards: Sequence[torch.Tensor], pieces: Sequence[Piece]) -> List[nn.Parameter]:
    """One ``nn.Parameter`` per piece of this rank (``FlatLayout.pieces``), a view into its group's shard: what
    the optimizer steps. Local."""
    return [nn.Parameter(shards[pc.group][pc.shard_offset:pc.shard_offset + pc.stop - pc.start]) for pc in pieces]


def step_pieces(optimizer: torch.optim.Optimizer, pieces: Sequence[Piece], shard_params: Sequence[nn.Parameter],
                params: Sequence[nn.Parameter], grads: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
    """Step ``optimizer`` (built on ``shard_params``) once: each piece takes its gradient from ``grads`` or, by
    default, its slice of its parameter's averaged ``.grad`` (None where that has none: skipped, as the unsharded
    optimizer skips it); then ``params``' ``.grad`` are dropped, so the next backward starts from zero. Local."""
    if grads is None:
        grads = [None if params[pc.param].grad is None else params[pc.param].grad.detach().reshape(-1)[pc.start:pc.stop]
                 for pc in pieces]
    for piece, grad in zip(shard_params, grads):
        piece.grad = grad
    optimizer.step()
    for p in params:
        p.grad = None


def allgather_shards(flats: Sequence[torch.Tensor], comm: MPI.Intracomm, calls: List[Tuple[str, int]],
                     stats: CommStats) -> None:
    """All-gather every rank's shard of each padded flat buffer in place over ``comm``, noting each call
    (``("allgather", bytes of the buffer)``) in ``calls`` and its time and ring-estimate bytes in ``stats``.
    Collective over ``comm``: every rank, the same buffers in the same order."""
    begin, size = time.perf_counter(), comm.Get_size()
    for flat in flats:
        mpi_tensor.allgather_in_place_(flat, comm)
        nbytes = flat.numel() * flat.element_size()
        calls.append(("allgather", nbytes))
        stats.bytes_sent += (size - 1) / size * nbytes
    stats.wait_time += time.perf_counter() - begin


class ShardedUpdate:
    """The optimizer state of ``params`` sharded over the data-parallel communicator ``comm`` (ZeRO-1), for
    a partitioned model whose replicas' gradients something else averages (a pipeline stage's or a
    tensor-parallel shard's, by :class:`~mpipar.comm.replicas.ReplicaAverager`).

    The trainable ``params`` (a tied one once) move into one flat buffer per dtype, padded to a multiple
    of the replicas (:class:`~mpipar.sharded.layout.FlatLayout`); the model's parameters become views
    into it. :meth:`parameters` are this replica's *pieces* (views into its shard) for any elementwise
    torch optimizer; :meth:`step`, after the gradients are averaged, hands each piece its slice of the
    averaged ``.grad`` (None where the parameter has none: skipped as the unsharded optimizer skips it),
    steps the optimizer, drops the model's ``.grad`` and all-gathers the buffers in place over ``comm``,
    so every replica holds the whole updated parameters again.

    Collective contract: every rank of ``comm`` builds it with parameters of the same names, shapes and
    dtypes in the same order (checked: a ValueError on every rank) and equal values (it does not
    broadcast; the averager did), and calls :meth:`step` together. Size 1 is the same code: the
    all-gather copies nothing.

    Args:
        named: ``(name, parameter)`` of the model part this rank holds, in a fixed order; the names
            identify the optimizer state in checkpoints (the unsplit model's names where it re-shards).
        comm: the data-parallel communicator (``ProcessGrid.data_comm``).
    """

    def __init__(self, named: Sequence[Tuple[str, nn.Parameter]], comm: MPI.Intracomm):
        by_id: Dict[int, Tuple[str, nn.Parameter]] = {}
        for name, p in named:  # a tied parameter once, under its first name
            if p.requires_grad:
                by_id.setdefault(id(p), (name, p))
        trainable = list(by_id.values())
        agree_on(comm, "the parameters sharded over the replicas (name, shape, dtype)",
                 [(name, tuple(p.shape), str(p.dtype)) for name, p in trainable],
                 hint="build the same model and placement in every replica")
        self.comm, self.size, self.rank = comm, comm.Get_size(), comm.Get_rank()
        self.names = [name for name, _ in trainable]
        self.params = [p for _, p in trainable]
        self.layout = FlatLayout([(name, p.numel(), str(p.dtype)) for name, p in trainable], self.size)
        self.flats = flatten_into(self.params, self.layout)
        self.shards = [flat[self.rank * g.shard:(self.rank + 1) * g.shard]
                       for flat, g in zip(self.flats, self.layout.groups)]
        self.pieces = self.layout.pieces(self.rank)
        self.shard_params = piece_parameters(self.shards, self.pieces)
        self.stats = CommStats()
        self.calls: List[Tuple[str, int]] = []  # (collective, bytes of the buffer it covers) until take_calls

    def parameters(self) -> List[nn.Parameter]:
        """This rank's pieces: what its optimizer steps."""
        return list(self.shard_params)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (built on :meth:`parameters`) on the averaged gradients' slices, drop the
        model's ``.grad`` and all-gather the shards. Collective over ``comm``."""
        step_pieces(optimizer, self.pieces, self.shard_params, self.params)  # the averager's buckets stay
        self.gather()

    def step_after(self, optimizer: torch.optim.Optimizer, stats: CommStats,
                   gradients: Sequence[torch.Tensor] = ()) -> Dict[str, float]:
        """:meth:`step`, its all-gathers' time and bytes added to ``stats`` (the averager's, so a step
        record counts them with the replicas' reduction), and :meth:`memory` with ``gradients`` (the
        averager's buckets). Collective over ``comm``."""
        self.step(optimizer)
        gathered = self.stats.take()
        self.take_calls()
        stats.wait_time += gathered.wait_time
        stats.bytes_sent += gathered.bytes_sent
        return self.memory(optimizer, gradients)

    def gather(self) -> None:
        """All-gather every rank's shard into the flat buffers (the model's parameters). Collective."""
        allgather_shards(self.flats, self.comm, self.calls, self.stats)

    def take_calls(self) -> List[Tuple[str, int]]:
        """The all-gathers (name, bytes of the buffer covered) since the last call; resets them."""
        calls, self.calls = self.calls, []
        return calls

    def memory(self, optimizer: Optional[torch.optim.Optimizer], gradients: Sequence[torch.Tensor] = ()) -> \
            Dict[str, float]:
        """Bytes held between steps: the whole parameters, ``gradients`` (the averager's buckets) and the
        optimizer state (this rank's shard's). Local."""
        return memory_record(tensor_bytes(self.flats), gradients, optimizer)

    def state_dict(self) -> dict:
        """The layout for a checkpoint file (:data:`~mpipar.sharded.consolidate.GRID_KEY`): the entries and
        this rank's pieces (``[name, start, stop]``, in the optimizer's order), which the file's optimizer
        state follows."""
        return {"zero": 1, "replicas": self.size, "replica": self.rank,
                "entries": [list(entry) for entry in self.layout.entries],
                "pieces": [[self.names[pc.param], pc.start, pc.stop] for pc in self.pieces]}

    def same_layout(self, saved: Optional[dict]) -> bool:
        """Whether a checkpoint's :meth:`state_dict` (None: written without ZeRO) cut the optimizer state
        into this rank's pieces, so that it loads as it is. Local."""
        return saved is not None and saved.get("pieces") == self.state_dict()["pieces"] \
            and saved.get("entries") == self.state_dict()["entries"]

    def optimizer_state(self, by_name: Dict[str, dict], group: dict) -> dict:
        """An optimizer state dict for this rank's pieces, cut from each parameter's whole state by name
        (``group``: the saved first param group). Local."""
        return shard_optimizer_state(by_name, [(self.names[pc.param], pc.start, pc.stop) for pc in self.pieces],
                                     group)
