"""Interleaved 1F1B (virtual stages) and zero-bubble (split backward) pipelines equal the unsplit model.

``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_schedules.py``: float64, outputs, loss and
every gradient at 1e-10 against one process, with frozen, unused and tied parameters, skips across stages,
BatchNorm, several SGD steps; bad settings are one error on every rank.
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from test_hybrid import reference_step_problems
from test_pipeline import make_model
from test_pipeline_skips import plain_reference, skip_model
from torch import nn

from mpi_helpers import assert_all_ranks, random_batch
from mpipar.diagnostics.failure import AgreedError
from mpipar.pipeline import Pipeline, Placement

TOL = dict(rtol=1e-10, atol=1e-12)
BATCH, WIDTH = 12, 6
torch.set_num_threads(1)


class WithUnused(nn.Module):
    """A Linear beside a parameter the forward never uses (its gradient stays None)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x)


def awkward_model() -> nn.Sequential:
    """12 layers: a frozen Linear, a module with an unused parameter, fc5 tied to fc3 (same weight)."""
    torch.manual_seed(0)
    layers = OrderedDict([
        ("fc0", nn.Linear(5, WIDTH)), ("act0", nn.Tanh()), ("fc1", nn.Linear(WIDTH, WIDTH)), ("act1", nn.Tanh()),
        ("fc2", nn.Linear(WIDTH, WIDTH)), ("act2", nn.Tanh()), ("fc3", nn.Linear(WIDTH, WIDTH)), ("act3", nn.Tanh()),
        ("odd", WithUnused()), ("fc5", nn.Linear(WIDTH, WIDTH)), ("act5", nn.Tanh()), ("fc6", nn.Linear(WIDTH, 3))])
    model = nn.Sequential(layers).double()
    model.fc1.requires_grad_(False)
    model.fc5.weight = model.fc3.weight
    return model


def microbatches_for(size: int) -> int:
    """A micro-batch count dividing the batch, a multiple of the ranks (interleaved), at least the stages."""
    return {1: 3, 2: 6, 3: 6, 4: 4}[size]


def placements(size: int) -> dict:
    return {
        "looped2": Placement.interleaved(12, size, 2),  # Megatron's: chunk c on rank c % size
        "looped3": Placement.interleaved(12, size, 3),
        "round_robin": Placement(tuple(i % size for i in range(12))),  # 12 stages, one layer each
        "even": Placement.even(12, size),
        "sandwich": Placement((0,) * 3 + tuple(1 + i % (size - 1) for i in range(6)) + (0,) * 3 if size > 1
                              else (0,) * 12),
    }


def compare(comm, pipe, model, reference, result, inputs, targets, what, outputs=None):
    expected = reference(inputs) if outputs is None else outputs
    problems = []
    if abs(result.loss - F.cross_entropy(expected, targets).item()) > 1e-12 and outputs is None:
        problems.append(f"loss {result.loss}")
    if pipe.holds_last_stage and not torch.allclose(result.outputs, expected.detach(), **TOL):
        problems.append("outputs")
    local = {id(p) for p in pipe.parameters()}
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        if id(p) not in local:
            continue
        if (p.grad is None) != (r.grad is None) or (p.grad is not None and not torch.allclose(p.grad, r.grad, **TOL)):
            problems.append(f"grad {name}")
    assert_all_ranks(comm, not problems, f"{what}: {problems}")


def step(pipe, inputs, targets):
    return pipe.step(inputs if pipe.holds_first_stage else None, targets if pipe.holds_last_stage else None)


def awkward_pipeline(comm, placement: Placement, schedule: str):
    """(model, an unsplit copy, the model pipelined over ``comm``): :func:`awkward_model` on ``placement``,
    :func:`microbatches_for` the size of ``comm``."""
    model = awkward_model()
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, placement, schedule=schedule, microbatches=microbatches_for(comm.Get_size()),
                    loss_fn=F.cross_entropy)
    return model, reference, pipe


def train_against_reference(comm, pipe, model, reference, what: str, steps: int = 3):
    """``steps`` SGD steps (momentum) of ``pipe`` (over ``model``) and of the unsplit ``reference`` on the same
    batches, each step's outputs, loss and gradients compared (:func:`compare`); the last step's result."""
    params = [p for p in pipe.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1,
                                          momentum=0.9)
    for number in range(steps):
        inputs, targets = random_batch(number, BATCH)
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(inputs), targets).backward()
        result = step(pipe, inputs, targets)
        compare(comm, pipe, model, reference, result, inputs, targets, f"{what} step {number}")
        optimizer.step()
        reference_optimizer.step()
    return result


CASES = [("interleaved", "looped2"), ("interleaved", "looped3"), ("interleaved", "round_robin"),
         ("interleaved", "even"), ("zero-bubble", "even"), ("zero-bubble", "round_robin"),
         ("zero-bubble", "sandwich"), ("zero-bubble", "looped2")]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule,placement_name", CASES)
def test_new_schedules_train_like_the_unsplit_model(schedule, placement_name):
    """Three SGD steps (momentum) with frozen, unused and tied parameters equal serial training."""
    comm = MPI.COMM_WORLD
    model, reference, pipe = awkward_pipeline(comm, placements(comm.Get_size())[placement_name], schedule)
    result = train_against_reference(comm, pipe, model, reference, f"{schedule} {pipe.placement}")
    check_held_and_evaluate(comm, pipe, reference, result, held=schedule == "zero-bubble")


def check_held_and_evaluate(comm, pipe, reference, result, held: bool) -> None:
    """With ``held`` (a split backward holds a micro-batch from its forward to its W): the step held what the
    schedule says on every stage; and evaluation equals the unsplit ``reference``."""
    if held:
        expected = {index: pipe.schedule.max_in_flight(index) for index in pipe.stages}
        assert_all_ranks(comm, result.peak_in_flight == expected, f"in flight {result.peak_in_flight} != {expected}")
    evaluated = pipe.evaluate(*random_batch(5, BATCH))
    with torch.no_grad():
        out = reference(random_batch(5, BATCH)[0])
    assert_all_ranks(comm, not pipe.holds_last_stage or torch.allclose(evaluated.outputs, out, **TOL), "evaluate")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule,chunks", [("interleaved", 2), ("zero-bubble", 1), ("zero-bubble", 2)])
def test_new_schedules_with_skips_across_stages(schedule, chunks):
    """The 14-layer skip model (skips across 1 to 3 layers' stages, some between two chunks of one rank)."""
    comm = MPI.COMM_WORLD
    model = skip_model()
    reference, forward = plain_reference(model)
    inputs, targets = random_batch(0, BATCH)
    F.cross_entropy(forward(inputs), targets).backward()
    placement = Placement.interleaved(14, comm.Get_size(), chunks)
    pipe = Pipeline(model, comm, placement, schedule=schedule, microbatches=microbatches_for(comm.Get_size()),
                    loss_fn=F.cross_entropy)
    result = step(pipe, inputs, targets)
    names = [name for name, _ in reference.named_parameters()]
    expected = {name: p.grad for name, p in reference.named_parameters()}
    local = {id(p) for p in pipe.parameters()}
    problems = [name for name, p in zip(names, model.parameters())
                if id(p) in local and not torch.allclose(p.grad, expected[name], **TOL)]
    out = forward(inputs).detach()
    if pipe.holds_last_stage and not torch.allclose(result.outputs, out, **TOL):
        problems.append("outputs")
    if abs(result.loss - F.cross_entropy(out, targets).item()) > 1e-12:
        problems.append("loss")
    assert_all_ranks(comm, not problems, f"{schedule} {placement}: {problems}")


@pytest.mark.mpi(min_size=1)
def test_zero_bubble_batchnorm_sees_one_microbatch_at_a_time():
    comm, microbatches = MPI.COMM_WORLD, 3
    model = make_model(batchnorm=True)
    reference = copy.deepcopy(model)
    inputs, targets = random_batch(0, BATCH)
    outputs = []
    for chunk, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
        out = reference(chunk)
        (F.cross_entropy(out, target) / microbatches).backward()
        outputs.append(out.detach())
    pipe = Pipeline(model, comm, Placement.even(6, comm.Get_size()), schedule="zero-bubble",
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    result = step(pipe, inputs, targets)
    compare(comm, pipe, model, reference, result, inputs, targets, "zero-bubble BatchNorm", torch.cat(outputs))
    local = {id(p) for p in pipe.parameters()}
    if any(id(p) in local for p in model.act2.parameters()):
        assert torch.allclose(model.act2.running_mean, reference.act2.running_mean, **TOL)
        assert int(model.act2.num_batches_tracked) == microbatches


def raises_everywhere(comm, match, build):
    try:
        build()
    except AgreedError as exc:
        ok = match in str(exc)
        message = str(exc)
    else:
        ok, message = False, "no error"
    assert_all_ranks(comm, ok, message)


@pytest.mark.mpi(min_size=1)
def test_zero_bubble_refuses_in_place_layers_on_every_rank():
    comm = MPI.COMM_WORLD
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.Linear(4, 3)).double()
    raises_everywhere(comm, "change their input in place", lambda: Pipeline(
        model, comm, Placement.even(4, comm.Get_size()), schedule="zero-bubble", microbatches=2,
        loss_fn=F.cross_entropy))


@pytest.mark.mpi(min_size=2)
def test_interleaved_refuses_unequal_chunks_and_ragged_microbatches_on_every_rank():
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    unequal = Placement((0,) + tuple(1 + r for r in Placement.even(10, size - 1).ranks) + (0,))  # size + 1 stages
    raises_everywhere(comm, "needs every rank to hold as many stages", lambda: Pipeline(
        awkward_model(), comm, unequal, schedule="interleaved", microbatches=size,
        loss_fn=F.cross_entropy))
    raises_everywhere(comm, f"needs micro-batches in whole groups of {size}", lambda: Pipeline(
        awkward_model(), comm, Placement.interleaved(12, size, 2), schedule="interleaved", microbatches=size + 1,
        loss_fn=F.cross_entropy))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["interleaved", "zero-bubble"])
def test_grids_of_replicas_equal_one_process_on_the_global_batch(stages, schedule):
    """Replicas x stages (interleaved: 2 chunks per rank), gradients averaged over the replicas while the last
    backward (zero-bubble: the last W) of each stage runs; two SGD steps equal one process on the global batch."""
    from mpipar.comm.topology import ProcessGrid
    from mpipar.pipeline import ReplicaAverager

    comm, global_batch = MPI.COMM_WORLD, 24
    if comm.Get_size() % stages:
        pytest.skip(f"{stages} stages do not divide {comm.Get_size()} ranks")
    grid = ProcessGrid(comm, stages)
    model = awkward_model()
    reference = copy.deepcopy(model)
    share = global_batch // grid.replicas
    microbatches = 2 * stages if share % (2 * stages) == 0 else stages
    chunks = 2 if schedule == "interleaved" else 1
    pipe = Pipeline(model, grid.pipeline_comm, Placement.interleaved(12, stages, chunks), schedule=schedule,
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    averager = ReplicaAverager(pipe.local_module, grid.data_comm, bucket_cap_mb=1e-6)
    params = [p for p in pipe.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1,
                                          momentum=0.9)
    problems = []
    for number in range(2):
        inputs, targets = random_batch(number, global_batch)
        mine = slice(grid.replica * share, (grid.replica + 1) * share)
        optimizer.zero_grad()
        averager.begin_step(num_samples=share)
        result = pipe.step(inputs[mine], targets[mine], before_last_backward=averager.stage_finishing)
        averager.average()
        optimizer.step()
        problems += reference_step_problems(grid, result, model, reference, reference_optimizer,
                                            {id(p) for p in params}, inputs, targets, number)
    grid.free()
    assert_all_ranks(comm, not problems, f"{schedule} {stages} stages: {problems}")


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["zero-bubble", "interleaved"])
def test_tensor_parallel_stages_with_the_new_schedules_equal_one_process(comm, mpi_tmp_path, schedule):
    """Tensor-parallel stages (4 ranks: 2 stages x 2; 1-3 ranks: one stage split over all) under the new
    schedules: the loop's shards after several optimizer steps equal the unsplit model trained on one process
    (interleaved takes no --virtual-stages with --tp > 1: one stage per rank)."""
    import h5py
    from test_loop import BATCH, build_model, serial_reference, session
    from test_tp_grid import grid_for, shard_problems

    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import PipelineStrategy
    from mpipar.run.loop import train
    from mpipar.tensor_parallel.strategy import split_mlp

    size = comm.Get_size()
    stages, tp = grid_for(size)
    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_reference(directory, size)
    settings = PipelineConfig(schedule=schedule, microbatches=2, stages=stages, tp=tp)
    batch = BATCH * size // (size // (stages * tp))
    run = session(comm, directory / "grid", batch, settings)
    strategy = PipelineStrategy(comm, build_model(), settings, batch_size=batch, state=run.state, say=run.say,
                                split_layers=split_mlp)
    stopped = train(run, strategy, synthetic(600, 100, seed=0))
    problems = (["stopped early"] if stopped else []) + shard_problems(strategy, reference, strategy.grid.tp_rank)
    with h5py.File(directory / "grid" / "metrics.h5", "r") as f:
        if str(f.attrs["schedule"]) != schedule:
            problems.append(f"metrics schedule {f.attrs['schedule']}")
    assert_all_ranks(comm, not problems, "; ".join(problems))


# -- the jobs' settings (serial) -----------------------------------------------------------------------------


def test_virtual_stages_settings_and_flags():
    import argparse

    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.flags import add_pipeline_flags
    from mpipar.pipeline.strategy import choose_placement

    config = PipelineConfig(schedule="interleaved", stages=2, microbatches=4, virtual_stages=2)
    assert config.to_dict()["virtual_stages"] == 2 and "virtual_stages" not in PipelineConfig().to_dict()
    placement, _ = choose_placement(awkward_model(), config, None, None, print)  # even: no collective
    assert placement == Placement.interleaved(12, 2, 2) and placement.stage_ranks == (0, 1, 0, 1)
    counted, _ = choose_placement(awkward_model(), PipelineConfig(
        schedule="interleaved", stages=2, microbatches=2, virtual_stages=2, balance=(2, 4, 4, 2)), None, None, print)
    assert counted.ranks == (0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1)
    with pytest.raises(ValueError, match="3 chunks cannot go round 2 ranks evenly"):
        Placement.looped([1, 1, 1], 2)
    assert Placement.interleaved(12, 1, 3).stage_ranks == (0,)  # one rank: its chunks are one stage
    for settings, match in [
        (dict(schedule="1f1b", virtual_stages=2), "above 1 only with a schedule of virtual stages"),
        (dict(schedule="interleaved", virtual_stages=0), "--virtual-stages must be >= 1"),
        (dict(schedule="interleaved", virtual_stages=2, stages=2, microbatches=3), "a multiple of --stages 2"),
        (dict(schedule="interleaved", virtual_stages=2, stages=2, balance=(3, 3)), "or 4 positive layer counts"),
        (dict(schedule="interleaved", virtual_stages=2, stages=2, placement=(0, 1)), "leave out --placement"),
    ]:
        with pytest.raises(ValueError, match=match):
            PipelineConfig(**settings)
    parser = argparse.ArgumentParser()
    add_pipeline_flags(parser)
    args = parser.parse_args(["--schedule", "zero-bubble"])
    assert args.virtual_stages == 1 and args.schedule == "zero-bubble"
    assert parser.parse_args(["--schedule", "interleaved", "--virtual-stages", "3"]).virtual_stages == 3


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("engine", ["direct", "public"])
def test_zero_bubble_cuts_after_trainable_layers_only_by_either_autograd_call(monkeypatch, engine):
    """A plain Sequential stage's graph is cut after its trainable layers and its last layer (activations and the
    frozen fc1 join the next piece); with autograd's engine called directly or through ``torch.autograd.grad``
    (``engine``) the gradients equal the unsplit model's."""
    from mpipar.pipeline import split_backward

    if engine == "public":
        monkeypatch.setattr(split_backward, "_ENGINE", None)
    comm = MPI.COMM_WORLD
    model = awkward_model()
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, Placement.even(12, comm.Get_size()), schedule="zero-bubble",
                    microbatches=microbatches_for(comm.Get_size()), loss_fn=F.cross_entropy)
    pieces = {}
    recorded = pipe._recorded

    class Watch(dict):  # sees each micro-batch's pieces as the forward records them
        def __init__(self, index):
            super().__init__()
            self.index = index

        def __setitem__(self, key, record):
            pieces[self.index] = len(record)
            super().__setitem__(key, record)

    for index in recorded:
        recorded[index] = Watch(index)
    inputs, targets = random_batch(0, BATCH)
    F.cross_entropy(reference(inputs), targets).backward()
    result = step(pipe, inputs, targets)
    compare(comm, pipe, model, reference, result, inputs, targets, f"zero-bubble {engine}")
    expected = {}
    for index, stage in pipe.stages.items():
        layers = list(stage.module)
        trainable = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
        expected[index] = sum(trainable[:-1]) + 1  # every trainable layer, and the last layer
    assert_all_ranks(comm, pieces == expected, f"pieces per micro-batch {pieces} != {expected}")


def test_zero_bubble_cuts_a_skip_model_where_a_skip_is_kept_and_after_trainable_layers():
    """On one rank, ``skip_model``'s 14 layers make 7 pieces: after fc0 (saved as "a"), act0 (its output saved as
    "b": cut though it has no parameters), fc1 (saved as "c"), fc2, add_b (its shortcut is trainable), fc3 and fc4
    (the last); add_c and cat_a join the next piece with their skips as its inputs. Gradients equal the plain
    network's (float64)."""
    model = skip_model()
    reference, forward = plain_reference(model)
    pipe = Pipeline(model, MPI.COMM_SELF, [0] * len(model), schedule="zero-bubble", microbatches=2,
                    loss_fn=F.cross_entropy)
    pieces = []
    recorded = pipe._recorded

    class Watch(dict):
        def __setitem__(self, key, record):
            pieces.append(len(record))
            super().__setitem__(key, record)

    recorded[0] = Watch()
    inputs, targets = random_batch(0, BATCH)
    F.cross_entropy(forward(inputs), targets).backward()
    pipe.step(inputs, targets)
    assert pieces == [7, 7]
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, r.grad, **TOL), name
