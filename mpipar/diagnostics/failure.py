"""Fail together: an unhandled exception on any rank ends the whole job, printed once."""

from __future__ import annotations

import os
import signal
import sys
import traceback

from mpi4py import MPI

__all__ = ["abort_on_exception", "EXIT_AGREED_ERROR", "FaultInjection"]

EXIT_AGREED_ERROR = 2


def abort_on_exception(comm: MPI.Intracomm) -> None:
    """Install a ``sys.excepthook`` that ends the job instead of letting it hang.

    * An error raised identically on every rank (``error.agreed``, set by
      :mod:`mpipar.agree` checks) is printed by rank 0 only, as one line, and every
      rank exits with status 2.
    * Any other unhandled exception is printed with its traceback, prefixed by the
      failing rank, then ``comm.Abort(1)`` stops all ranks within seconds (a rank
      waiting in a collective would otherwise wait forever).
    """

    rank, size = comm.Get_rank(), comm.Get_size()

    def hook(exc_type, exc, tb):
        if exc_type is KeyboardInterrupt and size == 1:
            sys.__excepthook__(exc_type, exc, tb)
            return
        if getattr(exc, "agreed", False):
            if rank == 0:
                sys.stderr.write(f"mpipar: error: {exc_type.__name__}: {exc}\n")
                sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_AGREED_ERROR) if size > 1 else sys.exit(EXIT_AGREED_ERROR)
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        prefixed = "".join(f"[rank {rank}/{size}] {line}\n" for line in text.rstrip().splitlines())
        sys.stderr.write(f"mpipar: rank {rank} of {size} failed; aborting the job\n{prefixed}")
        sys.stderr.flush()
        sys.stdout.flush()
        if size > 1:
            comm.Abort(1)
        os._exit(1)

    sys.excepthook = hook


class FaultInjection:
    """Deliberate crashes for testing recovery: ``MPIPAR_FAULT_AT_STEP=N`` (or
    ``N:RANK``) makes that rank (default: the last) kill itself with SIGKILL when
    it reaches step N, exactly as a node failure would."""

    def __init__(self, step=None, rank=None):
        self.step = step
        self.rank = rank

    @classmethod
    def from_environment(cls, comm: MPI.Intracomm, environ=os.environ) -> FaultInjection:
        spec = environ.get("MPIPAR_FAULT_AT_STEP", "").strip()
        if not spec:
            return cls()
        step, _, rank = spec.partition(":")
        target = int(rank) if rank else comm.Get_size() - 1
        return cls(int(step), target if target == comm.Get_rank() else None)

    def maybe_fail(self, step: int) -> None:
        if self.rank is not None and step == self.step:
            sys.stderr.write(f"mpipar: MPIPAR_FAULT_AT_STEP: rank {self.rank} kills itself at step {step}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
