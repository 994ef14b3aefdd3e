"""DataParallel on N ranks equals one process on the whole batch.

The comparisons with a serial reference run on CPU and, where a GPU exists, on CUDA (the
``device`` fixture, ``tests/conftest.py``): models are built on CPU from the seed and moved
there, reference and replica alike; batches are made on CPU and moved.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import mpipar
from mpi_helpers import assert_all_ranks, assert_close_all_ranks
from mpipar.comm import mpi_tensor
from mpipar.comm.reducer import GradientReducer, check_one_device

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 models: only summation order differs


def tiny_convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4, 5))


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5))


def global_batch(total: int, step: int, device="cpu"):
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(total, 1, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (total,), generator=generator)
    return images.to(device), labels.to(device)


def shares(total: int, size: int, skew: int):
    """Per-rank sample counts summing to ``total``; with ``skew`` ranks differ."""
    counts = [total // size + (1 if r < total % size else 0) for r in range(size)]
    if skew and size > 1:
        counts[0] += skew
        counts[-1] -= skew
    offsets = [sum(counts[:r]) for r in range(size)]
    return counts, offsets


def train_both(comm, make_model, device, *, steps=4, per_rank=6, skew=0, bucket_mb=25.0, weighted=True,
               out_of_place=None):
    """Train a DataParallel replica and a serial reference on ``device``; return both models."""
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = make_model().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, comm, bucket_cap_mb=bucket_mb, weighted=weighted, out_of_place=out_of_place)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt_dp = torch.optim.SGD(replica.parameters(), lr=0.1, momentum=0.9)
    total = per_rank * size
    counts, offsets = shares(total, size, skew)
    for step in range(steps):
        images, labels = global_batch(total, step, device)
        opt_ref.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        opt_ref.step()
        mine = slice(offsets[rank], offsets[rank] + counts[rank])
        opt_dp.zero_grad()
        F.cross_entropy(dp(images[mine]), labels[mine]).backward()
        opt_dp.step()
    return reference, replica


def assert_same_parameters(comm, reference, replica, tol=TOL):
    for (name, p_ref), p_dp in zip(reference.named_parameters(), replica.parameters()):
        assert_close_all_ranks(comm, p_dp.detach(), p_ref.detach(), what=name, **tol)


@pytest.mark.mpi
@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_convnet])
def test_equal_shards_match_one_process_on_whole_batch(comm, make_model, device):
    reference, replica = train_both(comm, make_model, device)
    assert_same_parameters(comm, reference, replica)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("skew", [1, 3])
def test_unequal_shards_give_sample_weighted_mean(comm, skew, device):
    reference, replica = train_both(comm, tiny_mlp, device, per_rank=7, skew=skew)
    assert_same_parameters(comm, reference, replica)


@pytest.mark.mpi
@pytest.mark.parametrize("skew", [0, 2])
def test_out_of_place_reduction_matches_one_process(comm, skew):
    """Buckets reduced from separate send buffers (the default across nodes) give the same training;
    the send buffers exist (so the path ran) and ``.grad`` stay views into the buckets."""
    skew = skew if comm.Get_size() > 1 else 0
    reference, replica = train_both(comm, tiny_convnet, "cpu", per_rank=7, skew=skew, bucket_mb=1e-4,
                                    out_of_place=True)
    assert_same_parameters(comm, reference, replica)
    dp = mpipar.DataParallel(copy.deepcopy(reference), comm, bucket_cap_mb=1e-4, out_of_place=True)
    sources = [bucket.source is not None for bucket in dp.buckets]
    assert_all_ranks(comm, all(sources) if comm.Get_size() > 1 else not any(sources),
                     f"send buffers {sources} at size {comm.Get_size()}")


@pytest.mark.mpi
def test_out_of_place_defaults_to_whether_ranks_span_nodes(comm):
    from mpipar.comm.topology import node_indices
    dp = mpipar.DataParallel(tiny_mlp(), comm)
    assert_all_ranks(comm, dp.out_of_place == (len(set(node_indices(comm))) > 1), "out_of_place default")


@pytest.mark.mpi(min_size=2)
def test_unweighted_mean_differs_on_unequal_shards(comm, device):
    """The plain mean is not the full-batch gradient: the weighting is doing work."""
    reference, replica = train_both(comm, tiny_mlp, device, per_rank=7, skew=3, weighted=False)
    differs = any(not torch.allclose(a, b, **TOL) for a, b in zip(reference.parameters(), replica.parameters()))
    assert_all_ranks(comm, differs, "plain mean unexpectedly equal to the weighted one")


@pytest.mark.mpi
def test_many_small_buckets_equal_one_flat_allreduce(comm, device):
    """Gradients from bucketed, overlapped reduction equal one flat Allreduce of all gradients."""
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    base = tiny_convnet().double().to(device)
    images, labels = global_batch(4 * size, 0, device)
    mine = slice(4 * rank, 4 * rank + 4)

    flat_model = copy.deepcopy(base)
    F.cross_entropy(flat_model(images[mine]), labels[mine]).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in flat_model.parameters()]).cpu()
    comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)  # the reference reduction, on the host
    flat = flat.to(device) / size

    small = copy.deepcopy(base)
    dp = mpipar.DataParallel(small, comm, bucket_cap_mb=1e-4)  # ~100 bytes: one parameter per bucket
    assert_all_ranks(comm, len(dp.buckets) == len(list(small.parameters())), "expected one bucket per parameter")
    F.cross_entropy(dp(images[mine]), labels[mine]).backward()
    bucketed = torch.cat([p.grad.reshape(-1) for p in small.parameters()])
    assert_close_all_ranks(comm, bucketed, flat, what="bucketed vs flat", **TOL)


@pytest.mark.mpi
def test_grads_are_views_into_buckets(comm):
    model = tiny_mlp().double()
    dp = mpipar.DataParallel(model, comm)
    images, labels = global_batch(3, 0)
    F.cross_entropy(dp(images), labels).backward()
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.buffer.untyped_storage().data_ptr() for b in dp.buckets}
    assert_all_ranks(comm, storages <= buffers, "a .grad is not a view into a bucket buffer")


@pytest.mark.mpi
def test_no_sync_accumulation_equals_whole_batch(comm, device):
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = tiny_mlp().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, comm)
    images, labels = global_batch(8 * size, 0, device)
    F.cross_entropy(reference(images), labels).backward()
    mine_images, mine_labels = images[8 * rank:8 * rank + 8], labels[8 * rank:8 * rank + 8]
    with dp.no_sync():
        for part in range(3):  # 3 local micro-batches without communication
            sl = slice(2 * part, 2 * part + 2)
            (F.cross_entropy(dp(mine_images[sl]), mine_labels[sl]) / 4).backward()
    (F.cross_entropy(dp(mine_images[6:]), mine_labels[6:]) / 4).backward()
    for (name, p_ref), p_dp in zip(reference.named_parameters(), replica.parameters()):
        assert_close_all_ranks(comm, p_dp.grad, p_ref.grad, what=name, **TOL)


class TwoBranch(nn.Module):
    """``branch`` is used only when the input batch is odd-sized: unused on some ranks."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(16, 5)
        self.branch = nn.Linear(16, 5)

    def forward(self, x):
        x = x.flatten(1)
        out = self.trunk(x)
        return out + self.branch(x) if len(x) % 2 else out


@pytest.mark.mpi(min_size=2)
def test_parameters_unused_on_some_ranks_do_not_hang(comm, device):
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = TwoBranch().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, comm, bucket_cap_mb=1e-4)
    counts = [4 if r % 2 == 0 else 3 for r in range(size)]
    offsets = [sum(counts[:r]) for r in range(size)]
    images, labels = global_batch(sum(counts), 0, device)
    # reference: per-sample losses with each rank's own forward, weighted by counts
    total = torch.zeros((), dtype=torch.float64, device=device)
    for r in range(size):
        sl = slice(offsets[r], offsets[r] + counts[r])
        total = total + F.cross_entropy(reference(images[sl]), labels[sl]) * counts[r]
    (total / sum(counts)).backward()
    sl = slice(offsets[rank], offsets[rank] + counts[rank])
    F.cross_entropy(dp(images[sl]), labels[sl]).backward()
    for (name, p_ref), p_dp in zip(reference.named_parameters(), replica.parameters()):
        assert_close_all_ranks(comm, p_dp.grad, p_ref.grad, what=name, **TOL)


@pytest.mark.mpi
def test_construction_broadcasts_rank0_parameters_and_buffers(comm):
    torch.manual_seed(comm.Get_rank())  # different on every rank
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(comm.Get_rank())
    mpipar.DataParallel(model, comm)
    state = torch.cat([t.reshape(-1).float() for t in model.state_dict().values()])
    root_state = torch.from_numpy(comm.bcast(state.numpy(), root=0))
    assert_close_all_ranks(comm, state, root_state, rtol=0, atol=0, what="state after broadcast")


@pytest.mark.mpi(min_size=2)
def test_different_models_on_ranks_are_refused_on_every_rank(comm):
    width = 4 if comm.Get_rank() == 0 else 5
    with pytest.raises(ValueError, match="ranks disagree on model parameters"):
        mpipar.DataParallel(nn.Linear(width, 2), comm)


def test_size_one_matches_plain_module(device):
    torch.manual_seed(0)
    reference = tiny_convnet().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, MPI.COMM_SELF)
    images, labels = global_batch(5, 0, device)
    F.cross_entropy(reference(images), labels).backward()
    F.cross_entropy(dp(images), labels).backward()
    for p_ref, p_dp in zip(reference.parameters(), replica.parameters()):
        if device.type == "cpu":
            assert torch.equal(p_ref.grad, p_dp.grad)
        else:  # cuDNN may pick a convolution backward that accumulates with atomics: not bitwise repeatable
            assert torch.allclose(p_ref.grad, p_dp.grad, **TOL)
    assert dp.stats.take().bytes_sent == 0


def test_training_on_comm_self_matches_reference(device):
    reference, replica = train_both(MPI.COMM_SELF, tiny_mlp, device)
    for p_ref, p_dp in zip(reference.parameters(), replica.parameters()):
        assert torch.equal(p_ref, p_dp)


@pytest.mark.mpi
def test_sync_buffers_averages_running_statistics(comm):
    model = nn.BatchNorm1d(2)
    dp = mpipar.DataParallel(model, comm)
    with torch.no_grad():
        model.running_mean.fill_(float(comm.Get_rank()))
    dp.sync_buffers()
    expected = torch.full((2,), (comm.Get_size() - 1) / 2)
    assert_close_all_ranks(comm, model.running_mean, expected, rtol=0, atol=1e-6, what="running_mean")


def test_bad_bucket_size_is_rejected():
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        mpipar.DataParallel(nn.Linear(2, 2), MPI.COMM_SELF, bucket_cap_mb=0)


def test_one_device_per_reducer_is_decided_from_the_device_list():
    """CPU and CUDA buckets could start in different orders on different ranks (a CUDA bucket waits
    for its host copy). No GPU needed: the rule reads a list of devices."""
    check_one_device([])
    check_one_device([torch.device("cuda", 0)] * 3)
    with pytest.raises(ValueError, match=r"^the parameters are on 2 devices \(2 on cpu, 1 on cuda:0\); .*\.to\("):
        check_one_device([torch.device("cpu"), torch.device("cuda", 0), torch.device("cpu")])
    with pytest.raises(ValueError, match="on 2 devices"):
        GradientReducer([nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1, device="meta"))], MPI.COMM_SELF)


@pytest.mark.mpi
def test_parameters_on_several_devices_are_refused_on_every_rank(comm):
    last = comm.Get_rank() == comm.Get_size() - 1
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta" if last else "cpu"))  # "meta": no GPU here
    with pytest.raises(ValueError) as caught:
        mpipar.DataParallel(model, comm)
    text = str(caught.value)
    assert_all_ranks(comm, text.startswith("DataParallel: the parameters are on 2 devices (2 on cpu, 2 on meta)")
                     and text.endswith(f"[failed on rank {comm.Get_size() - 1}]"), text)


@pytest.mark.mpi
def test_every_ranks_buffers_are_gathered_and_restored(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    dp = mpipar.DataParallel(model, comm)
    with torch.no_grad():
        model[1].running_mean.fill_(rank)  # replicas' statistics drift apart between syncs
    gathered = comm.bcast(dp.gather_buffers(root=0), root=0)
    ok = [float(b["1.running_mean"][0]) for b in gathered] == [float(r) for r in range(size)]
    with torch.no_grad():
        model[1].running_mean.zero_()
    ok = ok and dp.load_rank_buffers(gathered) and float(model[1].running_mean[0]) == rank
    ok = ok and not dp.load_rank_buffers(gathered + gathered[:1])  # for another world size: nothing loaded
    assert_all_ranks(comm, ok and float(model[1].running_mean[0]) == rank, f"{gathered}")


def record_reductions(monkeypatch) -> list:
    """Every PendingOp the reducer's non-blocking Allreduces return from now on."""
    started = []
    real = mpi_tensor.iallreduce_

    def recording(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(mpi_tensor, "iallreduce_", recording)
    return started


def assert_all_completed(comm, started, what):
    """Every started request completed: none left for a later step to overwrite or drop."""
    pending = sum(not op._done for op in started)
    assert_all_ranks(comm, len(started) > 0 and pending == 0, f"{what}: {pending} of {len(started)} still pending")


@pytest.mark.mpi(min_size=2)
def test_reducer_without_buckets_completes_its_sample_counts(comm, monkeypatch):
    started = record_reductions(monkeypatch)
    reducer = GradientReducer([], comm)  # a replicated pipeline stage with no parameters; all frozen
    for _ in range(3):
        reducer.begin(num_samples=2)
        reducer.finish()
    assert_all_completed(comm, started, "begin/finish without buckets")


def two_bucket_reducer(comm):
    params = [nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2)]
    reducer = GradientReducer(params, comm, bucket_cap_mb=1e-6)  # one parameter per bucket
    assert len(reducer.buckets) == 2 and reducer.buckets[0].params[0] is params[1]
    return reducer, params


@pytest.mark.mpi(min_size=2)
def test_reducer_error_paths_complete_every_request(comm, monkeypatch):
    started = record_reductions(monkeypatch)
    reducer, (first, last) = two_bucket_reducer(comm)
    reducer.begin(num_samples=1)
    reducer.begin(num_samples=1)   # a step that never finished: its sample counts are completed, not dropped
    reducer.mark_ready(last)       # starts bucket 0
    reducer.abandon()              # and abandoning completes it
    assert_all_completed(comm, started, "begin twice, abandon after a bucket started")
    reducer.begin(num_samples=1)
    reducer.mark_ready(first)      # bucket 1 waits for bucket 0: nothing started but the counts
    with pytest.raises(RuntimeError, match="more than once"):
        reducer.mark_ready(first)  # drains: the counts are completed too
    assert_all_completed(comm, started, "a gradient marked twice")
    reducer.begin(num_samples=1)
    reducer.finish()
    assert_all_completed(comm, started, "a step after the errors")


@pytest.mark.mpi
def test_strategy_records_the_bytes_each_rank_holds(comm, mpi_tmp_path):
    """The loop with DataParallelStrategy and AdamW (a frozen bias among the parameters): every step's row
    holds the model's parameter bytes, the bytes of the gradients after the reduction (the trainable
    parameters'), and AdamW's state bytes as the step found them (none before the first update), on every rank
    (ZeRO stage 0 beside ShardedStrategy's stages)."""
    import h5py

    from mpi_helpers import float64_mlp, loop_session, shared_directory
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    steps, sizes = 3, (784, 16, 12, 10)
    model = float64_mlp(sizes, 3)
    frozen = [module for module in model if isinstance(module, nn.Linear)][0].bias
    frozen.requires_grad_(False)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    reference = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in trainable])  # its state's bytes
    for p in reference.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    reference.step()
    state_bytes = sum(v.numel() * v.element_size() for per in reference.state.values() for v in per.values()
                      if isinstance(v, torch.Tensor))
    out = shared_directory(comm, mpi_tmp_path) / "run"
    run = loop_session(comm, out, 4, max_steps=steps, flush_every=2, optimizer="adamw", weight_decay=0.01)
    train(run, DataParallelStrategy(model, comm), synthetic(200, 20, seed=0))
    problems = []
    if comm.Get_rank() == 0:
        with h5py.File(out / "metrics.h5", "r") as f:
            held = {key: f[f"steps/{key}"][...] for key in ("param_bytes", "grad_bytes", "optimizer_bytes")}
        size = comm.Get_size()
        want = {"param_bytes": sum(p.numel() for p in params) * 8.0,
                "grad_bytes": sum(p.numel() for p in trainable) * 8.0}
        for key, value in want.items():
            if held[key].shape != (steps, size) or (held[key] != value).any():
                problems.append(f"{key}: {held[key].tolist()}, want {value} everywhere")
        state = held["optimizer_bytes"]
        if state.shape != (steps, size) or (state[0] != 0).any() or (state[1:] != state_bytes).any() \
                or state_bytes < 2 * want["grad_bytes"]:
            problems.append(f"optimizer_bytes {state.tolist()}, want 0 then {state_bytes}")
    assert_all_ranks(comm, not problems, "; ".join(problems))
