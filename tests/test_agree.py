"""Errors raised on every rank: AgreedError, the agreed() factory, collective checks, metadata collectives."""

import pickle
import threading

import numpy as np
import pytest
from mpi4py import MPI

from mpi_helpers import assert_all_ranks, run_mpi
from mpipar.diagnostics import collectives
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import EXIT_AGREED_ERROR, AgreedError, agreed, plain_type
from mpipar.run.metrics import NonFiniteLossError


def test_agreed_class_is_cached_named_like_its_base_and_caught_as_both():
    cls = agreed(ValueError)
    assert agreed(ValueError) is cls and agreed(KeyError) is not cls
    assert issubclass(cls, AgreedError) and issubclass(cls, ValueError)
    assert (cls.__name__, cls.__qualname__, cls.__module__) == ("ValueError", "ValueError", "builtins")
    with pytest.raises(ValueError, match="^bad size$") as caught:
        raise cls("bad size")
    assert isinstance(caught.value, AgreedError) and plain_type(caught.value) is ValueError
    assert plain_type(ValueError("plain")) is ValueError


def test_static_subclasses_are_their_own_agreed_class():
    assert agreed(NonFiniteLossError) is NonFiniteLossError
    assert issubclass(NonFiniteLossError, FloatingPointError)
    assert plain_type(NonFiniteLossError("nan")) is NonFiniteLossError


def test_agreed_instances_pickle():
    error = agreed(FileNotFoundError)(2, "No such file", "x.pt")
    error.note = "kept"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is agreed(FileNotFoundError)
    assert (copy.errno, copy.filename, str(copy), copy.note) == (2, "x.pt", str(error), "kept")


def test_collective_check_rebuilds_the_type_on_one_rank():
    with pytest.raises(FileNotFoundError, match=r"^data: missing \[failed on rank 0\]$") as caught:
        collective_check(MPI.COMM_SELF, lambda: (_ for _ in ()).throw(FileNotFoundError("missing")), "data")
    assert isinstance(caught.value, AgreedError)

    def unbuildable():
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with pytest.raises(RuntimeError, match=r"^read: UnicodeDecodeError: 'utf-8' codec can't decode") as caught:
        collective_check(MPI.COMM_SELF, unbuildable, "read")
    assert isinstance(caught.value, AgreedError)
    assert collective_check(MPI.COMM_SELF, lambda: 42, "fine") == 42


@pytest.mark.mpi
def test_collective_check_raises_the_same_error_on_every_rank(comm):
    size, rank = comm.Get_size(), comm.Get_rank()

    def check():
        if rank == size - 1:
            raise agreed(ValueError)("already agreed")  # e.g. check_same_run inside a check: must pickle
        return rank

    with pytest.raises(ValueError) as caught:
        collective_check(comm, check, "resume")
    text = str(caught.value)
    assert_all_ranks(comm, isinstance(caught.value, AgreedError), "not an AgreedError")
    assert_all_ranks(comm, text == f"resume: already agreed [failed on rank {size - 1}]", text)


@pytest.mark.mpi
def test_agree_on(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    agree_on(comm, "the answer", 42)
    if size == 1:
        return
    with pytest.raises(ValueError) as caught:
        agree_on(comm, "the rank", rank % 2, hint="none")
    text = str(caught.value)
    assert_all_ranks(comm, isinstance(caught.value, AgreedError), "not an AgreedError")
    assert_all_ranks(comm, text.startswith("ranks disagree on the rank: rank 0 has 0; rank 1: 1") and
                     text.endswith(". Hint: none"), text)


@pytest.mark.mpi
def test_metadata_collectives(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    root = size - 1
    everyone = collectives.allgather(comm, ("rank", rank), "test allgather")
    gathered = collectives.gather(comm, {"rank": rank}, "test gather", root=root)
    sent = collectives.bcast(comm, "from root" if rank == root else None, "test bcast", root=root)
    totals = np.array([1.0, rank])
    summed = collectives.allreduce_sum(comm, totals, "test allreduce")
    ok = everyone == [("rank", r) for r in range(size)]
    ok = ok and gathered == ([{"rank": r} for r in range(size)] if rank == root else None)
    ok = ok and sent == "from root" and summed is totals
    ok = ok and np.array_equal(totals, [size, size * (size - 1) / 2])
    assert_all_ranks(comm, ok, f"{everyone} {gathered} {sent} {totals}")


@pytest.mark.launch
@pytest.mark.parametrize("ranks", [1, 2])
def test_agreed_error_is_printed_once_and_every_rank_exits_2(ranks):
    code = ("from mpi4py import MPI\n"
            "from mpipar.diagnostics.agree import collective_check\n"
            "from mpipar.diagnostics.failure import abort_on_exception\n"
            "abort_on_exception(MPI.COMM_WORLD)\n"
            "def check():\n"
            "    raise ValueError('the same everywhere')\n"
            "collective_check(MPI.COMM_WORLD, check, 'test')\n")
    result = run_mpi(ranks, "-c", code, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_AGREED_ERROR, output
    assert output.count(f"mpipar: error: ValueError: test: the same everywhere [failed on rank{'s' * (ranks > 1)} "
                        f"{', '.join(str(r) for r in range(ranks))}]") == 1, output
    assert "Traceback" not in output and "aborting" not in output, output


@pytest.mark.mpi
def test_collective_check_keeps_the_value_local(comm, monkeypatch):
    """A check's value stays on its rank: it need not pickle, and the bytes exchanged do not grow with it."""
    rank = comm.Get_rank()
    exchanged = []

    def counting_allgather(comm, value, what):
        exchanged.append(len(pickle.dumps(value)))
        return comm.allgather(value)

    monkeypatch.setattr(collectives, "allgather", counting_allgather)
    lock = threading.Lock()  # cannot be pickled
    unpicklable = collective_check(comm, lambda: (rank, lock), "unpicklable")
    small = collective_check(comm, lambda: b"x", "small")
    large = collective_check(comm, lambda: bytes(2**20), "large")
    ok = unpicklable == (rank, lock) and small == b"x" and len(large) == 2**20
    assert_all_ranks(comm, ok and len(exchanged) == 3 and exchanged[1] == exchanged[2] < 100, f"{exchanged}")
