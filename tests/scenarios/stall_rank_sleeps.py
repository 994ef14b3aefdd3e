"""Run by test_watchdog.py: rank 1 sleeps before a collective while the others wait in it.

Usage: stall_rank_sleeps.py SECONDS  (thresholds from MPIPAR_STALL_WARN / MPIPAR_STALL_ABORT)
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpipar.comm import mpi_tensor  # noqa: E402
from mpipar.diagnostics.failure import abort_on_exception  # noqa: E402
from mpipar.diagnostics.watchdog import Watchdog  # noqa: E402

comm = MPI.COMM_WORLD
abort_on_exception(comm)
watchdog = Watchdog(comm).start()
for step in range(3):
    watchdog.label(step=step)
    if step == 2 and comm.Get_rank() == 1:
        time.sleep(float(sys.argv[1]))
    mpi_tensor.allreduce_(torch.ones(4), comm)
watchdog.stop()
print(f"rank {comm.Get_rank()} finished", flush=True)
