"""A sum over ranks that sends 16-bit values and adds in fp32: half the bytes of an fp32 Allreduce."""

from __future__ import annotations

from typing import Optional

import torch
from mpi4py import MPI

from mpipar.comm import mpi_tensor

__all__ = ["GRAD_WIRES", "wire_dtype", "WireSum", "WireReduceScatter"]

GRAD_WIRES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--grad-wire`` names -> the dtype gradients travel in (None: their own, reduced by Allreduce)."""


def wire_dtype(name: str) -> Optional[torch.dtype]:
    """The dtype of a ``--grad-wire`` name. Pure. Raises ValueError naming the choices."""
    try:
        return GRAD_WIRES[name]
    except KeyError:
        raise ValueError(f"--grad-wire must be one of {', '.join(GRAD_WIRES)}, got {name!r}") from None


class WireSum:
    """The sum over ``comm`` of a flat host tensor, sent as ``wire`` (bf16 or fp16), added in fp32 or wider.

    A reduce-scatter made of an Ialltoall of 16-bit chunks (the tensor padded to ``size`` equal
    chunks) and a local sum of this rank's chunk in ``promote(dtype, float32)``, in rank order;
    then an Iallgather of the 16-bit chunk sums. So the result is, element by element,
    ``round16(sum_k round16(x_k))``: it differs from the exact sum only by rounding the inputs and
    the output to 16 bits. Each rank sends ``2 (size-1) chunk`` 16-bit elements, half an fp32 ring
    Allreduce's bytes. Buffers are allocated once.

    Use: :meth:`start`, then :meth:`test` (progresses the Alltoall; adds locally once it has
    arrived), :meth:`gather` (starts the Allgather), :meth:`wait` (``tensor`` holds the sum).

    Collective contract: :meth:`start` and :meth:`gather` each start a non-blocking collective on
    ``comm``; every rank starts them, and its other collectives on ``comm``, in the same order,
    with tensors of the same size. Size 1 works (nothing leaves the rank; the result is rounded).

    Args:
        tensor: a contiguous host floating-point tensor: this rank's contribution, then the sum.
        comm: the group to sum over.
        wire: ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, tensor: torch.Tensor, comm: MPI.Intracomm, wire: torch.dtype):
        if wire not in (torch.bfloat16, torch.float16):
            raise ValueError(f"a 16-bit wire is bfloat16 or float16, got {wire}")
        if tensor.is_cuda or not tensor.is_contiguous() or not tensor.is_floating_point():
            raise ValueError(f"WireSum sums a contiguous host floating-point tensor, got {tensor.dtype} on "
                             f"{tensor.device}")
        self.tensor, self.comm, self.size = tensor, comm, comm.Get_size()
        self.chunk = -(-tensor.numel() // self.size)
        self.outgoing = torch.zeros(self.size * self.chunk, dtype=wire)  # then the gathered sums
        self.incoming = torch.empty(self.size * self.chunk, dtype=wire)
        self.partial = torch.empty(self.chunk, dtype=wire)
        self.sum_dtype = torch.promote_types(tensor.dtype, torch.float32)
        self.bytes_per_sum = 2.0 * (self.size - 1) * self.chunk * self.outgoing.element_size()
        self._scatter: Optional[mpi_tensor.PendingOp] = None
        self._gather: Optional[mpi_tensor.PendingOp] = None
        self._summed = self._done = True

    def start(self) -> None:
        """Round this rank's ``tensor`` to 16 bits and start the Ialltoall. Collective (non-blocking)."""
        self.outgoing[:self.tensor.numel()].copy_(self.tensor.view(-1))  # the padding stays zero
        self._summed = self._done = False
        self._gather = None
        self._scatter = mpi_tensor.ialltoall_(self.incoming, self.outgoing, self.comm)

    def _sum_own_chunk(self) -> None:
        if not self._summed:
            assert self._scatter is not None  # posted by start()
            self._scatter.wait()
            self.partial.copy_(_sum_chunks(self.incoming, self.size, self.chunk, self.sum_dtype))
            self._summed = True

    def test(self) -> bool:
        """Progress; True once the sum is in ``tensor``. Local."""
        if self._done:
            return True
        if self._gather is None:
            assert self._scatter is not None  # not done: start() posted it
            if self._scatter.test():
                self._sum_own_chunk()
            return False
        if self._gather.test():
            self._complete()
        return self._done

    def gather(self) -> None:
        """Wait for the Ialltoall, add this rank's chunk and start the Iallgather of the sums (once per
        :meth:`start`). Collective (non-blocking)."""
        if self._gather is None and not self._done:
            self._sum_own_chunk()
            self._gather = mpi_tensor.iallgather_(self.outgoing, self.partial, self.comm)

    def wait(self) -> torch.Tensor:
        """Complete both collectives (starting the gather if :meth:`gather` was not called); returns ``tensor``."""
        if not self._done:
            self.gather()
            assert self._gather is not None  # posted by gather()
            self._gather.wait()
            self._complete()
        return self.tensor

    def _complete(self) -> None:
        self.tensor.view(-1).copy_(self.outgoing[:self.tensor.numel()])
        self._done = True


def _sum_chunks(incoming: torch.Tensor, size: int, chunk: int, dtype: torch.dtype, count: int = -1) -> torch.Tensor:
    """The Ialltoall's ``size`` received 16-bit chunks (each ``chunk`` long; the first ``count``
    elements of each, all by default) added in ``dtype``, in rank order. Local."""
    return incoming.view(size, chunk)[:, :chunk if count < 0 else count].to(dtype).sum(dim=0)


class WireReduceScatter:
    """A reduce-scatter that sends 16-bit values: :class:`WireSum`'s first half, started at construction.

    ``tensor`` (a flat host floating-point tensor, this rank's contribution) is rounded to ``wire`` and
    cut into ``size`` equal chunks (padded with zeros), chunk r sent to rank r by an Ialltoall; rank r's
    ``output`` (at most a chunk's elements: the first ones of its chunk) receives
    ``sum_k round16(x_k)`` added in ``promote(output.dtype, float32)``, in rank order: it differs from the
    exact sum only by rounding the inputs (not the result, which stays in ``output``'s dtype). Each rank
    sends ``(size-1) chunk`` 16-bit elements, half of an fp32 reduce-scatter's bytes. Its buffers are
    allocated here and dropped on completion (ZeRO-3 starts one per unit and step; ``tensor`` may be
    freed once it is built).

    Use: :meth:`test` (progress; True once ``output`` holds the sum) or :meth:`wait`, as a
    :class:`~mpipar.comm.mpi_tensor.PendingOp`.

    Collective contract: the construction starts one non-blocking collective on ``comm``; every rank
    builds these, and starts its other collectives on ``comm``, in the same order, with tensors of the
    same size. Size 1 works (the result is the rounded input).
    """

    def __init__(self, output: torch.Tensor, tensor: torch.Tensor, comm: MPI.Intracomm, wire: torch.dtype):
        if wire not in (torch.bfloat16, torch.float16):
            raise ValueError(f"a 16-bit wire is bfloat16 or float16, got {wire}")
        if tensor.is_cuda or output.is_cuda or not tensor.is_floating_point():
            raise ValueError(f"WireReduceScatter sums a host floating-point tensor, got {tensor.dtype} on "
                             f"{tensor.device}")
        self.size = comm.Get_size()
        self.chunk = -(-tensor.numel() // self.size)
        if output.numel() > self.chunk:
            raise ValueError(f"WireReduceScatter: the output's {output.numel()} elements exceed a chunk of "
                             f"{self.chunk} (the tensor's {tensor.numel()} in {self.size} equal chunks)")
        self.output = output
        outgoing = torch.zeros(self.size * self.chunk, dtype=wire)  # the padding stays zero
        outgoing[:tensor.numel()].copy_(tensor.reshape(-1))
        self.incoming: Optional[torch.Tensor] = torch.empty(self.size * self.chunk, dtype=wire)
        self.bytes_sent = float((self.size - 1) * self.chunk * outgoing.element_size())
        self._scatter: Optional[mpi_tensor.PendingOp] = mpi_tensor.ialltoall_(self.incoming, outgoing, comm)

    def test(self) -> bool:
        """Progress; True once the sum is in ``output``. Local."""
        if self._scatter is not None and self._scatter.test():
            self._complete()
        return self._scatter is None

    def wait(self) -> torch.Tensor:
        """Complete the Ialltoall and add; returns ``output``."""
        if self._scatter is not None:
            self._scatter.wait()
            self._complete()
        return self.output

    def _complete(self) -> None:
        assert self.incoming is not None  # completed once: _scatter guards it
        dtype = torch.promote_types(self.output.dtype, torch.float32)
        self.output.copy_(_sum_chunks(self.incoming, self.size, self.chunk, dtype, self.output.numel()))
        self._scatter = self.incoming = None
