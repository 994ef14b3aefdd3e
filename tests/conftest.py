"""Test configuration: under --with-mpi a failure on one rank ends the whole run.

pytest-mpi runs the same tests on every rank; a test that fails on one rank while
the others wait in a collective would hang the run. Here a failed test prints its
report with the rank and calls MPI_Abort, so the run ends with a non-zero exit.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_with_mpi = False


def pytest_configure(config):
    global _with_mpi
    _with_mpi = bool(config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi", default=False))


def pytest_collection_modifyitems(config, items):
    """On several ranks, run only the MPI tests: serial tests (some launch mpirun
    themselves) run once, in the plain ``pytest`` pass."""
    if not _with_mpi:
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return
    skip = pytest.mark.skip(reason="serial test: runs in the plain 'python -m pytest' pass")
    for item in items:
        if "mpi" not in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if not (_with_mpi and report.failed):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return
    sys.stderr.write(f"\n[rank {comm.Get_rank()}] FAILED {report.nodeid} ({report.when})\n"
                     f"{report.longreprtext}\n[rank {comm.Get_rank()}] aborting the MPI run\n")
    sys.stderr.flush()
    comm.Abort(1)


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD
