"""The one boundary between torch tensors and MPI buffers.

Nothing else in mpipar converts tensors for MPI. Three transports:

* ``host``: a contiguous CPU tensor of an MPI-native dtype is handed to MPI as a
  raw buffer at its own address (no copy).
* ``cuda-aware``: a CUDA tensor is handed to MPI as a device buffer; the current
  CUDA stream is synchronised first (MPI does not know torch's streams).
* ``staged``: anything else (CUDA tensors with an MPI that is not CUDA-aware,
  non-contiguous tensors, fp16/bf16 in reductions) goes through a contiguous host
  copy, pinned when the source is on a GPU; results are copied back.

Reductions of float16 and bfloat16 are carried out in float32 (MPI has no
reduction for them); point-to-point transfers and broadcasts of those dtypes move
the raw bytes. Unsupported dtypes raise ``TypeError`` naming the dtype.

Debug mode (``MPIPAR_DEBUG=1``, :mod:`mpipar.diagnostics.debug`) compares each collective's
operation, shape, dtype and sequence number across ranks before MPI sees it, and
sends a small header ahead of each point-to-point message; a stall watchdog
(:mod:`mpipar.diagnostics.watchdog`) records which operation this rank waits in. Both act
through ``debug.hooks``; while both are off every call costs one ``if`` more.

Whether the MPI is CUDA-aware is probed once (``MPIX_Query_cuda_support`` through
mpi4py where available) and can be forced with the environment variable
``MPIPAR_CUDA_AWARE=1`` or ``0``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from mpi4py import MPI

from mpipar.diagnostics import debug as _debug

__all__ = [
    "allreduce_",
    "iallreduce_",
    "allgather_",
    "bcast_",
    "send",
    "recv_",
    "isend",
    "irecv_",
    "PendingOp",
    "wait_all",
    "mpi_datatype",
    "transport_for",
    "cuda_aware_mpi",
]

log = logging.getLogger("mpipar.comm.mpi_tensor")

_MPI_DATATYPES = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.complex64: MPI.C_FLOAT_COMPLEX,
    torch.complex128: MPI.C_DOUBLE_COMPLEX,
    torch.int8: MPI.INT8_T,
    torch.uint8: MPI.UINT8_T,
    torch.int16: MPI.INT16_T,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.bool: MPI.C_BOOL,
}
# dtypes MPI can move as bytes but cannot reduce: reductions run in float32.
_REDUCE_UPCAST = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

_cuda_aware: Optional[bool] = None


def mpi_datatype(dtype: torch.dtype) -> MPI.Datatype:
    """The MPI datatype for a torch dtype. Raises TypeError for unsupported ones."""
    try:
        return _MPI_DATATYPES[dtype]
    except KeyError:
        if dtype in _REDUCE_UPCAST:
            return MPI.BYTE
        raise TypeError(
            f"mpipar cannot send tensors of dtype {dtype} over MPI; "
            f"supported: {sorted(str(d) for d in [*_MPI_DATATYPES, *_REDUCE_UPCAST])}"
        ) from None


def cuda_aware_mpi() -> bool:
    """True when device buffers may be handed to MPI directly.

    ``MPIPAR_CUDA_AWARE`` (``1``/``0``) overrides the probe. The answer is
    cached for the life of the process and the path taken is logged once.
    """
    global _cuda_aware
    if _cuda_aware is None:
        forced = os.environ.get("MPIPAR_CUDA_AWARE", "").strip().lower()
        if forced in ("1", "true", "yes", "on"):
            _cuda_aware, why = True, "MPIPAR_CUDA_AWARE=1"
        elif forced in ("0", "false", "no", "off"):
            _cuda_aware, why = False, "MPIPAR_CUDA_AWARE=0"
        else:
            query = getattr(MPI, "Query_cuda_support", None)
            if query is None:
                _cuda_aware, why = False, "this MPI cannot report CUDA support"
            else:
                _cuda_aware = bool(query())
                why = "MPIX_Query_cuda_support()"
        path = "CUDA-aware (device buffers to MPI)" if _cuda_aware else "staged via pinned host memory"
        log.info("GPU tensors: %s [%s]", path, why)
    return _cuda_aware


def transport_for(tensor: torch.Tensor, reduce: bool = False) -> str:
    """Which transport a tensor takes: 'host', 'cuda-aware' or 'staged'."""
    mpi_datatype(tensor.dtype)  # raises TypeError early
    if reduce and tensor.dtype in _REDUCE_UPCAST:
        return "staged"
    if not tensor.is_contiguous():
        return "staged"
    if tensor.is_cuda:
        return "cuda-aware" if cuda_aware_mpi() else "staged"
    if tensor.device.type != "cpu":
        return "staged"
    return "host"


@dataclass
class _Work:
    """A tensor as MPI will see it, and how to put results back."""

    buffer: list  # [buffer, count, datatype]
    finish: Callable[[], None]
    keep_alive: list = field(default_factory=list)


def _raw(tensor: torch.Tensor) -> MPI.buffer:
    nbytes = tensor.numel() * tensor.element_size()
    return MPI.buffer.fromaddress(tensor.data_ptr() if nbytes else 0, nbytes)


def _spec(tensor: torch.Tensor, raw_bytes: bool) -> list:
    if raw_bytes or tensor.dtype in _REDUCE_UPCAST:
        return [_raw(tensor), tensor.numel() * tensor.element_size(), MPI.BYTE]
    datatype = mpi_datatype(tensor.dtype)
    if tensor.is_cuda:
        return [tensor, tensor.numel(), datatype]  # mpi4py reads __cuda_array_interface__
    return [_raw(tensor), tensor.numel(), datatype]


def _prepare(tensor: torch.Tensor, *, reduce: bool, read: bool, write: bool) -> _Work:
    """Make an MPI view of ``tensor``; ``read``: MPI reads it, ``write``: MPI writes it."""
    path = transport_for(tensor, reduce=reduce)
    if path == "host":
        return _Work(_spec(tensor, raw_bytes=False), lambda: None, [tensor])
    if path == "cuda-aware":
        torch.cuda.current_stream(tensor.device).synchronize()
        return _Work(_spec(tensor, raw_bytes=False), lambda: None, [tensor])
    work_dtype = _REDUCE_UPCAST.get(tensor.dtype, tensor.dtype) if reduce else tensor.dtype
    host = torch.empty(tensor.shape, dtype=work_dtype, device="cpu",
                       pin_memory=tensor.is_cuda)
    if read:
        host.copy_(tensor)

    def finish() -> None:
        if write:
            tensor.copy_(host)

    return _Work(_spec(host, raw_bytes=False), finish, [host, tensor])


class PendingOp:
    """A non-blocking MPI operation on a tensor. ``wait()`` completes it and
    returns the tensor; results are valid only after ``wait()``."""

    def __init__(self, request: MPI.Request, work: _Work, tensor: torch.Tensor,
                 call: Optional[_debug.Call] = None):
        self._request = request
        self._work = work
        self.tensor = tensor
        self._done = False
        self._call = call  # set while debug mode or a watchdog is on

    def test(self) -> bool:
        """Progress the operation; True once it has completed (and results are in place)."""
        if not self._done:
            done = self._request.Test() if self._call is None else self._call.test(self._request)
            if done:
                self._complete()
        return self._done

    def wait(self) -> torch.Tensor:
        if not self._done:
            if self._call is None:
                self._request.Wait()
            else:
                self._call.wait(self._request)
            self._complete()
        return self.tensor

    def _complete(self) -> None:
        self._work.finish()
        self._work = None
        self._call = None
        self._done = True


def wait_all(ops) -> None:
    """Wait for every PendingOp in ``ops``."""
    for op in ops:
        op.wait()


def _reduce_op(op):
    return MPI.SUM if op is None else op


def allreduce_(tensor: torch.Tensor, comm: MPI.Intracomm, op: MPI.Op = None) -> torch.Tensor:
    """In-place Allreduce (default SUM). Collective: every rank of ``comm``
    calls it with a tensor of the same shape and dtype. Size 1: no-op."""
    work = _prepare(tensor, reduce=True, read=True, write=True)
    hooks = _debug.hooks
    if hooks is None:
        comm.Allreduce(MPI.IN_PLACE, work.buffer, op=_reduce_op(op))
    else:
        with hooks.collective("allreduce_", tensor, comm, _debug.op_name(op)):
            comm.Allreduce(MPI.IN_PLACE, work.buffer, op=_reduce_op(op))
    work.finish()
    return tensor


def iallreduce_(tensor: torch.Tensor, comm: MPI.Intracomm, op: MPI.Op = None) -> PendingOp:
    """Start an in-place non-blocking Allreduce. Collective: every rank starts the
    same sequence of these in the same order (in debug mode starting one blocks
    until every rank has started it, to compare them)."""
    work = _prepare(tensor, reduce=True, read=True, write=True)
    hooks = _debug.hooks
    call = None if hooks is None else hooks.collective("iallreduce_", tensor, comm, _debug.op_name(op))
    request = comm.Iallreduce(MPI.IN_PLACE, work.buffer, op=_reduce_op(op))
    return PendingOp(request, work, tensor, call)


def allgather_(output: torch.Tensor, tensor: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Allgather of equal-size tensors into ``output``: read flat (row-major), ``output``
    holds rank 0's ``tensor``, then rank 1's, ... (e.g. shape ``(size, *tensor.shape)``).

    Collective: every rank of ``comm`` calls it with a ``tensor`` of the same shape and
    dtype. Size 1: ``output`` becomes a copy of ``tensor``.

    Raises:
        ValueError: when ``output`` does not hold ``size * tensor.numel()`` elements of
            ``tensor``'s dtype (raised before MPI is called).
    """
    size = comm.Get_size()
    if output.dtype != tensor.dtype or output.numel() != size * tensor.numel():
        raise ValueError(
            f"allgather_: output must hold {size} x {tensor.numel()} elements of {tensor.dtype} "
            f"(communicator size x tensor), got {output.numel()} of {output.dtype}")
    work = _prepare(tensor, reduce=False, read=True, write=False)
    into = _prepare(output, reduce=False, read=False, write=True)
    into.buffer[1] = work.buffer[1]  # the receive count is per rank
    hooks = _debug.hooks
    if hooks is None:
        comm.Allgather(work.buffer, into.buffer)
    else:
        with hooks.collective("allgather_", tensor, comm, ""):
            comm.Allgather(work.buffer, into.buffer)
    into.finish()
    return output


def bcast_(tensor: torch.Tensor, comm: MPI.Intracomm, root: int = 0) -> torch.Tensor:
    """In-place broadcast from ``root``. Collective: same shape and dtype on every rank."""
    is_root = comm.Get_rank() == root
    work = _prepare(tensor, reduce=False, read=is_root, write=not is_root)
    hooks = _debug.hooks
    if hooks is None:
        comm.Bcast(work.buffer, root=root)
    else:
        with hooks.collective("bcast_", tensor, comm, f"root {root}"):
            comm.Bcast(work.buffer, root=root)
    work.finish()
    return tensor


def send(tensor: torch.Tensor, comm: MPI.Intracomm, dest: int, tag: int = 0) -> None:
    """Blocking send; the receiver calls ``recv_`` with the same shape and dtype."""
    work = _prepare(tensor, reduce=False, read=True, write=False)
    hooks = _debug.hooks
    if hooks is None:
        comm.Send(work.buffer, dest=dest, tag=tag)
    else:
        hooks.send(tensor, comm, dest, tag).run(lambda status: comm.Send(work.buffer, dest=dest, tag=tag))


def recv_(tensor: torch.Tensor, comm: MPI.Intracomm, source: int, tag: int = 0) -> torch.Tensor:
    """Blocking receive into ``tensor`` (its shape and dtype must match the sender's;
    in debug mode a mismatch raises ``debug.MismatchError`` naming both)."""
    work = _prepare(tensor, reduce=False, read=False, write=True)
    hooks = _debug.hooks
    if hooks is None:
        comm.Recv(work.buffer, source=source, tag=tag)
    else:
        hooks.recv(tensor, comm, source, tag).run(
            lambda status: comm.Recv(work.buffer, source=source, tag=tag, status=status))
    work.finish()
    return tensor


def isend(tensor: torch.Tensor, comm: MPI.Intracomm, dest: int, tag: int = 0) -> PendingOp:
    """Non-blocking send; do not modify ``tensor`` before ``wait()``."""
    work = _prepare(tensor, reduce=False, read=True, write=False)
    hooks = _debug.hooks
    call = None if hooks is None else hooks.send(tensor, comm, dest, tag)
    return PendingOp(comm.Isend(work.buffer, dest=dest, tag=tag), work, tensor, call)


def irecv_(tensor: torch.Tensor, comm: MPI.Intracomm, source: int, tag: int = 0) -> PendingOp:
    """Non-blocking receive into ``tensor``; its contents are valid after ``wait()``."""
    work = _prepare(tensor, reduce=False, read=False, write=True)
    hooks = _debug.hooks
    call = None if hooks is None else hooks.recv(tensor, comm, source, tag)
    return PendingOp(comm.Irecv(work.buffer, source=source, tag=tag), work, tensor, call)
