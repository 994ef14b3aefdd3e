"""Skip connections across pipeline stages, the fine-grained ResNet, and auto balance on it.

A pipeline with skips (across 1, 2 and 3 stage boundaries, and between two stages of one
rank with another rank between them) equals the unsplit model: outputs, loss, every
gradient (float64). Run at several sizes:
``mpirun -n {1,2,3,4} python -m pytest --only-mpi tests/test_pipeline_skips.py``; the
serial pass checks the rank programs (no deadlock for any placement), the skip
declarations, the fine ResNet against the block ResNet and the balance on it.
"""

import copy
import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, random_batch
from mpipar import models
from mpipar.pipeline import AddSkip, CatSkip, Pipeline, Placement, SaveSkip, SkipSequential, find_skips
from mpipar.pipeline.partition import balance_by_time, profile_layers, stage_sums
from mpipar.pipeline.schedule import (
    SCHEDULES,
    Backward,
    Forward,
    RecvActivation,
    RecvGrad,
    RecvSkip,
    Schedule,
    SendActivation,
    SendGrad,
    SendSkip,
    SendSkipGrad,
    rank_program,
)

TOL = dict(rtol=1e-10, atol=1e-12)
BATCH, WIDTH = 12, 6
torch.set_num_threads(1)


def skip_model() -> SkipSequential:
    """14 layers, three skips: "a" (layer 1 -> 12, concatenated), "b" (3 -> 10, through a Linear
    shortcut) and "c" (5 -> 8, added)."""
    torch.manual_seed(0)
    return SkipSequential(OrderedDict([
        ("fc0", nn.Linear(5, WIDTH)), ("save_a", SaveSkip("a")), ("act0", nn.Tanh()), ("save_b", SaveSkip("b")),
        ("fc1", nn.Linear(WIDTH, WIDTH)), ("save_c", SaveSkip("c")), ("act1", nn.Tanh()),
        ("fc2", nn.Linear(WIDTH, WIDTH)), ("add_c", AddSkip("c")), ("act2", nn.Tanh()),
        ("add_b", AddSkip("b", shortcut=nn.Linear(WIDTH, WIDTH))), ("fc3", nn.Linear(WIDTH, WIDTH)),
        ("cat_a", CatSkip("a")), ("fc4", nn.Linear(2 * WIDTH, 3))])).double()


def plain_reference(model: SkipSequential):
    """The same network written as an ordinary forward (no skip layers), sharing nothing."""
    m = copy.deepcopy(model)

    def forward(x):
        a = m.fc0(x)
        b = torch.tanh(a)
        c = m.fc1(b)
        h = m.fc2(torch.tanh(c)) + c
        h = m.fc3(torch.tanh(h) + m.add_b.shortcut(b))
        return m.fc4(torch.cat([h, a], 1))

    return m, forward


def skip_placements(size: int) -> dict:
    """Placements of the 14 layers that use every rank of ``size``."""
    middle = [1 + i % (size - 1) for i in range(10)] if size > 1 else [0] * 10
    return {
        "even": Placement.even(14, size),  # at 4 ranks: "a" crosses 3 boundaries, "b" 2, "c" 1
        "sandwich": Placement((0, 0, 0, 0, *middle)[:12] + (0, 0)),  # "a": rank 0 -> ... -> rank 0, no message
        "round_robin": Placement(tuple(i % size for i in range(14))),
    }


def make_batch(step: int = 0):
    return random_batch(step, BATCH)


def expected_skip_bytes(placement: Placement, rank: int, microbatch_rows: int, microbatches: int,
                        train: bool) -> int:
    """Bytes of skip messages ``rank`` sends: every skip whose two layers sit on different ranks is
    sent once per micro-batch forward (and its gradient once back)."""
    size = microbatch_rows * WIDTH * 8
    total = 0
    for edge in find_skips(skip_model()):
        saver, user = placement.ranks[edge.producer], placement.ranks[edge.consumer]
        if saver != user:
            total += size * microbatches * ((saver == rank) + (train and user == rank))
    return total


# -- the skip declarations -----------------------------------------------------------------


def test_skip_model_equals_the_same_network_written_by_hand():
    model = skip_model()
    copy_, forward = plain_reference(model)
    inputs, targets = make_batch()
    F.cross_entropy(model(inputs), targets).backward()
    F.cross_entropy(forward(inputs), targets).backward()
    assert torch.equal(model(inputs), forward(inputs))
    for (name, p), q in zip(model.named_parameters(), copy_.parameters()):
        assert torch.allclose(p.grad, q.grad, **TOL), name
    assert [(e.name, e.producer, e.consumer) for e in find_skips(model)] == [("a", 1, 12), ("b", 3, 10), ("c", 5, 8)]


@pytest.mark.parametrize("layers,error,match", [
    (lambda: SkipSequential(nn.Identity(), AddSkip("x")), ValueError, "uses skip 'x' which no earlier layer saved"),
    (lambda: SkipSequential(SaveSkip("x"), nn.Identity()), ValueError, r"\['x'\] are saved .* but never used"),
    (lambda: SkipSequential(SaveSkip("x"), SaveSkip("x"), AddSkip("x")), ValueError, "'x' is saved twice"),
    (lambda: nn.Sequential(SaveSkip("x"), AddSkip("x")), TypeError, "build the model as mpipar.pipeline.SkipSeq"),
    (lambda: SkipSequential(nn.Sequential(SaveSkip("x")), AddSkip("x")), ValueError, "must be direct children"),
])
def test_bad_skip_declarations_are_refused_with_a_hint(layers, error, match):
    with pytest.raises(error, match=match):
        find_skips(layers())


@pytest.mark.mpi(min_size=1)
def test_bad_skips_are_an_error_on_every_rank_in_the_constructor():
    comm = MPI.COMM_WORLD
    with pytest.raises(ValueError, match="never used") as caught:
        Pipeline(SkipSequential(SaveSkip("x"), *[nn.Linear(2, 2) for _ in range(comm.Get_size())]), comm)
    assert_all_ranks(comm, True, str(caught.value))


# -- rank programs: skip messages where needed, and never a deadlock -------------------------


def run_programs(programs: dict) -> None:
    """Execute rank programs with non-blocking sends and blocking receives, one step at a time
    round robin; fails when every rank waits for a message not yet sent (a deadlock)."""
    def message(instruction):  # (sender stage, receiver stage, kind, micro-batch, skip)
        s, i = instruction.stage, instruction.microbatch
        if isinstance(instruction, SendActivation):
            return (s, s + 1, "a", i, None)
        if isinstance(instruction, RecvActivation):
            return (s - 1, s, "a", i, None)
        if isinstance(instruction, SendGrad):
            return (s, s - 1, "g", i, None)
        if isinstance(instruction, RecvGrad):
            return (s + 1, s, "g", i, None)
        if isinstance(instruction, (SendSkip, SendSkipGrad)):
            return (s, instruction.peer, type(instruction).__name__[4:], i, instruction.skip)
        return (instruction.peer, s, type(instruction).__name__[4:], i, instruction.skip)

    posted, position = set(), {rank: 0 for rank in programs}
    while any(position[r] < len(p) for r, p in programs.items()):
        progressed = False
        for rank, program in programs.items():
            while position[rank] < len(program):
                instruction = program[position[rank]]
                if type(instruction).__name__.startswith("Recv"):
                    if message(instruction) not in posted:
                        break
                    posted.remove(message(instruction))
                elif type(instruction).__name__.startswith("Send"):
                    posted.add(message(instruction))
                position[rank] += 1
                progressed = True
        assert progressed, f"deadlock: positions {position}"
    assert not posted, f"messages never received: {posted}"


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("stage_ranks,skips", [
    ((0, 1), [(0, 1)]),
    ((0, 1, 2, 3), [(0, 3), (1, 3), (1, 2)]),  # across 3, 2 and 1 boundaries
    ((0, 1, 0), [(0, 2), (0, 1)]),  # 0 -> 2: one rank, another between: no message
    ((0, 1, 2, 0, 1), [(0, 3), (1, 4), (0, 4), (2, 3)]),
    ((1, 0, 1, 0), [(0, 2), (1, 3), (0, 3)]),
    ((0, 1, 1, 0), [(0, 3), (1, 2), (0, 2)]),  # zbv's V: stages 1 and 2 adjacent on rank 1, no message between
])
def test_rank_programs_with_skips_cannot_deadlock(name, stage_ranks, skips):
    if name == "zbv" and len(stage_ranks) % 2:  # its own placement has two stages per rank: one stage more
        stage_ranks = (*stage_ranks, 0)
    chunks = 2 if name == "zbv" else 1
    schedule = Schedule(name, len(stage_ranks), max(3, len(stage_ranks) - 1),  # pipedream, 2bw: m >= p - 1
                        virtual_stages=chunks)
    m = schedule.microbatches
    programs = {rank: rank_program(schedule, stage_ranks, rank, skips) for rank in sorted(set(stage_ranks))}
    run_programs(programs)
    sends = [i for program in programs.values() for i in program if isinstance(i, SendSkip)]
    crossing = [k for k, (a, b) in enumerate(skips) if stage_ranks[a] != stage_ranks[b]]
    assert sorted({i.skip for i in sends}) == crossing  # a message exactly for skips between two ranks
    assert len(sends) == m * len(crossing)
    grads = [i for program in programs.values() for i in program if isinstance(i, SendSkipGrad)]
    assert len(grads) == (m * len(crossing) if schedule.has_backward else 0)


def test_skip_messages_sit_around_their_compute_steps():
    schedule = Schedule("gpipe", 3, 1)
    assert [str(i) for i in rank_program(schedule, (0, 1, 2), 0, [(0, 2)])] == ["F0", "sa0", "ss0.0", "rg0",
                                                                                   "rk0.0", "B0"]
    program = rank_program(schedule, (0, 1, 2), 2, [(0, 2)])
    assert [type(i) for i in program] == [RecvActivation, RecvSkip, Forward, Backward, SendGrad, SendSkipGrad]
    assert program[1].peer == 0 and program[-1].peer == 0
    with pytest.raises(ValueError, match="from a stage to a later one"):
        rank_program(schedule, (0, 1, 2), 0, [(2, 1)])


# -- the pipeline with skips equals the unsplit model ---------------------------------------


def compare(comm, pipe, model, reference, result, inputs, targets, what):
    expected = reference(inputs)
    problems = []
    if abs(result.loss - F.cross_entropy(expected, targets).item()) > 1e-12:
        problems.append(f"loss {result.loss}")
    if pipe.holds_last_stage and not torch.allclose(result.outputs, expected.detach(), **TOL):
        problems.append("outputs")
    local = {id(p) for p in pipe.parameters()}
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        if id(p) in local and (p.grad is None or not torch.allclose(p.grad, r.grad, **TOL)):
            problems.append(f"grad {name}")
    assert_all_ranks(comm, not problems, f"{what}: {problems}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "naive"])
@pytest.mark.parametrize("placement_name", ["even", "sandwich", "round_robin"])
def test_pipeline_with_skips_equals_unsplit_model(schedule, placement_name):
    comm, microbatches = MPI.COMM_WORLD, 3
    model = skip_model()
    reference = copy.deepcopy(model)
    inputs, targets = make_batch()
    F.cross_entropy(reference(inputs), targets).backward()
    placement = skip_placements(comm.Get_size())[placement_name]
    pipe = Pipeline(model, comm, placement, schedule=schedule, microbatches=microbatches, loss_fn=F.cross_entropy)
    result = pipe.step(inputs if pipe.holds_first_stage else None, targets if pipe.holds_last_stage else None)
    compare(comm, pipe, model, reference, result, inputs, targets, f"{schedule} {placement}")
    expected = expected_skip_bytes(placement, comm.Get_rank(), BATCH // microbatches, microbatches, True)
    assert_all_ranks(comm, result.skip_bytes_sent == expected and result.bytes_sent >= expected,
                     f"skip bytes {result.skip_bytes_sent}, expected {expected}")
    evaluated = pipe.evaluate(inputs, targets, microbatches=2)
    with torch.no_grad():
        out = reference(inputs)
    expected = expected_skip_bytes(placement, comm.Get_rank(), BATCH // 2, 2, False)
    assert_all_ranks(comm, (not pipe.holds_last_stage or torch.allclose(evaluated.outputs, out, **TOL))
                     and evaluated.skip_bytes_sent == expected, f"evaluate: skip bytes {evaluated.skip_bytes_sent}")


@pytest.mark.mpi(min_size=4)
def test_skips_across_one_two_and_three_boundaries_train_for_several_steps():
    """4 stages: "a" crosses 3 boundaries, "b" 2, "c" 1; three SGD steps equal serial training."""
    comm = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.Get_rank() < 4 else MPI.UNDEFINED, 0)
    if comm == MPI.COMM_NULL:
        assert_all_ranks(MPI.COMM_WORLD, True)
        return
    model = skip_model()
    reference = copy.deepcopy(model)
    pipe = Pipeline(model, comm, Placement.even(14, 4), schedule="1f1b", microbatches=4, loss_fn=F.cross_entropy)
    crossed = sorted(edge.consumer - edge.producer for edge in pipe.stage_skips)
    optimizer = torch.optim.SGD(list(pipe.parameters()), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        inputs, targets = make_batch(step)
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(inputs), targets).backward()
        result = pipe.step(inputs, targets)
        compare(comm, pipe, model, reference, result, inputs, targets, f"step {step}")
        optimizer.step()
        reference_optimizer.step()
    assert_all_ranks(comm, crossed == [1, 2, 3], f"boundaries crossed {crossed}")
    comm.Free()
    assert_all_ranks(MPI.COMM_WORLD, True)


@pytest.mark.mpi(min_size=2)
def test_skip_between_two_stages_of_one_rank_sends_nothing():
    """Placement [0, 1, 0] by stage: skip "a" goes from rank 0's first stage to its last stage, with
    rank 1 between them; skip "b" goes 0 -> 1, "c" stays in rank 1's stage."""
    comm = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.Get_rank() < 2 else MPI.UNDEFINED, 0)
    if comm == MPI.COMM_NULL:
        assert_all_ranks(MPI.COMM_WORLD, True)
        return
    model = skip_model()
    reference = copy.deepcopy(model)
    inputs, targets = make_batch()
    F.cross_entropy(reference(inputs), targets).backward()
    placement = Placement((0,) * 4 + (1,) * 7 + (0,) * 3)
    pipe = Pipeline(model, comm, placement, schedule="gpipe", microbatches=2, loss_fn=F.cross_entropy)
    result = pipe.step(inputs, targets)
    compare(comm, pipe, model, reference, result, inputs, targets, "[0, 1, 0]")
    stage_skips = [(e.name, e.producer, e.consumer) for e in pipe.stage_skips]
    rows = BATCH // 2 * WIDTH * 8 * 2  # one skip, both micro-batches, one direction
    assert_all_ranks(comm, pipe.stage_ranks == (0, 1, 0) and stage_skips == [("a", 0, 2), ("b", 0, 1)]
                     and result.skip_bytes_sent == rows, f"{pipe.stage_ranks} {stage_skips} {result.skip_bytes_sent}")
    comm.Free()
    assert_all_ranks(MPI.COMM_WORLD, True)


@pytest.mark.mpi(min_size=2)
def test_skip_tags_never_match_activation_tags():
    comm = MPI.COMM_WORLD
    pipe = Pipeline(skip_model(), comm, skip_placements(comm.Get_size())["round_robin"], schedule="1f1b",
                    microbatches=3, loss_fn=F.cross_entropy)
    program = pipe._program(True, 3)
    sends = [pipe._skip_peer_and_tag(i, 3) if isinstance(i, (SendSkip, SendSkipGrad)) else pipe._peer_and_tag(i, 3)
             for i in program if isinstance(i, (SendActivation, SendGrad, SendSkip, SendSkipGrad))]
    activation_top = max(pipe._tag(pipe.num_stages - 2, True, 2, 3), 0)
    skip_tags = [pipe._skip_peer_and_tag(i, 3)[1] for i in program if isinstance(i, (SendSkip, SendSkipGrad))]
    assert_all_ranks(comm, len(set(sends)) == len(sends) and all(tag > activation_top for tag in skip_tags),
                     f"duplicate (peer, tag) or overlapping tags: {sends}")


# -- the fine-grained ResNet ----------------------------------------------------------------


def block_and_fine(blocks=(1, 1), widths=(4, 8), image_size=8):
    torch.manual_seed(0)
    block = models.resnet(blocks, widths, image_size=image_size).double()
    fine = models.resnet_fine(blocks, widths, image_size=image_size).double()
    fine.load_state_dict(models.fine_state_dict(block))
    return block, fine


@pytest.mark.parametrize("bottleneck", [False, True])
def test_fine_resnet_equals_the_block_resnet(bottleneck):
    torch.manual_seed(0)
    block = models.resnet((1, 2), (4, 8), image_size=8, bottleneck=bottleneck).double()
    torch.manual_seed(1)  # other initial values: only the state-dict mapping makes them equal
    fine = models.resnet_fine((1, 2), (4, 8), image_size=8, bottleneck=bottleneck).double()
    fine.load_state_dict(models.fine_state_dict(block))
    assert len(fine) > 3 * len(block)
    inputs = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    targets = torch.randint(0, 10, (6,))
    F.cross_entropy(block(inputs), targets).backward()
    F.cross_entropy(fine(inputs), targets).backward()
    grads = {name: p.grad for name, p in fine.named_parameters()}
    mapped = models.block_state_dict(grads, block)  # fine names -> block names
    assert all(torch.equal(mapped[name], p.grad) for name, p in block.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(),
                                                 models.block_state_dict(fine.state_dict(), block).values()))
    block.eval(), fine.eval()
    assert torch.equal(block(inputs), fine(inputs))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_fine_resnet_pipeline_equals_the_block_resnet(schedule):
    """The fine ResNet cut into one stage per rank (inside blocks) equals the block ResNet run
    micro-batch by micro-batch (BatchNorm in training mode sees one micro-batch at a time)."""
    comm, microbatches = MPI.COMM_WORLD, 2
    block, fine = block_and_fine()
    inputs = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(4))
    outputs = []
    for chunk, target in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
        out = block(chunk)
        (F.cross_entropy(out, target) / microbatches).backward()
        outputs.append(out.detach())
    size, layers = comm.Get_size(), len(fine)
    placement = Placement(tuple((layer + 5) * size // (layers + 5) for layer in range(layers)))  # cuts in blocks
    pipe = Pipeline(fine, comm, placement, schedule=schedule, microbatches=microbatches, loss_fn=F.cross_entropy)
    result = pipe.step(inputs, targets)
    block_grads = {name: p.grad for name, p in block.named_parameters()}
    fine_to_block = {fine_name: block_name for block_name, fine_name in zip(
        block.state_dict(), models.fine_state_dict(block))}
    local = {id(p) for p in pipe.parameters()}
    problems = [name for name, p in fine.named_parameters()
                if id(p) in local and not torch.allclose(p.grad, block_grads[fine_to_block[name]], **TOL)]
    if pipe.holds_last_stage and not torch.allclose(result.outputs, torch.cat(outputs), **TOL):
        problems.append("outputs")
    if size > 1 and not pipe.stage_skips:
        problems.append(f"no skip crosses a stage with {placement}")
    assert_all_ranks(comm, not problems, f"{problems}")


# One profile of the fine ResNet below (microseconds per layer, forward + backward, float64, one
# core): a fixed list, so the balancer's split is asserted on costs, never on a fresh wall-clock profile.
FINE_RESNET_COSTS = [
    107, 115, 53, 31, 298, 115, 51, 296, 117, 57, 49, 31, 290, 115, 51, 297, 113, 55, 48, 31, 213, 104, 47,
    272, 103, 194, 57, 30, 267, 103, 47, 270, 104, 52, 44, 28, 210, 99, 44, 332, 100, 183, 56, 29, 328, 100,
    45, 326, 98, 49, 41, 112, 51, 112]


def fine_resnet():
    torch.manual_seed(0)
    return models.resnet_fine((2, 2, 2), (8, 16, 32), image_size=16).double()


@pytest.mark.parametrize("stages, expected", [(2, [27, 27]), (4, [13, 13, 14, 14])])
def test_auto_balance_of_the_fine_resnet_gives_stages_within_15_percent(stages, expected):
    """On fixed layer costs: the split, its evenness, and no worse than cutting between blocks only."""
    assert len(FINE_RESNET_COSTS) == len(fine_resnet())
    balance = balance_by_time(FINE_RESNET_COSTS, stages)
    sums = stage_sums(FINE_RESNET_COSTS, balance)
    assert balance == expected and max(sums) <= 1.15 * min(sums), (balance, sums)
    # the block model's 8 layers (cut points a subset of these) cannot have a faster slowest stage
    blocks = list(itertools.accumulate([3] + [8] * 6 + [3]))  # fine layers per block-model layer, cumulative
    block_costs = [sum(FINE_RESNET_COSTS[a:b]) for a, b in zip([0] + blocks[:-1], blocks)]
    assert max(stage_sums(block_costs, balance_by_time(block_costs, stages))) >= max(sums)


def test_profile_of_the_fine_resnet_has_one_entry_per_layer_and_a_valid_split():
    """The profile's shape (names, bytes, positive times), not its speed: times vary with the machine."""
    model = fine_resnet()
    sample = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    profiles = profile_layers(model, sample, repeats=1, warmup=0)
    assert [p.name for p in profiles] == [name for name, _ in model.named_children()]
    assert [p.param_bytes for p in profiles] == [8 * sum(p.numel() for p in layer.parameters()) for layer in model]
    assert profiles[-1].activation_bytes == 8 * 4 * 10 and all(p.activation_bytes > 0 for p in profiles)
    assert all(p.forward_time > 0 and p.backward_time >= 0 for p in profiles)
    balance = balance_by_time([p.time for p in profiles], 4)
    assert len(balance) == 4 and sum(balance) == len(model) and min(balance) >= 1
