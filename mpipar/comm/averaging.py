"""Weighted averaging of tensors (a model's parameters and buffers) over ranks, one flat collective per dtype."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor
from mpipar.diagnostics.failure import agreed

if TYPE_CHECKING:
    from mpipar.comm.reducer import CommStats

__all__ = ["average_tensors"]


@torch.no_grad()
def average_tensors(tensors: Sequence[torch.Tensor], comm: MPI.Intracomm, weight: Optional[float] = None, *,
                    root: int = 0, stats: Optional[CommStats] = None) -> None:
    """Replace every floating-point tensor of ``tensors`` by its weighted mean over ``comm``,
    sum(w_k x_k) / sum(w_k), in place; every other tensor (integer counters, flags) by
    ``root``'s value.

    Floating-point tensors of one dtype and device travel in one flat buffer with this
    rank's weight appended, so the average costs one Allreduce per dtype (one for a
    float32 model), whatever the number of tensors; float16 and bfloat16 are averaged in
    float32. Other tensors travel as one flat broadcast per dtype. A tensor listed twice
    is averaged once.

    Collective contract: every rank of ``comm`` calls it with tensors of the same shapes,
    dtypes and order (e.g. the same model's parameters and buffers). Size 1: nothing is
    communicated and the tensors are left as they are (bitwise).

    Args:
        tensors: what to average, e.g. ``[*trainable_parameters, *module.buffers()]``.
        comm: the ranks to average over.
        weight: this rank's weight (e.g. samples since the last average); None: equal weights.
        root: the rank whose non-floating-point tensors everyone takes.
        stats: a :class:`~mpipar.comm.reducer.CommStats` to add the time blocked in the
            collectives (``wait_time``) and the bytes sent to (ring estimate 2 (p-1)/p of
            an Allreduce's payload, (p-1)/p of a broadcast's).

    Raises:
        ValueError: on every rank together (after the collective), when a weight was
            negative or all weights were zero.
    """
    size = comm.Get_size()
    if size == 1:  # one rank's tensors are their own average (and x w / w could move the last bit)
        return
    weight = 1.0 if weight is None else float(weight)
    averaged, broadcast = _groups(tensors)
    waited, sent = 0.0, 0.0
    for members in averaged.values():
        # half precision in float32: the sums, and the weights' total (float16 counts exactly only to 2048)
        work_dtype = torch.promote_types(members[0].dtype, torch.float32)
        flat = torch.cat([*(t.reshape(-1).to(work_dtype) * weight for t in members),
                          torch.tensor([weight, float(weight < 0)], dtype=work_dtype, device=members[0].device)])
        begin = time.perf_counter()
        mpi_tensor.allreduce_(flat, comm)
        waited += time.perf_counter() - begin
        sent += 2.0 * (size - 1) / size * flat.numel() * flat.element_size()
        total, negative = flat[-2].item(), flat[-1].item()
        if negative or total <= 0:
            raise agreed(ValueError)(f"average_tensors: weights must be >= 0 and not all zero; {int(negative)} "
                                     f"rank(s) gave a negative weight, the weights sum to {total}")
        _unflatten(flat[:-2].div_(total), members)
    for members in broadcast.values():
        flat = torch.cat([t.reshape(-1) for t in members])
        begin = time.perf_counter()
        mpi_tensor.bcast_(flat, comm, root)
        waited += time.perf_counter() - begin
        sent += (size - 1) / size * flat.numel() * flat.element_size()
        _unflatten(flat, members)
    if stats is not None:
        stats.wait_time += waited
        stats.bytes_sent += sent


def _unflatten(flat: torch.Tensor, members: List[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``members`` (converting to each one's dtype)."""
    offset = 0
    for t in members:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _groups(tensors: Sequence[torch.Tensor]) -> Tuple[Dict[tuple, List[torch.Tensor]], Dict[tuple, List[torch.Tensor]]]:
    """``tensors`` (each once, in order) by (dtype, device): floating-point ones, then the others."""
    averaged: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    broadcast: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    seen = set()
    for t in tensors:
        if id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        (averaged if t.is_floating_point() else broadcast)[t.dtype, t.device].append(t)
    return averaged, broadcast
