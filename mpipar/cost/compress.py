"""Gradients on the wire: bytes and seconds of the fp32 Allreduce, the 16-bit wire and PowerSGD. Pure."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

from mpipar.cost.machine import Machine
from mpipar.cost.options import ASSUMED_MATMUL_FLOPS

__all__ = ["allreduce_bytes_sent", "wire16_bytes_sent", "wire16_seconds", "powersgd_split", "powersgd_bytes",
           "powersgd_flops", "powersgd_seconds"]

FP32, WIRE16 = 4, 2


def allreduce_bytes_sent(nbytes: float, ranks: int) -> float:
    """Bytes one rank sends in a ring Allreduce of ``nbytes``: ``2 (p-1)/p n`` (the estimate the
    metrics' ``bytes_sent`` uses)."""
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def wire16_bytes_sent(elements: int, ranks: int) -> float:
    """Bytes one rank sends to sum ``elements`` gradients over a 16-bit wire (``comm/wire.py``'s
    ``WireSum``): ``2 (p-1)`` chunks of ``ceil(n/p)`` 16-bit elements (an Alltoall, then an Allgather)."""
    return 2 * (ranks - 1) * math.ceil(elements / ranks) * WIRE16 if ranks > 1 else 0.0


def wire16_seconds(machine: Machine, elements: int, nodes: Sequence[int]) -> Tuple[float, float]:
    """(the Ialltoall of 16-bit chunks with the fp32 sum of the ``p`` chunks a rank receives, the
    Iallgather of the 16-bit sums) for ``elements`` gradients over ranks on ``nodes``.

    The casts (``comm/wire.py``) are priced too, each a pass over its elements at the machine file's
    ``reduce_seconds_per_byte`` per fp32 byte (the add's rate; a cast is not timed on its own): with the
    Ialltoall the bucket to 16 bits and the ``p`` chunks received to fp32 (``2 p chunk``) and the summed
    chunk to 16 bits (``chunk``); with the Iallgather the bucket back to fp32 (``p chunk``)."""
    p = len(nodes)
    if p <= 1 or elements <= 0:
        return 0.0, 0.0
    chunk = math.ceil(elements / p)
    padded = p * chunk * WIRE16
    alltoall = machine.collective_seconds("alltoall", padded, nodes)
    per_element = machine.reduce_seconds_per_byte * FP32
    add = per_element * (p - 1) * chunk
    casts = per_element * (2 * p * chunk + chunk)
    return alltoall + add + casts, machine.collective_seconds("allgather", padded, nodes) + per_element * p * chunk


def powersgd_split(shapes: Sequence[Tuple[int, ...]], rank: int) -> Tuple[int, int, int]:
    """(elements of P, elements of Q, elements sent uncompressed) of gradients of ``shapes`` under
    PowerSGD of rank ``rank`` (Vogels et al. 2019): a tensor of 2 or more dimensions is a matrix of
    ``n = shape[0]`` rows and ``m`` = the product of the rest, compressed to ``P`` (n x r) and ``Q``
    (m x r), ``r = min(rank, n, m)``, when ``(n + m) r < n m`` (as PyTorch's hook decides); vectors and
    matrices too small to gain are sent whole. Raises ValueError for rank < 1."""
    if rank < 1:
        raise ValueError(f"the PowerSGD rank must be >= 1, got {rank}")
    p_elements = q_elements = whole = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) < 2:
            whole += numel
            continue
        n, m = shape[0], numel // shape[0]
        r = min(rank, n, m)
        if (n + m) * r < n * m:
            p_elements, q_elements = p_elements + n * r, q_elements + m * r
        else:
            whole += numel
    return p_elements, q_elements, whole


def powersgd_bytes(shapes: Sequence[Tuple[int, ...]], rank: int) -> Tuple[float, float]:
    """(fp32 bytes PowerSGD Allreduces per step, bytes the uncompressed Allreduce would): ``(n + m) r``
    against ``n m`` elements per compressed matrix, other tensors whole."""
    p_elements, q_elements, whole = powersgd_split(shapes, rank)
    return FP32 * (p_elements + q_elements + whole), FP32 * sum(math.prod(shape) for shape in shapes)


def powersgd_flops(shapes: Sequence[Tuple[int, ...]], rank: int) -> Tuple[float, float, float]:
    """Floating-point operations per step of PowerSGD's local work on the matrices it compresses
    (``comm/compress.py``), in its three phases: (before the P Allreduce: ``P = M Q``, ``2 n m r``;
    before the Q Allreduce: the Householder QR of P with its Q formed, ``4 n r^2``, and ``Q = M^T P``,
    ``2 n m r``; after it: ``M = P Q^T``, ``2 n m r``). Matrices as :func:`powersgd_split` picks them."""
    first = middle = last = 0.0
    for shape in shapes:
        if len(shape) < 2:
            continue
        numel = math.prod(shape)
        n, m = shape[0], numel // shape[0]
        r = min(rank, n, m)
        if (n + m) * r < n * m:
            first, middle, last = first + 2 * n * m * r, middle + 4 * n * r * r + 2 * n * m * r, last + 2 * n * m * r
    return first, middle, last


def powersgd_seconds(machine: Machine, shapes: Sequence[Tuple[int, ...]],
                     rank: int) -> Tuple[Tuple[float, float, float], str]:
    """(the seconds of :func:`powersgd_flops`' three phases at the machine file's ``matmul_flops``, or
    at :data:`~mpipar.cost.options.ASSUMED_MATMUL_FLOPS` when it has none; the assumption made, or "")."""
    rate = machine.matmul_flops or ASSUMED_MATMUL_FLOPS
    note = "" if machine.matmul_flops else \
        f"PowerSGD products at {ASSUMED_MATMUL_FLOPS / 1e9:g} GFLOP/s (not calibrated)"
    first, middle, last = powersgd_flops(shapes, rank)
    return (first / rate, middle / rate, last / rate), note
