"""Devices: one per rank, the CUDA-aware-MPI decision and the transport rules, MPI from other threads,
and (where a GPU exists) host mirrors and GPU checkpoints that load on the CPU."""

import threading

import pytest
import torch
from mpi4py import MPI

from mpi_helpers import assert_all_ranks
from mpipar.comm import cuda_aware, mpi_tensor
from mpipar.comm.device import node_rank, select_device, to_device

OPEN_MPI, MPICH = "Open MPI v5.0.11", "MPICH Version: 4.2.0"


# -- the CUDA-aware decision -------------------------------------------------------------


@pytest.mark.parametrize("library", [OPEN_MPI, MPICH])
def test_decision_follows_the_library_query(library):
    """Open MPI and MPICH both answer MPIX_Query_cuda_support: 1 is aware, 0 is not."""
    assert cuda_aware.decide(library, lambda: 1, environ={}).aware is True
    no = cuda_aware.decide(library, lambda: 0, environ={})
    assert no.aware is False and library in no.reason and "= 0" in no.reason


@pytest.mark.parametrize("library", [OPEN_MPI, MPICH])
def test_a_library_without_the_query_is_not_cuda_aware(library):
    decision = cuda_aware.decide(library, None, environ={})
    assert decision.aware is False and "does not export MPIX_Query_cuda_support" in decision.reason


def test_the_environment_overrides_the_query_both_ways():
    called = []
    assert cuda_aware.decide(OPEN_MPI, None, environ={"MPIPAR_CUDA_AWARE": "1"}).aware is True
    assert cuda_aware.decide(OPEN_MPI, lambda: called.append(1) or 1,
                             environ={"MPIPAR_CUDA_AWARE": "0"}).aware is False
    assert not called  # the override is taken before the library is asked
    with pytest.raises(ValueError, match="MPIPAR_CUDA_AWARE must be 1 or 0"):
        cuda_aware.decide(OPEN_MPI, None, environ={"MPIPAR_CUDA_AWARE": "maybe"})


def test_an_override_the_library_contradicts_is_an_error():
    """MPIPAR_CUDA_AWARE=1 against a library that answers 0 would hand device buffers to an MPI
    that reads them as host memory: refused, naming both. A library that cannot say is trusted."""
    with pytest.raises(RuntimeError, match=r"MPIPAR_CUDA_AWARE=1.*Open MPI v5.0.11: MPIX_Query_cuda_support\(\) = 0"):
        cuda_aware.decide(OPEN_MPI, lambda: 0, environ={"MPIPAR_CUDA_AWARE": "1"})
    assert cuda_aware.decide(OPEN_MPI, lambda: 1, environ={"MPIPAR_CUDA_AWARE": "1"}).aware is True


@pytest.mark.mpi
def test_a_contradicted_override_is_one_clear_error_on_every_rank(comm, monkeypatch):
    """The library's answer can differ by rank (a node whose CUDA did not load): every rank raises."""
    last = comm.Get_rank() == comm.Get_size() - 1
    monkeypatch.setenv("MPIPAR_CUDA_AWARE", "1")
    monkeypatch.setattr(cuda_aware, "_find_query", lambda: (lambda: 0) if last else (lambda: 1))
    cuda_aware.reset()
    try:
        with pytest.raises(RuntimeError, match=rf"MPIPAR_CUDA_AWARE=1.*\[failed on rank {comm.Get_size() - 1}\]"):
            cuda_aware.agreed_cuda_awareness(comm)
    finally:
        cuda_aware.reset()


def test_this_mpi_is_asked_for_real(monkeypatch):
    """The loaded library is found and asked; the PyPI Open MPI and MPICH builds answer 0
    (or do not export the query): not CUDA-aware, with the library named in the reason."""
    monkeypatch.delenv("MPIPAR_CUDA_AWARE", raising=False)
    cuda_aware.reset()
    try:
        decision = cuda_aware.cuda_awareness()
    finally:
        cuda_aware.reset()
    library = cuda_aware.library_name()
    assert library in decision.reason
    if "Open MPI" in library:  # Open MPI 5 exports the query even when built without CUDA
        assert cuda_aware._find_query() is not None and "MPIX_Query_cuda_support() =" in decision.reason
    assert decision.aware is bool(cuda_aware._find_query() and cuda_aware._find_query()())


# -- which calls hand device buffers to MPI ---------------------------------------------


@pytest.mark.parametrize("call", sorted(cuda_aware.DEVICE_BUFFER_CALLS))
def test_cuda_aware_mpi_gets_device_buffers_in_point_to_point_and_blocking_collectives(call):
    assert mpi_tensor.choose_transport("cuda", True, False, call, cuda_aware_mpi=True) == "cuda-aware"
    assert mpi_tensor.choose_transport("cuda", True, False, call, cuda_aware_mpi=False) == "staged"


def test_non_blocking_reductions_of_device_buffers_are_always_staged():
    """Open MPI's CUDA support does not cover them: they would reduce device memory on the host."""
    assert mpi_tensor.choose_transport("cuda", True, False, "iallreduce", cuda_aware_mpi=True) == "staged"


def test_half_precision_reductions_and_strided_tensors_are_staged_everywhere():
    for device, aware in [("cpu", False), ("cuda", True)]:
        assert mpi_tensor.choose_transport(device, True, True, "allreduce", aware) == "staged"
        assert mpi_tensor.choose_transport(device, False, False, "send", aware) == "staged"
    assert mpi_tensor.choose_transport("cpu", True, True, "send", False) == "host"  # raw bytes move as they are
    assert mpi_tensor.choose_transport("cpu", True, False, "iallreduce", False) == "host"


# -- MPI from another thread --------------------------------------------------------------


def run_in_thread(function):
    errors = []

    def target():
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=target, name="autograd-like")
    thread.start()
    thread.join()
    return errors


def test_mpi_from_another_thread_needs_thread_multiple(monkeypatch):
    tensor = torch.ones(3)
    monkeypatch.setattr(mpi_tensor, "_thread_multiple", False)
    errors = run_in_thread(lambda: mpi_tensor.allreduce_(tensor, MPI.COMM_SELF))
    assert len(errors) == 1 and "MPI_THREAD_MULTIPLE" in str(errors[0]) and "autograd-like" in str(errors[0])
    mpi_tensor.allreduce_(tensor, MPI.COMM_SELF)  # the main thread is always allowed
    monkeypatch.setattr(mpi_tensor, "_thread_multiple", True)
    assert run_in_thread(lambda: mpi_tensor.allreduce_(tensor, MPI.COMM_SELF)) == []


# -- choosing the device -----------------------------------------------------------------


@pytest.mark.mpi
def test_node_rank_counts_the_ranks_of_this_node(comm):
    local, on_node = node_rank(comm)
    assert_all_ranks(comm, (local, on_node) == (comm.Get_rank(), comm.Get_size()),  # one node here
                     f"node rank {local} of {on_node}")


@pytest.mark.mpi
def test_cpu_and_auto_without_gpus(comm):
    assert_all_ranks(comm, select_device(comm, "cpu") == torch.device("cpu"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert_all_ranks(comm, select_device(comm, "auto").type == expected)


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error_on_every_rank(comm):
    with pytest.raises(ValueError, match=r"--device: cuda asked for, but rank\(s\) \[0"):
        select_device(comm, "cuda")


def test_unknown_device_choice():
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda"):
        select_device(MPI.COMM_SELF, "tpu")


def test_to_device_moves_nested_batches():
    batch = {"x": (torch.ones(2), [torch.zeros(1)]), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["x"][0], torch.ones(2)) and isinstance(moved["x"][1], list) and moved["n"] == 3


# -- on a GPU ----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.cuda
def test_host_mirror_round_trip():
    from mpipar.comm.staging import HostMirror

    device_tensor = torch.arange(1000.0, device="cuda")
    mirror = HostMirror(device_tensor)
    device_tensor.mul_(2)  # queued before the download: the copy must see it
    mirror.download()
    mirror.wait()
    assert mirror.ready() and mirror.host.is_pinned() and torch.equal(mirror.host, torch.arange(1000.0) * 2)
    mirror.host.add_(1)
    mirror.upload()
    assert torch.equal(device_tensor.cpu(), torch.arange(1000.0) * 2 + 1)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.mpi(min_size=2)
def test_cuda_reducer_mirrors_buckets_and_overlaps_backward(comm):
    """Several buckets on the GPU: each is mirrored on the host, reduced there, and at least
    one bucket's reduction starts before backward ends."""
    import mpipar

    device = select_device(comm, "cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)]).to(device)
    dp = mpipar.DataParallel(model, comm, bucket_cap_mb=0.25)
    x = torch.randn(8, 256, device=device) * (comm.Get_rank() + 1)
    dp(x).square().mean().backward()
    mirrored = all(bucket.mirror is not None for bucket in dp.buckets)
    reference = model[0].weight.grad.detach().cpu()
    gathered = comm.allgather(reference)
    assert_all_ranks(comm, mirrored and len(dp.buckets) >= 4 and dp._reducer.launched_early > 0
                     and all(torch.equal(g, gathered[0]) for g in gathered),
                     f"{len(dp.buckets)} buckets, mirrored {mirrored}, early {dp._reducer.launched_early}")


@needs_gpu
@pytest.mark.cuda
@pytest.mark.mpi
@pytest.mark.parametrize("transport", ["staged", "cuda-aware"])
def test_cuda_tensors_in_every_call(comm, transport, monkeypatch):
    """Blocking and non-blocking collectives and point-to-point on CUDA tensors, on the staged
    transport and (where the MPI is CUDA-aware) the device-buffer one."""
    if transport == "cuda-aware" and not cuda_aware.decide(cuda_aware.library_name(), cuda_aware._find_query(),
                                                           environ={}).aware:
        pytest.skip("this MPI is not CUDA-aware")
    monkeypatch.setenv("MPIPAR_CUDA_AWARE", "1" if transport == "cuda-aware" else "0")
    cuda_aware.reset()
    try:
        size, rank = comm.Get_size(), comm.Get_rank()
        device = select_device(comm, "cuda")
        tensor = torch.full((1000,), float(rank), device=device, requires_grad=True) * 2
        mpi_tensor.allreduce_(tensor, comm)
        pending = mpi_tensor.iallreduce_(torch.ones(10, device=device, dtype=torch.float16), comm)
        gathered = torch.empty(size, 3, device=device)
        mpi_tensor.allgather_(gathered, torch.full((3,), float(rank), device=device), comm)
        ring = torch.empty(4, device=device)
        receive = mpi_tensor.irecv_(ring, comm, (rank - 1) % size)
        mpi_tensor.send(torch.full((4,), float(rank), device=device), comm, (rank + 1) % size)
        receive.wait()
        ok = (torch.equal(tensor.detach().cpu(), torch.full((1000,), float(size * (size - 1))))
              and torch.equal(pending.wait().cpu(), torch.full((10,), float(size), dtype=torch.float16))
              and torch.equal(gathered.cpu(), torch.arange(size).float().repeat_interleave(3).view(size, 3))
              and torch.equal(ring.cpu(), torch.full((4,), float((rank - 1) % size))))
        assert_all_ranks(comm, ok, f"{transport}: wrong values")
    finally:
        cuda_aware.reset()
