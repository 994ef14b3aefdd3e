"""ZB-V (``--schedule zbv``): two stages per rank in a V, the backward split into I and W.

Pure: the V placement and its stage boundaries, the literal grid, every step once and no deadlock on any
placement, the unit-cost bubble against the paper's and the memory bound, the settings. MPI
(``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_zbv.py``): float64, outputs, loss and
every gradient at 1e-10 against the unsplit model over several SGD steps, with frozen, unused and tied
parameters, BatchNorm, skips between stages of one rank and of two; bad settings are one error on every rank.
"""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from test_pipeline_schedules import (
    BATCH,
    awkward_model,
    check_held_and_evaluate,
    compare,
    raises_everywhere,
    step,
    train_against_reference,
)
from test_pipeline_skips import plain_reference, skip_model
from torch import nn

from mpi_helpers import assert_all_ranks, random_batch
from mpipar.pipeline import Pipeline, Placement, even_balance
from mpipar.pipeline_plan.instructions import BackwardWeight, Forward, RecvActivation
from mpipar.pipeline_plan.schedule import Schedule, placement_bubble, rank_program, simulate_step
from mpipar.pipeline_plan.zbv import zbv_order

TOL = dict(rtol=1e-10, atol=1e-12)
torch.set_num_threads(1)


def rows(grid: str):
    return [line.split() for line in grid.splitlines()]


# -- the V placement: explicit stage boundaries ---------------------------------------------------------------


def test_v_shape_keeps_the_two_chunks_of_the_last_rank_apart():
    placement = Placement.v_shape(10, 2)  # chunks of 3, 3, 2, 2 layers on ranks 0, 1, 1, 0
    assert placement.ranks == (0, 0, 0, 1, 1, 1, 1, 1, 0, 0) and placement.boundaries == (6,)
    assert placement.stage_ranks == (0, 1, 1, 0) and placement.balance() == [3, 3, 2, 2]
    assert [(s.start, s.stop) for s in placement.segments] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert Placement.v_shape(4, 1).stage_ranks == (0, 0)  # one rank: its two chunks, two stages
    assert Placement.v_shape(6, 3).stage_ranks == (0, 1, 2, 2, 1, 0)
    assert Placement(placement.ranks).stage_ranks == (0, 1, 0)  # without the boundary the runs merge


def test_boundaries_are_checked_and_normalised():
    assert Placement((0, 0, 1), (1, 2)) == Placement((0, 0, 1), (1,))  # 2 starts a stage anyway: dropped
    assert Placement((0, 0, 1), (1,)).stage_ranks == (0, 0, 1)
    assert Placement.chunked([1, 2], [0, 0]).segments[1].start == 1
    for boundaries, match in [((0,), r"ints in 1\.\.2 for 3 layers; got \[0\]"), ((3,), r"got \[3\]"),
                              ((True,), r"got \[True\]")]:
        with pytest.raises(ValueError, match=match):
            Placement((0, 0, 0), boundaries)
    with pytest.raises(ValueError, match="3 chunks need as many ranks, got 2"):
        Placement.chunked([1, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="use at most 4 ranks"):
        Placement.v_shape(4, 3)


def test_the_other_constructors_keep_merging_runs():
    assert Placement.interleaved(12, 1, 3).stage_ranks == (0,) and Placement.interleaved(12, 1, 3).boundaries == ()
    assert Placement.looped([1, 1, 1, 1], 2).boundaries == () and Placement.from_balance([2, 1]).boundaries == ()
    assert Placement.even(5, 2) == Placement((0, 0, 0, 1, 1))


def test_rank_programs_hand_over_between_stages_of_one_rank():
    """Stages 1 and 2 both on rank 1: no message between them (``step@stage``), the others as ever."""
    schedule = Schedule("zbv", 4, 2, virtual_stages=2)
    program = [f"{i}@{i.stage}" for i in rank_program(schedule, (0, 1, 1, 0), 1)]
    assert program == ("ra0@1 F0@1 F0@2 sa0@2 ra1@1 F1@1 F1@2 sa1@2 rg0@2 I0@2 W0@2 I0@1 sg0@1 W0@1 rg1@2 I1@2 "
                       "W1@2 I1@1 sg1@1 W1@1").split()
    assert [f"{i}@{i.stage}" for i in rank_program(schedule, (0, 1, 1, 0), 0)] == (
        "F0@0 sa0@0 F1@0 sa1@0 ra0@3 F0@3 I0@3 sg0@3 W0@3 ra1@3 F1@3 I1@3 sg1@3 W1@3 rg0@0 I0@0 W0@0 rg1@0 I1@0 "
        "W1@0").split()
    assert [i.stage for i in rank_program(Schedule("1f1b", 3, 2), (0, 1, 0), 1) if isinstance(i, RecvActivation)] \
        == [1, 1]  # adjacent stages on two ranks: messages as before


# -- the schedule ---------------------------------------------------------------------------------------------


def test_zbv_grid_2_ranks_4_microbatches():
    """Rank 0 holds chunk 0 = stage 0 and chunk 1 = stage 3 (the loss), rank 1 stages 1 and 2: F, I and W one
    tick each; rank 1 waits one tick at the start, nothing else is idle but rank 1's last."""
    schedule = Schedule("zbv", 4, 4, virtual_stages=2)
    assert rows(schedule.rank_grid()) == [
        "F0.0 F1.0 F2.0 F0.1 I0.1 W0.1 F1.1 I1.1 W1.1 F3.0 I0.0 W0.0 F2.1 I2.1 W2.1 I1.0 W1.0 F3.1 I3.1 W3.1 "
        "I2.0 W2.0 I3.0 W3.0 .".split(),
        ".    F0.0 F0.1 F1.0 F1.1 I0.1 W0.1 F2.0 I0.0 W0.0 F2.1 I1.1 W1.1 F3.0 I1.0 W1.0 F3.1 I2.1 W2.1 I2.0 "
        "I3.1 I3.0 W2.0 W3.1 W3.0".split(),
    ]
    assert schedule.stage_ranks == (0, 1, 1, 0) and schedule.length == 25
    assert schedule.unit_bubble == pytest.approx(1 / 25) == schedule.ideal_bubble
    assert str(schedule) == "zbv schedule, 4 stages (2 per rank), 4 micro-batches"
    assert [str(s) for s in zbv_order(2, 4, 1)][:8] == "F0 F0 F1 F1 I0 W0 F2 I0".split()


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 7, 9, 12])
def test_zbv_runs_every_step_once_and_its_bubble_is_the_papers(ranks, microbatches):
    """Each stage runs F, I and W of every micro-batch once, I after F and W after I; at unit costs and
    m >= 2p - 1 the bubble is the fill's alone, (p-1)/(6m + p-1) (the paper's zero bubble at F = I = W); a rank
    holds at most 2p micro-batches of its half-size stages (1F1B's first stage's p of whole stages)."""
    p, m = ranks, microbatches
    schedule = Schedule("zbv", 2 * p, m, virtual_stages=2)
    for stage in range(2 * p):
        order = schedule.compute_order(stage)
        assert sorted(order) == sorted((code, i) for code in "FIW" for i in range(m))
        assert all(order.index(("F", i)) < order.index(("I", i)) < order.index(("W", i)) for i in range(m))
    if m >= 2 * p - 1:
        assert schedule.unit_bubble == pytest.approx((p - 1) / (6 * m + p - 1))
    assert schedule.ideal_bubble == pytest.approx(schedule.unit_bubble)
    assert placement_bubble(schedule, schedule.stage_ranks) == pytest.approx(schedule.unit_bubble)
    times = [(1.0, 2.0)] * (2 * p)  # I and W half a backward each: unit steps
    assert placement_bubble(schedule, schedule.stage_ranks, times) == pytest.approx(schedule.unit_bubble)
    for rank in range(p):
        held = peak = 0
        for instruction in zbv_order(p, m, rank):
            held += 1 if isinstance(instruction, Forward) else -1 if isinstance(instruction, BackwardWeight) else 0
            peak = max(peak, held)
        assert peak <= 2 * p


def test_zbv_bubble_below_the_other_schedules():
    """4 ranks, 8 micro-batches, unit costs (a whole stage's F, I, W two ticks each, a chunk's one)."""
    zbv = Schedule("zbv", 8, 8, virtual_stages=2).ideal_bubble
    assert zbv == pytest.approx(3 / 51)
    assert zbv < Schedule("zero-bubble", 4, 8).ideal_bubble < Schedule("1f1b", 4, 8).ideal_bubble


@pytest.mark.parametrize("seed", range(20))
def test_zbv_is_deadlock_free_on_any_placement(seed):
    """Any stage -> rank map (two chunks of a rank adjacent, apart, or more per rank) and random step times: the
    ranks' programs run to the end in the simulator (which raises on a deadlock), every input before its use."""
    rng = random.Random(seed)
    ranks = rng.randint(1, 4)
    schedule = Schedule("zbv", 2 * ranks, rng.randint(1, 3 * ranks), virtual_stages=2)
    stage_ranks = [rng.randrange(rng.randint(1, 4)) for _ in range(2 * ranks)]
    spans = simulate_step(schedule, stage_ranks, [(rng.random() + 0.1, rng.random() + 0.1)] * (2 * ranks))
    assert len(spans) == 3 * schedule.microbatches * 2 * ranks
    for step_, (start, _) in spans.items():
        assert all(spans[need][1] <= start for need in schedule.depends_on(step_))


@pytest.mark.parametrize("args,match", [
    (("zbv", 3, 4), "3 stages cannot be 2 virtual stages on each rank"),
    (("zbv", 4, 4), "zbv runs two stages per rank .* got 4 stages as 1 per rank"),
])
def test_bad_zbv_schedules_are_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        Schedule(*args, virtual_stages=2 if args[1] == 3 else 1)


def test_zbv_settings_place_a_v():
    from mpipar.cost.model import Layout, predict_pipeline
    from mpipar.pipeline.config import PipelineConfig
    from mpipar.pipeline.strategy import choose_placement

    config = PipelineConfig(schedule="zbv", stages=2, microbatches=3)
    assert config.chunks_per_rank == 2 and config.virtual_stages == 1 == PipelineConfig(schedule="1f1b").chunks_per_rank
    assert PipelineConfig(schedule="zbv", virtual_stages=2).chunks_per_rank == 2
    placement, _ = choose_placement(awkward_model(), config, MPI.COMM_SELF, None, print)
    assert placement == Placement.v_shape(12, 2) and placement.stage_ranks == (0, 1, 1, 0)
    given = PipelineConfig(schedule="zbv", stages=2, microbatches=3, balance=(2, 4, 4, 2))
    assert choose_placement(awkward_model(), given, MPI.COMM_SELF, None, print)[0].balance() == [2, 4, 4, 2]
    for settings, match in [(dict(virtual_stages=3), "leave out --virtual-stages"),
                            (dict(placement=(0, 1)), "and --placement"), (dict(tp=2), "use --tp 1"),
                            (dict(balance=(3, 3)), "or 4 positive layer counts")]:
        with pytest.raises(ValueError, match=match):
            PipelineConfig(schedule="zbv", stages=2, microbatches=4, **settings)
    from test_cost_model import machine_of, profile_of

    profile = profile_of([(1.0, 2.0, [1000], 100, 10)] * 8)  # 8 equal chunks: F 1, I 1, W 1
    prediction = predict_pipeline(profile, 64, Layout(4, 4, pp=4), machine_of(profile), microbatches=8,
                                  schedule="zbv")  # two chunks per rank whatever virtual_stages says
    assert prediction.bubble == pytest.approx(3 / 51) and prediction.p2p == 0
    assert prediction.step == pytest.approx(6 * 8 + 3)


# -- exactness over MPI ---------------------------------------------------------------------------------------


def batchnorm_model() -> nn.Sequential:
    """8 layers (one chunk each on 4 ranks) with two BatchNorms, a frozen Linear and dropout off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 6),
                          nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[3].requires_grad_(False)
    return model


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("microbatches,layout", [(2, "v"), (3, "default"), (6, "v"), (12, "default"), (4, "looped"),
                                                 (6, "looped")])
def test_zbv_trains_like_the_unsplit_model(microbatches, layout):
    """Three SGD steps (momentum) with frozen, unused and tied parameters (fc5 and fc3 on different ranks from 2
    ranks on) equal serial training; the default placement of zbv is the V, and Megatron's looped chunks (two per
    rank, chunk c on rank c % size) run too; a stage holds what the schedule says from F to W; evaluation equals
    the model."""
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    model = awkward_model()
    reference = copy.deepcopy(model)
    placement = {"v": Placement.v_shape(12, size), "default": None,
                 "looped": Placement.chunked(even_balance(12, 2 * size), [c % size for c in range(2 * size)])}[layout]
    pipe = Pipeline(model, comm, placement, schedule="zbv", microbatches=microbatches, loss_fn=F.cross_entropy)
    assert pipe.placement == (placement or Placement.v_shape(12, size)) and pipe.schedule.virtual_stages == 2
    result = train_against_reference(comm, pipe, model, reference, f"zbv m={microbatches}")
    check_held_and_evaluate(comm, pipe, reference, result, held=True)


@pytest.mark.mpi(min_size=1)
def test_zbv_batchnorm_sees_one_microbatch_at_a_time():
    """BatchNorm in two stages (on one rank's two chunks at 1 rank): outputs, loss and gradients of the model run
    micro-batch by micro-batch over two steps, running statistics updated once per micro-batch."""
    comm, microbatches = MPI.COMM_WORLD, 4
    model = batchnorm_model()
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, None, schedule="zbv", microbatches=microbatches, loss_fn=F.cross_entropy)
    for number in range(2):
        inputs, targets = random_batch(number, BATCH)
        for p in [*model.parameters(), *reference.parameters()]:
            p.grad = None
        outputs = []
        for chunk, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            out = reference(chunk)
            (F.cross_entropy(out, target) / microbatches).backward()
            outputs.append(out.detach())
        result = step(pipe, inputs, targets)
        compare(comm, pipe, model, reference, result, inputs, targets, f"zbv BatchNorm step {number}",
                torch.cat(outputs))
    local = {id(p) for p in pipe.parameters()}
    problems = [index for index in (1, 5) if id(model[index].weight) in local and not (
        torch.allclose(model[index].running_mean, reference[index].running_mean, **TOL) and
        torch.allclose(model[index].running_var, reference[index].running_var, **TOL) and
        int(model[index].num_batches_tracked) == 2 * microbatches)]
    assert_all_ranks(comm, not problems, f"running statistics of layers {problems}")


@pytest.mark.mpi(min_size=1)
def test_zbv_with_skips_across_stages():
    """The 14-layer skip model in a V: skip "a" (layer 1 -> 12) between rank 0's two stages (in memory), the
    others across ranks or inside a stage, depending on the size."""
    comm = MPI.COMM_WORLD
    model = skip_model()
    reference, forward = plain_reference(model)
    pipe = Pipeline(model, comm, None, schedule="zbv", microbatches=4, loss_fn=F.cross_entropy)
    problems = []
    for number in range(2):
        inputs, targets = random_batch(number, BATCH)
        for p in [*model.parameters(), *reference.parameters()]:
            p.grad = None
        F.cross_entropy(forward(inputs), targets).backward()
        result = step(pipe, inputs, targets)
        expected = {name: p.grad for name, p in reference.named_parameters()}
        local = {id(p) for p in pipe.parameters()}
        problems += [f"step {number} {name}" for (name, _), p in zip(reference.named_parameters(), model.parameters())
                     if id(p) in local and not torch.allclose(p.grad, expected[name], **TOL)]
        out = forward(inputs).detach()
        if pipe.holds_last_stage and not torch.allclose(result.outputs, out, **TOL):
            problems.append(f"step {number} outputs")
        if abs(result.loss - F.cross_entropy(out, targets).item()) > 1e-12:
            problems.append(f"step {number} loss")
        with torch.no_grad():
            for p, r in zip(model.parameters(), reference.parameters()):  # the same SGD step on both
                if p.grad is not None:
                    p -= 0.1 * p.grad
                if r.grad is not None:
                    r -= 0.1 * r.grad
    assert_all_ranks(comm, not problems, f"zbv {pipe.placement}: {problems}")


@pytest.mark.mpi(min_size=1)
def test_zbv_refuses_one_stage_per_rank_on_every_rank():
    comm = MPI.COMM_WORLD
    raises_everywhere(comm, "zbv runs two stages per rank", lambda: Pipeline(
        awkward_model(), comm, Placement.even(12, comm.Get_size()), schedule="zbv", microbatches=2,
        loss_fn=F.cross_entropy))
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), *[nn.Linear(4, 4) for _ in range(6)]).double()
    raises_everywhere(comm, "change their input in place", lambda: Pipeline(
        model, comm, None, schedule="zbv", microbatches=2, loss_fn=F.cross_entropy))
