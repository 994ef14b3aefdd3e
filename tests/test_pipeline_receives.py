"""Receives posted ahead: any number kept posted per stream gives the unsplit model's results bitwise alike.

A pipeline with skips (across several boundaries, and between two stages of one rank) under every flushing
schedule, and an asynchronous one, with ``receives_ahead`` 0, 1 and 3: losses and parameters over several
steps equal the unsplit model (float64, 1e-10) and each other bitwise; each stream keeps the receives it
was asked to posted, and none is left posted after a step. Run at several sizes:
``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_receives.py``.
"""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from test_pipeline_skips import TOL, make_batch, skip_model, skip_placements

from mpi_helpers import assert_all_ranks
from mpipar.pipeline import Pipeline

STEPS, MICROBATCHES = 3, 4
AHEAD = (0, 1, 3)


def reference_run(model, steps: int):
    """The unsplit model, one process, SGD on the mean loss of each whole batch."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        inputs, targets = make_batch(step)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


def pipeline_run(comm, placement, schedule: str, ahead: int, steps: int):
    """The pipeline's losses and this rank's parameters after ``steps``, and the most receives each stream
    had posted at once (checked: none left posted after a step)."""
    model = skip_model()
    pipe = Pipeline(model, comm, placement, schedule=schedule, microbatches=MICROBATCHES,
                    loss_fn=F.cross_entropy, receives_ahead=ahead)
    # a rank may hold only layers without parameters (a placeholder keeps the optimizer valid)
    optimizer = torch.optim.SGD(list(pipe.parameters()) or [torch.zeros(1, requires_grad=True)], lr=0.1)
    pipe.bind_optimizer(optimizer)
    most: Counter = Counter()
    take = pipe._take_received

    def counting(instruction, run, event):
        for stream, count in Counter(pipe._stream(i) for i in pipe._posted).items():
            most[stream] = max(most[stream], count)
        return take(instruction, run, event)

    pipe._take_received = counting
    losses, left = [], 0
    for step in range(steps):
        inputs, targets = make_batch(step)
        optimizer.zero_grad()
        losses.append(pipe.step(inputs, targets).loss)
        if not pipe.schedule.is_async:
            optimizer.step()
        left += len(pipe._posted)
    pipe.drain()
    left += len(pipe._posted)
    names = {id(p): name for name, p in model.named_parameters()}
    return losses, {names[id(p)]: p.detach().clone() for p in pipe.parameters()}, most, left


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("layout", ["even", "sandwich", "round_robin"])
def test_every_receives_ahead_equals_the_unsplit_model_and_each_other(schedule, layout):
    comm = MPI.COMM_WORLD
    placement = skip_placements(comm.Get_size())[layout]
    ref_losses, ref_params = reference_run(skip_model(), STEPS)
    runs = {ahead: pipeline_run(comm, placement, schedule, ahead, STEPS) for ahead in AHEAD}
    problems = []
    for ahead, (losses, params, most, left) in runs.items():
        if any(abs(a - b) > 1e-10 * max(1.0, abs(b)) for a, b in zip(losses, ref_losses)):
            problems.append(f"ahead {ahead}: losses {losses} != {ref_losses}")
        problems += [f"ahead {ahead}: {name}" for name, p in params.items()
                     if not torch.allclose(p, ref_params[name], **TOL)]
        problems += [f"ahead {ahead}: {name} differs from ahead 0" for name, p in params.items()
                     if not torch.equal(p, runs[0][1][name])]
        if losses != runs[0][0]:
            problems.append(f"ahead {ahead}: losses differ from ahead 0")
        if left:
            problems.append(f"ahead {ahead}: {left} receives left posted")
        if ahead and most and max(most.values()) < min(ahead, MICROBATCHES):
            problems.append(f"ahead {ahead}: at most {dict(most)} posted per stream")
        if not ahead and most:
            problems.append(f"ahead 0 posted ahead: {dict(most)}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_asynchronous_windows_post_ahead_with_the_same_results(schedule):
    comm = MPI.COMM_WORLD
    placement = skip_placements(comm.Get_size())["even"]
    runs = {ahead: pipeline_run(comm, placement, schedule, ahead, STEPS) for ahead in AHEAD}
    problems = []
    for ahead, (losses, params, _, left) in runs.items():
        if [x for x in losses if x == x] != [x for x in runs[0][0] if x == x]:
            problems.append(f"ahead {ahead}: losses {losses} != {runs[0][0]}")
        problems += [f"ahead {ahead}: {name}" for name, p in params.items() if not torch.equal(p, runs[0][1][name])]
        if left:
            problems.append(f"ahead {ahead}: {left} receives left posted")
    assert_all_ranks(comm, not problems, "; ".join(problems))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("ahead", [-1, 1.5, True])
def test_bad_receives_ahead_is_an_error_on_every_rank(ahead):
    comm = MPI.COMM_WORLD
    with pytest.raises(ValueError, match="receives_ahead must be an int >= 0") as caught:
        Pipeline(skip_model(), comm, schedule="1f1b", microbatches=2, receives_ahead=ahead)
    assert_all_ranks(comm, True, str(caught.value))


@pytest.mark.mpi(min_size=1)
def test_a_cancelled_receive_takes_no_later_message():
    from mpipar.comm import mpi_tensor

    comm = MPI.COMM_SELF  # a failed step's receive, left posted, is cancelled before the next step posts its own
    stale = mpi_tensor.irecv_(torch.full((3,), -1.0), comm, 0, tag=5)
    stale.cancel()
    send = mpi_tensor.isend(torch.arange(3.0), comm, 0, tag=5)
    fresh = mpi_tensor.irecv_(torch.empty(3), comm, 0, tag=5)
    send.wait()
    ok = torch.equal(fresh.wait(), torch.arange(3.0)) and torch.equal(stale.tensor, torch.full((3,), -1.0))
    assert_all_ranks(MPI.COMM_WORLD, ok, f"received {fresh.tensor}, the cancelled buffer {stale.tensor}")
