"""Checks that every rank of a communicator agrees, raised on all ranks together."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, TypeVar, cast

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

    Collective over ``comm`` (one allgather of the verdict: whether this rank failed,
    and the message). ``check()``'s value stays on its rank: it is never pickled nor
    sent, so it may be a dataset or anything else. The raised error is the original
    exception type (ValueError, FileNotFoundError, ...) where it can be rebuilt from
    a message, with the failing ranks named, so all ranks exit together instead of
    leaving the others waiting in the next collective. Returns this rank's
    ``check()`` value where nothing failed.

    Raises:
        AgreedError: on every rank when ``check`` raised on some rank: an instance of
            ``agreed(type of the first failure)``, or, for a type that cannot be
            rebuilt from one message, of ``agreed(RuntimeError)`` naming that type.
    """
    result, failure = _run(check)
    _raise_failures(collectives.allgather(comm, failure, f"check {what}"), what)
    return cast(T, result)  # check() returned it: no rank failed


def gather_checked(comm: MPI.Intracomm, check: Callable[[], T], what: str = "") -> List[T]:
    """:func:`collective_check` that also sends every rank's ``check()`` value to every rank,
    as a list by rank (the same one allgather, of the verdict and the value): for small
    picklable metadata that every rank needs, such as shapes. Collective over ``comm``."""
    result, failure = _run(check)
    replies = collectives.allgather(comm, (failure, result), f"check {what}")
    _raise_failures([failure for failure, _ in replies], what)
    return [value for _, value in replies]


def _run(check: Callable[[], T]) -> Tuple[Optional[T], Optional[Tuple[type, str]]]:
    """``check()``'s value and None, or None and its failure as (exception type, message)."""
    try:
        return check(), None
    except Exception as exc:  # noqa: BLE001 - reported collectively
        return None, (plain_type(exc), str(exc))  # an agreed(...) class does not pickle; its base does


def _raise_failures(failures: List[Optional[Tuple[type, str]]], what: str) -> None:
    """Raise the first failure of the ranks' verdicts (a list by rank), naming every failing rank."""
    failed = [(rank, failure) for rank, failure in enumerate(failures) if failure is not None]
    if not failed:
        return
    exc_type, message = failed[0][1]
    ranks = ", ".join(str(rank) for rank, _ in failed)
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
