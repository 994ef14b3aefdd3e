"""Local SGD on N ranks equals its serial simulation (every rank's model and optimizer in one process), averaging
every step equals one process on the whole batch, and the weighted model average is one collective.

The simulation is written from the definitions (weighted means, the DiLoCo outer step as a formula), not from
the strategy's code; every rank computes it for all ranks and compares its own model after every step.
"""

import copy

import h5py
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

import mpi_helpers
from mpi_helpers import assert_all_ranks, assert_comm_still_usable, count_tensor_calls, float64_mlp, shared_directory
from mpipar.comm.averaging import average_tensors
from mpipar.comm.reducer import CommStats
from mpipar.data import synthetic
from mpipar.data.sharding import step_plan
from mpipar.data_parallel.strategy import DataParallelStrategy
from mpipar.diagnostics.failure import AgreedError
from mpipar.local_sgd import LocalSGDConfig, LocalSGDStrategy, OuterOptimizer, sync_every_flag
from mpipar.run.loop import train

TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the order of sums differs
STEPS, GLOBAL_BATCH, FEATURES, CLASSES = 8, 10, 6, 4  # 10 samples: uneven shares on 3 and 4 ranks


class Net(nn.Module):
    """What users bring: BatchNorm, a frozen layer, and a layer only some ranks use (``uses_extra``).
    Without ``batchnorm`` (statistics of a rank's shard are not those of the whole batch) N ranks can
    equal one process on the whole batch."""

    def __init__(self, uses_extra: bool, batchnorm: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8) if batchnorm else nn.Identity(),
                                  nn.Tanh())
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.extra = nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)
        self.uses_extra = uses_extra

    def forward(self, x):
        h = torch.tanh(self.frozen(self.body(x)))
        if self.uses_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


def build(rank: int, batchnorm: bool = True) -> Net:
    """The same initial weights on every rank; odd ranks use ``extra`` (so on one rank nobody does)."""
    torch.manual_seed(3)
    return Net(uses_extra=rank % 2 == 1, batchnorm=batchnorm).double()


def data(device):
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(STEPS * GLOBAL_BATCH, FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (len(inputs),), generator=generator)
    return inputs.to(device), labels.to(device)


def plan(size):
    """Each step's shares of the global batch per rank (they differ by at most one)."""
    return step_plan(STEPS * GLOBAL_BATCH, GLOBAL_BATCH // size, size, seed=0, epoch=0, global_batch=GLOBAL_BATCH)


def make_optimizer(params, momentum):
    if momentum:
        return torch.optim.SGD(params, lr=0.2, momentum=momentum, nesterov=True, weight_decay=1e-3)
    return torch.optim.SGD(params, lr=0.2)


def weighted_mean(tensors, weights):
    return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)


def simulate(size, config, momentum, device):
    """Local SGD of ``size`` ranks in one process. Returns, after every step (and after the epoch end's
    average, as a last entry), every rank's state dict."""
    replicas = [build(rank).to(device) for rank in range(size)]
    optimizers = [make_optimizer(m.parameters(), momentum) for m in replicas]
    inputs, labels = data(device)
    trainable = [name for name, p in replicas[0].named_parameters() if p.requires_grad]
    buffers = [name for name, _ in replicas[0].named_buffers()]
    global_weights = {name: p.detach().clone() for name, p in replicas[0].named_parameters()}
    outer_buffer = {}
    samples, local, since, history = [0] * size, 0, 0, []

    def average():
        nonlocal local, since, samples
        tensors = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in replicas]
        with torch.no_grad():
            for name in trainable + buffers:
                if tensors[0][name].is_floating_point():
                    mean = weighted_mean([t[name] for t in tensors], samples)
                else:
                    mean = tensors[0][name].clone()
                if config.outer_optimizer and name in trainable:  # DiLoCo: SGD on global along global - average
                    outer_gradient = global_weights[name] - mean
                    if config.outer_momentum:
                        outer_buffer[name] = outer_gradient.clone() if name not in outer_buffer else \
                            config.outer_momentum * outer_buffer[name] + outer_gradient
                        outer_gradient = outer_gradient + config.outer_momentum * outer_buffer[name]
                    mean = global_weights[name] - config.outer_lr * outer_gradient
                    global_weights[name] = mean.clone()
                for t in tensors:
                    t[name].copy_(mean)
        local = since = 0
        samples = [0] * size

    for step, shards in enumerate(plan(size)):
        warmup = step < config.local_warmup
        if step == config.local_warmup:  # the first global weights: the warm-up's result
            global_weights = {name: p.detach().clone() for name, p in replicas[0].named_parameters()}
        for model, optimizer, shard in zip(replicas, optimizers, shards):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[shard]), labels[shard]).backward()
        if warmup:  # data parallelism: the sample-weighted mean gradient (zeros where a rank had none)
            for name in trainable:
                grads = [dict(m.named_parameters())[name].grad for m in replicas]
                if all(g is None for g in grads):
                    continue
                mean = weighted_mean([torch.zeros_like(dict(replicas[0].named_parameters())[name]) if g is None
                                      else g for g in grads], [len(s) for s in shards])
                for m in replicas:
                    dict(m.named_parameters())[name].grad = mean.clone()
        for optimizer in optimizers:
            optimizer.step()
        samples = [n + len(s) for n, s in zip(samples, shards)]
        since += 1
        local += not warmup
        if not warmup and local == config.sync_every:
            average()
        history.append([copy.deepcopy(m.state_dict()) for m in replicas])
    if since:
        average()  # the epoch end
    history.append([copy.deepcopy(m.state_dict()) for m in replicas])
    return history


def one_process_on_the_whole_batch(momentum, device, steps):
    """Serial training of one model on every step's whole global batch."""
    model = build(0, batchnorm=False).to(device)
    optimizer = make_optimizer(model.parameters(), momentum)
    inputs, labels = data(device)
    states = []
    for shards in plan(1)[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[shards[0]]), labels[shards[0]]).backward()
        optimizer.step()
        states.append(copy.deepcopy(model.state_dict()))
    return states


def differences(mine: dict, theirs: dict, names) -> list:
    return [f"{name}: {(mine[name] - theirs[name]).abs().max().item():.2e}" for name in names
            if not torch.allclose(mine[name].double(), theirs[name].double(), **TOL)]


CASES = {  # name: (config, inner momentum, use an outer optimizer at lr 1 and momentum 0)
    "every_step_plain_sgd": (LocalSGDConfig(sync_every=1), 0.0, False),
    "warmup_then_every_3": (LocalSGDConfig(sync_every=3, local_warmup=2), 0.9, False),
    "one_shot_at_the_end": (LocalSGDConfig(sync_every=0), 0.9, False),
    "outer_lr_1_momentum_0": (LocalSGDConfig(sync_every=2), 0.0, True),
    "diloco_outer_nesterov": (LocalSGDConfig(sync_every=2, local_warmup=1, outer_lr=0.7, outer_momentum=0.6),
                              0.9, False),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES)
def test_local_sgd_equals_its_serial_simulation(comm, device, case):
    """After every step each rank's parameters and buffers equal its simulated model; ranks are equal after
    warm-up steps and averages (BatchNorm statistics too after averages) and differ between them; ``synced``
    marks exactly those steps; bytes: the gradient per warm-up step, the model per average, none otherwise."""
    config, momentum, outer_at_one = CASES[case]
    size, rank = comm.Get_size(), comm.Get_rank()
    reference = simulate(size, config, momentum, device)
    model = build(rank)
    strategy = LocalSGDStrategy(model, comm, config, device=device)
    frozen_before = model.frozen.weight.detach().clone()
    if outer_at_one:  # the outer step forced on: lr 1, no momentum must be the plain average
        strategy.outer = OuterOptimizer(strategy.averaged, lr=1.0, momentum=0.0)
    strategy.bind_optimizer(make_optimizer(strategy.parameters(), momentum))
    inputs, labels = data(device)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    float_buffers = [name for name, b in model.named_buffers() if b.is_floating_point()]
    names = trainable + [name for name, _ in model.named_buffers()]
    parameter_bytes = sum(p.numel() for p in strategy.averaged) * 8
    model_bytes = (sum(p.numel() for p in strategy.averaged) + sum(dict(model.named_buffers())[n].numel()
                                                                  for n in float_buffers) + 2) * 8
    int_bytes = sum(b.numel() * 8 for b in model.buffers() if not b.is_floating_point())
    ring = 2 * (size - 1) / size
    problems = []
    for step, shards in enumerate(plan(size)):
        strategy.optimizer.zero_grad()
        record = strategy.train_step((inputs[shards[rank]], labels[shards[rank]]))
        warmup = step < config.local_warmup
        averaged = not warmup and config.sync_every and (step + 1 - config.local_warmup) % config.sync_every == 0
        if record.extra != {"synced": float(warmup or averaged)}:
            problems.append(f"step {step}: {record.extra}, expected synced {int(warmup or averaged)}")
        expected_bytes = ring * parameter_bytes if warmup else \
            ring * model_bytes + (size - 1) / size * int_bytes if averaged else 0.0
        if record.bytes_sent != pytest.approx(expected_bytes) or record.samples != len(shards[rank]):
            problems.append(f"step {step}: {record.bytes_sent} bytes sent, expected {expected_bytes}")
        state = model.state_dict()
        problems += [f"step {step} {d}" for d in differences(state, reference[step][rank], names)]
        everyone = comm.allgather({name: state[name].cpu() for name in names})
        same = {name: all(torch.allclose(s[name], everyone[0][name], rtol=0, atol=1e-13) for s in everyone)
                for name in names}
        if size > 1:
            apart = [name for name in (trainable if warmup else trainable + float_buffers)
                     if not same[name] and (warmup or averaged)]
            if apart:
                problems.append(f"step {step}: ranks differ after a sync in {apart}")
            if not (warmup or averaged) and same["head.weight"]:
                problems.append(f"step {step}: the ranks' models are equal after a local step")
            if warmup and same["body.1.running_mean"]:  # data parallelism leaves statistics alone
                problems.append(f"step {step}: BatchNorm statistics equal in warm-up")
            if not (warmup or averaged) and same["body.1.running_mean"]:
                problems.append(f"step {step}: BatchNorm statistics equal before an average")
    strategy.end_epoch()  # an average: every rank evaluates the same model
    state = model.state_dict()
    problems += [f"epoch end {d}" for d in differences(state, reference[-1][rank], names)]
    if not torch.equal(model.frozen.weight, frozen_before):
        problems.append("the frozen layer changed")
    everyone = comm.allgather({name: state[name].cpu() for name in names})
    if not all(torch.allclose(s[n], everyone[0][n], rtol=0, atol=1e-13) for s in everyone for n in names):
        problems.append("ranks differ after the epoch end")
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))


@pytest.mark.mpi
@pytest.mark.parametrize("momentum,steps", [(0.0, STEPS), (0.9, 2)])
def test_warmup_and_every_step_averaging_equal_one_process_on_the_whole_batch(comm, device, momentum, steps):
    """Averaging every step with plain SGD, and synchronous warm-up steps with any SGD, equal one process
    training on the whole global batch (uneven shares on 3 and 4 ranks)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    config = LocalSGDConfig(sync_every=1) if momentum == 0 else LocalSGDConfig(sync_every=4, local_warmup=steps)
    serial = one_process_on_the_whole_batch(momentum, device, steps)
    model = build(0, batchnorm=False)  # no rank uses the extra layer here
    strategy = LocalSGDStrategy(model, comm, config, device=device)
    strategy.bind_optimizer(make_optimizer(strategy.parameters(), momentum))
    inputs, labels = data(device)
    names = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("extra")]
    problems = []
    for step, shards in enumerate(plan(size)[:steps]):
        strategy.optimizer.zero_grad()
        strategy.train_step((inputs[shards[rank]], labels[shards[rank]]))
        problems += [f"step {step} {d}" for d in differences(model.state_dict(), serial[step], names)]
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))


# -- through the loop ----------------------------------------------------------------------------------------

LOOP_STEPS, LOOP_BATCH = 4, 6


def mlp():
    return float64_mlp([784, 16, 10], 7)


def loop_session(comm, out, batch_size, settings=None):
    return mpi_helpers.loop_session(comm, out, batch_size, settings, max_steps=LOOP_STEPS, flush_every=2,
                                    checkpoint_every=2)


@pytest.mark.mpi
def test_every_step_averaging_through_the_loop_equals_one_process(comm, mpi_tmp_path):
    """The loop's SGD (Nesterov momentum, weight decay, one-cycle schedule) with an average after every step
    equals the loop on one process over the whole batch (equal shares: each rank's momentum is then a
    share of the global one); the metrics mark every step synced; every rank saves its own checkpoint."""
    size, rank = comm.Get_size(), comm.Get_rank()
    directory = shared_directory(comm, mpi_tmp_path)
    splits = synthetic(600, 100, seed=0)
    reference = mlp()
    train(loop_session(MPI.COMM_SELF, directory / f"serial-{rank}", LOOP_BATCH * size),
          DataParallelStrategy(reference, MPI.COMM_SELF), splits)
    model = mlp()
    config = LocalSGDConfig(sync_every=1)
    run = loop_session(comm, directory / "local", LOOP_BATCH, settings=config)
    stopped = train(run, LocalSGDStrategy(model, comm, config, state=run.state), splits)
    problems = ["stopped early"] if stopped else []
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        if not torch.allclose(mine, theirs, **TOL):
            problems.append(f"{name}: max difference {(mine - theirs).abs().max().item():.2e}")
    with h5py.File(directory / "local" / "metrics.h5", "r") as f:
        synced, sent = f["steps/synced"][...], f["steps/bytes_sent"][...]
        strategy_name = f.attrs["strategy"]
    if synced.shape != (LOOP_STEPS, size) or not (synced == 1).all() or strategy_name != "local_sgd":
        problems.append(f"metrics: synced {synced.tolist()}, strategy {strategy_name}")
    if size > 1 and not (sent > 0).all():
        problems.append(f"bytes sent {sent.tolist()}")
    files = sorted(p.name for p in (directory / "local" / "checkpoints" / "step-000000004").glob("rank-*.pt"))
    if files != [f"rank-{r}.pt" for r in range(size)]:
        problems.append(f"checkpoint files {files}")
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))


# -- the averaging collective --------------------------------------------------------------------------------

@pytest.mark.mpi
def test_average_tensors_is_the_weighted_mean_in_one_collective_per_dtype(comm, monkeypatch):
    size, rank = comm.Get_size(), comm.Get_rank()

    def tensors_of(r):
        generator = torch.Generator().manual_seed(r)
        return [torch.randn(3, 2, generator=generator, dtype=torch.float64),
                torch.randn(5, generator=generator).to(torch.float16),
                torch.randn(4, generator=generator, dtype=torch.float64),
                torch.full((2,), r, dtype=torch.int64), torch.tensor([r % 2 == 0])]

    mine = tensors_of(rank)
    original = [t.clone() for t in mine]
    weights = [r + 1 for r in range(size)]
    stats = CommStats()
    calls = count_tensor_calls(monkeypatch)
    average_tensors(mine + [mine[0]], comm, weight=weights[rank], stats=stats)  # listed twice: averaged once
    everyone = [tensors_of(r) for r in range(size)]
    problems = []
    for index, tensor in enumerate(mine):
        if tensor.is_floating_point():
            expected = weighted_mean([t[index].double() for t in everyone], weights).to(tensor.dtype)
            tolerance = dict(rtol=1e-2, atol=1e-2) if tensor.dtype == torch.float16 else TOL
        else:
            expected, tolerance = everyone[0][index], {}
        if not (torch.allclose(tensor.double(), expected.double(), **tolerance) if tolerance else
                torch.equal(tensor, expected)):
            problems.append(f"tensor {index}: {tensor.tolist()} != {expected.tolist()}")
    if size == 1:  # nothing to average with: left as they were, bitwise, with no communication
        problems += [f"tensor {i} changed" for i, (a, b) in enumerate(zip(mine, original)) if not torch.equal(a, b)]
        problems += [f"calls {calls}, bytes {stats.bytes_sent}"] if calls or stats.bytes_sent else []
    else:  # float64 and float16 (in float32): one Allreduce each; int64 and bool: one broadcast each
        if sorted(calls) != ["allreduce_", "allreduce_", "bcast_", "bcast_"]:
            problems.append(f"collectives {calls}")
        payload = 2 * (size - 1) / size * ((6 + 4 + 2) * 8 + (5 + 2) * 4) + (size - 1) / size * (2 * 8 + 1)
        if stats.bytes_sent != pytest.approx(payload):
            problems.append(f"bytes sent {stats.bytes_sent}, expected {payload}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_a_negative_weight_is_refused_on_every_rank(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        pytest.skip("nothing is averaged on one rank")
    with pytest.raises(AgreedError, match="negative weight"):
        average_tensors([torch.ones(3)], comm, weight=-1.0 if rank == size - 1 else 1.0)
    assert_comm_still_usable(comm)


# -- pieces without MPI ----------------------------------------------------------------------------------------

def test_outer_step_moves_the_global_weights_towards_the_average():
    """lr 1 without momentum gives the average; lr 0.5 goes half way; Nesterov momentum goes further along
    global - average, then keeps going in the direction of earlier averages (a flipped sign fails each)."""
    torch.manual_seed(0)
    start, average = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for lr, momentum, expected in [(1.0, 0.0, average), (0.5, 0.0, start + 0.5 * (average - start)),
                                   (0.5, 0.9, start + 0.5 * 1.9 * (average - start))]:
        param = nn.Parameter(start.clone())
        outer = OuterOptimizer([param], lr=lr, momentum=momentum)
        with torch.no_grad():
            param.copy_(average)
        outer.step()
        assert torch.allclose(param, expected, rtol=0, atol=1e-15), (lr, momentum)
        assert torch.dot(param.detach() - start, average - start) > 0
        assert torch.equal(outer.global_params[0], param.detach())
    moved = param.detach().clone()  # a second average equal to the global weights: momentum alone moves on
    outer.step()
    assert torch.dot(param.detach() - moved, average - start) > 0


@pytest.mark.parametrize("settings,message", [
    (dict(sync_every=-1), "--sync-every must be >= 0"),
    (dict(local_warmup=-2), "--local-warmup must be >= 0"),
    (dict(sync_every=1, local_warmup=3), "needs local steps after it"),
    (dict(outer_lr=0.0), "--outer-lr must be a positive number"),
    (dict(outer_momentum=1.0), r"--outer-momentum must be in \[0, 1\)"),
])
def test_config_refuses_bad_values_naming_the_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        LocalSGDConfig(**settings)


def test_sync_every_flag_takes_steps_or_end():
    import argparse

    assert (sync_every_flag("4"), sync_every_flag("end"), sync_every_flag("0")) == (4, 0, 0)
    with pytest.raises(argparse.ArgumentTypeError, match="'end'"):
        sync_every_flag("often")
    assert not LocalSGDConfig().outer_optimizer and LocalSGDConfig(outer_momentum=0.5).outer_optimizer
