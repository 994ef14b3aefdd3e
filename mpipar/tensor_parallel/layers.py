"""Column- and row-parallel linear layers, each cut from a full ``nn.Linear`` over a tensor-parallel group."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn
from torch.autograd.function import once_differentiable

from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import CommStats
from mpipar.diagnostics.failure import agreed
from mpipar.tensor_parallel.mappings import (
    gather_from_parallel,
    record_allreduce,
    reduce_from_parallel,
    scatter_to_parallel,
)
from mpipar.tensor_parallel.partition import agree_on_linears, shard_size

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _agreed_shard(features: int, size: int, *, pad: bool, what: str) -> int:
    """:func:`shard_size` on sizes every rank agreed on, so its error is raised on every rank."""
    try:
        return shard_size(features, size, pad=pad, what=what)
    except ValueError as exc:
        raise agreed(ValueError)(str(exc)) from None


def _weight_gradient(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """dL/dW of ``y = x W^T`` over any leading dimensions: ``sum_batch grad_y^T x``."""
    return grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(input.reshape(-1, input.shape[-1]))


class _ColumnLinear(torch.autograd.Function):
    """``F.linear`` whose backward overlaps the input gradient's Allreduce with dW and db.

    It is copy-to-parallel fused with the column's matmul: the input is replicated, so
    its gradient is the sum of every rank's ``grad_y W_r``. Backward computes that part,
    starts its non-blocking Allreduce, computes the weight and bias gradients (testing
    the request between them, as MPI may progress only inside calls), then waits.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, comm, stats):
        ctx.save_for_backward(input, weight)
        ctx.comm, ctx.stats, ctx.has_bias = comm, stats, bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        comm, size = ctx.comm, ctx.comm.Get_size()
        grad_input = grad_weight = grad_bias = pending = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(weight)
            if size > 1:
                pending = mpi_tensor.iallreduce_(grad_input, comm)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(grad_output, input)
        if pending is not None:
            pending.test()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        if pending is not None:
            start = time.perf_counter()
            pending.wait()
            record_allreduce(ctx.stats, grad_input, size, time.perf_counter() - start)
        return grad_input, grad_weight, grad_bias, None, None


class ColumnParallelLinear(nn.Module):
    """``full`` split by output features: rank r holds rows ``[r s, (r+1) s)`` of its weight and bias.

    ``y_r = x W_r^T + b_r`` from the replicated input ``x``. Backward sums the input
    gradient over ``comm`` (one Allreduce, overlapped with the weight gradient); with
    ``gather_output`` the output shards are all-gathered into the full output.

    Uneven splits: an ``out_features`` that the group's size p does not divide is refused
    with a ValueError, unless ``pad_output``: then out_features is padded to
    ``ceil(out_features / p) * p`` with zero weight rows and biases, and the padding
    columns at the end of the last shards are not part of the model: gather_output drops
    them, and :func:`~mpipar.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy`
    masks them (for classes or a vocabulary that p does not divide).

    Collective contract: every rank of ``comm`` builds the layer together from a full
    layer of the same shape (one small allgather checks it) and the same values (the
    caller's part: same seed or checkpoint), then runs forward and backward together on
    inputs of the same shape. Size 1: the layer is ``full``'s copy and nothing is communicated.

    Args:
        full: the unsplit layer (copied; not modified).
        comm: the tensor-parallel group.
        gather_output: return the full output on every rank instead of this rank's shard.
        pad_output: pad an uneven output split instead of refusing it.
        stats: where the time blocked in MPI and the bytes sent accumulate (default: a new
            :class:`CommStats`, ``self.stats``).

    Raises:
        TypeError: on every rank, when some rank's ``full`` is not an ``nn.Linear``.
        ValueError: on every rank, naming the sizes, when the shapes differ between ranks
            or p does not divide ``out_features`` (without ``pad_output``).
    """

    def __init__(self, full: nn.Linear, comm: MPI.Intracomm, gather_output: bool = False, *,
                 pad_output: bool = False, stats: Optional[CommStats] = None):
        super().__init__()
        what = "ColumnParallelLinear"
        in_features, out_features = agree_on_linears(comm, {"full": full}, what)["full"]
        size, rank = comm.Get_size(), comm.Get_rank()
        shard = _agreed_shard(out_features, size, pad=pad_output, what=f"{what} output ({in_features}->{out_features})")
        self.comm, self.gather_output = comm, gather_output
        self.in_features, self.out_features, self.out_per_rank = in_features, out_features, shard
        self.stats = CommStats() if stats is None else stats
        rows = slice(rank * shard, (rank + 1) * shard)
        with torch.no_grad():
            weight = full.weight.new_zeros(shard, in_features)
            real = full.weight[rows]
            weight[:len(real)] = real
            self.weight = nn.Parameter(weight)
            if full.bias is None:
                self.register_parameter("bias", None)
            else:
                bias = full.bias.new_zeros(shard)
                bias[:len(real)] = full.bias[rows]
                self.bias = nn.Parameter(bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """This rank's output shard ``(..., out_per_rank)``, or with ``gather_output`` the full
        ``(..., out_features)``. Collective over ``comm`` (in backward; forward too when gathering)."""
        output = _ColumnLinear.apply(input, self.weight, self.bias, self.comm, self.stats)
        if self.gather_output:
            output = gather_from_parallel(output, self.comm, self.stats)[..., :self.out_features]
        return output

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsplit layer's ``weight`` (and ``bias``), padding dropped, on every rank.

        Collective: every rank of ``comm`` calls it together (an all-gather per tensor;
        a copy at size 1).
        """
        state = {"weight": _gather_rows(self.weight, self.comm)[:self.out_features]}
        if self.bias is not None:
            state["bias"] = _gather_rows(self.bias, self.comm)[:self.out_features]
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_per_rank={self.out_per_rank}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``full`` split by input features: rank r holds columns ``[r s, (r+1) s)`` of its weight.

    Every rank computes ``x_r W_r^T`` from its input shard; one Allreduce sums them and
    the bias (replicated, whole on every rank) is added once, after the sum. With
    ``input_is_parallel=False`` the replicated input is split first (and its gradient
    all-gathered in backward). Backward of the output is communication-free.

    Uneven splits: an ``in_features`` that the group's size p does not divide is refused
    with a ValueError (an input shard has to match the column-parallel layer before it).

    Collective contract: every rank of ``comm`` builds the layer together from a full
    layer of the same shape (one small allgather checks it) and the same values, then
    runs forward and backward together on inputs of the same shape. Size 1: the layer
    is ``full``'s copy and nothing is communicated.

    Args:
        full: the unsplit layer (copied; not modified).
        comm: the tensor-parallel group.
        input_is_parallel: the input is already this rank's shard ``(..., in_per_rank)``
            (as a column-parallel layer without gather_output returns it).
        stats: where the time blocked in MPI and the bytes sent accumulate.

    Raises:
        TypeError: on every rank, when some rank's ``full`` is not an ``nn.Linear``.
        ValueError: on every rank, naming the sizes, when the shapes differ between ranks
            or p does not divide ``in_features``.
    """

    def __init__(self, full: nn.Linear, comm: MPI.Intracomm, input_is_parallel: bool = True, *,
                 stats: Optional[CommStats] = None):
        super().__init__()
        what = "RowParallelLinear"
        in_features, out_features = agree_on_linears(comm, {"full": full}, what)["full"]
        size, rank = comm.Get_size(), comm.Get_rank()
        shard = _agreed_shard(in_features, size, pad=False, what=f"{what} input ({in_features}->{out_features})")
        self.comm, self.input_is_parallel = comm, input_is_parallel
        self.in_features, self.out_features, self.in_per_rank = in_features, out_features, shard
        self.stats = CommStats() if stats is None else stats
        with torch.no_grad():
            self.weight = nn.Parameter(full.weight[:, rank * shard:(rank + 1) * shard].clone())
            if full.bias is None:
                self.register_parameter("bias", None)
            else:
                self.bias = nn.Parameter(full.bias.clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """The full output ``(..., out_features)`` on every rank. Collective over ``comm`` (forward
        Allreduce; backward all-gather only when the input is not parallel)."""
        if not self.input_is_parallel:
            input = scatter_to_parallel(input, self.comm, self.stats)
        output = reduce_from_parallel(F.linear(input, self.weight), self.comm, self.stats)
        return output if self.bias is None else output + self.bias

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsplit layer's ``weight`` (and ``bias``) on every rank.

        Collective: every rank of ``comm`` calls it together (an all-gather of the
        weight; a copy at size 1).
        """
        blocks = _gather_rows(self.weight.unsqueeze(0), self.comm)  # (p, out, in / p)
        state = {"weight": blocks.permute(1, 0, 2).reshape(self.out_features, self.in_features)}
        if self.bias is not None:
            state["bias"] = self.bias.detach().clone()
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_per_rank={self.in_per_rank}, input_is_parallel={self.input_is_parallel}")


def _gather_rows(tensor: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along dimension 0, in rank order. Collective over ``comm``."""
    local = tensor.detach().contiguous()
    gathered = torch.empty((comm.Get_size() * local.shape[0], *local.shape[1:]), dtype=local.dtype,
                           device=local.device)
    return mpi_tensor.allgather_(gathered, local, comm)
