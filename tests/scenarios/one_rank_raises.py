"""Rank 1 raises while every other rank waits in a collective: the job must end, not hang."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mpi4py import MPI  # noqa: E402

from mpipar.diagnostics.failure import abort_on_exception  # noqa: E402

comm = MPI.COMM_WORLD
abort_on_exception(comm)
if comm.Get_rank() == 1:
    raise ZeroDivisionError("deliberate failure on rank 1")
comm.barrier()  # the others would wait here forever
print("unreachable: the barrier completed", flush=True)
