"""Debug mode and the hooks mpi_tensor calls around each MPI operation while it or a watchdog is on."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Optional, Tuple

import numpy as np
import torch
from mpi4py import MPI

from mpipar.diagnostics.failure import agreed

__all__ = ["MismatchError", "enabled", "set_enabled", "attach_activity", "hooks", "Hooks", "Call", "op_name",
           "comm_members", "watched", "ENV_DEBUG"]

ENV_DEBUG = "MPIPAR_DEBUG"

# Every dtype mpi_tensor can move; a header carries the index (append only: stable codes).
_DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16]
_MAX_DIMS = 8
_MAGIC = 0x6D706970  # "mpip": tells a debug header from a payload sent without one
_HEADER_LENGTH = 4 + _MAX_DIMS  # magic, seq, dtype code, ndim, dims
_OPS = [(MPI.SUM, "SUM"), (MPI.PROD, "PROD"), (MPI.MAX, "MAX"), (MPI.MIN, "MIN"), (MPI.LAND, "LAND"),
        (MPI.LOR, "LOR"), (MPI.BAND, "BAND"), (MPI.BOR, "BOR")]
_KEYVAL = MPI.Comm.Create_keyval()  # per-communicator counters live and die with the communicator


class MismatchError(RuntimeError):
    """Ranks disagree on an MPI operation (caught by debug mode before MPI sees it).

    For a collective it is raised on every rank of the communicator as
    ``agreed(MismatchError)`` (an AgreedError: printed once); for a Send/Recv pair
    it is raised on the receiver only, and the failure handler aborts the job.
    """


class Hooks:
    """What mpi_tensor calls around MPI operations: debug checks and the activity record.

    One per process (``hooks``); ``None`` while debug mode is off and no watchdog
    runs, so an uninstrumented call costs one ``if``.
    """

    def __init__(self) -> None:
        self.check = False
        self.activity: Any = None  # duck-typed: enter(call), leave(call), started(call)

    def collective(self, name: str, tensor: torch.Tensor, comm: MPI.Intracomm, detail: str) -> Call:
        """Number a collective on ``comm`` and, in debug mode, compare it across ranks.

        Collective over ``comm`` in debug mode (one allgather of a small tuple);
        local otherwise. Raises MismatchError on every rank when the fingerprints
        (name, shape, dtype, detail, sequence number) differ.
        """
        state = _comm_state(comm)
        state.collectives += 1
        call = Call(self, name, comm, state.collectives, detail=detail)
        if self.activity is not None:
            self.activity.started(call)
        if self.check:
            with call:  # a rank that has not arrived keeps the others here
                _check_collective(comm, (name, tuple(tensor.shape), _dtype_name(tensor.dtype), detail,
                                         call.seq))
        return call

    def send(self, tensor: torch.Tensor, comm: MPI.Intracomm, dest: int, tag: int) -> Call:
        """Number a send to ``dest``; in debug mode start the header (non-blocking) first."""
        state = _comm_state(comm)
        seq = state.count(("send", dest))
        call = Call(self, "send", comm, seq, peer=dest, tag=tag)
        if self.check:
            header = _encode_header(seq, tensor)
            call.header = [comm.Isend(header, dest=dest, tag=_header_tag(comm, tag, state)), header]
        return call

    def recv(self, tensor: torch.Tensor, comm: MPI.Intracomm, source: int, tag: int, detail: str = "") -> Call:
        """Number a receive from ``source``; in debug mode post the header receive first
        (for a wildcard source or tag, the header is read once the payload has arrived)."""
        state = _comm_state(comm)
        call = Call(self, "recv", comm, 0, peer=source, tag=tag, detail=detail)
        call.expected = tensor
        wildcard = source == MPI.ANY_SOURCE or tag == MPI.ANY_TAG
        if not wildcard:
            call.seq = state.count(("recv", source))
        if not self.check:
            return call
        if wildcard:
            call.late_header = True
        else:
            header = np.zeros(_HEADER_LENGTH, dtype=np.int64)
            call.header = [comm.Irecv(header, source=source, tag=_header_tag(comm, tag, state)), header]
        return call


class Call:
    """One instrumented MPI operation: what the watchdog sees while this rank waits in it,
    and for a Send/Recv in debug mode the header sent along or still to be checked."""

    def __init__(self, hooks: Hooks, name: str, comm: MPI.Intracomm, seq: int, *,
                 peer: Optional[int] = None, tag: Optional[int] = None, detail: str = ""):
        self.hooks, self.name, self.comm, self.seq = hooks, name, comm, seq
        self.peer, self.tag = peer, tag
        self.detail = detail if tag is None else ", ".join(filter(None, [detail, f"tag {tag}"]))
        self.header: Optional[list] = None  # [request, buffer] of a header in flight (debug mode)
        self.expected: Optional[torch.Tensor] = None  # a receive's own buffer
        self.late_header = False  # wildcard receive: read the header once the payload is in

    def describe(self) -> str:
        peer = "" if self.peer is None else f" {'to' if self.name == 'send' else 'from'} rank {self.peer}"
        seq = f" #{self.seq}" if self.seq else ""
        return f"{self.name}{peer}{seq}" + (f" ({self.detail})" if self.detail else "")

    def __enter__(self) -> Call:
        if self.hooks.activity is not None:
            self.hooks.activity.enter(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.hooks.activity is not None:
            self.hooks.activity.leave(self)

    def run(self, blocking, request: Optional[MPI.Request] = None) -> None:
        """Run ``blocking(status)``, a blocking MPI call, as this operation; a receive checks
        its header first (``request``: the payload's receive when already posted)."""
        with self:
            self._header_first(wait=True, request=request)
            status = MPI.Status()
            blocking(status)
            self._finish(status)

    def wait(self, request: MPI.Request) -> None:
        """Block until ``request`` completes; a receive checks its header before the payload."""
        self.run(request.Wait, request)

    def test(self, request: MPI.Request) -> bool:
        """Progress ``request``; True once it and this call's header are complete (and checked)."""
        if not self._header_first(wait=False, request=request):
            return False
        status = MPI.Status()
        if not request.Test(status):
            return False
        self._finish(status)
        return True

    def _header_first(self, wait: bool, request: Optional[MPI.Request]) -> bool:
        if self.header is None or self.expected is None:
            return True
        header_request, buffer = self.header
        if wait:
            header_request.Wait()
        elif not header_request.Test():
            return False
        self.header = None
        assert self.peer is not None  # a header goes with a message from a known peer
        try:
            self._check_header(buffer, self.peer)
        except MismatchError:
            self._discard_payload(request)
            raise
        return True

    def _discard_payload(self, request: Optional[MPI.Request]) -> None:
        """Take the mismatched payload off the wire (the sender sends it right after its
        header), so the communicator stays usable and no receive is left writing to memory."""
        try:
            if request is not None:
                request.Wait()
            else:
                assert self.peer is not None and self.tag is not None  # a message from a known peer
                status = MPI.Status()
                self.comm.Probe(source=self.peer, tag=self.tag, status=status)
                self.comm.Recv([bytearray(status.Get_count(MPI.BYTE)), MPI.BYTE], source=self.peer, tag=self.tag)
        except MPI.Exception:
            pass  # truncated: the payload was bigger than this rank's buffer

    def _finish(self, status: MPI.Status) -> None:
        """Complete what goes with the payload: a send's header; a wildcard receive's check."""
        if self.header is not None:  # a send: its small header went out before the payload
            self.header[0].Wait()
            self.header = None
        if self.late_header:
            self.late_header = False
            source, tag = status.Get_source(), status.Get_tag()
            state = _comm_state(self.comm)
            self.seq = state.count(("recv", source))
            buffer = np.zeros(_HEADER_LENGTH, dtype=np.int64)
            self.comm.Recv(buffer, source=source, tag=_header_tag(self.comm, tag, state))
            self._check_header(buffer, source)

    def _check_header(self, header: np.ndarray, source: int) -> None:
        rank = self.comm.Get_rank()
        if int(header[0]) != _MAGIC:
            raise MismatchError(
                f"debug mode: rank {rank} expected a Send/Recv header from rank {source} and got other "
                f"data; set {ENV_DEBUG}=1 on every rank (or on none)")
        code, ndim = int(header[2]), int(header[3])
        sent = (tuple(int(d) for d in header[4:4 + min(ndim, _MAX_DIMS)]),
                _dtype_name(_DTYPES[code]) if 0 <= code < len(_DTYPES) else f"dtype code {code}")
        assert self.expected is not None  # a header is checked against a receive's own buffer
        mine = (_fold_shape(self.expected.shape), _dtype_name(self.expected.dtype))
        if sent == mine:
            return
        raise MismatchError(
            f"debug mode: Send/Recv mismatch ({self.detail}): rank {rank} receives from rank {source} into "
            f"shape {mine[0]} {mine[1]} (its receive #{self.seq} from rank {source}), but rank {source} sent "
            f"shape {sent[0]} {sent[1]} (its send #{int(header[1])} to rank {rank}). Hint: sender and "
            f"receiver must agree on the shape and dtype of each message")


hooks: Optional[Hooks] = None
_state = Hooks()


def watched(comm: MPI.Intracomm, name: str, *, peer: Optional[int] = None, tag: Optional[int] = None,
            detail: str = "") -> ContextManager:
    """Around a blocking MPI call made outside mpi_tensor (a pickled collective, a Probe):
    lets a running watchdog see this rank wait in it. Local; a no-op without a watchdog.

    ``peer`` None: a collective on ``comm`` (every rank of it must make the same
    call, numbered like mpi_tensor's collectives); otherwise a wait for a message
    from ``peer``. Debug mode does not check these calls (pickled data has no fixed
    shape to compare).
    """
    current = hooks
    if current is None or current.activity is None:
        return nullcontext()
    state = _comm_state(comm)
    if peer is None:
        state.collectives += 1
        call = Call(current, name, comm, state.collectives, detail=detail)
        current.activity.started(call)
    else:
        call = Call(current, name, comm, 0, peer=peer, tag=tag, detail=detail)
    return call


def enabled() -> bool:
    """True while debug mode checks each collective and Send/Recv pair."""
    return _state.check


def set_enabled(on: bool) -> None:
    """Turn debug mode on or off in this process (``MPIPAR_DEBUG=1`` turns it on at import).

    Must be switched the same way on every rank at the same point between MPI
    operations: a collective checked on some ranks only would hang.
    """
    _state.check = bool(on)
    _update()


def attach_activity(activity: Any) -> None:
    """Let ``activity`` (or None) record this process's MPI operations (used by the watchdog)."""
    _state.activity = activity
    _update()


def _update() -> None:
    global hooks
    hooks = _state if (_state.check or _state.activity is not None) else None


def op_name(op: Optional[MPI.Op]) -> str:
    if op is None:
        return "SUM"
    return next((name for known, name in _OPS if known == op), repr(op))


# -- per-communicator counters ------------------------------------------------------

class _CommState:
    def __init__(self) -> None:
        self.collectives = 0
        self.peers: Dict[Tuple[str, int], int] = {}
        self.header_base: Optional[int] = None
        self.members: Dict[int, Tuple[int, ...]] = {}  # id(watched comm) -> this comm's ranks in it

    def count(self, key: Tuple[str, int]) -> int:
        self.peers[key] = self.peers.get(key, 0) + 1
        return self.peers[key]


def _comm_state(comm: MPI.Comm) -> _CommState:
    state = comm.Get_attr(_KEYVAL)
    if not isinstance(state, _CommState):  # None: not set yet
        state = _CommState()
        comm.Set_attr(_KEYVAL, state)
    return state


def comm_members(comm: MPI.Comm, watched: MPI.Comm) -> Tuple[int, ...]:
    """The ranks of ``comm`` as ranks of ``watched`` (-1 where not a member); cached. Local."""
    state = _comm_state(comm)
    members = state.members.get(id(watched))
    if members is None:
        group, other = comm.Get_group(), watched.Get_group()
        try:
            translated = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), other)
        finally:
            group.Free()
            other.Free()
        members = tuple(-1 if r == MPI.UNDEFINED else int(r) for r in translated)
        state.members[id(watched)] = members
    return members


# -- collectives ----------------------------------------------------------------------

def _check_collective(comm: MPI.Intracomm, fingerprint: tuple) -> None:
    prints = comm.allgather(fingerprint)
    if all(p == prints[0] for p in prints):
        return
    groups: Dict[tuple, list] = {}
    for rank, p in enumerate(prints):
        groups.setdefault(p, []).append(rank)
    shown = "; ".join(f"{_ranks(ranks)}: {_describe(p)}" for p, ranks in groups.items())
    raise agreed(MismatchError)(
        f"debug mode: ranks disagree on an MPI collective: {shown}. Hint: every rank must make the same "
        f"collective calls in the same order with the same shapes, dtypes and root/op")


def _describe(fingerprint: tuple) -> str:
    name, shape, dtype, detail, seq = fingerprint
    return f"{name}(shape {shape}, {dtype}, {detail}) #{seq}"


def _ranks(ranks: list) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- Send/Recv headers -----------------------------------------------------------------

def _fold_shape(shape) -> tuple:
    dims = tuple(int(d) for d in shape)
    if len(dims) <= _MAX_DIMS:
        return dims
    return dims[:_MAX_DIMS - 1] + (int(np.prod(dims[_MAX_DIMS - 1:])),)


def _encode_header(seq: int, tensor: torch.Tensor) -> np.ndarray:
    header = np.zeros(_HEADER_LENGTH, dtype=np.int64)
    dims = _fold_shape(tensor.shape)
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    header[:4] = (_MAGIC, seq, code, tensor.dim())
    header[4:4 + len(dims)] = dims
    return header


def _header_tag(comm: MPI.Comm, tag: int, state: _CommState) -> int:
    """Headers travel on tag ``base + tag``, base = half the MPI tag range: pairs stay
    matched per (peer, tag) by MPI's non-overtaking rule, and a Probe for ``tag`` sees
    only payloads."""
    if state.header_base is None:
        tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)  # an MPI constant, attached to the world only
        state.header_base = int(tag_ub or 32767) // 2 + 1
    if not 0 <= tag < state.header_base:
        raise ValueError(f"debug mode reserves MPI tags >= {state.header_base} for its headers; "
                         f"got tag {tag}. Use a smaller tag")
    return state.header_base + tag


def _env_enabled() -> bool:
    return os.environ.get(ENV_DEBUG, "").strip().lower() in ("1", "true", "yes", "on")


set_enabled(_env_enabled())
