"""What a job checks about how it was launched: world size, threads, output directory, stop and requeue."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable

from mpi4py import MPI

from mpipar.comm import cuda_aware
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import agreed

__all__ = ["check_world_size", "threads_per_rank", "prepare_output_dir", "RootPrinter", "StopRequest", "mpi_library",
           "requeue_slurm_job"]


def mpi_library() -> str:
    """The MPI library's name and version, one line."""
    return cuda_aware.library_name()


def check_world_size(comm: MPI.Intracomm, environ=os.environ) -> None:
    """Fail loudly when the MPI world does not match the Slurm allocation.

    A launch with the wrong PMI plugin (e.g. ``srun --mpi=pmi2`` with an Open MPI
    that only speaks PMIx) starts every task as its own world of size 1, which
    would otherwise train N independent models and exit 0.

    Collective over ``comm`` (rank 0's environment decides: ranks that ``mpirun`` starts on
    other nodes see their node daemon's one-task Slurm step). A wrongly launched job is
    a world of size 1 on every task, where each task checks its own environment.

    Raises:
        RuntimeError: when ``SLURM_NTASKS`` (or ``MPIPAR_EXPECTED_WORLD_SIZE``)
            differs from ``comm``'s size, with how to launch correctly.
    """
    expected = environ.get("MPIPAR_EXPECTED_WORLD_SIZE") or (
        environ.get("SLURM_NTASKS") if "SLURM_JOB_ID" in environ else None)
    size = comm.Get_size()
    # rank 0's view: ranks that mpirun starts on other nodes of an allocation run under the
    # one-task Slurm step of their node's daemon (SLURM_NTASKS=1 there)
    expected = collectives.bcast(comm, expected, "the launch's task count", root=0)
    if expected is None or int(expected) == size:
        return
    raise agreed(RuntimeError)(  # every rank sees the same sizes
        f"MPI world size is {size} but the launch asked for {expected} tasks "
        f"(SLURM_NTASKS={environ.get('SLURM_NTASKS')}). Every rank is its own world: the MPI library "
        f"did not connect to the launcher. Launch with 'srun --mpi=pmix' (see 'srun --mpi=list'), or with "
        f"'mpirun -n $SLURM_NTASKS' inside the allocation, using the MPI that mpi4py was built against. "
        f"For a deliberately smaller run inside an allocation set MPIPAR_EXPECTED_WORLD_SIZE={size}.")


def threads_per_rank(comm: MPI.Intracomm, requested: int = 0) -> int:
    """torch intra-op threads for this rank: ``requested`` if positive, else
    ``SLURM_CPUS_PER_TASK``, else the cores this process may use divided by the
    ranks sharing its node (at least 1). Collective (one Split_type)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_ranks = node.Get_size()
    node.Free()
    if requested > 0:
        return requested
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if usable >= (os.cpu_count() or usable):  # not bound to a subset: share the node
        usable //= local_ranks
    return max(1, usable)


def prepare_output_dir(comm: MPI.Intracomm, out, *, allow_existing_run: bool = False) -> Path:
    """Create ``out`` on rank 0 and check it is writable; every rank raises together if not.

    An output directory that already holds ``metrics.h5`` is refused unless
    ``allow_existing_run`` (resuming): runs are never overwritten silently.
    """
    out = Path(out)

    def check():
        if comm.Get_rank() != 0:
            return
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file, not a directory; choose another --out")
        if (out / "metrics.h5").exists() and not allow_existing_run:
            raise FileExistsError(f"{out} holds an earlier run (metrics.h5); choose another --out or remove it")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()

    collective_check(comm, check, f"output directory {out}")
    return out


class RootPrinter:
    """``print`` on rank 0 only, flushed (reads well in a terminal and a Slurm log)."""

    def __init__(self, comm: MPI.Intracomm):
        self.enabled = comm.Get_rank() == 0

    def __call__(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)


class StopRequest:
    """Remembers that a signal asked the job to stop (Slurm's ``--signal`` before
    the time limit, or SIGTERM). The job acts on it at its next collective flush,
    so all ranks stop at the same step."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.signal_name = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def cancelled(self) -> bool:
        """SIGTERM (``scancel``, or Slurm's kill at the limit): stop without requeueing.
        Only Slurm's warning signal (SIGUSR1) leads to a requeue."""
        return self.signal_name == "SIGTERM"

    def describe(self) -> str:
        return f"{self.signal_name} received" if self.requested else "no stop requested"

    @classmethod
    def install(cls, early_signals=()) -> StopRequest:
        """Handle SIGUSR1 and SIGTERM from now on; ``early_signals`` are signal
        numbers caught before this call (jobs install a stdlib-only handler before
        importing torch, since Slurm may signal during start-up)."""
        import signal

        request = cls()
        if early_signals:
            request.signal_name = signal.Signals(early_signals[0]).name

        def handler(signum, frame):
            request.signal_name = signal.Signals(signum).name

        for name in cls.SIGNALS:
            signal.signal(getattr(signal, name), handler)
        return request


def requeue_slurm_job(comm: MPI.Intracomm, say: Callable[[str], None], environ=os.environ) -> None:
    """Ask Slurm to requeue this job (``scontrol requeue $SLURM_JOB_ID`` on rank 0 of
    ``comm``); the requeued job resumes from the checkpoint just written. Call it on
    every rank after that checkpoint; it does not communicate, and outside Slurm it
    only says so. A failed ``scontrol`` is reported, not raised: the checkpoint is safe.
    """
    if comm.Get_rank() != 0:
        return
    job = environ.get("SLURM_JOB_ID")
    if not job:
        say("--requeue: not running under Slurm; nothing to requeue")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as exc:  # scontrol missing on this node
        say(f"could not requeue Slurm job {job}: {exc}")
        return
    if result.returncode == 0:
        say(f"requeued Slurm job {job}")
    elif result.returncode < 0:  # Slurm signals the whole step when it requeues it, this scontrol included
        say(f"requeued Slurm job {job} (scontrol was ended by {signal.Signals(-result.returncode).name}: "
            f"Slurm stopped this run to requeue it)")
    else:
        say(f"could not requeue Slurm job {job}: {result.stderr.strip()}")
