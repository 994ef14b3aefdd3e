"""Test configuration: under --with-mpi a failure on one rank ends the whole run.

pytest-mpi runs the same tests on every rank; a test that fails on one rank while
the others wait in a collective would hang the run. Here a failed test prints its
report with the rank and calls MPI_Abort, so the run ends with a non-zero exit.

Markers (setup.cfg): a test that starts mpirun (``mpi_helpers.mpirun_command``, directly or in a
fixture) must be marked ``launch``, or that call fails it; a test that uses a cluster fixture
(``CLUSTER_FIXTURES``: Slurm, emulated nodes) is marked ``cluster`` here at collection.
``bash tests/run.sh --fast`` runs neither.

The ``device`` fixture runs a test on CPU and, marked ``cuda``, on a CUDA device.
Where ``torch.cuda.is_available()`` is False every ``cuda``-marked test is skipped at
collection (before any fixture, so no communicator is built for it). On a GPU machine,
``pytest -m cuda`` and ``mpirun -n N pytest --only-mpi -m cuda`` run only those.
"""

import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import mpi_helpers  # noqa: E402

_with_mpi = False
CLUSTER_FIXTURES = {"slurm_cluster", "nodes"}  # each skips (or fails) where no Slurm / emulated nodes are up


def pytest_configure(config):
    global _with_mpi
    _with_mpi = bool(config.getoption("--with-mpi", default=False) or config.getoption("--only-mpi", default=False))


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks added here
def pytest_collection_modifyitems(config, items):
    """Mark ``cluster`` the tests that use a cluster fixture. Without a GPU, skip the ``cuda``
    tests. On several ranks, run only the MPI tests: serial tests (some launch mpirun
    themselves) run once, in the plain ``pytest`` pass."""
    for item in items:
        if CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
    if any(item.get_closest_marker("cuda") for item in items):
        import torch

        if not torch.cuda.is_available():
            skip_cuda = pytest.mark.skip(reason=CUDA_SKIP_REASON)
            for item in items:
                if item.get_closest_marker("cuda"):
                    item.add_marker(skip_cuda)
    if not _with_mpi:
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return
    skip = pytest.mark.skip(reason="serial test: runs in the plain 'python -m pytest' pass")
    for item in items:
        if "mpi" not in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    mpi_helpers.running_test = item  # before its fixtures: a module fixture's launch counts for it


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


CUDA_SKIP_REASON = "needs a CUDA device: torch.cuda.is_available() is False"


@functools.cache
def _cuda_device():
    """This rank's GPU: its rank among the ranks on its node, modulo the node's GPUs
    (ranks share a GPU when there are more ranks than GPUs). With one GPU no
    communication; otherwise a collective over COMM_WORLD, at the first CUDA test,
    which every rank reaches together (the same tests run on every rank)."""
    import torch

    count = torch.cuda.device_count()
    index = 0
    if count > 1:
        from mpi4py import MPI

        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        index = node.Get_rank() % count
        node.Free()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The ``torch.device`` a test builds its models and batches on: CPU, then CUDA
    (marked ``cuda``; skipped without a GPU, see ``pytest_collection_modifyitems``)."""
    import torch

    if request.param == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():  # also when the collection hook was bypassed
        pytest.skip(CUDA_SKIP_REASON)
    return _cuda_device()
