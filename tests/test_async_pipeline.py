"""Asynchronous pipelines (PipeDream, PipeDream-2BW) against the delayed-gradient reference.

Serial tests check the reference itself; the MPI ones (``mpirun -n {1,2,3,4} python -m pytest
--only-mpi tests/test_async_pipeline.py``) run the pipeline over every rank of the world (one
stage per rank) and on ``COMM_SELF`` (one stage) and compare with one process applying the same
gradients with the same per-stage staleness. float64 tiny MLPs: only summation order may differ.
"""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, random_batch
from mpipar.pipeline import Pipeline, Placement
from mpipar.pipeline.config import PipelineConfig
from mpipar.pipeline.delayed import DelayedGradientSGD
from mpipar.pipeline.schedule import Schedule
from mpipar.pipeline.versions import WeightVersions

TOL = dict(rtol=1e-10, atol=1e-12)
BATCH, MICROBATCHES, STEPS = 8, 4, 20
torch.set_num_threads(1)
COMMS = {"self": lambda: MPI.COMM_SELF, "world": lambda: MPI.COMM_WORLD}


def make_model(width: int = 5, layers: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    parts = [(f"fc{i}", nn.Linear(5 if i == 0 else width, width)) for i in range(layers)]
    body = [item for i, fc in enumerate(parts) for item in (fc, (f"act{i}", nn.Tanh()))]
    return nn.Sequential(OrderedDict(body + [("head", nn.Linear(width, 3))])).double()


def make_batch(step: int, batch: int = BATCH):
    return random_batch(step, batch)


def sgd(params, lr=0.1, momentum=0.9, weight_decay=0.0):
    return torch.optim.SGD(params or [torch.zeros(0, requires_grad=True)], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def async_pipeline(comm, model, schedule, microbatches=MICROBATCHES, weight_decay=0.0):
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule=schedule,
                    microbatches=microbatches, loss_fn=F.cross_entropy)
    optimizer = sgd(list(pipe.parameters()), weight_decay=weight_decay)
    pipe.bind_optimizer(optimizer)
    return pipe, optimizer


def local_difference(pipe, model, reference_model) -> float:
    local = {id(p) for p in pipe.parameters()}
    return max([(p - r).abs().max().item() for p, r in zip(model.parameters(), reference_model.parameters())
                if id(p) in local] or [0.0])


# -- the reference (serial) --------------------------------------------------------------------


@pytest.mark.parametrize("update_every", [1, MICROBATCHES])
def test_reference_with_zero_staleness_is_plain_sgd_bitwise(update_every):
    model, plain = make_model(), make_model()
    reference = DelayedGradientSGD(model, [3, 6], [0, 0], update_every=update_every, microbatches=MICROBATCHES,
                                   optimizer=sgd, loss_fn=F.cross_entropy)
    optimizer = sgd(list(plain.parameters()))
    for step in range(5):
        inputs, targets = make_batch(step)
        reference.step(inputs, targets)
        for i, (x, y) in enumerate(zip(inputs.chunk(MICROBATCHES), targets.chunk(MICROBATCHES))):
            (F.cross_entropy(plain(x), y) / MICROBATCHES).backward()
            if (i + 1) % update_every == 0:
                optimizer.step()
                optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert reference.updates == 5 * MICROBATCHES // update_every


def test_reference_with_staleness_differs_from_plain_sgd_and_keeps_only_the_versions_it_needs():
    model, plain = make_model(), make_model()
    reference = DelayedGradientSGD.for_schedule(model, [3, 3, 3], Schedule("pipedream", 3, MICROBATCHES),
                                                optimizer=sgd, loss_fn=F.cross_entropy)
    assert reference.staleness == [2, 1, 0] and reference.update_every == 1
    reference.step(*make_batch(0))
    assert [sorted(h) for h in reference.history] == [[2, 3, 4], [3, 4], [4]]
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_reference_and_config_reject_bad_input_with_the_values():
    with pytest.raises(ValueError, match=r"balance \[3, 3\] must split the 9 layers"):
        DelayedGradientSGD(make_model(), [3, 3], [0, 0], update_every=1, microbatches=2, optimizer=sgd,
                           loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"need a staleness >= 0 for each of 2 stages, got \[1\]"):
        DelayedGradientSGD(make_model(), [4, 5], [1], update_every=1, microbatches=2, optimizer=sgd,
                           loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"--schedule 2bw with 4 stages needs --microbatches >= 3"):
        PipelineConfig(schedule="2bw", stages=4, microbatches=2)


# -- the pipeline (MPI) ------------------------------------------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("comm_name", ["self", "world"])
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_async_pipeline_replays_the_delayed_gradient_reference(comm_name, schedule, decay):
    """20 steps, drained after steps 7 and 13 (where checkpoints would be): weights, losses and the
    staleness of every update equal the reference's and the schedule's (with weight decay too)."""
    comm = COMMS[comm_name]()
    model, reference_model = make_model(), make_model()
    pipe, _ = async_pipeline(comm, model, schedule, weight_decay=decay)
    reference = DelayedGradientSGD.for_schedule(reference_model, pipe.placement.balance(), pipe.schedule,
                                                optimizer=lambda params: sgd(params, weight_decay=decay),
                                                loss_fn=F.cross_entropy)
    problems, records, versions = [], [], []
    for step in range(STEPS):
        inputs, targets = make_batch(step)
        result = pipe.step(inputs, targets)
        expected = reference.step(inputs, targets)
        if pipe.holds_last_stage and abs(result.loss - expected) > 1e-12:
            problems.append(f"step {step}: loss {result.loss} != {expected}")
        records += result.updates
        versions.append(result.weight_versions)
        if step in (7, 13):
            pipe.drain()
            records += pipe.take_updates()
    pipe.drain()
    records += pipe.take_updates()
    difference = local_difference(pipe, model, reference_model)
    if difference > 1e-10:
        problems.append(f"weights differ by {difference:.3e}")
    m, staleness = MICROBATCHES, pipe.schedule.staleness()
    for stage in pipe.stages:
        mine = [(g, used, applied) for s, g, used, applied in records if s == stage]
        every = m if schedule == "2bw" else 1  # one record per micro-batch, each update's in order
        if [g for g, _, _ in mine] != list(range(STEPS * m)) or \
                [applied for _, _, applied in mine] != [g // every for g in range(STEPS * m)]:
            problems.append(f"stage {stage}: updates {mine[:6]}...")
        steady = {applied - used for g, used, applied in mine if g >= 2 * m}
        if steady != {staleness[stage]}:
            problems.append(f"stage {stage}: steady staleness {steady}, schedule {staleness[stage]}")
        peak = max(v[stage] for v in versions[2:])
        if peak != pipe.schedule.weight_versions()[stage]:
            problems.append(f"stage {stage}: {peak} weight versions, schedule {pipe.schedule.weight_versions()}")
    assert_all_ranks(MPI.COMM_WORLD, not problems, f"{schedule} on {comm.Get_size()} ranks: {problems}")


@pytest.mark.mpi(min_size=1)
def test_zero_staleness_reference_equals_the_1f1b_pipeline():
    comm = MPI.COMM_WORLD
    model, reference_model = make_model(), make_model()
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule="1f1b",
                    microbatches=MICROBATCHES, loss_fn=F.cross_entropy)
    optimizer = sgd(list(pipe.parameters()))
    reference = DelayedGradientSGD(reference_model, pipe.placement.balance(), [0] * pipe.num_stages,
                                   update_every=MICROBATCHES, microbatches=MICROBATCHES, optimizer=sgd,
                                   loss_fn=F.cross_entropy)
    for step in range(5):
        inputs, targets = make_batch(step)
        optimizer.zero_grad()
        pipe.step(inputs, targets)
        optimizer.step()
        reference.step(inputs, targets)
    difference = local_difference(pipe, model, reference_model)
    assert_all_ranks(comm, difference < 1e-10, f"1f1b and the zero-staleness reference differ by {difference:.3e}")


class _Seen(torch.autograd.Function):
    """``x * weight``, logging the weight its forward saw, and in backward the weight it uses and the
    module's parameter at that time."""

    @staticmethod
    def forward(ctx, x, weight, probe):
        ctx.save_for_backward(x, weight)
        ctx.probe = probe
        if not weight.is_meta:  # not the pipeline's shape inference
            probe.forwards.append(weight.detach().clone())
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.probe.backwards.append((weight.detach().clone(), ctx.probe.weight.detach().clone()))
        return grad * weight, (grad * x).sum(0), None


class Probe(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))
        self.forwards, self.backwards = [], []

    def forward(self, x):
        return _Seen.apply(x, self.weight, self)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_backward_uses_exactly_the_weights_of_its_forward(schedule):
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    layers = []
    for i in range(comm.Get_size()):  # one stage per rank, each with a probe
        layers += [(f"fc{i}", nn.Linear(5, 5).double()), (f"probe{i}", Probe(5)), (f"act{i}", nn.Tanh())]
    model = nn.Sequential(OrderedDict(layers + [("head", nn.Linear(5, 3).double())]))
    pipe, _ = async_pipeline(comm, model, schedule)
    for step in range(6):
        pipe.step(*make_batch(step))
    pipe.drain()
    problems = []
    for index, stage in pipe.stages.items():
        for probe in [layer for layer in stage.module if isinstance(layer, Probe)]:
            used = [saved for saved, _ in probe.backwards]
            if len(probe.forwards) != 6 * MICROBATCHES or len(used) != 6 * MICROBATCHES or \
                    not all(torch.equal(f, b) for f, b in zip(probe.forwards, used)):
                problems.append(f"stage {index}: a backward saw other weights than its forward "
                                f"({len(probe.forwards)} forwards, {len(used)} backwards)")
            moved = any(not torch.equal(saved, live) for saved, live in probe.backwards)
            if moved != (pipe.schedule.staleness()[index] > 0):
                problems.append(f"stage {index}: updates between forward and backward: {moved}")
    assert_all_ranks(comm, not problems, str(problems))


@pytest.mark.mpi(min_size=1)
def test_state_taken_in_a_drain_resumes_bitwise():
    """The checkpoint's content (weights, optimizer, stashed versions, counters) taken after step 4 and
    loaded into a new pipeline gives after 8 steps exactly the weights of a run never stopped."""
    comm = MPI.COMM_WORLD
    straight_model = make_model()
    straight, _ = async_pipeline(comm, straight_model, "pipedream")
    for step in range(8):
        straight.step(*make_batch(step))
    straight.drain()

    first_model = make_model()
    first, first_optimizer = async_pipeline(comm, first_model, "pipedream")
    for step in range(4):
        first.step(*make_batch(step))
    saved = copy.deepcopy({"async": first.async_state_dict(), "model": first.local_module.state_dict(),
                           "optimizer": first_optimizer.state_dict()})
    resumed_model = make_model()
    torch.manual_seed(1)
    resumed, resumed_optimizer = async_pipeline(comm, resumed_model, "pipedream")
    resumed.local_module.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_async_state_dict(saved["async"])
    for step in range(4, 8):
        resumed.step(*make_batch(step))
    resumed.drain()
    local = {id(p) for p in resumed.parameters()}
    same = all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), straight_model.parameters())
               if id(a) in local)
    stashed = sum(len(stage["stash"]) for stage in saved["async"]["stages"].values())
    expected = sum(straight.schedule.staleness()[i] for i in straight.stages)  # pipedream: one per micro-batch held
    assert_all_ranks(comm, same and stashed == expected, f"resumed weights equal: {same}; {stashed} versions "
                                                          f"stashed, {expected} expected")


@pytest.mark.mpi(min_size=1)
def test_missing_optimizer_is_an_error_on_every_rank():
    comm = MPI.COMM_WORLD
    model = make_model()
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule="2bw",
                    microbatches=MICROBATCHES, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match=r"call pipe.bind_optimizer\(optimizer\)") as caught:
        pipe.step(*make_batch(0))
    assert_all_ranks(comm, True, str(caught.value))
    pipe.bind_optimizer(sgd(list(pipe.parameters())))
    updates = pipe.step(*make_batch(0)).updates
    pipe.drain()
    updates += pipe.take_updates()  # 2bw: one update per stage, recorded for each micro-batch in it
    expected = [(stage, i, 0, 0) for stage in pipe.stages for i in range(MICROBATCHES)]
    assert_all_ranks(comm, updates == expected, f"after the error: {updates}")


@pytest.mark.mpi(min_size=2)
def test_replicated_async_pipelines_are_refused_on_every_rank():
    from mpipar.pipeline.strategy import PipelineStrategy

    comm = MPI.COMM_WORLD
    config = PipelineConfig(schedule="pipedream", stages=1, microbatches=2, balance="even")
    with pytest.raises(ValueError, match=r"cannot average gradients over replicas or split layers yet; use "
                                         rf"--stages = the world size \({comm.Get_size()}\)") as caught:
        PipelineStrategy(comm, make_model(), config, batch_size=8)
    assert_all_ranks(comm, True, str(caught.value))


class Gated(nn.Module):
    """``x``, with a parameter that gets an exact zero gradient (so only weight decay moves it), one that
    takes no part (gradient None) and a frozen one (``requires_grad=False``)."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.decayed = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))
        self.unused = nn.Parameter(torch.linspace(-1.0, 1.0, width, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.linspace(1.0, 2.0, width, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return x * self.frozen / self.frozen + 0.0 * self.decayed.sum()


def gated_model(stages: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for i in range(stages):  # one stage per rank, each with a gate
        layers += [(f"fc{i}", nn.Linear(5, 5).double()), (f"gate{i}", Gated()), (f"act{i}", nn.Tanh())]
    return nn.Sequential(OrderedDict(layers + [("head", nn.Linear(5, 3).double())]))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_weight_decay_per_batch_is_the_flushing_schedules(schedule):
    """Each update decays by its share of the batch (1/m for PipeDream's per-micro-batch updates), so a
    weight whose gradient is zero shrinks by (1 - lr wd) per batch to first order, as under 1F1B; exactly,
    (1 - lr wd share) per update."""
    comm = MPI.COMM_WORLD
    lr, decay, steps = 0.1, 0.1, 5
    model = gated_model(comm.Get_size())
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule=schedule,
                    microbatches=MICROBATCHES, loss_fn=F.cross_entropy)
    pipe.bind_optimizer(torch.optim.SGD(list(pipe.parameters()), lr=lr, weight_decay=decay))
    gates = [layer for stage in pipe.stages.values() for layer in stage.module if isinstance(layer, Gated)]
    start = [gate.decayed.detach().clone() for gate in gates]
    for step in range(steps):
        pipe.step(*make_batch(step))
    pipe.drain()
    share = 1 / MICROBATCHES if schedule == "pipedream" else 1.0
    factor = torch.tensor(1 - lr * decay * share, dtype=torch.float64) ** round(steps / share)
    problems = [f"{schedule}: decayed by {(gate.decayed / begin).mean().item():.6f}, expected {factor.item():.6f}"
                for gate, begin in zip(gates, start) if not torch.allclose(gate.decayed, begin * factor, **TOL)]
    assert_all_ranks(comm, not problems, str(problems))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_frozen_and_unused_parameters_do_not_move(schedule):
    """Momentum and weight decay leave parameters without a gradient alone (their ``.grad`` stays None, as
    under the flushing schedules); the stash holds only trainable parameters."""
    comm = MPI.COMM_WORLD
    model = gated_model(comm.Get_size())
    pipe = Pipeline(model, comm, Placement.even(len(model), comm.Get_size()), schedule=schedule,
                    microbatches=MICROBATCHES, loss_fn=F.cross_entropy)
    pipe.bind_optimizer(torch.optim.SGD(list(pipe.parameters()), lr=0.1, momentum=0.9, weight_decay=0.1))
    gates = [layer for stage in pipe.stages.values() for layer in stage.module if isinstance(layer, Gated)]
    start = [(gate.unused.detach().clone(), gate.frozen.detach().clone()) for gate in gates]
    for step in range(3):
        pipe.step(*make_batch(step))
    stashed = {name for versions in pipe.versions.values() for weights in versions.stash.values() for name in weights}
    pipe.drain()
    problems = [f"{schedule}: unused moved {(gate.unused - unused).abs().max().item():.2e}, frozen moved "
                f"{(gate.frozen - frozen).abs().max().item():.2e}" for gate, (unused, frozen) in zip(gates, start)
                if not (torch.equal(gate.unused, unused) and torch.equal(gate.frozen, frozen))]
    if any(name.endswith("frozen") for name in stashed):
        problems.append(f"frozen parameters stashed: {sorted(stashed)}")
    assert_all_ranks(comm, not problems, str(problems))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_evaluate_in_flight_drains_first(schedule):
    """``evaluate`` between steps (non-contiguous placement: the last stage back on rank 0) gives the
    outputs of the drained pipeline's evaluation, and training goes on as if drained there."""
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    ranks = [layer * size // 8 for layer in range(8)] + [0]  # 9 layers; with 2 or more ranks rank 0 twice
    results = []
    for drained in (True, False):
        model = make_model()
        pipe = Pipeline(model, comm, Placement(tuple(ranks)), schedule=schedule, microbatches=MICROBATCHES,
                        loss_fn=F.cross_entropy)
        pipe.bind_optimizer(sgd(list(pipe.parameters())))
        for step in range(3):
            pipe.step(*make_batch(step))
        if drained:
            pipe.drain()
        inputs, targets = make_batch(99)
        outputs = pipe.evaluate(inputs, targets).outputs
        for step in range(3, 5):
            pipe.step(*make_batch(step))
        pipe.drain()
        results.append((outputs, [p.detach().clone() for p in pipe.parameters()]))
    (expected, expected_weights), (outputs, weights) = results
    problems = []
    if pipe.holds_last_stage and not torch.equal(outputs, expected):
        problems.append(f"outputs differ by {(outputs - expected).abs().max().item():.3e}")
    if not all(torch.equal(a, b) for a, b in zip(weights, expected_weights)):
        problems.append("weights after evaluating in flight differ from the drained run's")
    assert_all_ranks(comm, not problems, f"{schedule} on {size} ranks: {problems}")


# -- no self-inflicted copies --------------------------------------------------------------------


def stashed_micro_batches(schedule: str, stage: int, layer: nn.Module):
    """Run ``stage``'s compute steps of ``schedule`` on ``layer`` through its weight versions; the micro-batches
    whose forward got a stashed copy, and the versions."""
    versions = WeightVersions(stage, layer, Schedule(schedule, 4, MICROBATCHES))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses, stashed = {}, []
    for instruction in versions.schedule.instructions(stage):
        kind, i = type(instruction).__name__, instruction.microbatch
        if kind == "Forward":
            weights = versions.weights_for(i)
            stashed += [] if weights is None else [i]
            x = torch.full((1, 3), float(i + 1), dtype=torch.float64)
            losses[i] = torch.func.functional_call(layer, weights or dict(layer.named_parameters()), (x,)).sum()
        elif kind == "Backward":
            losses.pop(i).backward()
            versions.take_gradient(i)
        elif kind == "Update":
            versions.update(lambda params, share: optimizer.step())
    return stashed, versions


@pytest.mark.parametrize("schedule,stage,copied,stash_bytes", [
    ("pipedream", 3, [], 0),  # staleness 0: forward and backward on the newest weights, never a copy
    ("pipedream", 0, [1, 2, 3], 3 * 64),  # micro-batch 0 runs before any update: on the parameters
    ("2bw", 1, [], 64),  # the first batch runs on version 0 before its update; the next batch's version 0 kept
])
def test_a_micro_batch_that_sees_the_newest_weights_runs_on_the_parameters(schedule, stage, copied, stash_bytes):
    layer = nn.Linear(3, 2).double()  # 64 bytes of parameters
    stashed, versions = stashed_micro_batches(schedule, stage, layer)
    assert stashed == copied
    assert all(p.grad is None for p in layer.parameters())  # gradients reach the parameters only in updates
    assert versions.peak_bytes == stash_bytes


@pytest.mark.mpi(min_size=2)
def test_the_last_stage_of_pipedream_stashes_nothing():
    comm = MPI.COMM_WORLD
    pipe, optimizer = async_pipeline(comm, make_model(layers=2 * comm.Get_size()), "pipedream")
    peaks = []
    for step in range(3):
        inputs, targets = make_batch(step)
        peaks.append(pipe.step(inputs, targets).stash_bytes)
    pipe.drain()
    only_last = set(pipe.stages) == {pipe.num_stages - 1}
    assert_all_ranks(comm, not only_last or max(peaks) == 0, f"rank {comm.Get_rank()}: stash bytes {peaks}")
    assert_all_ranks(comm, only_last or max(peaks) > 0, f"rank {comm.Get_rank()}: stash bytes {peaks}")
