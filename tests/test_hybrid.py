"""Pipelines replicated with data parallelism equal one process on the whole global batch.

The comparison runs on CPU and, where a GPU exists, on CUDA (the ``device`` fixture,
``tests/conftest.py``): the model is built on CPU from the seed and moved there before the
Pipeline is built; batches are made on CPU and moved.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, assert_comm_still_usable
from mpipar.comm.topology import ProcessGrid
from mpipar.pipeline import Pipeline, Placement, ReplicaAverager

TOL = dict(rtol=1e-10, atol=1e-12)
GLOBAL_BATCH = 24
torch.set_num_threads(1)


def make_model(device="cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8),
                         nn.Linear(8, 3)).double().to(device)


def global_batch(step: int, device="cpu"):
    generator = torch.Generator().manual_seed(7 + step)
    return (torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64).to(device),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator).to(device))


def reference_step_problems(grid, result, model, reference, reference_optimizer, local, inputs, targets,
                            step: int) -> list:
    """One SGD step of the unsplit ``reference`` on the global batch, against a replicated pipeline's step
    (``result``, ``model``'s gradients): the replicas' mean loss and every gradient of this rank's parameters
    (``local``: ids; a None gradient reads as zeros, an unused parameter's). Collective over ``grid.data_comm``."""
    reference_optimizer.zero_grad()
    expected = F.cross_entropy(reference(inputs), targets)
    expected.backward()
    problems = []
    losses = grid.data_comm.allgather(result.loss)
    if abs(sum(losses) / len(losses) - expected.item()) > 1e-12:
        problems.append(f"step {step}: loss {losses} vs {expected.item()}")
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        mine, theirs = (torch.zeros_like(p) if g is None else g for g in (p.grad, r.grad))
        if id(p) in local and not torch.allclose(mine, theirs, **TOL):
            problems.append(f"step {step}: grad of {name}")
    reference_optimizer.step()
    return problems


@pytest.mark.mpi(min_size=1)
def test_grid_layout():
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    problems = []
    for stages in [d for d in range(1, size + 1) if size % d == 0]:
        with ProcessGrid(comm, stages) as grid:
            pipeline = grid.pipeline_comm.allgather(rank)
            data = grid.data_comm.allgather(rank)
            expected_pipeline = list(range(grid.replica * stages, (grid.replica + 1) * stages))
            expected_data = list(range(grid.stage, size, stages))
            if (pipeline, data) != (expected_pipeline, expected_data) or grid.replicas * stages != size:
                problems.append(f"stages {stages}: pipeline {pipeline}, data {data}")
    assert_all_ranks(comm, not problems, str(problems))


@pytest.mark.mpi(min_size=1)
def test_stages_not_dividing_the_world_is_an_error_on_every_rank():
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    with pytest.raises(ValueError, match=rf"{size + 1} pipeline stages do not divide the {size} processes"):
        ProcessGrid(comm, size + 1)
    assert_comm_still_usable(comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("overlapped", [False, True])
def test_hybrid_equals_one_process_on_the_global_batch(stages, schedule, overlapped, device):
    comm = MPI.COMM_WORLD
    if comm.Get_size() % stages:
        pytest.skip(f"{stages} stages do not divide {comm.Get_size()} ranks")
    grid = ProcessGrid(comm, stages)
    model = make_model(device)
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, grid.pipeline_comm, Placement.even(len(model), stages), schedule=schedule,
                    microbatches=2, loss_fn=F.cross_entropy)
    # one parameter per bucket: several buckets, launched in order as the last backward finishes them
    averager = ReplicaAverager(pipe.local_module, grid.data_comm, bucket_cap_mb=1e-6)
    params = list(pipe.parameters())
    optimizer = torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // grid.replicas
    problems = []
    for step in range(2):
        inputs, targets = global_batch(step, device)
        mine = slice(grid.replica * share, (grid.replica + 1) * share)
        optimizer.zero_grad()
        if overlapped:
            averager.begin_step(num_samples=share)
            result = pipe.step(inputs[mine], targets[mine], before_last_backward=averager.stage_finishing)
            averager.average()
        else:
            result = pipe.step(inputs[mine], targets[mine])
            averager.average(num_samples=share)
        optimizer.step()
        problems += reference_step_problems(grid, result, model, reference, reference_optimizer,
                                            {id(p) for p in params}, inputs, targets, step)
    # overlapped with replicas: every bucket starts during the backward, none is left for average()
    early = 2 * len(averager.buckets) if overlapped and grid.replicas > 1 else 0
    if averager.launched_early != early:
        problems.append(f"{averager.launched_early} buckets launched during backward, expected {early}")
    grid.free()
    assert_all_ranks(comm, not problems, f"{grid} {schedule}: {problems}")


@pytest.mark.mpi(min_size=2)
def test_replicas_with_different_models_fail_together():
    comm = MPI.COMM_WORLD
    width = 4 if comm.Get_rank() == 0 else 5
    with pytest.raises(ValueError, match="ranks disagree on the parameters"):
        ReplicaAverager(nn.Linear(width, 2), comm)
    assert_comm_still_usable(comm)
