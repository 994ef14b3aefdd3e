"""Checks that every rank of a communicator agrees, raised on all ranks together."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from mpi4py import MPI

from mpipar.diagnostics import debug

__all__ = ["agree_on", "collective_check", "RankError"]

T = TypeVar("T")


class RankError(RuntimeError):
    """Raised on every rank when some rank failed a collective check.

    ``agreed`` marks it as raised identically everywhere, so the failure handler
    prints it once (from the lowest failing rank) instead of from every rank.
    """

    agreed = True


def agree_on(comm: MPI.Intracomm, what: str, value: Any, hint: str = "") -> None:
    """Raise ValueError on every rank unless ``value`` is equal on all ranks.

    Collective over ``comm`` (one small allgather of pickled metadata). The
    message names the ranks that differ from rank 0 and their values.
    """
    with debug.watched(comm, "allgather", detail=f"agree on {what}"):
        values = comm.allgather(value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if not differing:
        return
    shown = ", ".join(f"rank {r}: {_short(values[r])}" for r in differing[:4])
    error = ValueError(
        f"ranks disagree on {what}: rank 0 has {_short(values[0])}; {shown}"
        + (f" (and {len(differing) - 4} more)" if len(differing) > 4 else "")
        + (f". Hint: {hint}" if hint else ""))
    error.agreed = True
    raise error


def collective_check(comm: MPI.Intracomm, check: Callable[[], T], what: str = "") -> T:
    """Run ``check`` on every rank; if it raised anywhere, raise on every rank.

    The raised error is the original exception type (ValueError, FileNotFoundError,
    ...) where it can be rebuilt from a message, with the failing ranks named, so
    all ranks exit together instead of leaving the others waiting in the next
    collective. Returns ``check()``'s value where nothing failed.
    """
    result: Optional[T] = None
    failure = None
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        failure = (type(exc), str(exc))
    with debug.watched(comm, "allgather", detail=f"check {what}"):
        failures = comm.allgather(failure)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not failed:
        return result
    rank, (exc_type, message) = failed[0]
    ranks = ", ".join(str(r) for r, _ in failed)
    prefix = f"{what}: " if what else ""
    text = f"{prefix}{message} [failed on rank{'s' if len(failed) > 1 else ''} {ranks}]"
    try:
        error = exc_type(text)
    except Exception:  # noqa: BLE001 - exception types with other signatures
        error = RankError(text)
    error.agreed = True
    raise error


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
