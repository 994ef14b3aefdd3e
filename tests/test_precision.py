"""16-bit gradient wire: half the bytes, fp32 sums; the result differs from the fp32 reduction only by
rounding the inputs and the outputs to 16 bits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpipar
from mpi_helpers import assert_all_ranks, assert_close_all_ranks
from mpipar.comm.reducer import GradientReducer
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.wire import wire_dtype

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
