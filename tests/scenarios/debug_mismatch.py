"""Run by test_debug.py with MPIPAR_DEBUG=1: mismatched MPI calls end the job with both sides named.

Usage: debug_mismatch.py {send-recv,allreduce}
  send-recv: rank 0 sends a (4, 3) tensor, rank 1 receives into (3, 4); the others wait.
  allreduce: the last rank reduces a (5,) tensor, the others (4,).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpipar.comm import mpi_tensor  # noqa: E402
from mpipar.diagnostics import debug  # noqa: E402
from mpipar.diagnostics.failure import abort_on_exception  # noqa: E402

comm = MPI.COMM_WORLD
abort_on_exception(comm)
assert debug.enabled(), "run with MPIPAR_DEBUG=1"
rank, size = comm.Get_rank(), comm.Get_size()
if sys.argv[1] == "send-recv":
    if rank == 0:
        mpi_tensor.send(torch.ones(4, 3), comm, dest=1, tag=5)
    elif rank == 1:
        mpi_tensor.recv_(torch.empty(3, 4), comm, source=0, tag=5)
    comm.barrier()  # ranks other than 1 wait here
else:
    mpi_tensor.allreduce_(torch.ones(5 if rank == size - 1 else 4), comm)
print(f"unreachable: rank {rank} completed the mismatched {sys.argv[1]}", flush=True)
