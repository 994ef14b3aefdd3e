"""PowerSGD with error feedback (``--compress powersgd:RANK``): equal to a one-process reference of the same
algorithm, bytes as the formula says, checkpointed per rank, refused clearly where it does not apply."""

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpipar
from mpi_helpers import assert_all_ranks, assert_close_all_ranks
from mpipar.comm.compress import (
    check_powersgd_rank,
    initial_q,
    is_compressed,
    orthonormalize_,
    parse_compress,
    powersgd_elements,
)
from mpipar.comm.reducer import GradientReducer

SHAPES = [(13, 5), (7,), (6, 3, 2, 2), (4, 3), (20, 9)]  # a matrix, a bias, a conv weight, a tiny matrix, a matrix
RANK = 2
STEPS = 4


def rank_gradients(rank: int, step: int):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + rank) for shape in SHAPES]


def samples(size: int):
    return [3 + 2 * rank for rank in range(size)]  # unequal: the sample weighting must survive the compression


def reference(size: int, steps: int):
    """The algorithm on one process, on the list of every rank's gradients, written plainly (float64,
    QR for the orthonormal basis): per step the summed result of every parameter, and every rank's errors."""
    weights = [count / sum(samples(size)) for count in samples(size)]
    qs = {i: initial_q(math.prod(shape[1:]), RANK, i, torch.float64) for i, shape in enumerate(SHAPES)
          if is_compressed(shape, RANK)}
    errors = {(k, i): torch.zeros(shape[0], math.prod(shape[1:]), dtype=torch.float64)
              for k in range(size) for i, shape in enumerate(SHAPES) if is_compressed(shape, RANK)}
    results = []
    for step in range(steps):
        grads = [rank_gradients(k, step) for k in range(size)]
        summed = []
        for i, shape in enumerate(SHAPES):
            if i not in qs:
                summed.append(sum(w * g[i] for w, g in zip(weights, grads)))
                continue
            ms = [w * g[i].reshape(shape[0], -1) + errors[k, i] for k, (w, g) in enumerate(zip(weights, grads))]
            total = sum(ms)
            p = torch.linalg.qr(total @ qs[i]).Q
            qs[i] = total.t() @ p
            approx = p @ qs[i].t()
            for k, w in enumerate(weights):
                errors[k, i] = ms[k] - w * approx
            summed.append(approx.reshape(shape))
        results.append((summed, {key: e.clone() for key, e in errors.items()}))
    return results


@pytest.mark.mpi
@pytest.mark.parametrize("cap_mb", [25.0, 1e-6])  # one bucket; one bucket per parameter
def test_powersgd_equals_the_one_process_reference_over_several_steps(comm, cap_mb):
    size, rank = comm.Get_size(), comm.Get_rank()
    params = [nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in SHAPES]
    reducer = GradientReducer(params, comm, bucket_cap_mb=cap_mb, compress=RANK)
    expected = reference(size, STEPS)
    problems = []
    for step in range(STEPS):
        for p, grad in zip(params, rank_gradients(rank, step)):
            p.grad = grad.clone()
        reducer.begin(num_samples=samples(size)[rank])
        reducer.finish()
        summed, errors = expected[step]
        state = reducer.compress_state()
        for i, p in enumerate(params):
            if not torch.allclose(p.grad, summed[i], rtol=0, atol=1e-10):
                problems.append(f"step {step} parameter {i}: {(p.grad - summed[i]).abs().max():.2e}")
            if (rank, i) in errors and not torch.allclose(state[i]["error"], errors[rank, i], rtol=0, atol=1e-10):
                problems.append(f"step {step} parameter {i}: error feedback off by "
                                f"{(state[i]['error'] - errors[rank, i]).abs().max():.2e}")
        if sorted(state) != sorted(i for i, shape in enumerate(SHAPES) if is_compressed(shape, RANK)):
            problems.append(f"compressed parameters {sorted(state)}")
        sent = reducer.stats.take().bytes_sent
        formula = 2.0 * (size - 1) / size * 8 * powersgd_elements(SHAPES, RANK)
        if sent != formula:
            problems.append(f"bytes sent {sent}, the formula says {formula}")
    assert_all_ranks(comm, not problems, "; ".join(problems[:6]))


@pytest.mark.mpi(min_size=2)
def test_bytes_fall_as_the_factors_say(comm):
    """fp32 Allreduce of n m elements per matrix against (n + m) r: here 2 (p-1)/p 4 (sum) bytes."""
    shapes = [(256, 64, 3, 3), (256,), (10, 256)]
    counted = {}
    for compress in (None, 4):
        params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
        for p in params:
            p.grad = torch.ones_like(p)
        reducer = GradientReducer(params, comm, compress=compress)
        reducer.begin(num_samples=1)
        reducer.finish()
        counted[compress] = reducer.stats.take().bytes_sent
    size = comm.Get_size()
    ring = 2.0 * (size - 1) / size * 4
    expected = {None: ring * (256 * 576 + 256 + 2560), 4: ring * ((256 + 576) * 4 + 256 + (10 + 256) * 4)}
    assert_all_ranks(comm, counted == expected and counted[4] < counted[None] / 30, f"{counted} vs {expected}")


class Awkward(nn.Module):
    """A conv, a frozen bias, a layer used on even steps only, keyword input; float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.conv = nn.Conv2d(2, 6, 3)
        self.conv.bias.requires_grad_(False)
        self.hidden = nn.Linear(96, 8)
        self.sometimes = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, images, *, use_sometimes=False):
        x = torch.relu(self.hidden(torch.relu(self.conv(images)).flatten(1)))
        if use_sometimes:
            x = torch.tanh(self.sometimes(x))
        return self.head(x)


@pytest.mark.mpi
def test_data_parallel_with_powersgd_equals_one_process_on_the_whole_batch(comm):
    """Everything but the orthonormalisation is linear in the summed gradients and errors: p ranks with
    unequal shards follow one process that compresses the whole batch's gradient."""
    size, rank = comm.Get_size(), comm.Get_rank()
    from mpi4py import MPI

    serial_model, model = Awkward(), Awkward()
    serial = mpipar.DataParallel(serial_model, MPI.COMM_SELF, compress=RANK)
    dp = mpipar.DataParallel(model, comm, compress=RANK, bucket_cap_mb=1e-3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (serial_model, model)]
    counts = samples(size)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)
        images = torch.randn(sum(counts), 2, 6, 6, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (sum(counts),), generator=generator)
        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        for wrapper, optimizer, part in ((serial, optimizers[0], slice(None)), (dp, optimizers[1], mine)):
            optimizer.zero_grad()
            F.cross_entropy(wrapper(images[part], use_sometimes=step % 2 == 0), labels[part]).backward()
            optimizer.step()
        assert_all_ranks(comm, (model.sometimes.weight.grad is None) == (step % 2 == 1),
                         f"step {step}: the unused layer's gradient")
    for (name, p), q in zip(model.named_parameters(), serial_model.parameters()):
        assert_close_all_ranks(comm, p, q, rtol=0, atol=1e-10, what=name)
    assert_all_ranks(comm, dp._built.compress is not None and all(b.wire is not None for b in dp.buckets),
                     "every bucket compressed")


@pytest.mark.mpi
def test_a_rank_no_layer_takes_is_one_clear_error_on_every_rank(comm):
    from mpipar.diagnostics.failure import AgreedError

    with pytest.raises(ValueError, match=r"powersgd:9: the rank is larger than any layer allows .* 20 x 9, takes "
                                         r"r <= 6\); use powersgd:6 or lower") as caught:
        mpipar.DataParallel(nn.Sequential(nn.Linear(9, 20), nn.Linear(20, 3)), comm, compress=9)
    assert_all_ranks(comm, isinstance(caught.value, AgreedError), "an agreed error")
    with pytest.raises(ValueError, match="does not combine with a 16-bit wire"):
        mpipar.DataParallel(nn.Linear(40, 40), comm, compress=2, wire=torch.bfloat16)


def test_flag_parsing_and_the_rules():
    assert parse_compress("none") is None and parse_compress("powersgd:4") == 4
    for bad in ("powersgd", "powersgd:0", "powersgd:-1", "topk:3", "powersgd:x"):
        with pytest.raises(ValueError, match="--compress must be none or powersgd:RANK"):
            parse_compress(bad)
    assert is_compressed((20, 9), 6) and not is_compressed((20, 9), 7) and not is_compressed((100,), 1)
    assert is_compressed((64, 32, 3, 3), 4) and powersgd_elements([(64, 32, 3, 3), (64,)], 4) == (64 + 288) * 4 + 64
    check_powersgd_rank([(20, 9), (3,)], 6)
    with pytest.raises(ValueError, match="no matrix-shaped gradient"):
        check_powersgd_rank([(3,)], 1)
    with pytest.raises(ValueError, match="use --compress none"):
        check_powersgd_rank([(2, 2)], 1)


def test_orthonormalize_makes_nearly_parallel_columns_orthonormal():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    matrix = base + 1e-7 * torch.randn(50, 4, generator=generator, dtype=torch.float64)
    q = orthonormalize_(matrix.clone())
    assert torch.allclose(q.t() @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ (q.t() @ matrix), matrix, atol=1e-12)  # the same span
    zero = orthonormalize_(torch.zeros(5, 2, dtype=torch.float64))  # no sum at all: still a basis, no NaN
    assert torch.allclose(zero.t() @ zero, torch.eye(2, dtype=torch.float64), atol=1e-12)
    transposed = torch.randn(3, 40, generator=generator, dtype=torch.float64)  # the reducer's r x n storage
    orthonormalize_(transposed.t())
    assert torch.allclose(transposed @ transposed.t(), torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_the_flag_reaches_the_config_and_combinations_are_refused():
    from mpipar.run.cli import train_config, training_parser
    from mpipar.run.config import TrainConfig

    parser = training_parser("", out="runs/x", batch_help="")
    config = train_config(parser.parse_args(["--compress", "powersgd:4"]), threads=1, model="mlp")
    assert config.compress == "powersgd:4" and config.to_dict()["compress"] == "powersgd:4"
    assert "compress" not in train_config(parser.parse_args([]), threads=1, model="mlp").to_dict()  # as before
    with pytest.raises(ValueError, match="--compress must be none or powersgd:RANK"):
        TrainConfig(compress="powersgd:0")
    with pytest.raises(ValueError, match="does not combine with --grad-wire bf16"):
        TrainConfig(compress="powersgd:4", grad_wire="bf16")
    with pytest.raises(ValueError, match="use --precision bf16 or fp32"):
        TrainConfig(compress="powersgd:4", precision="fp16")


# -- the loop: checkpoints, resume, refusals ------------------------------------------------------

LOOP_STEPS = 4


def loop_model():
    from mpi_helpers import float64_mlp

    return float64_mlp([784, 16, 10], 5)


def run_loop(comm, out, *, resume=False, strategy_class=None, **config):
    from mpi_helpers import loop_session
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    session = loop_session(comm, out, 8, max_steps=LOOP_STEPS, checkpoint_every=2, flush_every=1,
                           compress="powersgd:2", resume=resume, **config)
    model = loop_model()
    strategy = (strategy_class or DataParallelStrategy)(model, comm, compress="powersgd:2")
    train(session, strategy, synthetic(600, 100, seed=0))
    return model, strategy


@pytest.mark.mpi
def test_resume_continues_the_error_feedback_on_the_same_and_on_fewer_ranks(comm, mpi_tmp_path):
    """A run resumed from its step-2 checkpoint ends where the straight run ends: bitwise on as many
    ranks (each rank its own error), within rounding on fewer (rank 0 takes the errors' sum)."""
    import h5py

    from mpi_helpers import shared_directory

    size, rank = comm.Get_size(), comm.Get_rank()
    directory = shared_directory(comm, mpi_tmp_path)
    straight, strategy = run_loop(comm, directory / "straight")
    errors = strategy.dp._built.compress_state()
    nonzero = bool(errors) and all(entry["error"].abs().max() > 0 for entry in errors.values())
    groups = [("same", comm)] + ([("fewer", comm.Split(0 if rank < size - 1 else 1, rank))] if size > 1 else [])
    problems = [] if nonzero else ["the errors are zero: nothing to resume"]
    for name, group in groups:
        if rank == 0:
            shutil.copytree(directory / "straight", directory / name)
            shutil.rmtree(directory / name / "checkpoints" / f"step-{LOOP_STEPS:09d}")
        comm.Barrier()
        if name == "same" or rank < size - 1:
            resumed, again = run_loop(group, directory / name, resume=True)
            exact = name == "same"
            for (label, p), q in zip(resumed.named_parameters(), straight.parameters()):
                if not (torch.equal(p, q) if exact else torch.allclose(p, q, rtol=0, atol=1e-12)):
                    problems.append(f"{name}: {label} off by {(p - q).abs().max():.2e}")
            said = again.describe()
            if exact == ("their sum on rank 0" in said):
                problems.append(f"{name}: describe() says {said!r}")
        comm.Barrier()
    with h5py.File(directory / "straight" / "metrics.h5", "r") as f:
        sent = f["steps/bytes_sent"][...]
    if not ((sent > 0).all() if size > 1 else (sent == 0).all()):
        problems.append(f"bytes_sent {sent}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_strategies_that_do_not_compress_refuse_it_on_every_rank(comm, mpi_tmp_path):
    from mpi_helpers import loop_session, shared_directory
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.diagnostics.failure import AgreedError
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    session = loop_session(comm, directory / "refused", 8, max_steps=1, compress="powersgd:2")
    plain = DataParallelStrategy(copy.deepcopy(loop_model()), comm)  # built without the run's --compress
    with pytest.raises(ValueError, match="data_parallel was built with compress='none', the run asks for "
                                         "--compress powersgd:2") as caught:
        train(session, plain, synthetic(600, 100, seed=0))
    assert_all_ranks(comm, isinstance(caught.value, AgreedError), "an agreed error")
    from mpipar.local_sgd import LocalSGDConfig, LocalSGDStrategy

    session = loop_session(comm, directory / "local", 8, max_steps=1, compress="powersgd:2")
    local = LocalSGDStrategy(copy.deepcopy(loop_model()), comm, LocalSGDConfig(4, 0, 1.0, 0.0))
    with pytest.raises(ValueError, match="local_sgd cannot take --compress powersgd:2") as caught:
        train(session, local, synthetic(600, 100, seed=0))
    assert_all_ranks(comm, isinstance(caught.value, AgreedError), "an agreed error")
