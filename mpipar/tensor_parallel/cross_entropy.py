"""Cross-entropy of logits split by class (vocabulary) over a tensor-parallel group."""

from __future__ import annotations

from typing import Optional

import torch
from mpi4py import MPI

from mpipar.comm.reducer import CommStats
from mpipar.diagnostics.failure import agreed
from mpipar.tensor_parallel.mappings import all_reduce_
from mpipar.tensor_parallel.partition import shard_bounds, shard_size

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, comm, num_classes, stats):
        size, rank = comm.Get_size(), comm.Get_rank()
        start, stop = shard_bounds(num_classes, size, rank, pad=True)
        local = logits.detach()
        if stop - start < local.shape[-1]:  # padding classes: never the maximum, exp() = 0
            local = local.clone()
            local[..., stop - start:] = float("-inf")
        maximum = local.max(dim=-1).values.contiguous()
        all_reduce_(maximum, comm, stats, op=MPI.MAX)
        exp = (local - maximum.unsqueeze(-1)).exp_()
        owned = (target >= start) & (target < stop)
        index = (target - start).clamp_(0, local.shape[-1] - 1).unsqueeze(-1)
        picked = torch.where(owned, local.gather(-1, index).squeeze(-1) - maximum, torch.zeros_like(maximum))
        sums = torch.stack([exp.sum(dim=-1), picked])  # one Allreduce for both
        all_reduce_(sums, comm, stats)
        sum_exp, target_logit = sums[0], sums[1]
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, owned, index)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, owned, index = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, index, -owned.to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, comm: MPI.Intracomm,
                                 num_classes: Optional[int] = None, reduction: str = "mean",
                                 stats: Optional[CommStats] = None) -> torch.Tensor:
    """``F.cross_entropy`` of logits whose classes are split over ``comm``.

    Rank r holds logits of classes ``[r s, (r+1) s)``, ``s = ceil(num_classes / p)``
    (the layout of :class:`~mpipar.tensor_parallel.layers.ColumnParallelLinear`, with
    ``pad_output`` when p does not divide the class count): the last shards may end in
    padding columns, which are masked (their value is ignored and their gradient is
    zero), so the result equals the unsplit loss. Numerically stable: the global maximum
    logit is subtracted before exponentiating. Two Allreduces (max; sum-exp with the
    target logit, picked on the rank that owns the target); backward is local.

    Collective contract: every rank of ``comm`` calls it together with logits of the
    same shape ``(..., s)``, the same ``target`` and ``num_classes``. The checks below
    depend only on those, so they fail on every rank alike (debug mode, ``MPIPAR_DEBUG=1``,
    compares the shapes across ranks before each Allreduce). Size 1: plain cross-entropy.

    Args:
        logits: this rank's shard, ``(..., s)``, floating point.
        target: class indices in ``[0, num_classes)``, shape ``logits.shape[:-1]``.
        comm: the tensor-parallel group.
        num_classes: the unpadded class count (default: ``s * p``, no padding).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in ``F.cross_entropy``.
        stats: where the time blocked in MPI and the bytes sent accumulate.

    Returns:
        The loss, reduced as asked, equal on every rank.

    Raises:
        ValueError: when the shard width does not fit ``num_classes`` over p ranks, the
            target's shape does not match, a target is out of range, or ``reduction`` is unknown.
    """
    size = comm.Get_size()
    width = logits.shape[-1]
    num_classes = width * size if num_classes is None else num_classes
    if reduction not in ("mean", "sum", "none"):
        raise agreed(ValueError)(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_classes < 1 or shard_size(num_classes, size, pad=True) != width:
        raise agreed(ValueError)(
            f"logits of {width} classes per rank do not fit {num_classes} classes over {size} tensor-parallel ranks "
            f"(expected ceil({num_classes} / {size}) = {-(-num_classes // size) if num_classes > 0 else 0} per rank)")
    if target.shape != logits.shape[:-1]:
        raise agreed(ValueError)(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise agreed(ValueError)(f"targets must lie in [0, {num_classes}), got [{int(target.min())}, "
                                 f"{int(target.max())}]")
    losses = _VocabParallelCrossEntropy.apply(logits, target, comm, num_classes, stats)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses
