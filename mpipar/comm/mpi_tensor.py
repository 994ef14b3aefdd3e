"""The one boundary between torch tensors and MPI buffers.

Nothing else in mpipar converts tensors for MPI. Three transports:

* ``host``: a contiguous CPU tensor of an MPI-native dtype is handed to MPI as a
  raw buffer at its own address (no copy).
* ``cuda-aware``: a CUDA tensor is handed to MPI as a device buffer (detached, for
  mpi4py's DLPack import); the current CUDA stream is synchronised first (MPI does
  not know torch's streams). Only where :mod:`mpipar.comm.cuda_aware` allows it: a
  CUDA-aware MPI, and a point-to-point call or a blocking collective.
* ``staged``: anything else (CUDA tensors otherwise, non-contiguous tensors,
  fp16/bf16 in reductions) goes through a contiguous host copy, pinned when the
  source is on a GPU; results are copied back. The gradient reducer keeps its own
  per-bucket pinned buffers and copies on a side stream (:mod:`mpipar.comm.staging`).

MPI may be called from a thread other than the main one (autograd runs the backward
of CUDA tensors, and so gradient hooks, on a device thread): that needs an MPI
initialised with ``MPI_THREAD_MULTIPLE`` (mpi4py's default), checked at every call
from another thread; a lower level raises RuntimeError instead of undefined behaviour.

Reductions of float16 and bfloat16 are carried out in float32 (MPI has no
reduction for them); point-to-point transfers and broadcasts of those dtypes move
the raw bytes. Unsupported dtypes raise ``TypeError`` naming the dtype.

Debug mode (``MPIPAR_DEBUG=1``, :mod:`mpipar.diagnostics.debug`) compares each collective's
operation, shape, dtype and sequence number across ranks before MPI sees it, and
sends a small header ahead of each point-to-point message; a stall watchdog
(:mod:`mpipar.diagnostics.watchdog`) records which operation this rank waits in. Both act
through ``debug.hooks``; while both are off every call costs one ``if`` more.

Point-to-point bytes: every ``send`` and ``isend`` adds its bytes to this process's count per
communicator and destination; :func:`take_sent` hands them over as ranks of another communicator
(``MetricsWriter`` stores them at each flush as the run's rank x rank matrix, ``/p2p``).

Whether the MPI is CUDA-aware is decided once by :mod:`mpipar.comm.cuda_aware`
(``MPIX_Query_cuda_support`` from the loaded library; ``MPIPAR_CUDA_AWARE=1``/``0``
overrides it).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from mpi4py import MPI

from mpipar.comm import cuda_aware
from mpipar.diagnostics import debug as _debug

__all__ = [
    "allreduce_",
    "iallreduce_",
    "allgather_",
    "allgather_in_place_",
    "ireduce_scatter_",
    "ialltoall_",
    "iallgather_",
    "bcast_",
    "send",
    "recv_",
    "isend",
    "irecv_",
    "PendingOp",
    "wait_all",
    "mpi_datatype",
    "transport_for",
    "choose_transport",
    "cuda_aware_mpi",
    "check_thread",
    "thread_multiple",
    "take_sent",
]

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
    """True when this MPI takes device buffers (in the calls of ``cuda_aware.DEVICE_BUFFER_CALLS``)."""
    return cuda_aware.cuda_awareness().aware


def transport_for(tensor: torch.Tensor, call: str = "allreduce") -> str:
    """Which transport ``tensor`` takes in the mpi_tensor function named ``call``:
    'host', 'cuda-aware' or 'staged'. Raises TypeError for a dtype MPI cannot carry."""
    mpi_datatype(tensor.dtype)  # raises TypeError early
    aware = tensor.is_cuda and cuda_aware_mpi()
    return choose_transport(tensor.device.type, tensor.is_contiguous(), tensor.dtype in _REDUCE_UPCAST, call, aware)


def choose_transport(device_type: str, contiguous: bool, half: bool, call: str, cuda_aware_mpi: bool) -> str:
    """The rule behind :func:`transport_for`, for a tensor on ``device_type``: device
    buffers go to MPI only from a CUDA-aware MPI and in the calls of
    ``cuda_aware.DEVICE_BUFFER_CALLS``; half-precision reductions, non-contiguous
    tensors and other devices are staged."""
    if (half and call in ("allreduce", "iallreduce", "ireduce_scatter")) or not contiguous:
        return "staged"
    if device_type == "cuda":
        return "cuda-aware" if cuda_aware_mpi and call in cuda_aware.DEVICE_BUFFER_CALLS else "staged"
    return "host" if device_type == "cpu" else "staged"


_thread_multiple: Optional[bool] = None


def thread_multiple() -> bool:
    """Whether MPI was initialised with ``MPI_THREAD_MULTIPLE`` (asked once). Local."""
    global _thread_multiple
    if _thread_multiple is None:
        _thread_multiple = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
    return _thread_multiple


def check_thread() -> None:
    """Raise RuntimeError when MPI is called from a thread other than the main one and
    MPI was not initialised with ``MPI_THREAD_MULTIPLE``. Local."""
    if threading.current_thread() is threading.main_thread():
        return
    if not thread_multiple():
        raise RuntimeError(
            f"mpipar called MPI from thread {threading.current_thread().name!r} (autograd's device thread runs "
            f"the backward of CUDA tensors), but MPI was initialised with a thread level below "
            f"MPI_THREAD_MULTIPLE; leave mpi4py.rc.thread_level at its default 'multiple' (and use an MPI "
            f"that supports it)")


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
    if tensor.is_cuda:  # mpi4py imports it through DLPack, which refuses tensors that require grad
        return [tensor.detach(), tensor.numel(), datatype]
    return [_raw(tensor), tensor.numel(), datatype]


def _prepare(tensor: torch.Tensor, call: str, *, read: bool, write: bool) -> _Work:
    """Make an MPI view of ``tensor`` for the function ``call``; ``read``: MPI reads it,
    ``write``: MPI writes it."""
    check_thread()
    reduce = call in ("allreduce", "iallreduce", "ireduce_scatter")
    path = transport_for(tensor, call)
    if path == "host":
        return _Work(_spec(tensor, raw_bytes=False), lambda: None, [tensor])
    if path == "cuda-aware":
        torch.cuda.current_stream(tensor.device).synchronize()
        return _Work(_spec(tensor, raw_bytes=False), lambda: None, [tensor])
    work_dtype = _REDUCE_UPCAST.get(tensor.dtype, tensor.dtype) if reduce else tensor.dtype
    host = torch.empty(tensor.shape, dtype=work_dtype, device="cpu",
                       pin_memory=tensor.is_cuda)
    if read:
        with torch.no_grad():
            host.copy_(tensor)  # synchronous: MPI reads the host copy next

    def finish() -> None:
        if write:
            with torch.no_grad():
                tensor.copy_(host)

    return _Work(_spec(host, raw_bytes=False), finish, [host, tensor])


class PendingOp:
    """A non-blocking MPI operation on a tensor. ``wait()`` completes it and
    returns the tensor; results are valid only after ``wait()``."""

    def __init__(self, request: MPI.Request, work: _Work, tensor: torch.Tensor,
                 call: Optional[_debug.Call] = None):
        self._request = request
        self._work: Optional[_Work] = work  # None once completed
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
                wait_any([self._request])
            else:
                self._call.wait(self._request)
            self._complete()
        return self.tensor

    def cancel(self) -> None:
        """Cancel a receive not yet matched (one already matched completes) and forget it. Local."""
        if not self._done:
            header = self._call.header if self._call is not None else None  # debug mode: its header's receive
            for request in [self._request] + ([header[0]] if header else []):
                request.Cancel()
                request.Wait()
            self._work = self._call = None
            self._done = True

    def _complete(self) -> None:
        assert self._work is not None  # completed once: _done guards it
        self._work.finish()
        self._work = None
        self._call = None
        self._done = True


SPIN_SECONDS = 1e-3  # then sleep between tests: a long wait leaves the core to ranks that compute
NAP_SECONDS = 1e-4
WAITS = ("nap", "spin")
WAIT = os.environ.get("MPIPAR_WAIT", "nap")
"""How :func:`wait_any` waits, read at every call: ``nap`` (default) or ``spin`` (MPI's own ``Waitany``);
set by ``MPIPAR_WAIT``, for benchmarks (``benchmarks/bench_waits.py`` switches it between rounds)."""


def wait_any(requests, *, spin: Optional[float] = None, nap: Optional[float] = None) -> int:
    """``MPI.Request.Waitany`` that does not spin the whole time: it tests in a tight loop for ``spin``
    seconds (default ``SPIN_SECONDS``: short waits stay fast), then every ``nap`` seconds (default
    ``NAP_SECONDS``; each test also progresses MPI). MPI's own waits spin, which on shared or
    oversubscribed cores takes the CPU from the ranks waited for. With ``WAIT`` (``MPIPAR_WAIT``) ``spin``,
    MPI's ``Waitany`` instead. Returns the completed request's index. Local.

    Raises:
        ValueError: when ``WAIT`` is neither ``nap`` nor ``spin``.
    """
    if WAIT != "nap":
        if WAIT not in WAITS:
            raise ValueError(f"MPIPAR_WAIT={WAIT!r}: expected one of {', '.join(WAITS)}")
        return MPI.Request.Waitany(requests)
    spin = SPIN_SECONDS if spin is None else spin
    nap = NAP_SECONDS if nap is None else nap
    start = time.perf_counter()
    while True:
        index, done = MPI.Request.Testany(requests)
        if done:
            return index
        if time.perf_counter() - start > spin:
            time.sleep(nap)


def wait_all(ops) -> None:
    """Wait for every PendingOp in ``ops``."""
    for op in ops:
        op.wait()


def _reduce_op(op):
    return MPI.SUM if op is None else op


def allreduce_(tensor: torch.Tensor, comm: MPI.Intracomm, op: Optional[MPI.Op] = None) -> torch.Tensor:
    """In-place Allreduce (default SUM). Collective: every rank of ``comm``
    calls it with a tensor of the same shape and dtype. Size 1: no-op."""
    work = _prepare(tensor, "allreduce", read=True, write=True)
    hooks = _debug.hooks
    if hooks is None:
        comm.Allreduce(MPI.IN_PLACE, work.buffer, op=_reduce_op(op))
    else:
        with hooks.collective("allreduce_", tensor, comm, _debug.op_name(op)):
            comm.Allreduce(MPI.IN_PLACE, work.buffer, op=_reduce_op(op))
    work.finish()
    return tensor


def iallreduce_(tensor: torch.Tensor, comm: MPI.Intracomm, op: Optional[MPI.Op] = None, *,
                source: Optional[torch.Tensor] = None) -> PendingOp:
    """Start a non-blocking Allreduce into ``tensor``: in place, or of ``source`` (a host tensor of the
    same shape and dtype holding this rank's contribution; ``tensor`` then only receives, and must be
    a host tensor too). Out of place matters on Open MPI: its non-blocking Allreduce reduces an
    in-place buffer up a binomial tree and broadcasts it down, moving the whole buffer on every
    level, where out of place it takes Rabenseifner's reduce-scatter + allgather (4+ ranks, 64 KiB+).
    Collective: every rank starts the same sequence of these in the same order (in debug mode
    starting one blocks until every rank has started it, to compare them)."""
    if source is None:
        work = _prepare(tensor, "iallreduce", read=True, write=True)
        send: Union[list, MPI.InPlaceType] = MPI.IN_PLACE
    else:
        if tensor.is_cuda or source.is_cuda or source.shape != tensor.shape or source.dtype != tensor.dtype:
            raise ValueError(f"iallreduce_: source must be a host tensor like the host result tensor, got "
                             f"{source.dtype} {tuple(source.shape)} on {source.device} for {tensor.dtype} "
                             f"{tuple(tensor.shape)} on {tensor.device}")
        contribution = _prepare(source, "iallreduce", read=True, write=False)
        work = _prepare(tensor, "iallreduce", read=False, write=True)
        work.keep_alive.append(contribution)
        send = contribution.buffer
    hooks = _debug.hooks
    call = None if hooks is None else hooks.collective("iallreduce_", tensor, comm, _debug.op_name(op))
    request = comm.Iallreduce(send, work.buffer, op=_reduce_op(op))
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
    work = _prepare(tensor, "allgather", read=True, write=False)
    into = _prepare(output, "allgather", read=False, write=True)
    into.buffer[1] = work.buffer[1]  # the receive count is per rank
    hooks = _debug.hooks
    if hooks is None:
        comm.Allgather(work.buffer, into.buffer)
    else:
        with hooks.collective("allgather_", tensor, comm, ""):
            comm.Allgather(work.buffer, into.buffer)
    into.finish()
    return output


def allgather_in_place_(buffer: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    """Allgather in place: ``buffer`` (flat, ``size`` equal parts) holds this rank's contribution at
    part ``rank`` and receives every other rank's part (``MPI_IN_PLACE``). Collective: every rank
    calls it with a buffer of the same size and dtype. Size 1: nothing moves.

    Raises:
        ValueError: when the communicator's size does not divide ``buffer``'s elements.
    """
    size = comm.Get_size()
    if buffer.numel() % size:
        raise ValueError(f"allgather_in_place_: {size} ranks do not divide the buffer's {buffer.numel()} elements")
    work = _prepare(buffer, "allgather", read=True, write=True)
    spec = [work.buffer[0], work.buffer[1] // size, work.buffer[2]]  # the count per rank (bytes for fp16)
    hooks = _debug.hooks
    if hooks is None:
        comm.Allgather(MPI.IN_PLACE, spec)
    else:
        with hooks.collective("allgather_in_place_", buffer, comm, ""):
            comm.Allgather(MPI.IN_PLACE, spec)
    work.finish()
    return buffer


def ireduce_scatter_(output: torch.Tensor, tensor: torch.Tensor, counts, comm: MPI.Intracomm) -> PendingOp:
    """Start a non-blocking sum of ``tensor`` over the ranks, scattered: rank r's ``output`` (``counts[r]``
    elements) receives elements ``sum(counts[:r]) .. sum(counts[:r + 1])`` of the sum (MPI's
    ``Ireduce_scatter``; ``tensor`` holds ``sum(counts)`` elements and is only read).

    Collective: every rank starts the same sequence of these in the same order with the same ``counts``.
    Size 1: ``output`` receives ``tensor``.

    Raises:
        ValueError: when the sizes do not match ``counts`` (before MPI is called).
    """
    counts = [int(count) for count in counts]
    if (len(counts) != comm.Get_size() or tensor.numel() != sum(counts) or output.dtype != tensor.dtype
            or output.numel() != counts[comm.Get_rank()]):
        raise ValueError(f"ireduce_scatter_: counts {counts} must be one per rank, summing to the tensor's "
                         f"{tensor.numel()} elements, this rank's count the output's {output.numel()} (dtype "
                         f"{output.dtype}, tensor {tensor.dtype})")
    work = _prepare(tensor, "ireduce_scatter", read=True, write=False)
    into = _prepare(output, "ireduce_scatter", read=False, write=True)
    into.keep_alive.append(work)
    hooks = _debug.hooks
    call = None if hooks is None else hooks.collective("ireduce_scatter_", tensor, comm, f"counts {counts}")
    request = comm.Ireduce_scatter([work.buffer[0], work.buffer[2]], [into.buffer[0], into.buffer[2]],
                                   counts, op=MPI.SUM)
    return PendingOp(request, into, output, call)


def _check_blocks(name: str, output: torch.Tensor, tensor: torch.Tensor, size: int, block: int) -> None:
    if output.dtype != tensor.dtype or output.numel() != size * block:
        raise ValueError(f"{name}: output must hold {size} blocks of {block} elements of {tensor.dtype} "
                         f"(communicator size x block), got {output.numel()} of {output.dtype}")


def ialltoall_(output: torch.Tensor, tensor: torch.Tensor, comm: MPI.Intracomm) -> PendingOp:
    """Start a non-blocking Alltoall: ``tensor`` (read flat) is ``size`` equal blocks, block r goes to rank
    r, and ``output``'s block k receives rank k's block for this rank. Moves raw elements (16-bit floats
    too); nothing is reduced. Collective: every rank starts the same sequence of non-blocking collectives
    in the same order, with the same sizes. Size 1: ``output`` receives ``tensor``.

    Raises:
        ValueError: when the sizes are not ``size`` equal blocks (before MPI is called).
    """
    size = comm.Get_size()
    if tensor.numel() % size:
        raise ValueError(f"ialltoall_: the tensor's {tensor.numel()} elements are not {size} equal blocks")
    _check_blocks("ialltoall_", output, tensor, size, tensor.numel() // size)
    work = _prepare(tensor, "ialltoall", read=True, write=False)
    into = _prepare(output, "ialltoall", read=False, write=True)
    into.keep_alive.append(work)
    work.buffer[1] //= size  # counts are per rank
    into.buffer[1] //= size
    hooks = _debug.hooks
    call = None if hooks is None else hooks.collective("ialltoall_", tensor, comm, "")
    request = comm.Ialltoall(work.buffer, into.buffer)
    return PendingOp(request, into, output, call)


def iallgather_(output: torch.Tensor, tensor: torch.Tensor, comm: MPI.Intracomm) -> PendingOp:
    """Start a non-blocking Allgather: ``output`` (read flat) receives rank 0's ``tensor``, then rank 1's,
    ... (raw elements, 16-bit floats too). Collective, as :func:`ialltoall_`. Size 1: a copy.

    Raises:
        ValueError: when ``output`` does not hold ``size * tensor.numel()`` elements of its dtype.
    """
    _check_blocks("iallgather_", output, tensor, comm.Get_size(), tensor.numel())
    work = _prepare(tensor, "iallgather", read=True, write=False)
    into = _prepare(output, "iallgather", read=False, write=True)
    into.keep_alive.append(work)
    into.buffer[1] = work.buffer[1]  # the receive count is per rank
    hooks = _debug.hooks
    call = None if hooks is None else hooks.collective("iallgather_", tensor, comm, "")
    request = comm.Iallgather(work.buffer, into.buffer)
    return PendingOp(request, into, output, call)


def bcast_(tensor: torch.Tensor, comm: MPI.Intracomm, root: int = 0) -> torch.Tensor:
    """In-place broadcast from ``root``. Collective: same shape and dtype on every rank."""
    is_root = comm.Get_rank() == root
    work = _prepare(tensor, "bcast", read=is_root, write=not is_root)
    hooks = _debug.hooks
    if hooks is None:
        comm.Bcast(work.buffer, root=root)
    else:
        with hooks.collective("bcast_", tensor, comm, f"root {root}"):
            comm.Bcast(work.buffer, root=root)
    work.finish()
    return tensor


_sent: Dict[int, Tuple[MPI.Comm, MPI.Group, Dict[int, int]]] = {}
"""Bytes sent since the last :func:`take_sent`, keyed by the communicator object's ``id``: (the object,
kept so that its id is not reused while counted; its group, taken at the first send; dest -> bytes).
Not keyed by handle: a freed communicator's handle is reused by the next one, and translating a new
communicator's destinations with an old, smaller group reads past its end (a crash in Open MPI)."""


def _count_sent(comm: MPI.Intracomm, dest: int, nbytes: int) -> None:
    counted = _sent.get(id(comm))
    if counted is None:
        counted = _sent[id(comm)] = (comm, comm.Get_group(), {})
    counted[2][dest] = counted[2].get(dest, 0) + nbytes


def take_sent(comm: MPI.Intracomm) -> Dict[int, int]:
    """Bytes this process sent with :func:`send` and :func:`isend` since the last call (on any
    communicator, freed ones included), by destination as a rank of ``comm``; destinations
    outside ``comm`` are left out. Resets the counts. Local."""
    target = comm.Get_group()
    totals: Dict[int, int] = {}
    try:
        for _, group, by_dest in _sent.values():
            dests = [dest for dest in by_dest if 0 <= dest < group.Get_size()]
            for dest, rank in zip(dests, MPI.Group.Translate_ranks(group, dests, target)):
                if rank != MPI.UNDEFINED:
                    totals[rank] = totals.get(rank, 0) + by_dest[dest]
            group.Free()
    finally:
        _sent.clear()
        target.Free()
    return totals


def send(tensor: torch.Tensor, comm: MPI.Intracomm, dest: int, tag: int = 0) -> None:
    """Blocking send; the receiver calls ``recv_`` with the same shape and dtype."""
    work = _prepare(tensor, "send", read=True, write=False)
    _count_sent(comm, dest, tensor.numel() * tensor.element_size())
    hooks = _debug.hooks
    if hooks is None:
        comm.Send(work.buffer, dest=dest, tag=tag)
    else:
        hooks.send(tensor, comm, dest, tag).run(lambda status: comm.Send(work.buffer, dest=dest, tag=tag))


def recv_(tensor: torch.Tensor, comm: MPI.Intracomm, source: int, tag: int = 0) -> torch.Tensor:
    """Blocking receive into ``tensor`` (its shape and dtype must match the sender's;
    in debug mode a mismatch raises ``debug.MismatchError`` naming both)."""
    work = _prepare(tensor, "recv", read=False, write=True)
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
    work = _prepare(tensor, "isend", read=True, write=False)
    _count_sent(comm, dest, tensor.numel() * tensor.element_size())
    hooks = _debug.hooks
    call = None if hooks is None else hooks.send(tensor, comm, dest, tag)
    return PendingOp(comm.Isend(work.buffer, dest=dest, tag=tag), work, tensor, call)


def irecv_(tensor: torch.Tensor, comm: MPI.Intracomm, source: int, tag: int = 0, *, detail: str = "") -> PendingOp:
    """Non-blocking receive into ``tensor``; its contents are valid after ``wait()``. ``detail``: what the
    message is, for a watchdog's report of a rank waiting in it."""
    work = _prepare(tensor, "irecv", read=False, write=True)
    hooks = _debug.hooks
    call = None if hooks is None else hooks.recv(tensor, comm, source, tag, detail=detail)
    return PendingOp(comm.Irecv(work.buffer, source=source, tag=tag), work, tensor, call)
