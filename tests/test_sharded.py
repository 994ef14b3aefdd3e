"""Sharded data parallelism (ZeRO-1/2/3) equals DataParallel on the same ranks, and resumes on other rank counts.

Every comparison is float64 with tight tolerances: ZeRO changes where the optimizer runs and how
gradients are reduced (a reduce-scatter instead of an Allreduce sums in another order), nothing else.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpi_helpers import assert_all_ranks, assert_comm_still_usable, shared_directory
from mpipar import DataParallel
from mpipar.diagnostics.failure import AgreedError
from mpipar.models.gpt import gpt
from mpipar.models.vit import VisionTransformer
from mpipar.run.checkpoint import Checkpointer
from mpipar.run.consolidate import main as consolidate_main
from mpipar.sharded import FlatLayout, ShardedConfig, ShardedDataParallel, ShardedStrategy

TOL = dict(rtol=1e-12, atol=1e-12)
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


@pytest.fixture
def private_comm(comm):
    dup = comm.Dup()
    yield dup
    dup.Free()


class Tied(nn.Module):
    """Two layers sharing one weight: one ZeRO-3 unit."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(7, 7, bias=False)
        self.out = nn.Linear(7, 7, bias=False)
        self.out.weight = self.head.weight  # tied

    def forward(self, h):
        return self.out(torch.tanh(self.head(h)))


class Awkward(nn.Module):
    """Frozen, unused, tied and sometimes-used parameters, BatchNorm, a keyword input; 173
    trainable elements (prime: no rank count above 1 divides it). The children run in another
    order than they are registered (bn before sometimes), and sometimes on some ranks only."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 7)
        self.frozen = nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(3, 3)
        self.sometimes = nn.Linear(7, 7)
        self.bn = nn.BatchNorm1d(7)
        self.tail = Tied()

    def forward(self, x, *, scale=1.0):
        h = self.bn(self.frozen(torch.tanh(self.embed(x))))
        if len(x) % 2:  # used on the ranks with an odd number of samples only
            h = h + self.sometimes(h)
        return self.tail(h) * scale


def shard(size, rank, step):
    """Rank r takes r + 2 samples of the step's global batch: unequal, odd and even."""
    generator = torch.Generator().manual_seed(100 + step)
    counts = [r + 2 for r in range(size)]
    x = torch.randn(sum(counts), 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 7, (sum(counts),), generator=generator)
    start = sum(counts[:rank])
    return x[start:start + counts[rank]], y[start:start + counts[rank]]


def test_layout_pieces_cover_every_parameter_once_and_pad_to_the_ranks():
    entries = [("a", 5, "float64"), ("b", 0, "float64"), ("c", 6, "float32"), ("d", 4, "float64")]
    for ranks in (1, 2, 3, 4, 7):
        layout = FlatLayout(entries, ranks)
        covered = {}
        for rank in range(ranks):
            for piece in layout.pieces(rank):
                covered.setdefault(piece.param, []).append((piece.start, piece.stop))
        for index, (_, numel, _) in enumerate(entries):
            spans = sorted(covered.get(index, []))
            assert sum(stop - start for start, stop in spans) == numel
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert [g.padded % ranks for g in layout.groups] == [0, 0]
        assert [g.total for g in layout.groups] == [9, 6]
        assert sum(layout.counts(0, 0, 9)) == 9


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sharded_equals_data_parallel(comm, private_comm, stage, optimizer):
    """Five steps on unequal shards: every parameter and buffer as DataParallel's on the same ranks."""
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = Awkward().double()
    replica = copy.deepcopy(reference)
    dp = DataParallel(reference, comm)
    sdp = ShardedDataParallel(replica, private_comm, stage=stage, bucket_cap_mb=0.0005)  # several buckets
    opt_dp, opt_sharded = OPTIMIZERS[optimizer](reference.parameters()), OPTIMIZERS[optimizer](sdp.parameters())
    problems = []
    for step in range(5):
        x, y = shard(size, rank, step)
        opt_dp.zero_grad()
        F.cross_entropy(dp(x, scale=0.5), y).backward()
        opt_dp.step()
        if step % 2:  # either order of zero_grad, on the model or the optimizer: no effect on the step
            loss = F.cross_entropy(sdp(x, scale=0.5), y)
            opt_sharded.zero_grad()
            replica.zero_grad()
        else:
            opt_sharded.zero_grad()
            loss = F.cross_entropy(sdp(x, scale=0.5), y)
        loss.backward()
        sdp.step(opt_sharded)
        with sdp.full_parameters():
            for (name, a), b in zip(reference.state_dict().items(), replica.state_dict().values()):
                if not torch.allclose(a, b, **TOL):
                    problems.append(f"step {step} {name}: max abs difference {(a - b).abs().max().item():.3e}")
    if stage >= 2:
        assert all(p.grad is None for p in replica.parameters())  # only the shard keeps gradients
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))
    assert_all_ranks(comm, not torch.equal(reference.unused.weight, torch.zeros(3, 3)), "the check is not vacuous")


class Mixed(nn.Module):
    """Two dtypes (two flat buffers); the float32 one has 2 elements: on 3+ ranks some own only its padding."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(1, 1).float()
        self.first = nn.Linear(5, 4).double()
        self.last = nn.Linear(4, 7).double()

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.last(h * self.gate(x[:, :1].float()).double())


class Tiny(nn.Module):
    """2 elements: on 3+ ranks some ranks own no piece at all (the loop's optimizer gets a placeholder)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(1, 1).double()

    def forward(self, x):
        return self.scale(x[:, :1]).expand(-1, 7) * torch.arange(7, dtype=torch.float64)


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("make", [Mixed, Tiny])
def test_two_dtypes_and_ranks_that_own_only_padding_equal_data_parallel(comm, private_comm, stage, make):
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(1)
    reference = make()
    replica = copy.deepcopy(reference)
    dp, sdp = DataParallel(reference, comm), ShardedDataParallel(replica, private_comm, stage=stage)
    opt_dp = OPTIMIZERS["adamw"](reference.parameters())
    opt_sharded = OPTIMIZERS["adamw"](sdp.parameters() or [torch.zeros(0, requires_grad=True)])  # as the loop does
    for step in range(5):
        x, y = shard(size, rank, step)
        opt_dp.zero_grad()
        F.cross_entropy(dp(x), y).backward()
        opt_dp.step()
        F.cross_entropy(sdp(x), y).backward()
        sdp.step(opt_sharded)
    with sdp.full_parameters():
        problems = [f"{name}: max abs difference {(p - q).abs().max().item():.3e}" for (name, p), q in
                    zip(reference.named_parameters(), replica.parameters())
                    if not torch.allclose(p, q, **(TOL if p.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)))]
    groups = (3 if stage == 3 else 2) if make is Mixed else 1  # stage 3: a buffer per unit and dtype
    assert_all_ranks(comm, not problems and len(sdp.layout.groups) == groups, "; ".join(problems))


class Rooted(nn.Module):
    """ZeRO-3's root unit: trainable parameters on the root (gain, used at the start and at the end of the
    forward; bias), a frozen one (fixed) and a buffer (shift) there, a child without trainable parameters
    (frozen), one with none at all (act) and one run twice (twice): with units= leaving it out, its
    parameters join the root unit."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.3, 7))
        self.fixed = nn.Parameter(torch.linspace(0.1, 0.7, 7), requires_grad=False)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5))
        self.embed = nn.Linear(5, 7)
        self.frozen = nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.act = nn.Tanh()
        self.mid = nn.Linear(7, 7)
        self.twice = nn.Linear(7, 7)
        self.head = nn.Linear(7, 7)

    def forward(self, x):
        h = self.act(self.embed((x - self.shift) * self.gain))
        h = self.twice(self.twice(self.act(self.mid(self.frozen(h) + self.fixed))))
        return self.head(h) * self.gain[0] + self.bias

    def units(self):
        return [self.embed, self.frozen, self.act, self.mid, self.head]  # embed, mid, head hold trainables


def rooted_case(name):
    """(model, units, the rank's inputs for a step, logits from the output) of the root-unit tests."""
    torch.manual_seed(1)
    if name == "gpt":  # the token embedding tied to the head (two default units): the root unit's
        model = gpt(vocab=7, width=8, layers=2, heads=2, seq_len=4).double()
        return model, None, lambda x: (x[:, :4].abs() * 3).long() % 7, lambda out: out.mean(2)  # (batch, vocab, tokens)
    if name == "vit":  # the position embedding on the root; blocks a ModuleList (its entries are units)
        model = VisionTransformer(1, 7, 8, patch_size=4, dim=8, depth=2, heads=2, hidden=16).double()
        return model, None, lambda x: x[:, :4].repeat(1, 16).reshape(-1, 1, 8, 8), lambda out: out
    if name == "tied":  # first and last layer share a weight: in two default units, it joins the root unit
        model = nn.Sequential(nn.Linear(7, 7, bias=False), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(),
                              nn.Linear(7, 7)).double()
        model[4].weight = model[0].weight
        return model, None, lambda x: F.pad(x, (0, 2)), lambda out: out
    model = Rooted().double()
    return model, model.units(), lambda x: x, lambda out: out


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["vit", "rooted", "tied", "gpt"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_zero3_root_unit_equals_data_parallel(comm, private_comm, case, optimizer):
    """Parameters in no unit (the ViT's position embedding; Rooted's, and a child run twice) or in two default
    units (a weight tied across layers, whose other parameters stay in their units; the GPT's) form the root unit: five
    steps on unequal shards equal DataParallel's
    (float64, 1e-12); frozen parameters and buffers untouched."""
    size, rank = comm.Get_size(), comm.Get_rank()
    reference, units, inputs, logits = rooted_case(case)
    replica = copy.deepcopy(reference)
    dp = DataParallel(reference, comm)
    sdp = ShardedDataParallel(replica, private_comm, stage=3, units=units)
    problems = [] if sdp.units[0] is replica else [f"unit 0 is {type(sdp.units[0]).__name__}, not the root"]
    opt_dp, opt_sharded = OPTIMIZERS[optimizer](reference.parameters()), OPTIMIZERS[optimizer](sdp.parameters())
    initial = copy.deepcopy(reference.state_dict())
    for step in range(5):
        x, y = shard(size, rank, step)
        opt_dp.zero_grad()
        F.cross_entropy(logits(dp(inputs(x))), y).backward()
        opt_dp.step()
        opt_sharded.zero_grad()
        F.cross_entropy(logits(sdp(inputs(x))), y).backward()
        sdp.step(opt_sharded)
        with sdp.full_parameters():
            for (name, a), b in zip(reference.state_dict().items(), replica.state_dict().values()):
                if not torch.allclose(a, b, **TOL):
                    problems.append(f"step {step} {name}: max abs difference {(a - b).abs().max().item():.3e}")
    root = {"vit": ["position"], "rooted": ["gain", "bias", "twice.weight"], "tied": ["0.weight"],
            "gpt": ["0.tokens.weight"]}[case]
    problems += [f"{name} did not change" for name in root if torch.equal(initial[name], reference.state_dict()[name])]
    sdp.close()
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


@pytest.mark.mpi
def test_zero3_root_unit_collectives_per_step(comm, private_comm):
    """Rooted's units: root (gain 5, bias 7, twice 56: 68 elements), embed 42, mid 56, head 56. All-gathers
    forward root, embed, mid, head, backward mid, embed (the root and the last unit kept); one reduce-scatter
    per unit, last first, the root's after the backward; the root whole from its forward to its last gradient."""
    size = comm.Get_size()
    model, units, _, _ = rooted_case("rooted")
    sdp = ShardedDataParallel(model, private_comm, stage=3, units=units)
    elements = [68, 42, 56, 56]
    optimizer = torch.optim.SGD(sdp.parameters(), lr=0.1)
    root_whole, problems = [], []
    model.embed.register_forward_pre_hook(lambda module, args: root_whole.append(model.gain.numel() == 5))
    model.embed.weight.register_hook(lambda grad: root_whole.append(model.gain.numel() == 5))
    for step in range(2):
        x, y = shard(size, comm.Get_rank(), step)
        loss = F.cross_entropy(sdp(x), y)
        after_forward = [p.untyped_storage().size() > 0 for p in (model.gain, model.embed.weight,
                                                                  model.mid.weight, model.head.weight)]
        if after_forward != [True, False, False, True]:
            problems.append(f"after the forward, whole {after_forward}: the root and the last unit only")
        loss.backward()
        sdp.step(optimizer)
        calls = sdp.take_calls()
        expected = [("allgather", padded_bytes(elements[u], size)) for u in (0, 1, 2, 3, 2, 1)]
        expected += [("reduce_scatter", elements[u] * 8) for u in (3, 2, 1, 0)]
        gathers = [call for call in calls if call[0] == "allgather"]
        scatters = [call for call in calls if call[0] == "reduce_scatter"]
        if gathers + scatters != expected or calls[-1] != expected[-1]:
            problems.append(f"step {step}: calls {calls}, expected {expected} (the root's reduce-scatter last)")
        if model.gain.untyped_storage().size() or sdp.memory(optimizer)["param_bytes"] != sum(
                padded_bytes(n, size) for n in elements) // size + 7 * 8 + 49 * 8 + 7 * 8:
            problems.append(f"step {step}: after it {sdp.memory(optimizer)}; the root unit should be freed")
    if root_whole != [True, True] * 2:
        problems.append(f"root unit whole at embed's forward and backward: {root_whole}")
    sdp.close()
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2])
def test_collectives_per_step_are_the_designs(comm, private_comm, stage):
    """Stage 1: DataParallel's Allreduces, then one all-gather of the padded buffer per dtype;
    stage 2: one reduce-scatter per bucket covering every trainable element once, the same all-gather."""
    size = comm.Get_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()  # 66 elements
    sdp = ShardedDataParallel(model, private_comm, stage=stage, bucket_cap_mb=200 / 2**20)  # 25 doubles a bucket
    optimizer = torch.optim.SGD(sdp.parameters(), lr=0.1)
    x, y = shard(size, comm.Get_rank(), 0)
    F.cross_entropy(sdp(x), y.clamp(max=2)).backward()
    sdp.step(optimizer)
    calls = sdp.take_calls()
    early = sdp.launched_early == (3 if stage == 2 else 0)  # every bucket started during backward
    assert_all_ranks(comm, early, f"{sdp.launched_early} buckets started during backward")
    padded = -(-66 // size) * size * 8
    scatters = [nbytes for name, nbytes in calls if name == "reduce_scatter"]
    gathers = [nbytes for name, nbytes in calls if name == "allgather"]
    expected_scatters = [24 * 8, 7 * 8, 35 * 8] if stage == 2 else []  # whole parameters, last first
    ok = gathers == [padded] and scatters == expected_scatters
    assert_all_ranks(comm, ok, f"reduce-scatters {scatters} (expected {expected_scatters}), all-gathers {gathers} "
                               f"(expected [{padded}])")
    shard_bytes = padded // size
    memory = sdp.memory(optimizer)
    expected_grads = shard_bytes if stage == 2 else 66 * 8
    ok = memory["grad_bytes"] == expected_grads and memory["optimizer_bytes"] == 0 and memory["param_bytes"] == padded
    assert_all_ranks(comm, ok, f"{memory} (gradients expected {expected_grads}, parameters {padded}: no shard copy)")


def padded_bytes(elements, size):
    return -(-elements // size) * size * 8


@pytest.mark.mpi
def test_zero3_gathers_each_unit_before_its_forward_and_backward_and_frees_it(comm, private_comm):
    """Units Linear(5,7), Linear(7,7), Linear(7,3) (42, 56, 24 elements): all-gathers forward 0, 1, 2, backward
    1, 0 (the last unit is kept), one reduce-scatter per unit, last first; while a unit computes only it and the
    next (prefetched) are whole; between uses a rank holds only its shards."""
    size = comm.Get_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    reference = copy.deepcopy(model)
    sdp = ShardedDataParallel(model, private_comm, stage=3)
    units = [model[0], model[2], model[4]]
    elements = [42, 56, 24]

    def whole():
        return [all(p.untyped_storage().size() > 0 for p in unit.parameters()) for unit in units]

    seen, problems = [], []

    def before_backward(module, args, output):
        output.register_hook(lambda grad: seen.append(whole()))

    for unit in units:
        unit.register_forward_pre_hook(lambda module, args: seen.append(whole()))
        unit.register_forward_hook(before_backward)
    optimizer, opt_reference = torch.optim.SGD(sdp.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(),
                                                                                          lr=0.1)
    for step in range(2):
        x, y = global_batch(step)
        loss = F.cross_entropy(sdp(x), y.clamp(max=2))
        if whole() != [False, False, True]:
            problems.append(f"after the forward, whole units {whole()}: only the last should be")
        loss.backward()
        sdp.step(optimizer)
        opt_reference.zero_grad()
        F.cross_entropy(reference(x), y.clamp(max=2)).backward()  # every rank has the whole batch
        opt_reference.step()
        calls = sdp.take_calls()
        gathers = [nbytes for name, nbytes in calls if name == "allgather"]
        scatters = [nbytes for name, nbytes in calls if name == "reduce_scatter"]
        expected = [padded_bytes(elements[u], size) for u in (0, 1, 2, 1, 0)]
        if gathers != expected or scatters != [24 * 8, 56 * 8, 42 * 8] or calls[:2] != [("allgather", g) for g in
                                                                                          expected[:2]]:
            problems.append(f"step {step}: calls {calls}, expected all-gathers {expected}, reduce-scatters "
                            f"{[24 * 8, 56 * 8, 42 * 8]}")
        if whole() != [False, False, False]:
            problems.append(f"after the step, whole units {whole()}")
    forward = [[True, True, False], [False, True, True], [False, False, True]]
    backward = [[False, True, True], [True, True, False], [True, False, False]]  # freed as its gradients complete
    if seen != (forward + backward) * 2:
        problems.append(f"whole units while each computed {seen}, expected {(forward + backward) * 2}")
    shards = sum(padded_bytes(n, size) for n in elements) // size
    memory = sdp.memory(optimizer)
    if memory["param_bytes"] != shards or memory["grad_bytes"] != shards:
        problems.append(f"{memory}: parameters and gradients should be the shards' {shards} bytes")
    if sdp.launched_early != 6:
        problems.append(f"{sdp.launched_early} reduce-scatters started during backward, expected 3 a step")
    with sdp.full_parameters():
        problems += [f"{name}: max abs difference {(p - q).abs().max().item():.3e}" for (name, p), q in
                     zip(reference.named_parameters(), model.parameters()) if not torch.allclose(p, q, **TOL)]
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


@pytest.mark.mpi
def test_zero3_holds_a_units_gradient_once_and_frees_it_when_its_reduce_scatter_completes(comm, private_comm):
    """After each parameter's gradient hook no ``.grad`` is left (it moved into its unit's flat buffer, the
    reduce-scatter's send buffer); at most the units whose reduce-scatter is still in flight hold a buffer, a
    completed one none; after the step none. The results stay DataParallel's (Awkward: a unit some ranks skip)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = Awkward().double()
    replica = copy.deepcopy(reference)
    dp, sdp = DataParallel(reference, comm), ShardedDataParallel(replica, private_comm, stage=3)
    opt_dp, opt_sharded = OPTIMIZERS["adamw"](reference.parameters()), OPTIMIZERS["adamw"](sdp.parameters())
    problems, hooks = [], [0]

    def check(param):
        hooks[0] += 1
        held = [sdp.names[i] for i, p in enumerate(sdp.params) if p.grad is not None]
        if held:
            problems.append(f"after a gradient hook, .grad held by {held}")
        flats = sdp._grad_flats or []
        for bucket in sdp.buckets:
            if bucket.pending is None and flats[bucket.group] is not None and \
                    sdp.buckets.index(bucket) < sdp._order.started:
                problems.append(f"unit {sdp.layout.groups[bucket.group].unit}'s gradient kept after its "
                                f"reduce-scatter completed")

    for p in sdp.params:
        p.register_post_accumulate_grad_hook(check)  # after the wrapper's own hook
    for step in range(3):
        x, y = shard(size, rank, step)
        opt_dp.zero_grad()
        F.cross_entropy(dp(x, scale=0.5), y).backward()
        opt_dp.step()
        F.cross_entropy(sdp(x, scale=0.5), y).backward()
        sdp.step(opt_sharded)
        if sdp._grad_flats is not None or any(p.grad is not None for p in replica.parameters()):
            problems.append(f"step {step}: gradient buffers left after the step")
    with sdp.full_parameters():
        problems += [f"{name}: max abs difference {(a - b).abs().max().item():.3e}" for (name, a), b in
                     zip(reference.state_dict().items(), replica.state_dict().values())
                     if not torch.allclose(a, b, **TOL)]
    assert_all_ranks(comm, hooks[0] > 0 and not problems, "; ".join(problems[:4]))


UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def wire_model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # float32: 42 + 24 elements


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_a_16_bit_wire_differs_from_the_exact_mean_only_by_rounding_and_halves_the_bytes(comm, private_comm,
                                                                                       stage, wire):
    """Each piece's gradient is the weighted mean sum_k (m_k / m) g_k within the 16-bit rounding of each
    contribution (and, stage 1's WireSum, of the sum); the reduce-scatters cover the same elements in half
    the bytes of fp32's."""
    size, rank = comm.Get_size(), comm.Get_rank()
    grads, weights = [], [(r + 2) / sum(k + 2 for k in range(size)) for r in range(size)]
    for k in range(size):  # every rank's float32 gradient, computed here (then summed in float64)
        model = wire_model()
        x, y = shard(size, k, 0)
        F.cross_entropy(model(x.float()), y.clamp(max=2)).backward()
        grads.append([p.grad.reshape(-1).double() for p in model.parameters()])
    reference = [sum(w * g[i] for w, g in zip(weights, grads)) for i in range(len(grads[0]))]
    magnitude = [sum(w * g[i].abs() for w, g in zip(weights, grads)) for i in range(len(grads[0]))]
    calls = {}
    for name, used in (("fp32", None), ("wire", wire)):
        sdp = ShardedDataParallel(wire_model(), private_comm, stage=stage, bucket_cap_mb=100 / 2**20, wire=used)
        optimizer = torch.optim.SGD(sdp.parameters(), lr=0.0)
        x, y = shard(size, rank, 0)
        F.cross_entropy(sdp(x.float()), y.clamp(max=2)).backward()
        sdp.step(optimizer)
        calls[name] = sum(nbytes for call, nbytes in sdp.take_calls() if call == "reduce_scatter")
        if name == "wire":
            u = UNIT_ROUNDOFF[wire] if size > 1 else 0.0
            problems = []
            for piece, pc in zip(sdp.shard_params, sdp.pieces):
                want, scale = reference[pc.param][pc.start:pc.stop], magnitude[pc.param][pc.start:pc.stop]
                bound = u * (1 + u) * scale + (u if stage == 1 else 0.0) * want.abs() + 8 * size * 2.0 ** -24 * scale
                error = (piece.grad.double() - want).abs()
                if not bool((error <= bound).all()):
                    problems.append(f"{sdp.names[pc.param]}: error {error.max():.3e} above the bound")
            if stage == 1:
                wired = size == 1 or all(b.wire is not None and b.wire.outgoing.dtype == wire for b in sdp.dp.buckets)
                problems += [] if wired else ["DataParallel's buckets are not on the wire"]
        sdp.close()
    if stage > 1:
        problems += [] if calls["wire"] * (2 if size > 1 else 1) == calls["fp32"] else \
            [f"reduce-scatter bytes {calls['wire']} on the wire, {calls['fp32']} in fp32: not half"]
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


def test_zero3_roots_what_no_unit_holds_and_refuses_a_tie_across_given_units_and_a_unit_run_twice():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3)).double()
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match=r"0.weight = 1.weight is shared by two units .* tie parameters within one"):
        ShardedDataParallel(model, MPI.COMM_SELF, stage=3, units=list(model))
    sdp = ShardedDataParallel(model, MPI.COMM_SELF, stage=3)  # default units: the tied weight in the root unit
    assert sdp.units == [model, model[1]] and sdp.names == ["0.weight", "1.bias"]
    sdp.close()
    loose = nn.Sequential(nn.Linear(3, 3)).double()
    loose.register_parameter("scale", nn.Parameter(torch.ones(1, dtype=torch.float64)))
    sdp = ShardedDataParallel(loose, MPI.COMM_SELF, stage=3)  # scale: the root unit, before the child
    assert sdp.units == [loose, loose[0]] and sdp.names == ["scale", "0.weight", "0.bias"]
    sdp.close()
    ShardedDataParallel(loose, MPI.COMM_SELF, stage=3, units=[loose]).close()  # one unit: the whole model
    reused = Rooted().double()
    sdp = ShardedDataParallel(reused, MPI.COMM_SELF, stage=3)  # default units: twice is one, run twice
    with pytest.raises(RuntimeError, match=r"unit 3 \(Linear\) ran twice .* pass units= without it"):
        sdp(torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("stage", [1, 2])
def test_ranks_disagreeing_on_parameter_shapes_is_one_error_on_every_rank(comm, private_comm, stage):
    last = comm.Get_rank() == comm.Get_size() - 1
    model = nn.Linear(4, 4 if last else 3).double()
    with pytest.raises(AgreedError, match="ranks disagree on model parameters"):
        ShardedDataParallel(model, private_comm, stage=stage)
    assert_comm_still_usable(private_comm)


def test_unknown_stages_are_refused():
    assert ShardedConfig(3).zero == 3
    with pytest.raises(ValueError, match="--zero must be 0"):
        ShardedConfig(5)
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        ShardedDataParallel(nn.Linear(2, 2), MPI.COMM_SELF, stage=0)
    with pytest.raises(ValueError, match="units= is for ZeRO stage 3"):
        ShardedDataParallel(nn.Linear(2, 2), MPI.COMM_SELF, stage=2, units=[])


# -- checkpoints on other numbers of ranks ------------------------------------------------

GLOBAL_BATCH = 12


def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7)).double()  # 117 elements


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_strategy_counts_the_whole_models_parameters_at_every_stage(comm, private_comm, stage):
    """The count in the run's description and metrics is the model's, also after stage 3 freed the parameters."""
    whole = sum(p.numel() for p in mlp().parameters())  # 5 * 9 + 9 + 9 * 7 + 7
    strategy = ShardedStrategy(mlp(), private_comm, ShardedConfig(stage))
    assert strategy.parameter_count == strategy.metrics_attrs["parameters"] == whole == 124
    assert strategy.describe().startswith("124 parameters; ")


@pytest.mark.mpi
def test_stage_1_counts_the_gradients_allreduce_and_the_all_gather_in_its_bytes(comm, private_comm):
    """Stage 1's bytes sent in a step: DataParallel's (the gradients' Allreduce) plus (N-1)/N of the all-gather."""
    size, rank = comm.Get_size(), comm.Get_rank()
    x, y = global_batch(0)
    parts = torch.arange(GLOBAL_BATCH).tensor_split(size)[rank]
    dp = DataParallel(mlp(), private_comm)
    F.cross_entropy(dp(x[parts]), y[parts]).backward()
    torch.optim.SGD(dp.parameters(), lr=0.1).step()
    dp_bytes = dp.stats.take().bytes_sent
    sdp = ShardedDataParallel(mlp(), private_comm, stage=1)
    optimizer = torch.optim.SGD(sdp.parameters(), lr=0.1)
    F.cross_entropy(sdp(x[parts]), y[parts]).backward()
    sdp.step(optimizer)
    gathered = sum(nbytes for call, nbytes in sdp.take_calls() if call == "allgather")
    sent = sdp.stats.take().bytes_sent
    assert_all_ranks(comm, sent == pytest.approx(dp_bytes + (size - 1) / size * gathered),
                     f"stage 1 sent {sent}, DataParallel {dp_bytes} + all-gather of {gathered}")
    assert_all_ranks(comm, size == 1 or dp_bytes > 0, "the check is not vacuous")


class RootedMLP(nn.Module):
    """mlp() with a root parameter (ZeRO-3's root unit) and its layers in a ModuleList (each a unit)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList([nn.Linear(5, 9), nn.Linear(9, 7)])
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 9))

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)) * self.scale)


MODELS = {"mlp": mlp, "rooted": lambda: RootedMLP().double()}


def global_batch(step):
    generator = torch.Generator().manual_seed(500 + step)
    return (torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 7, (GLOBAL_BATCH,), generator=generator))


def strategy_steps(strategy, comm, steps):
    for step in steps:
        x, y = global_batch(step)
        parts = torch.arange(GLOBAL_BATCH).tensor_split(comm.Get_size())[comm.Get_rank()]
        strategy.optimizer.zero_grad()
        strategy.train_step((x[parts], y[parts]))


def sub_communicator(comm, ranks):
    return comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED, comm.Get_rank())


@pytest.mark.mpi
@pytest.mark.parametrize("stage,model", [(1, "mlp"), (2, "mlp"), (3, "mlp"), (3, "rooted")])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_on_other_rank_counts_equals_the_straight_run(comm, mpi_tmp_path, stage, model, optimizer):
    """3 steps on a ranks, checkpoint, 2 more on b ranks (4->3, 4->2, 2->4, 3->1 where the world has
    them, and a->a): the parameters of one process's 5 steps on the whole batch (rtol 1e-9); the
    consolidated checkpoint is the model that wrote it. ``rooted``: ZeRO-3 with a root unit."""
    size = comm.Get_size()
    mlp = MODELS[model]
    reference = mlp()
    opt_reference = OPTIMIZERS[optimizer](reference.parameters())
    for step in range(5):
        x, y = global_batch(step)
        opt_reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt_reference.step()
    directory = shared_directory(comm, mpi_tmp_path)
    pairs = [(a, b) for a, b in [(4, 3), (4, 2), (2, 4), (3, 1), (size, size)] if max(a, b) <= size]
    problems = []
    for a, b in dict.fromkeys(pairs):
        out = directory / f"{stage}-{model}-{optimizer}-{a}-{b}"
        writers = sub_communicator(comm, a)
        if writers != MPI.COMM_NULL:
            strategy = ShardedStrategy(mlp(), writers, ShardedConfig(stage))
            strategy.bind_optimizer(OPTIMIZERS[optimizer](strategy.parameters()))
            strategy_steps(strategy, writers, range(3))
            saved = Checkpointer(out, writers, per_rank=True).save(3, {
                **strategy.state_dict(), "optimizer": strategy.optimizer.state_dict(), "strategy": strategy.name})
            with strategy.sdp.full_parameters():  # every rank: stage 3 gathers
                written = {k: v.clone() for k, v in strategy.model.state_dict().items()}
            if writers.Get_rank() == 0:
                consolidate_main([str(saved), "-o", str(out / "model.pt")])
                consolidated = torch.load(out / "model.pt", weights_only=True)
                problems += [f"{a}->{b}: consolidated {k}" for k, v in written.items()
                             if not torch.equal(consolidated["model"][k], v)]
                moments = {name: {k: tuple(v.shape) for k, v in state.items() if v.dim()} for name, state in
                           consolidated.get("optimizer_by_name", {}).items()}
                expected = {name: {"momentum_buffer" if optimizer == "sgd" else key: (p.numel(),)
                                   for key in ("exp_avg", "exp_avg_sq")} for name, p in mlp().named_parameters()}
                if moments != expected:
                    problems.append(f"{a}->{b}: consolidated optimizer state {moments}, expected {expected}")
            writers.Free()
        comm.Barrier()
        readers = sub_communicator(comm, b)
        if readers != MPI.COMM_NULL:
            path, state = Checkpointer(out, readers).resume()
            strategy = ShardedStrategy(mlp(), readers, ShardedConfig(stage), checkpoint=path)
            strategy.bind_optimizer(OPTIMIZERS[optimizer](strategy.parameters()))
            strategy.load_state_dict(state)
            strategy.optimizer.load_state_dict(state["optimizer"])
            strategy_steps(strategy, readers, range(3, 5))
            with strategy.sdp.full_parameters():
                for (name, p), q in zip(reference.named_parameters(), strategy.model.parameters()):
                    if not torch.allclose(p, q, rtol=1e-9, atol=1e-12):
                        problems.append(f"{a}->{b}: {name} max abs difference {(p - q).abs().max().item():.3e}")
            readers.Free()
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


# -- the loop ------------------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_loop_with_adamw_equals_data_parallel_and_records_the_bytes_held(comm, mpi_tmp_path, stage):
    """``--zero`` and ``--optimizer adamw`` through the loop: the parameters of DataParallel's run on the
    same ranks; the metrics hold each rank's bytes of parameters, gradients and optimizer state; the
    checkpoints hold AdamW's state."""
    import h5py

    from mpi_helpers import float64_mlp, loop_session
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    models, steps = {}, 3
    for kind in ("data_parallel", "sharded"):
        model = float64_mlp((784, 12, 10), seed=5)
        run = loop_session(comm, directory / kind, 5, ShardedConfig(stage) if kind == "sharded" else None,
                           max_steps=steps, optimizer="adamw", lr=0.01, checkpoint_every=2, flush_every=1)
        strategy = ShardedStrategy(model, comm, run.settings) if kind == "sharded" else \
            DataParallelStrategy(model, comm)
        train(run, strategy, synthetic(300, 50, seed=0))
        models[kind] = model
    with strategy.sdp.full_parameters():  # after the loop's finish closed the wrapper: gathered over comm
        problems = [f"{name}: max abs difference {(p - q).abs().max().item():.3e}" for (name, p), q in
                    zip(models["data_parallel"].named_parameters(), models["sharded"].parameters())
                    if not torch.allclose(p, q, **TOL)]
    if not strategy.sdp.closed or (stage == 3 and strategy.sdp._param_comm != MPI.COMM_NULL):
        problems.append("the loop's finish did not close the wrapper and free its communicator")
    with pytest.raises(RuntimeError, match="close"):
        strategy.sdp(torch.zeros(2, 784, dtype=torch.float64))
    with h5py.File(directory / "sharded" / "metrics.h5", "r") as f:
        held = {key: f[f"steps/{key}"][...] for key in ("param_bytes", "grad_bytes", "optimizer_bytes")}
    total = sum(p.numel() * 8 for p in models["data_parallel"].parameters())
    shard = -(-total // 8 // comm.Get_size()) * 8
    expected = {"grad_bytes": shard if stage == 2 else total, "optimizer_bytes": 2 * shard + 8 * 4}  # + steps
    if stage == 3:  # a flat buffer per layer, padded to the ranks; only the shards are held between steps
        shard = sum(-(-sum(p.numel() for p in layer.parameters()) // comm.Get_size()) * 8
                    for layer in models["data_parallel"].children())
        expected = {"grad_bytes": shard, "param_bytes": shard, "optimizer_bytes": 2 * shard + 8 * 4}
    for key, value in expected.items():
        if held[key].shape != (steps, comm.Get_size()) or held[key].max() > value:
            problems.append(f"{key} {held[key].tolist()}: more than {value}")
    state = torch.load(directory / "sharded" / "checkpoints" / "step-000000003" / f"rank-{comm.Get_rank()}.pt",
                       weights_only=True)
    if not all("exp_avg" in entry for entry in state["optimizer"]["state"].values()):
        problems.append("the checkpoint's optimizer state is not AdamW's")
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))


@pytest.mark.mpi
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_loop_with_bf16_autocast_equals_one_process_and_fp16_is_refused_on_every_rank(comm, mpi_tmp_path,
                                                                                           stage):
    """``--zero N --precision bf16``: the parameters of one process's autocast run on the whole batch, within
    test_precision's tolerance; ``--precision fp16`` is one clear error on every rank (no loss scaling)."""
    from test_precision import LOOP_BATCH, TOLERANCE, loop_mlp, loop_run, serial_loop

    from mpi_helpers import shared_directory
    from mpipar.data import synthetic
    from mpipar.diagnostics.failure import AgreedError
    from mpipar.run.loop import train

    directory = shared_directory(comm, mpi_tmp_path)
    reference = serial_loop(comm, directory, "bf16")
    model = loop_mlp()

    class Watched(ShardedStrategy):
        seen: list = []

        def train_step(self, batch):
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().train_step(batch)

    strategy = Watched(model, comm, ShardedConfig(stage))
    train(loop_run(comm, directory / "zero", LOOP_BATCH, "bf16", ShardedConfig(stage)), strategy,
          synthetic(600, 100, seed=0))
    with strategy.sdp.full_parameters():
        problems = [f"{name}: {(p - q).abs().max():.2e}" for (name, p), q in zip(model.named_parameters(),
                                                                                reference.parameters())
                    if p.dtype != torch.float32 or not torch.allclose(p, q, rtol=0, atol=TOLERANCE["bf16"])]
    if not strategy.seen or set(strategy.seen) != {torch.bfloat16}:
        problems.append(f"autocast in train_step: {strategy.seen}")
    assert_all_ranks(comm, not problems, "; ".join(problems))
    run = loop_run(comm, directory / "fp16", LOOP_BATCH, "fp16", ShardedConfig(stage))
    with pytest.raises(AgreedError, match=r"sharded cannot train with --precision fp16 \(it takes fp32, bf16\)"):
        train(run, ShardedStrategy(loop_mlp(), comm, ShardedConfig(stage)), synthetic(600, 100, seed=0))


def test_the_optimizer_and_zero_flags_reach_the_settings():
    from mpipar.run.cli import add_zero_flag, train_config, training_parser

    parser = training_parser("", out="runs/x", batch_help="", models={"mlp": None})
    add_zero_flag(parser)
    args = parser.parse_args(["--optimizer", "adamw", "--zero", "2"])
    config = train_config(args, threads=1)
    assert (config.optimizer, args.zero) == ("adamw", 2)
    assert config.to_dict()["optimizer"] == "adamw"
    assert "optimizer" not in train_config(parser.parse_args([]), threads=1).to_dict()  # as before the flag


@pytest.mark.mpi
@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (4, 3)])
def test_the_loop_stopped_and_resumed_on_other_ranks_equals_one_process(comm, mpi_tmp_path, before, after):
    """``--zero 2 --optimizer adamw`` stopped at step 2 (a stop request), resumed by the loop on another
    number of ranks (the session hands the strategy its checkpoint): one process's run on the whole batch."""
    from mpi_helpers import float64_mlp, loop_session
    from mpipar.data import synthetic
    from mpipar.data_parallel.strategy import DataParallelStrategy
    from mpipar.run.launch import StopRequest
    from mpipar.run.loop import train

    size, rank = comm.Get_size(), comm.Get_rank()
    if max(before, after) > size:
        pytest.skip(f"needs {max(before, after)} ranks")
    directory, steps, batch = shared_directory(comm, mpi_tmp_path), 6, 4
    settings = dict(max_steps=steps, optimizer="adamw", lr=0.01, flush_every=2)
    reference = float64_mlp((784, 12, 10), seed=5)
    serial = loop_session(MPI.COMM_SELF, directory / f"serial-{rank}", batch * before, **settings)
    train(serial, DataParallelStrategy(reference, MPI.COMM_SELF), synthetic(300, 50, seed=0))
    out, problems = directory / "run", []
    for phase, ranks in enumerate((before, after)):
        group = sub_communicator(comm, ranks)
        if group != MPI.COMM_NULL:
            model = float64_mlp((784, 12, 10), seed=5)
            run = loop_session(group, out, batch, ShardedConfig(2), resume=phase == 1, **settings)
            if phase == 0:
                run.stop = StopRequest()
                run.stop.signal_name = "SIGUSR1"  # as if Slurm's warning came: save and stop at step 2
            elif run.state["step"] != 2:
                problems.append(f"resumed at step {run.state['step']}")
            strategy = ShardedStrategy(model, group, run.settings, checkpoint=run.resumed_from)
            train(run, strategy, synthetic(300, 50, seed=0))
            if phase == 1:
                problems += [f"{name}: max abs difference {(p - q).abs().max().item():.3e}" for (name, p), q in
                             zip(reference.named_parameters(), model.parameters())
                             if not torch.allclose(p, q, rtol=1e-9, atol=1e-12)]
            group.Free()
        comm.Barrier()
    assert_all_ranks(comm, not problems, "; ".join(problems[:4]))
