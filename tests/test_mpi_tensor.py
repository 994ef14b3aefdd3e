"""The torch<->MPI boundary: dtypes, zero copy, staging, blocking and non-blocking calls."""

import threading

import pytest
import torch
from mpi4py import MPI

from mpi_helpers import assert_all_ranks, assert_close_all_ranks
from mpipar.comm import mpi_tensor

REDUCIBLE = [torch.float32, torch.float64, torch.int32, torch.int64, torch.int16, torch.uint8]


def test_dtype_table_and_unsupported_dtype():
    assert mpi_tensor.mpi_datatype(torch.float32) == MPI.FLOAT
    assert mpi_tensor.mpi_datatype(torch.int64) == MPI.INT64_T
    with pytest.raises(TypeError, match="uint16"):
        mpi_tensor.mpi_datatype(torch.uint16)
    with pytest.raises(TypeError, match="uint16"):
        mpi_tensor.allreduce_(torch.zeros(2, dtype=torch.uint16), MPI.COMM_SELF)


def test_transport_choice():
    assert mpi_tensor.transport_for(torch.zeros(3)) == "host"
    assert mpi_tensor.transport_for(torch.zeros(3, 4).t()) == "staged"
    assert mpi_tensor.transport_for(torch.zeros(3, dtype=torch.float16), "allreduce") == "staged"
    assert mpi_tensor.transport_for(torch.zeros(3, dtype=torch.float16), "iallreduce") == "staged"
    assert mpi_tensor.transport_for(torch.zeros(3, dtype=torch.bfloat16), "send") == "host"


def test_host_transport_hands_mpi_the_tensor_memory():
    tensor = torch.arange(4.0)
    work = mpi_tensor._prepare(tensor, "allreduce", read=True, write=True)
    buffer = work.buffer[0]
    assert buffer.address == tensor.data_ptr() and buffer.nbytes == 16


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", REDUCIBLE)
def test_allreduce_sums_in_place(comm, dtype):
    size, rank = comm.Get_size(), comm.Get_rank()
    tensor = (torch.arange(6) % 5 + rank).to(dtype)
    address = tensor.data_ptr()
    mpi_tensor.allreduce_(tensor, comm)
    expected = ((torch.arange(6) % 5) * size + size * (size - 1) // 2).to(dtype)
    assert_all_ranks(comm, tensor.data_ptr() == address and torch.equal(tensor, expected), f"{dtype}: {tensor}")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reductions_run_in_float32(comm, dtype):
    size = comm.Get_size()
    tensor = torch.full((5,), 0.5, dtype=dtype)
    mpi_tensor.allreduce_(tensor, comm)
    assert_all_ranks(comm, tensor.dtype == dtype and torch.equal(tensor, torch.full((5,), 0.5 * size, dtype=dtype)),
                     str(tensor))


@pytest.mark.mpi
def test_non_contiguous_allreduce_writes_back(comm):
    base = torch.ones(4, 3)
    view = base.t()  # not contiguous
    mpi_tensor.allreduce_(view, comm)
    assert_close_all_ranks(comm, base, torch.full((4, 3), float(comm.Get_size())), rtol=0, atol=0, what="view")


@pytest.mark.mpi
def test_iallreduce_equals_allreduce(comm):
    torch.manual_seed(comm.Get_rank())
    data = torch.randn(1000, dtype=torch.float64)
    blocking, pending = data.clone(), data.clone()
    mpi_tensor.allreduce_(blocking, comm)
    op = mpi_tensor.iallreduce_(pending, comm)
    op.wait()
    assert_close_all_ranks(comm, pending, blocking, rtol=1e-12, atol=1e-12, what="iallreduce")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_bcast(comm, dtype):
    tensor = torch.full((7,), comm.Get_rank() + 1).to(dtype)
    mpi_tensor.bcast_(tensor, comm, root=0)
    assert_all_ranks(comm, torch.equal(tensor, torch.ones(7).to(dtype)), str(tensor))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("numel", [3, 1 << 20])  # small and above the eager limit
def test_ring_send_recv(comm, numel):
    size, rank = comm.Get_size(), comm.Get_rank()
    outgoing = torch.full((numel,), float(rank), dtype=torch.bfloat16)
    incoming = torch.empty(numel, dtype=torch.bfloat16)
    right, left = (rank + 1) % size, (rank - 1) % size
    ops = [mpi_tensor.irecv_(incoming, comm, left, tag=7), mpi_tensor.isend(outgoing, comm, right, tag=7)]
    mpi_tensor.wait_all(ops)
    ok = torch.equal(incoming, torch.full((numel,), float(left), dtype=torch.bfloat16))
    if rank % 2 == 0:
        mpi_tensor.send(outgoing.float(), comm, right, tag=8)
        back = mpi_tensor.recv_(torch.empty(numel), comm, left, tag=8)
    else:
        back = mpi_tensor.recv_(torch.empty(numel), comm, left, tag=8)
        mpi_tensor.send(outgoing.float(), comm, right, tag=8)
    ok = ok and torch.equal(back, torch.full((numel,), float(left)))
    assert_all_ranks(comm, ok, "ring exchange delivered wrong data")


@pytest.mark.mpi
def test_empty_tensor(comm):
    tensor = torch.empty(0)
    mpi_tensor.allreduce_(tensor, comm)
    assert_all_ranks(comm, tensor.numel() == 0)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64, torch.bfloat16, torch.bool])
def test_allgather_stacks_in_rank_order(comm, dtype):
    size, rank = comm.Get_size(), comm.Get_rank()
    local = (torch.arange(6).reshape(2, 3) + 10 * rank).to(dtype)
    output = torch.empty(size, 2, 3, dtype=dtype)
    mpi_tensor.allgather_(output, local, comm)
    expected = torch.stack([(torch.arange(6).reshape(2, 3) + 10 * r).to(dtype) for r in range(size)])
    assert_all_ranks(comm, torch.equal(output, expected), f"{dtype}: {output}")


@pytest.mark.mpi
def test_allgather_non_contiguous_input_and_output(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    local = torch.full((3, 2), float(rank)).t()  # not contiguous
    base = torch.zeros(3, size * 2)
    output = base.t()  # not contiguous: staged, then written back
    mpi_tensor.allgather_(output, local, comm)
    expected = torch.cat([torch.full((2, 3), float(r)) for r in range(size)])
    assert_all_ranks(comm, torch.equal(output, expected) and torch.equal(base, expected.t()), str(output))


def test_allgather_output_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="1 x 6 elements of torch.float32"):
        mpi_tensor.allgather_(torch.empty(5), torch.empty(6), MPI.COMM_SELF)
    with pytest.raises(ValueError, match="torch.float64"):
        mpi_tensor.allgather_(torch.empty(6, dtype=torch.float64), torch.empty(6), MPI.COMM_SELF)


@pytest.mark.mpi(min_size=2)
def test_sent_bytes_survive_freed_communicators(comm):
    """Bytes sent on a communicator freed before they are taken, then on a larger one that may get its
    handle back, are both counted, as ranks of the communicator asked (a handle-keyed count once
    translated the larger one's destinations with the freed one's smaller group and crashed)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    mpi_tensor.take_sent(comm)
    pairs = comm.Split(color=rank // 2, key=rank)  # {0, 1}, {2, 3}, ...: a small communicator
    partner = pairs.Get_rank() ^ 1
    if partner < pairs.Get_size():
        op = mpi_tensor.isend(torch.ones(3, dtype=torch.float64), pairs, partner)
        mpi_tensor.recv_(torch.empty(3, dtype=torch.float64), pairs, partner)
        op.wait()
    pairs.Free()
    reversed_comm = comm.Split(color=0, key=size - 1 - rank)  # every rank, in reverse order
    last = size - 1  # rank 0 of comm is the last of reversed_comm
    if rank == 0:
        mpi_tensor.send(torch.ones(5, dtype=torch.float32), reversed_comm, 0)  # to comm's last rank
    if rank == size - 1:
        mpi_tensor.recv_(torch.empty(5, dtype=torch.float32), reversed_comm, last)
    reversed_comm.Free()
    sent = mpi_tensor.take_sent(comm)
    expected = {}
    if rank ^ 1 < size:
        expected[rank ^ 1] = 24
    if rank == 0:
        expected[size - 1] = expected.get(size - 1, 0) + 20
    assert_all_ranks(comm, sent == expected, f"counted {sent}, expected {expected}")


def _request_sent_after(naps: list, count: int, monkeypatch):
    """A receive on ``MPI.COMM_SELF`` whose message is sent at the ``count``-th nap (0: at once); each
    nap's length is appended to ``naps`` instead of sleeping."""
    from mpipar.comm import mpi_tensor

    inbox, outbox = bytearray(8), bytearray(8)
    request = MPI.COMM_SELF.Irecv(inbox, source=0, tag=31)
    sends = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == count:
            sends.append(MPI.COMM_SELF.Isend(outbox, dest=0, tag=31))

    monkeypatch.setattr(mpi_tensor.time, "sleep", nap)
    if count == 0:
        sends.append(MPI.COMM_SELF.Isend(outbox, dest=0, tag=31))
    return request, sends


def test_a_long_wait_naps_between_tests_and_a_short_one_does_not(monkeypatch):
    naps = []
    request, sends = _request_sent_after(naps, 0, monkeypatch)
    assert mpi_tensor.wait_any([request]) == 0  # done within the spin
    MPI.Request.Waitall(sends)
    assert naps == []
    monkeypatch.setattr(mpi_tensor, "SPIN_SECONDS", 0.0)
    request, sends = _request_sent_after(naps, 3, monkeypatch)
    assert mpi_tensor.wait_any([request]) == 0
    MPI.Request.Waitall(sends)
    assert len(naps) == 3 and all(s == mpi_tensor.NAP_SECONDS for s in naps)
    naps.clear()  # the parameter server's own spin and nap
    request, sends = _request_sent_after(naps, 2, monkeypatch)
    assert mpi_tensor.wait_any([request], spin=0.0, nap=2e-4) == 0
    MPI.Request.Waitall(sends)
    assert naps == [2e-4, 2e-4]


def test_mpipar_wait_spin_waits_in_mpi_without_napping(monkeypatch):
    naps = []
    monkeypatch.setattr(mpi_tensor, "SPIN_SECONDS", 0.0)
    monkeypatch.setattr(mpi_tensor.time, "sleep", naps.append)
    inbox, outbox = bytearray(8), bytearray(8)
    request = MPI.COMM_SELF.Irecv(inbox, source=0, tag=32)
    sends = []
    later = threading.Timer(0.02, lambda: sends.append(MPI.COMM_SELF.Isend(outbox, dest=0, tag=32)))
    monkeypatch.setattr(mpi_tensor, "WAIT", "spin")
    later.start()
    assert mpi_tensor.wait_any([request]) == 0
    later.join()
    MPI.Request.Waitall(sends)
    assert naps == []
    monkeypatch.setattr(mpi_tensor, "WAIT", "doze")
    with pytest.raises(ValueError, match="MPIPAR_WAIT='doze': expected one of nap, spin"):
        mpi_tensor.wait_any([MPI.REQUEST_NULL])
