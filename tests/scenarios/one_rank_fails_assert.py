"""Run by test_failure.py under pytest-mpi: an assertion fails on the last rank only."""
import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_fails_on_last_rank_only():
    comm = MPI.COMM_WORLD
    assert comm.Get_rank() != comm.Get_size() - 1, "deliberate failure on the last rank"
    comm.barrier()  # the other ranks wait here
