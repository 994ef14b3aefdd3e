"""Fail together: an unhandled exception on any rank ends the whole job, printed once."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from typing import Any, Dict, Tuple, Type, cast

from mpi4py import MPI

__all__ = ["AgreedError", "agreed", "plain_type", "abort_on_exception", "EXIT_AGREED_ERROR", "FaultInjection"]

EXIT_AGREED_ERROR = 2


class AgreedError(Exception):
    """Marks an error raised identically on every rank of the job (after a collective check).

    :func:`abort_on_exception` prints such an error once (rank 0) and exits every
    rank with status 2 instead of aborting the job. Raise a subclass: a static one
    (``class NonFiniteLossError(AgreedError, FloatingPointError)``) or
    ``agreed(ValueError)(message)``, which is still caught as a ValueError.
    """


_AGREED: Dict[type, Type[AgreedError]] = {}
_AGREED_LOCK = threading.Lock()


def agreed(base: Type[BaseException]) -> Type[AgreedError]:
    """The exception class that is both ``base`` and :class:`AgreedError`; cached, one per base.

    It has ``base``'s name, qualified name and module, so messages and tracebacks
    still say e.g. ``ValueError: ...``; instances pickle (the class itself does not).

    Args:
        base: an exception class; an AgreedError subclass is returned unchanged.

    Returns:
        A subclass of ``AgreedError`` and ``base``, e.g. ``agreed(ValueError)("bad size")``.

    Raises:
        TypeError: when ``base`` cannot be subclassed.
    """
    if issubclass(base, AgreedError):
        return base
    with _AGREED_LOCK:
        cls = _AGREED.get(base)
        if cls is None:
            cls = type(base.__name__, (AgreedError, base), {
                "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
                "_agreed_base": base, "__reduce__": _reduce})
            _AGREED[base] = cls
        return cls


def plain_type(exc: BaseException) -> Type[BaseException]:
    """``exc``'s type without the :func:`agreed` wrapper: ``ValueError`` for ``agreed(ValueError)(...)``."""
    return getattr(type(exc), "_agreed_base", type(exc))


def _reduce(self: BaseException) -> Tuple[Any, ...]:
    base = plain_type(self)
    _, args, *state = cast(Tuple[Any, ...], base.__reduce__(self))  # the base's arguments (OSError adds its filename)
    return (_rebuild, (base, args), *state)


def _rebuild(base: Type[BaseException], args: tuple) -> BaseException:
    return agreed(base)(*args)


def abort_on_exception(comm: MPI.Intracomm) -> None:
    """Install a ``sys.excepthook`` that ends the job instead of letting it hang.

    * An error raised identically on every rank (an :class:`AgreedError`, raised by
      :mod:`mpipar.diagnostics.agree` checks) is printed by rank 0 only, as one line,
      and every rank exits with status 2.
    * Any other unhandled exception is printed with its traceback, prefixed by the
      failing rank, then ``comm.Abort(1)`` stops all ranks within seconds (a rank
      waiting in a collective would otherwise wait forever).
    """

    rank, size = comm.Get_rank(), comm.Get_size()

    def hook(exc_type, exc, tb):
        if exc_type is KeyboardInterrupt and size == 1:
            sys.__excepthook__(exc_type, exc, tb)
            return
        if isinstance(exc, AgreedError):
            if rank == 0:
                sys.stderr.write(f"mpipar: error: {exc_type.__name__}: {exc}\n")
                sys.stderr.flush()
            sys.stdout.flush()
            if size > 1:
                _after_rank_0_spoke(comm)  # an early exit elsewhere would let the launcher kill rank 0 first
                os._exit(EXIT_AGREED_ERROR)
            sys.exit(EXIT_AGREED_ERROR)
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        prefixed = "".join(f"[rank {rank}/{size}] {line}\n" for line in text.rstrip().splitlines())
        sys.stderr.write(f"mpipar: rank {rank} of {size} failed; aborting the job\n{prefixed}")
        sys.stderr.flush()
        sys.stdout.flush()
        if size > 1:
            comm.Abort(1)
        os._exit(1)

    sys.excepthook = hook


def _after_rank_0_spoke(comm: MPI.Intracomm, timeout: float = 5.0) -> None:
    """Wait (at most ``timeout`` s) until every rank, rank 0 after printing, reached this
    point: a non-blocking barrier, so a rank that never comes cannot hold the exit."""
    import time

    try:
        request = comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


class FaultInjection:
    """Deliberate faults for testing recovery and diagnostics: ``MPIPAR_FAULT_AT_STEP=N`` (or
    ``N:RANK``) makes that rank (default: the last) kill itself with SIGKILL when it reaches
    step N, exactly as a node failure would; ``MPIPAR_SLOW_RANK=RANK:SECONDS`` makes that rank
    a straggler: it sleeps that long in every step, counted as its compute (a slower processor)."""

    def __init__(self, step=None, rank=None, slow_seconds: float = 0.0):
        self.step = step
        self.rank = rank
        self.slow_seconds = slow_seconds

    @classmethod
    def from_environment(cls, comm: MPI.Intracomm, environ=os.environ) -> FaultInjection:
        spec = environ.get("MPIPAR_FAULT_AT_STEP", "").strip()
        slow = environ.get("MPIPAR_SLOW_RANK", "").strip()
        slow_seconds = 0.0
        if slow:
            rank, _, seconds = slow.partition(":")
            try:
                slow_rank, slow_value = int(rank), float(seconds)
            except ValueError:
                raise ValueError(f"MPIPAR_SLOW_RANK={slow!r}: expected RANK:SECONDS, e.g. 1:0.05") from None
            slow_seconds = slow_value if slow_rank == comm.Get_rank() else 0.0
        if not spec:
            return cls(slow_seconds=slow_seconds)
        step, _, rank = spec.partition(":")
        target = int(rank) if rank else comm.Get_size() - 1
        return cls(int(step), target if target == comm.Get_rank() else None, slow_seconds)

    def maybe_slow(self) -> float:
        """Sleep this rank's ``MPIPAR_SLOW_RANK`` seconds (0 on the others); returns them."""
        if self.slow_seconds > 0:
            import time

            time.sleep(self.slow_seconds)
        return self.slow_seconds

    def maybe_fail(self, step: int) -> None:
        if self.rank is not None and step == self.step:
            sys.stderr.write(f"mpipar: MPIPAR_FAULT_AT_STEP: rank {self.rank} kills itself at step {step}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
