"""Pipelines under autocast: activations cross in 16 bits, and fp16 loss scaling skips an overflow everywhere.

A 2-stage and a 4-stage pipeline (4 stages on 2 ranks, and on 4 ranks from 4 up) under bf16 autocast equal a
one-process autocast run of the unsplit model over the same micro-batches: the boundaries where autocast's
output is already bf16 (after a Linear) change nothing; one after a LayerNorm (float32 under autocast) is cast
to bf16 at the send, which the unsplit model's next Linear does too, so the bound is the reference's own
bf16 rounding (checked at 1e-6 here). Through the loop, ``--precision bf16`` and ``fp16`` pipelines equal one
process (the data-parallel loop on the whole batch, tolerance of ``test_precision``), and an inf injected on
one rank at fp16 skips that step on every rank and halves the scale. Run at several sizes:
``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_precision.py``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from test_precision import (
    LOOP_BATCH,
    LOOP_STEPS,
    TOLERANCE,
    loop_mlp,
    loop_run,
    metrics_column,
    overflowing,
    serial_loop,
)
from torch import nn

from mpi_helpers import assert_all_ranks, shared_directory
from mpipar.pipeline import Pipeline, Placement

MICROBATCHES, BATCH, WIDTH = 4, 16, 12
torch.set_num_threads(1)


def boundary_model() -> nn.Sequential:
    """Layers whose outputs under bf16 autocast are bf16 (Linear, ReLU after it) or float32 (LayerNorm)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH),
                         nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 3))


def batch(step: int):
    generator = torch.Generator().manual_seed(50 + step)
    return torch.randn(BATCH, 6, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator)


def reference_gradients(model: nn.Sequential, step: int):
    """One process, bf16 autocast, the same micro-batches with gradient accumulation (forward and backward
    under autocast, as the loop runs a step)."""
    model = copy.deepcopy(model)
    inputs, targets = batch(step)
    losses = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk, target in zip(inputs.chunk(MICROBATCHES), targets.chunk(MICROBATCHES)):
            loss = F.cross_entropy(model(chunk), target)
            (loss / MICROBATCHES).backward()
            losses.append(loss.item())
    return sum(losses) / MICROBATCHES, {name: p.grad for name, p in model.named_parameters()}


def stage_parameters(pipe) -> dict:
    """This rank's parameters by their name in the whole model."""
    return {name: p for stage in pipe.stages.values() for name, p in stage.module.named_parameters()}  # sliced:
    # a stage's Sequential keeps the whole model's layer names


PLACEMENTS = {  # the ranks of the pipeline's communicator -> a rank per layer of boundary_model
    "2 stages": (2, (0, 0, 0, 0, 1, 1, 1, 1, 1)),  # the boundary after the LayerNorm: a float32 output cast
    "4 stages on 2 ranks": (2, (0, 0, 1, 1, 0, 0, 1, 1, 1)),
    "4 stages on 4 ranks": (4, (0, 0, 1, 1, 2, 2, 3, 3, 3)),
}


def autocast_problems(world, ranks: int, placement: Placement, schedule: str) -> list:
    """Two steps of ``boundary_model`` pipelined over the first ``ranks`` ranks of ``world`` under bf16 autocast,
    against :func:`reference_gradients`: loss and every (float32) gradient within 1e-6, every activation and
    gradient sent in bf16. What differs, on this rank (none on the ranks left out). Collective over ``world``."""
    comm = world.Split(0 if world.Get_rank() < ranks else MPI.UNDEFINED)
    problems = []
    if comm != MPI.COMM_NULL:
        model = boundary_model()
        pipe = Pipeline(copy.deepcopy(model), comm, placement, schedule=schedule, microbatches=MICROBATCHES,
                        loss_fn=F.cross_entropy)
        for step in range(2):
            inputs, targets = batch(step)
            for p in pipe.parameters():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                result = pipe.step(inputs, targets)
            loss, grads = reference_gradients(model, step)
            if abs(result.loss - loss) > 1e-6:
                problems.append(f"step {step}: loss {result.loss} != {loss}")
            for name, p in stage_parameters(pipe).items():
                if p.grad is None or p.grad.dtype != torch.float32 or not torch.allclose(
                        p.grad, grads[name], rtol=0, atol=1e-6):
                    gap = None if p.grad is None else f"{p.grad.dtype}, {(p.grad - grads[name]).abs().max():.2e}"
                    problems.append(f"step {step} {name}: {gap}")
            # every activation and gradient between two ranks crossed in bf16: 2 bytes per element (all boundaries
            # WIDTH wide); a boundary between two stages of one rank is handed over in memory
            owner = pipe.stage_ranks
            crossing = [i for i in pipe.stages if i < pipe.num_stages - 1 and owner[i + 1] != owner[i]] + \
                [i for i in pipe.stages if i > 0 and owner[i - 1] != owner[i]]
            expected = len(crossing) * MICROBATCHES * (BATCH // MICROBATCHES) * WIDTH * 2
            if result.bytes_sent != expected:
                problems.append(f"step {step}: {result.bytes_sent} bytes sent, bf16 activations {expected}")
        comm.Free()
    return problems


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", PLACEMENTS)
def test_bf16_pipeline_equals_one_process_autocast_with_16_bit_activations(layout):
    world = MPI.COMM_WORLD
    ranks, placement = PLACEMENTS[layout]
    if world.Get_size() < ranks:
        pytest.skip(f"{layout} needs {ranks} ranks")
    problems = autocast_problems(world, ranks, Placement(placement), "1f1b")
    assert_all_ranks(world, not problems, "; ".join(problems))


def pipeline_loop(comm, directory, precision, strategy_class, stages: int):
    from mpipar.data import synthetic
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.run.loop import train

    settings = PipelineConfig(schedule="1f1b", microbatches=2, stages=stages)
    replicas = comm.Get_size() // stages
    run = loop_run(comm, directory, LOOP_BATCH * comm.Get_size() // replicas, precision, settings)
    strategy = strategy_class(comm, loop_mlp(), settings, batch_size=LOOP_BATCH * comm.Get_size() // replicas,
                              state=run.state, say=run.say)
    train(run, strategy, synthetic(600, 100, seed=0))
    return strategy


def stage_differences(strategy, reference: nn.Module, tolerance: float) -> list:
    """This rank's parameters further than ``tolerance`` from the reference's."""
    theirs = dict(reference.named_parameters())
    return [f"{name}: {(p - theirs[name]).abs().max():.2e}" for name, p in stage_parameters(strategy.pipe).items()
            if not torch.allclose(p, theirs[name], rtol=0, atol=tolerance)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pipeline_loop_under_autocast_equals_one_process(comm, mpi_tmp_path, precision):
    from mpipar.pipeline.strategy import PipelineStrategy

    stages = 2 if comm.Get_size() % 2 == 0 else comm.Get_size()
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, precision)
    strategy = pipeline_loop(comm, directory / "pp", precision, PipelineStrategy, stages)
    problems = stage_differences(strategy, reference, TOLERANCE[precision])
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=2)
def test_fp16_overflow_on_one_pipeline_rank_skips_the_step_everywhere(comm, mpi_tmp_path):
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.pipeline.strategy import PipelineStrategy

    size = comm.Get_size()
    stages = 2 if size % 2 == 0 else size
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, "fp16", overflowing(DataParallelStrategy, 1, 0))
    strategy = pipeline_loop(comm, directory / "pp", "fp16", overflowing(PipelineStrategy, 1, size - 1), stages)
    path = directory / "pp" / "metrics.h5"
    skipped, scales = metrics_column(path, "skipped"), metrics_column(path, "loss_scale")
    problems = stage_differences(strategy, reference, TOLERANCE["fp16"])
    if skipped.tolist() != [[0.0] * size, [1.0] * size, [0.0] * size][:LOOP_STEPS]:
        problems.append(f"skipped {skipped.tolist()}")
    if scales[:, 0].tolist() != [2.0 ** 16, 2.0 ** 16, 2.0 ** 15][:LOOP_STEPS]:
        problems.append(f"loss scales {scales.tolist()}")
    assert_all_ranks(comm, not problems, "; ".join(problems))
