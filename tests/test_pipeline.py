"""A pipeline on N ranks equals the unsplit model on one process: outputs, loss, every gradient.

Run at several sizes: ``mpirun -n {1,2,3,4} python -m pytest --with-mpi tests/test_pipeline.py``.
The comparisons with the unsplit model run on CPU and, where a GPU exists, on CUDA (the
``device`` fixture, ``tests/conftest.py``): the model is built on CPU from the seed and
moved there before the Pipeline is built; batches are made on CPU and moved.
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, random_batch
from mpipar.diagnostics.failure import AgreedError
from mpipar.pipeline import Pipeline, Placement

TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the summation order differs
BATCH = 12
torch.set_num_threads(1)


def make_model(width: int = 7, batchnorm: bool = False, device="cpu") -> nn.Sequential:
    torch.manual_seed(0)
    layers = [("fc1", nn.Linear(5, width)), ("act1", nn.Tanh()), ("fc2", nn.Linear(width, width)),
              ("act2", nn.BatchNorm1d(width) if batchnorm else nn.Tanh()), ("fc3", nn.Linear(width, width)),
              ("fc4", nn.Linear(width, 3))]
    return nn.Sequential(OrderedDict(layers)).double().to(device)


def make_batch(step: int = 0, batch: int = BATCH, features: int = 5, dtype=torch.float64, device="cpu"):
    return random_batch(step, batch, features=features, dtype=dtype, device=device)


def placements(size: int):
    """Layer-to-rank maps for a 6-layer model that use every rank of ``size``."""
    middle = [1 + i % (size - 1) for i in range(4)] if size > 1 else [0] * 4
    return {
        "even": Placement.even(6, size),
        "round_robin": Placement(tuple(i % size for i in range(6))),
        "sandwich": Placement((0, *middle, 0)),  # first and last layer on rank 0
        "reversed": Placement(tuple(size - 1 - r for r in Placement.even(6, size).ranks)),
    }


COMMS = {"self": lambda: MPI.COMM_SELF, "world": lambda: MPI.COMM_WORLD}


def compare_step(comm, pipe, model, reference, inputs, targets, result, what):
    """Gathered comparison of a pipeline step with the reference's full-batch step."""
    expected_out = reference(inputs)
    expected_loss = F.cross_entropy(expected_out, targets)
    problems = []
    if abs(result.loss - expected_loss.item()) > 1e-12:
        problems.append(f"loss {result.loss} != {expected_loss.item()}")
    if pipe.holds_last_stage and not torch.allclose(result.outputs, expected_out.detach(), **TOL):
        problems.append("outputs differ")
    if not pipe.holds_last_stage and result.outputs is not None:
        problems.append("outputs on a rank without the last stage")
    local = {id(p) for p in pipe.parameters()}
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if id(param) in local:
            if param.grad is None or not torch.allclose(param.grad, ref.grad, **TOL):
                problems.append(f"grad of {name} differs")
        elif param.grad is not None:
            problems.append(f"{name} is not on this rank but got a gradient")
    assert_all_ranks(comm, not problems, f"{what}: {problems}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("comm_name", ["self", "world"])
@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("placement_name", ["even", "round_robin", "sandwich", "reversed"])
@pytest.mark.parametrize("microbatches", [1, 3, BATCH])
def test_pipeline_equals_unsplit_model(comm_name, schedule, placement_name, microbatches, device):
    comm = COMMS[comm_name]()
    model = make_model(device=device)
    reference = copy.deepcopy(model)
    inputs, targets = make_batch(device=device)
    F.cross_entropy(reference(inputs), targets).backward()
    placement = placements(comm.Get_size())[placement_name]
    pipe = Pipeline(model, comm, placement, schedule=schedule, microbatches=microbatches,
                    loss_fn=F.cross_entropy)
    feed = inputs if pipe.holds_first_stage else None
    result = pipe.step(feed, targets if pipe.holds_last_stage else None)
    compare_step(comm, pipe, model, reference, inputs, targets, result,
                 f"{schedule} {placement} m={microbatches}")
    assert_all_ranks(MPI.COMM_WORLD, result.times.busy > 0 and result.times.wall >= result.times.busy,
                     f"times {result.times}")


@pytest.mark.mpi(min_size=2)
def test_mlp_with_fc1_fc4_on_rank_0_and_fc2_fc3_on_rank_1(device):
    """The issue's example, placed by layer name: the activation goes 0 -> 1 -> 0."""
    comm = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.Get_rank() < 2 else MPI.UNDEFINED, 0)
    if comm == MPI.COMM_NULL:
        assert_all_ranks(MPI.COMM_WORLD, True)
        return
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 6), fc2=nn.Linear(6, 6), fc3=nn.Linear(6, 6),
                                      fc4=nn.Linear(6, 3))).double().to(device)
    reference = copy.deepcopy(model)
    inputs, targets = make_batch(device=device)
    F.cross_entropy(reference(inputs), targets).backward()
    pipe = Pipeline(model, comm, {"fc1": 0, "fc4": 0, "fc2": 1, "fc3": 1}, schedule="1f1b", microbatches=4,
                    loss_fn=F.cross_entropy)
    assert pipe.stage_ranks == (0, 1, 0)
    result = pipe.step(inputs, targets)
    compare_step(comm, pipe, model, reference, inputs, targets, result, "fc1,fc4 | fc2,fc3")
    comm.Free()
    assert_all_ranks(MPI.COMM_WORLD, True)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_training_steps_match_serial_training(schedule, device):
    comm = MPI.COMM_WORLD
    model = make_model(device=device)
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, placements(comm.Get_size())["round_robin"], schedule=schedule,
                    microbatches=4, loss_fn=F.cross_entropy)
    params = list(pipe.parameters())  # empty on a rank holding only activations (size 4)
    optimizer = torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        inputs, targets = make_batch(step, device=device)
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(inputs), targets).backward()
        result = pipe.step(inputs, targets)
        compare_step(comm, pipe, model, reference, inputs, targets, result, f"step {step}")
        optimizer.step()
        reference_optimizer.step()
    local = {id(p) for p in pipe.parameters()}
    same = all(torch.allclose(p, r, **TOL) for p, r in zip(model.parameters(), reference.parameters())
               if id(p) in local)
    assert_all_ranks(comm, same, "parameters after 3 SGD steps differ")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_batchnorm_sees_one_microbatch_at_a_time(schedule, device):
    """With micro-batches, BatchNorm normalises each micro-batch and updates its running
    statistics once per micro-batch: the pipeline equals the unsplit model run
    micro-batch by micro-batch (mean loss over micro-batches), not on the whole batch."""
    comm, microbatches = MPI.COMM_WORLD, 3
    model = make_model(batchnorm=True, device=device)
    reference = copy.deepcopy(model)
    inputs, targets = make_batch(device=device)
    outputs = []
    for chunk, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
        out = reference(chunk)
        (F.cross_entropy(out, target) / microbatches).backward()
        outputs.append(out.detach())
    pipe = Pipeline(model, comm, placements(comm.Get_size())["even"], schedule=schedule,
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    result = pipe.step(inputs, targets)
    problems = []
    if pipe.holds_last_stage and not torch.allclose(result.outputs, torch.cat(outputs), **TOL):
        problems.append("outputs")
    local = {id(p) for p in pipe.parameters()}
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        if id(p) in local and not torch.allclose(p.grad, r.grad, **TOL):
            problems.append(f"grad {name}")
    norm, reference_norm = model.act2, reference.act2
    if any(id(p) in local for p in norm.parameters()):
        if not (torch.allclose(norm.running_mean, reference_norm.running_mean, **TOL)
                and torch.allclose(norm.running_var, reference_norm.running_var, **TOL)
                and int(norm.num_batches_tracked) == microbatches == int(reference_norm.num_batches_tracked)):
            problems.append("running statistics")
    assert_all_ranks(comm, not problems, f"BatchNorm {schedule}: {problems}")


@pytest.mark.mpi(min_size=1)
def test_evaluate_streams_forward_only_and_allows_another_microbatch_count(device):
    comm = MPI.COMM_WORLD
    model = make_model(batchnorm=True, device=device)
    model.eval()
    inputs, targets = make_batch(device=device)
    with torch.no_grad():
        expected = model(inputs)
    pipe = Pipeline(model, comm, placements(comm.Get_size())["sandwich"], schedule="1f1b", microbatches=4,
                    loss_fn=F.cross_entropy)
    problems = []
    for microbatches in (None, 1, 6):
        result = pipe.evaluate(inputs, targets, microbatches=microbatches)
        if pipe.holds_last_stage and not torch.allclose(result.outputs, expected, **TOL):
            problems.append(f"outputs with {microbatches}")
        if abs(result.loss - F.cross_entropy(expected, targets).item()) > 1e-12:
            problems.append(f"loss with {microbatches}")
    if any(p.grad is not None for p in model.parameters()):
        problems.append("evaluate made gradients")
    assert_all_ranks(comm, not problems, str(problems))


@pytest.mark.mpi(min_size=2)
def test_messages_above_the_eager_limit_and_float32(device):
    """Activations of 8 x 4096 float32 (128 KiB) take MPI's rendezvous path."""
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4096), nn.Tanh(), nn.Linear(4096, 4096), nn.Linear(4096, 3)).to(device)
    reference = copy.deepcopy(model)
    inputs, targets = make_batch(batch=16, dtype=torch.float32, device=device)
    F.cross_entropy(reference(inputs), targets).backward()
    pipe = Pipeline(model, comm, tuple(i % comm.Get_size() for i in range(4)), schedule="1f1b",
                    microbatches=2, loss_fn=F.cross_entropy)
    result = pipe.step(inputs, targets)
    local = {id(p) for p in pipe.parameters()}
    ok = all(torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6)
             for p, r in zip(model.parameters(), reference.parameters()) if id(p) in local)
    ok = ok and abs(result.loss - F.cross_entropy(reference(inputs), targets).item()) < 1e-5
    assert_all_ranks(comm, ok, "float32 gradients with 128 KiB messages differ")


@pytest.mark.mpi(min_size=1)
def test_step_reports_times_memory_and_in_flight_counts():
    comm = MPI.COMM_WORLD
    model = make_model()
    pipe = Pipeline(model, comm, Placement.even(6, comm.Get_size()), schedule="1f1b", microbatches=6,
                    loss_fn=F.cross_entropy)
    result = pipe.step(*make_batch())
    (stage,) = pipe.stages  # even placement: one stage per rank
    times = result.times
    # every boundary carries width-7 float64 activations of 2-sample micro-batches, 6 each way
    directions = int(stage > 0) + int(stage < pipe.num_stages - 1)
    forward, backward = result.stage_times[stage]
    ok = (abs(times.busy + times.comm + times.idle - times.wall) < 1e-9
          and result.peak_in_flight == {stage: min(pipe.num_stages - stage, 6)}
          and result.activation_bytes > 0 and set(result.stage_busy) == {stage}
          and forward > 0 and backward > 0 and abs(forward + backward - result.stage_busy[stage]) < 1e-12
          and result.bytes_sent == directions * 6 * 2 * 7 * 8)
    assert_all_ranks(comm, ok, f"{result}")


# -- errors: raised on every rank, before any Send/Recv, never a hang --------------------


def raises_everywhere(comm, error, match, build):
    """Run ``build()`` on every rank; every rank must raise ``error`` matching ``match``."""
    with pytest.raises(error, match=match) as caught:
        build()
    assert_all_ranks(comm, True, str(caught.value))
    return caught.value


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("ranks,match", [
    (lambda size: tuple(range(size)) + (size,) * (6 - size), r"uses rank\(s\) \[\d\] but the communicator has"),
    (lambda size: (0,) * 5, "covers 5 layers but the model has 6"),
    (lambda size: (0, -1, 0, 0, 0, 0), r"ints >= 0"),
])
def test_bad_placement_is_an_error_on_every_rank(ranks, match):
    comm = MPI.COMM_WORLD
    raises_everywhere(comm, ValueError, match,
                      lambda: Pipeline(make_model(), comm, ranks(comm.Get_size()), loss_fn=F.cross_entropy))


@pytest.mark.mpi(min_size=2)
def test_world_larger_than_the_placement_is_an_error_on_every_rank():
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    error = raises_everywhere(comm, ValueError, rf"\[{size - 1}\] of {size} hold no layer; run with {size - 1} proc",
                              lambda: Pipeline(make_model(), comm, Placement.even(6, size - 1)))
    assert isinstance(error, AgreedError)


@pytest.mark.mpi(min_size=2)
def test_ranks_that_disagree_on_the_placement_fail_together():
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    mine = placements(size)["even"] if comm.Get_rank() == 0 else placements(size)["reversed"]
    raises_everywhere(comm, ValueError, "ranks disagree on the pipeline",
                      lambda: Pipeline(make_model(), comm, mine, loss_fn=F.cross_entropy))


@pytest.mark.mpi(min_size=2)
def test_a_rank_with_an_invalid_placement_fails_every_rank():
    comm = MPI.COMM_WORLD
    mine = Placement.even(6, comm.Get_size()) if comm.Get_rank() else (0,) * 4
    raises_everywhere(comm, ValueError, r"covers 4 layers.*failed on rank 0",
                      lambda: Pipeline(make_model(), comm, mine, loss_fn=F.cross_entropy))


@pytest.mark.mpi(min_size=1)
def test_bad_schedule_and_microbatch_count_are_errors_in_the_constructor():
    comm = MPI.COMM_WORLD
    raises_everywhere(comm, ValueError, "unknown pipeline schedule 'zigzag'",
                      lambda: Pipeline(make_model(), comm, schedule="zigzag"))
    raises_everywhere(comm, ValueError, "microbatches >= 1",
                      lambda: Pipeline(make_model(), comm, microbatches=0))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("microbatches", [5, 24])
def test_microbatches_not_dividing_the_batch_is_an_error_on_every_rank(microbatches):
    comm = MPI.COMM_WORLD
    pipe = Pipeline(make_model(), comm, placements(comm.Get_size())["round_robin"], schedule="gpipe",
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    raises_everywhere(comm, ValueError, f"12 samples does not split into {microbatches} equal",
                      lambda: pipe.step(*make_batch()))
    # the pipeline still works afterwards with a batch that divides
    result = pipe.step(*make_batch(batch=2 * microbatches))
    assert_all_ranks(comm, result.loss == result.loss, "no loss after the error")


@pytest.mark.mpi(min_size=1)
def test_shape_mismatch_between_stages_is_an_error_on_every_rank():
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(8, 7), nn.Linear(7, 3)).double()
    pipe = Pipeline(model, comm, Placement(tuple(i % comm.Get_size() for i in range(4))),
                    loss_fn=F.cross_entropy)
    raises_everywhere(comm, RuntimeError, r"stage \d \(layers? [\d-]+\) on rank \d with input \(12, \d\) float64: ",
                      lambda: pipe.step(*make_batch()))


@pytest.mark.mpi(min_size=1)
def test_missing_or_mismatched_batches_are_errors_on_every_rank():
    comm = MPI.COMM_WORLD
    pipe = Pipeline(make_model(), comm, placements(comm.Get_size())["even"], microbatches=2,
                    loss_fn=F.cross_entropy)
    inputs, targets = make_batch()
    raises_everywhere(comm, TypeError, "holds the first stage and needs the input batch",
                      lambda: pipe.step(None, targets))
    raises_everywhere(comm, ValueError, "12 inputs on rank 0 but 6 targets",
                      lambda: pipe.step(inputs, targets[:6]))
    no_loss = Pipeline(make_model(), comm, placements(comm.Get_size())["even"], microbatches=2)
    raises_everywhere(comm, ValueError, "needs a loss_fn", lambda: no_loss.step(inputs, targets))
