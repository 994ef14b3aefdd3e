"""Checks that every rank of a communicator agrees, raised on all ranks together."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, TypeVar

from mpi4py import MPI

from mpipar.diagnostics import collectives
from mpipar.diagnostics.failure import AgreedError, agreed, plain_type

__all__ = ["agree_on", "collective_check", "gather_checked"]

T = TypeVar("T")


def agree_on(comm: MPI.Intracomm, what: str, value: Any, hint: str = "") -> None:
    """Raise ValueError on every rank unless ``value`` is equal on all ranks.

    Collective over ``comm`` (one small allgather of pickled metadata). The
    message names the ranks that differ from rank 0 and their values.

    Raises:
        ValueError: an :class:`~mpipar.diagnostics.failure.AgreedError`, on every rank.
    """
    values = collectives.allgather(comm, value, f"agree on {what}")
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if not differing:
        return
    shown = ", ".join(f"rank {r}: {_short(values[r])}" for r in differing[:4])
    raise agreed(ValueError)(
        f"ranks disagree on {what}: rank 0 has {_short(values[0])}; {shown}"
        + (f" (and {len(differing) - 4} more)" if len(differing) > 4 else "")
        + (f". Hint: {hint}" if hint else ""))


def collective_check(comm: MPI.Intracomm, check: Callable[[], T], what: str = "") -> T:
    """Run ``check`` on every rank; if it raised anywhere, raise on every rank.

    The raised error is the original exception type (ValueError, FileNotFoundError,
    ...) where it can be rebuilt from a message, with the failing ranks named, so
    all ranks exit together instead of leaving the others waiting in the next
    collective. Returns ``check()``'s value where nothing failed.

    Raises:
        AgreedError: on every rank when ``check`` raised on some rank: an instance of
            ``agreed(type of the first failure)``, or, for a type that cannot be
            rebuilt from one message, of ``agreed(RuntimeError)`` naming that type.
    """
    return gather_checked(comm, check, what)[comm.Get_rank()]


def gather_checked(comm: MPI.Intracomm, check: Callable[[], T], what: str = "") -> List[T]:
    """:func:`collective_check` that returns every rank's ``check()`` value, as a list by
    rank, on every rank (the same one allgather). Collective over ``comm``."""
    result: Optional[T] = None
    failure = None
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        failure = (plain_type(exc), str(exc))  # an agreed(...) class does not pickle; its base does
    replies = collectives.allgather(comm, (failure, result), f"check {what}")
    failed = [(r, f) for r, (f, _) in enumerate(replies) if f is not None]
    if not failed:
        return [value for _, value in replies]
    exc_type, message = failed[0][1]
    ranks = ", ".join(str(r) for r, _ in failed)
    prefix = f"{what}: " if what else ""
    where = f" [failed on rank{'s' if len(failed) > 1 else ''} {ranks}]"
    try:
        error: AgreedError = agreed(exc_type)(f"{prefix}{message}{where}")
    except Exception:  # noqa: BLE001 - exception types with other signatures
        error = agreed(RuntimeError)(f"{prefix}{exc_type.__name__}: {message}{where}")
    raise error


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
