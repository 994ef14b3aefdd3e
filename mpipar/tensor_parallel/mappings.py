"""The conjugate autograd maps between replicated and split activations over a tensor-parallel group.

Megatron-style pairs, each forward the conjugate of its backward:

=====================  ==========================  ==========================
map                    forward                     backward
=====================  ==========================  ==========================
copy_to_parallel       identity                    all-reduce (sum)
reduce_from_parallel   all-reduce (sum)            identity
scatter_to_parallel    keep this rank's last-dim   all-gather the last dim
                       shard
gather_from_parallel   all-gather the last dim     keep this rank's shard
=====================  ==========================  ==========================

Collective contract for all of them: every rank of ``comm`` applies the same maps in the
same order to tensors of the same shape and dtype, and runs backward through them
together. At size 1 every map is the identity and nothing is communicated; on the meta
device (shape inference) nothing is communicated either and the shapes come out right. The time
blocked in MPI and the bytes sent (ring estimates) go to an optional
:class:`~mpipar.comm.reducer.CommStats`, and in a step sampled by ``--trace-steps`` each
Allreduce and Allgather is a ``tp_allreduce`` / ``tp_gather`` event with those bytes.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import CommStats
from mpipar.diagnostics import events
from mpipar.diagnostics.failure import agreed

__all__ = ["copy_to_parallel", "reduce_from_parallel", "scatter_to_parallel", "gather_from_parallel",
           "all_reduce_", "all_gather_last_dim", "split_last_dim", "record_allreduce", "allreduce_bytes"]


def allreduce_bytes(payload_bytes: int, size: int) -> float:
    """Bytes one rank sends in a ring Allreduce of ``payload_bytes``: 2 (p-1)/p of the payload."""
    return 2.0 * (size - 1) / size * payload_bytes


def record_allreduce(stats: Optional[CommStats], tensor: torch.Tensor, size: int, seconds: float) -> None:
    """Add one Allreduce of ``tensor`` over ``size`` ranks, blocked ``seconds`` until now, to ``stats``
    (if any), and in a sampled step as an event."""
    if stats is not None:
        stats.wait_time += seconds
        stats.bytes_sent += allreduce_bytes(tensor.numel() * tensor.element_size(), size)
    recorder = events.active()
    if recorder is not None:
        end = time.perf_counter()
        recorder.add("tp_allreduce", end - seconds, end,
                     nbytes=allreduce_bytes(tensor.numel() * tensor.element_size(), size))


def all_reduce_(tensor: torch.Tensor, comm: MPI.Intracomm, stats: Optional[CommStats] = None,
                op: Optional[MPI.Op] = None) -> torch.Tensor:
    """In-place blocking Allreduce (default SUM), timed into ``stats``.

    Collective: every rank of ``comm`` calls it with a tensor of the same shape and
    dtype. Size 1: returns ``tensor`` untouched, records nothing.
    """
    size = comm.Get_size()
    if size == 1 or tensor.device.type == "meta":  # shape inference (a pipeline's specs): nothing to add
        return tensor
    start = time.perf_counter()
    mpi_tensor.allreduce_(tensor, comm, op)
    record_allreduce(stats, tensor, size, time.perf_counter() - start)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, comm: MPI.Intracomm,
                        stats: Optional[CommStats] = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the last dimension, in rank order.

    Collective: every rank of ``comm`` calls it with a tensor of the same shape and
    dtype. Size 1: returns ``tensor`` itself. Records the ring estimate (p-1)/p of the
    gathered bytes.
    """
    size = comm.Get_size()
    if size == 1:
        return tensor
    if tensor.device.type == "meta":  # shape inference: the gathered shape, no data
        return torch.empty((*tensor.shape[:-1], size * tensor.shape[-1]), dtype=tensor.dtype, device="meta")
    local = tensor.detach().contiguous()
    gathered = torch.empty((size, *local.shape), dtype=local.dtype, device=local.device)
    start = time.perf_counter()
    mpi_tensor.allgather_(gathered, local, comm)
    end = time.perf_counter()
    if stats is not None:
        stats.wait_time += end - start
        stats.bytes_sent += (size - 1) * local.numel() * local.element_size()
    recorder = events.active()
    if recorder is not None:
        recorder.add("tp_gather", start, end, nbytes=(size - 1) * local.numel() * local.element_size())
    return gathered.movedim(0, -2).reshape(*local.shape[:-1], size * local.shape[-1])


def split_last_dim(tensor: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """This rank's contiguous shard of the last dimension (rank r: the r-th of p equal parts).

    Local (no communication); every rank of ``comm`` takes its own part. Size 1: ``tensor``.

    Raises:
        ValueError: when the group's size does not divide the last dimension (on every rank: the
            input is replicated, so each finds it alone).
    """
    size = comm.Get_size()
    if size == 1:
        return tensor
    width = tensor.shape[-1]
    if width % size:
        raise agreed(ValueError)(f"cannot split a last dimension of {width} over {size} tensor-parallel ranks "
                         f"(shape {tuple(tensor.shape)}); use a multiple of {size}")
    shard = width // size
    rank = comm.Get_rank()
    return tensor[..., rank * shard:(rank + 1) * shard].contiguous()


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, comm, stats):
        ctx.comm, ctx.stats = comm, stats
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.detach().clone(memory_format=torch.contiguous_format)
        return all_reduce_(grad, ctx.comm, ctx.stats), None, None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, comm, stats):
        output = input.detach().clone(memory_format=torch.contiguous_format)
        return all_reduce_(output, comm, stats)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


class _ScatterToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, comm, stats):
        ctx.comm, ctx.stats = comm, stats
        return split_last_dim(input, comm)

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_last_dim(grad_output, ctx.comm, ctx.stats), None, None


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, comm, stats):
        ctx.comm = comm
        return all_gather_last_dim(input, comm, stats)

    @staticmethod
    def backward(ctx, grad_output):
        return split_last_dim(grad_output, ctx.comm), None, None


def _apply(function, input: torch.Tensor, comm: MPI.Intracomm, stats: Optional[CommStats]) -> torch.Tensor:
    if comm.Get_size() == 1:
        return input
    return function.apply(input, comm, stats)


def copy_to_parallel(input: torch.Tensor, comm: MPI.Intracomm, stats: Optional[CommStats] = None) -> torch.Tensor:
    """Enter a parallel region with a replicated tensor: identity forward, gradient summed over
    ``comm`` in backward (each rank's branch contributes part of it). Size 1: identity."""
    return _apply(_CopyToParallel, input, comm, stats)


def reduce_from_parallel(input: torch.Tensor, comm: MPI.Intracomm,
                         stats: Optional[CommStats] = None) -> torch.Tensor:
    """Leave a parallel region by summing partial results over ``comm`` (forward); the gradient
    passes through unchanged (backward). Size 1: identity."""
    return _apply(_ReduceFromParallel, input, comm, stats)


def scatter_to_parallel(input: torch.Tensor, comm: MPI.Intracomm,
                        stats: Optional[CommStats] = None) -> torch.Tensor:
    """Keep this rank's shard of a replicated tensor's last dimension (forward); all-gather the
    gradient along it (backward). The group's size must divide the last dimension. Size 1: identity."""
    return _apply(_ScatterToParallel, input, comm, stats)


def gather_from_parallel(input: torch.Tensor, comm: MPI.Intracomm,
                         stats: Optional[CommStats] = None) -> torch.Tensor:
    """All-gather last-dimension shards in rank order (forward); keep this rank's shard of the
    gradient (backward). Size 1: identity."""
    return _apply(_GatherFromParallel, input, comm, stats)
