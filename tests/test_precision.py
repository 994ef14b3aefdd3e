"""16-bit gradient wire: half the bytes, fp32 sums; the result differs from the fp32 reduction only by
rounding the inputs and the outputs to 16 bits."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpipar
from mpi_helpers import assert_all_ranks, assert_close_all_ranks
from mpipar.comm.reducer import GradientReducer
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.wire import wire_dtype
from mpipar.run.precision import autocast_dtype

SHAPES = [(7,), (13, 5), (1,), (3, 3, 2)]  # sizes not divisible by 2, 3 or 4
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def rank_gradients(rank: int):
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=generator) * (1 + rank) for shape in SHAPES]


def reduce_with(comm, wire, samples, cap_mb=25.0):
    """This rank's gradients averaged by a GradientReducer with ``wire``; the reducer too."""
    params = [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    for p, grad in zip(params, rank_gradients(comm.Get_rank())):
        p.grad = grad.clone()
    reducer = GradientReducer(params, comm, bucket_cap_mb=cap_mb, wire=wire)
    reducer.begin(num_samples=samples[comm.Get_rank()])
    reducer.finish()
    return [p.grad for p in params], reducer


@pytest.mark.mpi
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap_mb", [25.0, 1e-6])  # one bucket; one bucket per parameter
def test_wire_differs_from_fp32_only_by_16_bit_rounding(comm, wire, cap_mb):
    size = comm.Get_size()
    samples = [3 + 2 * rank for rank in range(size)]  # unequal: the sample weighting must survive the wire
    weights = [count / sum(samples) for count in samples]
    wired, reducer = reduce_with(comm, wire, samples, cap_mb)
    fp32, plain = reduce_with(comm, None, samples, cap_mb)
    u = UNIT_ROUNDOFF[wire]
    for index, (got, reference) in enumerate(zip(wired, fp32)):
        magnitude = sum(w * g[index].abs() for w, g in zip(weights, map(rank_gradients, range(size))))
        if size == 1:
            bound = torch.zeros_like(magnitude)  # nothing is sent: exact
        else:  # each contribution rounded, the sum rounded, fp32 additions on both sides
            bound = u * (1 + u) * magnitude + u * reference.abs() + 8 * size * 2.0 ** -24 * magnitude
        error = (got - reference).abs()
        assert_all_ranks(comm, got.dtype == torch.float32 and bool((error <= bound).all()),
                         f"parameter {index}: error {error.max():.3e} above the bound (wire {wire})")
    expected_bytes = sum(2.0 * (size - 1) * -(-b.buffer.numel() // size) * 2 for b in reducer.buckets)
    fp32_bytes = plain.stats.take().bytes_sent
    assert_all_ranks(comm, reducer.stats.take().bytes_sent == expected_bytes and expected_bytes <= 0.5 * fp32_bytes
                     + 2.0 * (size - 1) * 2 * len(reducer.buckets),
                     f"bytes: the wire's vs fp32's {fp32_bytes}")


@pytest.mark.mpi(min_size=2)
def test_wire_rounds_to_16_bits(comm):
    """The values that travel are 16-bit: a sum of equal contributions is their 16-bit rounding."""
    params = [nn.Parameter(torch.zeros(5))]
    params[0].grad = torch.full((5,), 1.0 + 2.0 ** -12)  # not a bfloat16 value
    reducer = GradientReducer(params, comm, wire=torch.bfloat16)
    reducer.begin(num_samples=1)
    reducer.finish()
    assert_close_all_ranks(comm, params[0].grad, torch.ones(5), rtol=0, atol=0, what="bf16-rounded mean")


@pytest.mark.mpi
def test_data_parallel_with_a_wire_matches_the_serial_run_within_the_rounding(comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, comm, wire=torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    images, labels = torch.randn(4 * size + 1, 1, 4, 4, generator=generator), torch.randint(0, 5, (4 * size + 1,),
                                                                                          generator=generator)
    F.cross_entropy(reference(images), labels).backward()
    mine = slice(rank * 4, (rank + 1) * 4 + (rank == size - 1))  # the last rank takes one more sample
    F.cross_entropy(dp(images[mine]), labels[mine]).backward()
    for (name, p), q in zip(replica.named_parameters(), reference.parameters()):
        tolerance = 0.0 if size == 1 else 2 * 2.0 ** -8 * q.grad.abs().max().item() + 1e-6
        assert_close_all_ranks(comm, p.grad, q.grad, rtol=2 ** -7, atol=tolerance, what=name)
    assert_all_ranks(comm, size == 1 or all(b.wire is not None for b in dp.buckets), "every bucket on the wire")


@pytest.mark.mpi(min_size=2)
def test_replica_averager_takes_the_wire(comm):
    module = nn.Linear(3, 2)
    averager = ReplicaAverager(module, comm, wire=torch.float16)
    assert_all_ranks(comm, all(b.wire is not None and b.wire.outgoing.dtype == torch.float16
                               for b in averager.buckets), "replica buckets on an fp16 wire")


def test_wire_names_and_bad_values():
    assert wire_dtype("fp32") is None and wire_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="--grad-wire must be one of fp32, bf16, fp16"):
        wire_dtype("fp8")
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16"):
        GradientReducer([nn.Parameter(torch.zeros(2))], __import__("mpi4py").MPI.COMM_SELF, wire=torch.float64)


def test_grad_wire_flag_reaches_the_config():
    from mpipar.comm.wire import GRAD_WIRES
    from mpipar.run import config as run_config
    from mpipar.run.cli import train_config, training_parser

    parser = training_parser("", out="runs/x", batch_help="")
    config = train_config(parser.parse_args(["--grad-wire", "bf16"]), threads=1, model="mlp")
    assert config.grad_wire == "bf16" and config.to_dict()["grad_wire"] == "bf16"
    assert "grad_wire" not in train_config(parser.parse_args([]), threads=1, model="mlp").to_dict()  # as before
    assert tuple(GRAD_WIRES) == run_config.GRAD_WIRES
    with pytest.raises(ValueError, match="--grad-wire must be one of fp32, bf16, fp16"):
        run_config.TrainConfig(grad_wire="fp8")


@pytest.mark.mpi
def test_data_parallel_strategy_takes_the_grad_wire(comm):
    from mpipar.data_parallel.strategy import DataParallelStrategy

    strategy = DataParallelStrategy(nn.Linear(4, 3), comm, grad_wire="fp16")
    assert_all_ranks(comm, comm.Get_size() == 1 or all(b.wire is not None for b in strategy.dp.buckets),
                     "DataParallelStrategy's buckets on the wire")


# -- --precision: autocast and fp16 loss scaling -------------------------------------------------

def fp32_mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))


@pytest.mark.mpi
def test_loss_scaler_on_n_ranks_matches_grad_scaler_on_one(comm):
    """fp16 autocast, DataParallel + LossScaler against torch.amp.GradScaler on the whole batch; an inf in
    one rank's gradient (after the reduction, as a tensor-parallel shard's would be) skips the step on
    every rank and halves the scale."""
    from mpipar.run.precision import LossScaler

    size, rank, per_rank = comm.Get_size(), comm.Get_rank(), 4
    reference = fp32_mlp()
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, comm)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    scaler = LossScaler(comm, init_scale=256.0, growth_interval=2)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt_dp = torch.optim.SGD(replica.parameters(), lr=0.1, momentum=0.9)
    problems = []
    for step in range(6):
        generator = torch.Generator().manual_seed(50 + step)
        images = torch.randn(per_rank * size, 1, 4, 4, generator=generator)
        labels = torch.randint(0, 5, (per_rank * size,), generator=generator)
        expected_scale = torch_scaler.get_scale()
        opt_ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(reference(images), labels)
        torch_scaler.scale(loss).backward()
        if step == 2:
            reference[1].weight.grad[0, 0] = float("inf")
        torch_scaler.step(opt_ref)
        torch_scaler.update()

        opt_dp.zero_grad()
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(dp(images[mine]), labels[mine])
        scaler.scale(loss).backward()
        if step == 2 and rank == size - 1:
            replica[1].weight.grad[0, 0] = float("inf")
        used = scaler.scale_value
        skipped = scaler.unscale(replica.parameters())
        if not skipped:
            opt_dp.step()
        scaler.update(skipped)
        if (used, skipped, scaler.scale_value) != (expected_scale, step == 2, torch_scaler.get_scale()):
            problems.append(f"step {step}: scale {used}, skipped {skipped}, next {scaler.scale_value}; GradScaler "
                            f"{expected_scale}, {step == 2}, {torch_scaler.get_scale()}")
        for (name, mine_p), theirs in zip(replica.named_parameters(), reference.parameters()):
            if not torch.allclose(mine_p, theirs, rtol=0, atol=2e-3):  # fp16 products, split batches
                problems.append(f"step {step} {name}: {(mine_p - theirs).abs().max():.2e}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


LOOP_SIZES = (784, 24, 16, 12, 10)
LOOP_STEPS, LOOP_BATCH = 3, 6


def loop_mlp() -> nn.Sequential:
    from mpipar import models

    torch.manual_seed(7)
    return models.mlp(list(LOOP_SIZES))


def overflowing(strategy_class, step: int, rank: int):
    """``strategy_class`` whose ``train_step`` puts an inf in one gradient at loop step ``step`` on world
    rank ``rank`` (after the step's reductions: only that rank sees it)."""

    class Overflowing(strategy_class):
        calls = 0

        def train_step(self, batch):
            record = super().train_step(batch)
            world = getattr(self, "world", None) or self.comm
            if self.calls == step and world.Get_rank() == rank:
                grad = next(p.grad for p in self.parameters() if p.grad is not None)
                grad.view(-1)[0] = float("inf")
            self.calls += 1
            return record

    return Overflowing


def loop_run(comm, directory, batch, precision, settings=None, resume=False):
    from mpi_helpers import loop_session

    return loop_session(comm, directory, batch, settings, max_steps=LOOP_STEPS, flush_every=2, checkpoint_every=2,
                        precision=precision, resume=resume)


def serial_loop(comm, directory, precision, strategy_class=None):
    """The loop on one process (COMM_SELF) over the whole global batch, ``precision`` too."""
    from mpi4py import MPI

    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    model = loop_mlp()
    run = loop_run(MPI.COMM_SELF, directory / f"serial-{comm.Get_rank()}", LOOP_BATCH * comm.Get_size(), precision)
    train(run, (strategy_class or DataParallelStrategy)(model, MPI.COMM_SELF), synthetic(600, 100, seed=0))
    return model


def metrics_column(path, name):
    import h5py

    with h5py.File(path, "r") as f:
        return f[f"steps/{name}"][...]


TOLERANCE = {"bf16": 1e-3, "fp16": 1e-4}  # parameters after 3 steps: ~5x the differences measured at 2-4 ranks


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_data_parallel_loop_with_autocast_equals_one_process(comm, mpi_tmp_path, precision):
    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    class Watched(DataParallelStrategy):
        seen = []

        def train_step(self, batch):
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().train_step(batch)

    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, precision)
    model = loop_mlp()
    strategy = Watched(model, comm)
    train(loop_run(comm, directory / "dp", LOOP_BATCH, precision), strategy, synthetic(600, 100, seed=0))
    problems = [f"{name}: {(p - q).abs().max():.2e}" for (name, p), q in zip(model.named_parameters(),
                                                                            reference.parameters())
                if p.dtype != torch.float32 or not torch.allclose(p, q, rtol=0, atol=TOLERANCE[precision])]
    if strategy.seen != [autocast_dtype(precision)] * LOOP_STEPS:
        problems.append(f"autocast in train_step: {strategy.seen}")
    if precision == "fp16":
        scales = metrics_column(directory / "dp" / "metrics.h5", "loss_scale")
        problems += [] if (scales == 2.0 ** 16).all() and scales.shape == (LOOP_STEPS, comm.Get_size()) \
            else [f"loss scales {scales.tolist()}"]
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
def test_fp16_overflow_on_one_rank_of_a_tp_x_dp_grid_skips_the_step_everywhere(comm, mpi_tmp_path):
    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.checkpoint import read_state
    from mpipar.run.loop import train
    from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

    size = comm.Get_size()
    if size % 2:
        pytest.skip("a grid of groups of 2 needs an even number of ranks")
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, "fp16", overflowing(DataParallelStrategy, 1, 0))
    settings = TensorParallelConfig(tp=2)
    run = loop_run(comm, directory / "grid", LOOP_BATCH * 2, "fp16", settings)
    strategy = overflowing(TensorParallelStrategy, 1, size - 1)(comm, loop_mlp(), settings, state=run.state)
    train(run, strategy, synthetic(600, 100, seed=0))
    path = directory / "grid" / "metrics.h5"
    skipped, scales = metrics_column(path, "skipped"), metrics_column(path, "loss_scale")
    problems = []
    if skipped.tolist() != [[0.0] * size, [1.0] * size, [0.0] * size]:
        problems.append(f"skipped {skipped.tolist()}")
    if scales[:, 0].tolist() != [2.0 ** 16, 2.0 ** 16, 2.0 ** 15]:
        problems.append(f"loss scales {scales.tolist()}")
    state = read_state(directory / "grid" / "checkpoints" / "step-000000002" / f"rank-{comm.Get_rank()}.pt")
    if state.get("loss_scaler", {}).get("scale") != 2.0 ** 15:
        problems.append(f"checkpoint's loss scaler {state.get('loss_scaler')}")
    position = comm.Get_rank() % 2
    blocks = [module for module in strategy.model if hasattr(module, "fc1")]
    linears = [module for module in reference.modules() if isinstance(module, nn.Linear)]
    for block, (fc1, fc2) in zip(blocks, zip(linears[::2], linears[1::2])):
        rows = slice(position * block.fc1.out_per_rank, (position + 1) * block.fc1.out_per_rank)
        columns = slice(position * block.fc2.in_per_rank, (position + 1) * block.fc2.in_per_rank)
        for mine, theirs in [(block.fc1.weight, fc1.weight[rows]), (block.fc2.weight, fc2.weight[:, columns])]:
            if not torch.allclose(mine, theirs, rtol=0, atol=TOLERANCE["fp16"]):
                problems.append(f"shard: {(mine - theirs).abs().max():.2e}")
    assert_all_ranks(comm, len(blocks) == 2 and not problems, "; ".join(problems) or f"{len(blocks)} blocks")


@pytest.mark.mpi
def test_fp16_refused_on_every_rank_where_the_loop_cannot_scale_the_loss(comm, mpi_tmp_path):
    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.diagnostics.failure import AgreedError
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train
    from mpipar.run.precision import check_strategy_precision

    directory = shared_directory(comm, mpi_tmp_path)
    settings = PipelineConfig(schedule="pipedream", microbatches=max(2, comm.Get_size()), stages=comm.Get_size())
    run = loop_run(comm, directory / "async", 12, "fp16", settings)
    strategy = PipelineStrategy(comm, loop_mlp(), settings, batch_size=12, state=run.state, say=run.say)
    with pytest.raises(AgreedError, match="pipeline.* cannot train with --precision fp16 .it takes fp32"):
        train(run, strategy, synthetic(600, 100, seed=0))
    with pytest.raises(ValueError, match="--precision fp16 needs loss scaling"):  # should pipelines offer it
        check_strategy_precision("fp16", SimpleNamespace(name="pipeline_async", steps_optimizer=True,
                                                         precisions=("fp32", "fp16")))


@pytest.mark.mpi
def test_a_device_without_the_precision_is_one_error_on_every_rank(comm):
    from mpipar.diagnostics.agree import collective_check
    from mpipar.diagnostics.failure import AgreedError
    from mpipar.run.precision import check_precision

    device = torch.device("meta") if comm.Get_rank() == comm.Get_size() - 1 else torch.device("cpu")
    with pytest.raises(AgreedError, match="--precision fp16: torch has no autocast for meta devices"):
        collective_check(comm, lambda: check_precision("fp16", device), "--precision")


@pytest.mark.mpi(min_size=2)
def test_pipeline_replicas_on_a_bf16_wire_equal_one_process_within_the_rounding(comm, mpi_tmp_path):
    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train

    size = comm.Get_size()
    stages = 2 if size % 2 == 0 and size > 2 else 1  # replicas of 2-stage pipelines, or of 1-stage ones
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, "fp32")
    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages)
    batch = LOOP_BATCH * stages
    run = loop_run(comm, directory / "pipes", batch, "fp32", settings)
    model = loop_mlp()
    strategy = PipelineStrategy(comm, model, settings, batch_size=batch, state=run.state, say=run.say,
                                grad_wire="bf16")
    train(run, strategy, synthetic(600, 100, seed=0))
    held = [layer for layer, owner in enumerate(strategy.placement.ranks) if owner == comm.Get_rank() % stages]
    problems = [f"layer {layer}: {(p - q).abs().max():.2e}" for layer in held
                for p, q in zip(model[layer].parameters(), reference[layer].parameters())
                if not torch.allclose(p, q, rtol=0, atol=TOLERANCE["bf16"])]
    if not strategy.averager.buckets or any(b.wire is None for b in strategy.averager.buckets):
        problems.append("the replicas' buckets are not on the wire")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi
def test_fp16_resume_restores_the_loss_scale_bitwise(comm, mpi_tmp_path):
    """Stopped at the first flush (step 2) after an overflow at step 1 halved the scale, resumed: the
    scale comes back from the checkpoint and the run ends as the uninterrupted one."""
    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.launch import StopRequest
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    strategy_class = overflowing(DataParallelStrategy, 1, comm.Get_size() - 1)
    straight = loop_mlp()
    train(loop_run(comm, directory / "straight", LOOP_BATCH, "fp16"), strategy_class(straight, comm),
          synthetic(600, 100, seed=0))
    run = loop_run(comm, directory / "stopped", LOOP_BATCH, "fp16")
    run.stop = StopRequest()
    run.stop.signal_name = "SIGUSR1"  # as if Slurm's warning came: stop and save at the first flush (step 2)
    stopped = train(run, strategy_class(loop_mlp(), comm), synthetic(600, 100, seed=0))
    resumed = loop_mlp()
    run = loop_run(comm, directory / "stopped", LOOP_BATCH, "fp16", resume=True)
    state_scale = run.state.get("loss_scaler", {}).get("scale")
    train(run, DataParallelStrategy(resumed, comm), synthetic(600, 100, seed=0))
    scales = metrics_column(directory / "stopped" / "metrics.h5", "loss_scale")[:, 0].tolist()
    problems = [] if stopped else ["the first run did not stop"]
    if state_scale != 2.0 ** 15 or scales != [2.0 ** 16, 2.0 ** 16, 2.0 ** 15]:
        problems.append(f"checkpoint scale {state_scale}, scales {scales}")
    problems += [name for (name, p), q in zip(resumed.named_parameters(), straight.parameters())
                 if not torch.equal(p, q)]
    assert_all_ranks(comm, not problems, "; ".join(problems))
