"""Debug mode: mismatched collectives and Send/Recv pairs raise with both sides named, never hang."""

import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpi_helpers import ROOT, assert_all_ranks, run_mpi
from mpipar.comm import mpi_tensor
from mpipar.diagnostics import debug
from mpipar.diagnostics.failure import AgreedError

SCENARIO = ROOT / "tests" / "scenarios" / "debug_mismatch.py"


@pytest.fixture
def debug_mode():
    """Debug mode on for one test (switched on every rank at the same point), then restored."""
    previous = debug.enabled()
    debug.set_enabled(True)
    yield
    debug.set_enabled(previous)


@pytest.fixture
def debug_off():
    previous = debug.enabled()
    debug.set_enabled(False)
    yield
    debug.set_enabled(previous)


def collective_error(comm, call) -> str:
    """Run ``call`` on every rank; the MismatchError text ('' where none was raised)."""
    try:
        call()
    except debug.MismatchError as error:
        return str(error) if isinstance(error, AgreedError) else "not agreed: " + str(error)
    return ""


def matching_exchanges(comm) -> bool:
    """Every mpi_tensor operation with matching sides; True when all results are right."""
    size, rank = comm.Get_size(), comm.Get_rank()
    total = torch.full((3, 2), float(rank))
    mpi_tensor.allreduce_(total, comm)
    pending = mpi_tensor.iallreduce_(torch.ones(5, dtype=torch.int64), comm, op=MPI.MAX)
    root = torch.full((4,), float(rank), dtype=torch.bfloat16)
    mpi_tensor.bcast_(root, comm, root=size - 1)
    ok = torch.equal(total, torch.full((3, 2), float(size * (size - 1) // 2)))
    ok = ok and torch.equal(pending.wait(), torch.ones(5, dtype=torch.int64))
    ok = ok and torch.equal(root, torch.full((4,), float(size - 1), dtype=torch.bfloat16))
    right, left = (rank + 1) % size, (rank - 1) % size
    for numel in (3, 1 << 18):  # small, and above the eager limit: criss-cross must not deadlock
        incoming = torch.empty(numel)
        ops = [mpi_tensor.irecv_(incoming, comm, left, tag=3), mpi_tensor.isend(torch.full((numel,), rank * 1.0),
                                                                                comm, right, tag=3)]
        while not ops[0].test():  # test() progresses the header check and the payload
            pass
        mpi_tensor.wait_all(reversed(ops))
        ok = ok and torch.equal(incoming, torch.full((numel,), left * 1.0))
    outgoing = torch.arange(6.0).reshape(2, 3) + rank
    sends = mpi_tensor.isend(outgoing, comm, right, tag=4)  # blocking recv from a wildcard source
    received = mpi_tensor.recv_(torch.empty(2, 3), comm, MPI.ANY_SOURCE, tag=4)
    sends.wait()
    return ok and torch.equal(received, torch.arange(6.0).reshape(2, 3) + left)


# -- serial: COMM_SELF and pure helpers ------------------------------------------------------

def test_matching_calls_pass_in_debug_mode_on_comm_self(debug_mode):
    assert debug.hooks is not None
    assert matching_exchanges(MPI.COMM_SELF)


def test_debug_mode_off_installs_no_hooks_and_numbers_nothing(debug_off):
    comm = MPI.COMM_SELF.Dup()
    try:
        assert debug.hooks is None
        assert matching_exchanges(comm)
        assert comm.Get_attr(debug._KEYVAL) is None  # no hook ran: no per-communicator state
    finally:
        comm.Free()


def test_env_switch(monkeypatch):
    for value, on in [("1", True), ("yes", True), ("0", False), ("", False)]:
        monkeypatch.setenv("MPIPAR_DEBUG", value)
        assert debug._env_enabled() is on


def test_header_round_trip_and_reserved_tags():
    state = debug._CommState()
    header = debug._encode_header(7, torch.zeros(2, 3, dtype=torch.int16))
    assert header.dtype == np.int64 and list(header[1:6]) == [7, debug._DTYPES.index(torch.int16), 2, 2, 3]
    base = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) // 2 + 1
    assert debug._header_tag(MPI.COMM_SELF, 5, state) == base + 5
    with pytest.raises(ValueError, match=f"tags >= {base}"):
        debug._header_tag(MPI.COMM_SELF, base, state)
    assert debug._fold_shape(tuple(range(1, 11))) == (1, 2, 3, 4, 5, 6, 7, 8 * 9 * 10)


def test_mismatch_message_groups_ranks():
    prints = [("allreduce_", (4,), "float32", "SUM", 3)] * 2 + [("bcast_", (4,), "float32", "root 0", 3)]

    class FakeComm:
        def allgather(self, value):
            return prints

    with pytest.raises(debug.MismatchError) as caught:
        debug._check_collective(FakeComm(), prints[0])
    assert isinstance(caught.value, AgreedError)
    assert "ranks 0, 1: allreduce_(shape (4,), float32, SUM) #3; rank 2: bcast_(shape (4,), float32, root 0) #3" \
        in str(caught.value)


# -- MPI: every rank raises together -------------------------------------------------------------

@pytest.mark.mpi
def test_matching_calls_pass_in_debug_mode(comm, debug_mode):
    assert_all_ranks(comm, matching_exchanges(comm), "wrong results in debug mode")


@pytest.mark.mpi(min_size=2)
def test_allreduce_shape_mismatch_raises_on_every_rank(comm, debug_mode):
    last = comm.Get_size() - 1
    message = collective_error(comm, lambda: mpi_tensor.allreduce_(torch.ones(5 if comm.Get_rank() == last else 4),
                                                                   comm))
    expected = f"rank {last}: allreduce_(shape (5,), float32, SUM)"
    assert_all_ranks(comm, expected in message and "allreduce_(shape (4,), float32, SUM)" in message, message)
    # the communicator is still usable: nothing mismatched reached MPI
    assert_all_ranks(comm, matching_exchanges(comm), "communicator unusable after a caught mismatch")


@pytest.mark.mpi(min_size=2)
def test_iallreduce_dtype_mismatch_raises_on_every_rank(comm, debug_mode):
    dtype = torch.float64 if comm.Get_rank() == 0 else torch.float32
    message = collective_error(comm, lambda: mpi_tensor.iallreduce_(torch.ones(4, dtype=dtype), comm).wait())
    ok = "rank 0: iallreduce_(shape (4,), float64, SUM)" in message and "float32" in message
    assert_all_ranks(comm, ok, message)


@pytest.mark.mpi(min_size=2)
def test_bcast_against_allreduce_raises_on_every_rank(comm, debug_mode):
    tensor = torch.ones(4)

    def mixed():
        if comm.Get_rank() == 0:
            mpi_tensor.bcast_(tensor, comm, root=0)
        else:
            mpi_tensor.allreduce_(tensor, comm)

    message = collective_error(comm, mixed)
    ok = "rank 0: bcast_(shape (4,), float32, root 0)" in message and "allreduce_(shape (4,), float32, SUM)" in message
    assert_all_ranks(comm, ok, message)


@pytest.mark.mpi(min_size=2)
def test_send_recv_dtype_mismatch_raises_on_the_receiver(comm, debug_mode):
    rank = comm.Get_rank()
    message = ""
    if rank == 0:
        mpi_tensor.isend(torch.ones(4, dtype=torch.int32), comm, dest=1, tag=9).wait()
    elif rank == 1:
        try:
            mpi_tensor.irecv_(torch.empty(4), comm, source=0, tag=9).wait()
        except debug.MismatchError as error:
            message = str(error)
    ok = rank != 1 or ("shape (4,) float32" in message and "shape (4,) int32" in message)
    assert_all_ranks(comm, ok, message or "no MismatchError on the receiver")
    # the mismatched payload was taken off the wire: the next pairs on the same tag match
    if rank == 0:
        mpi_tensor.send(torch.ones(4, 2), comm, dest=1, tag=9)  # blocking receive: header, then payload
        mpi_tensor.send(torch.full((3,), 7.0), comm, dest=1, tag=9)
    elif rank == 1:
        try:
            mpi_tensor.recv_(torch.empty(8), comm, source=0, tag=9)
        except debug.MismatchError as error:
            message = str(error)
        following = mpi_tensor.recv_(torch.empty(3), comm, source=0, tag=9)
        ok = "shape (8,) float32" in message and "shape (4, 2) float32" in message and \
            torch.equal(following, torch.full((3,), 7.0))
    assert_all_ranks(comm, ok, message)


# -- whole jobs: a mismatch ends the job, it never hangs ------------------------------------------

@pytest.mark.launch
def test_send_recv_shape_mismatch_ends_the_job_naming_both_shapes():
    start = time.monotonic()
    result = run_mpi(3, str(SCENARIO), "send-recv", timeout=120, env={"MPIPAR_DEBUG": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert time.monotonic() - start < 120
    assert "unreachable" not in output
    assert "rank 1 receives from rank 0 into shape (3, 4) float32" in output, output
    assert "rank 0 sent shape (4, 3) float32" in output, output


@pytest.mark.launch
def test_collective_mismatch_ends_the_job_printed_once():
    result = run_mpi(3, str(SCENARIO), "allreduce", timeout=120, env={"MPIPAR_DEBUG": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.count("MismatchError") == 1, output
    assert "ranks 0, 1: allreduce_(shape (4,), float32, SUM) #1; rank 2: allreduce_(shape (5,), float32, SUM) #1" \
        in output, output
