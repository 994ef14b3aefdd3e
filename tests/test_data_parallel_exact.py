"""DataParallel is exact: N ranks on unequal shards equal ONE process on the whole global batch.

Every test builds the same float64 model on every rank from a fixed seed, trains a
DataParallel replica on this rank's shard (rank r takes r + 1 samples, so the shards
are unequal and odd-sized) and a serial reference on the concatenated global batch,
computed identically on every rank, with SGD with momentum AND weight decay (so a
zero gradient and a None gradient lead to different parameters). After every step
it compares the loss, every ``.grad`` (None or not, and its value) and, after
``optimizer.step()``, every parameter.

Both call orders users write are covered: ``zero_grad`` before forward, and
forward, ``zero_grad``, backward. Tests that expect an exception expect it on every
rank; a hang ends the process (and so the MPI run) after ``HANG_S`` seconds.

Every test runs on CPU and, where a GPU exists, on CUDA (the ``device`` fixture,
``tests/conftest.py``): models are built on CPU from the seed and moved to the device,
reference and replica alike, batches are generated on CPU and moved, and the
comparisons run on device tensors with the same float64 tolerances.
"""

import contextlib
import copy
import faulthandler
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mpipar
from mpi_helpers import assert_all_ranks, assert_close_all_ranks, assert_comm_still_usable

TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the summation order differs
HANG_S = 60  # no test here needs more than a few seconds
ZERO_GRAD_FIRST = "zero_grad_before_forward"
ZERO_GRAD_BETWEEN = "zero_grad_between_forward_and_backward"
ORDERS = [ZERO_GRAD_FIRST, ZERO_GRAD_BETWEEN]


@pytest.fixture(autouse=True)
def _end_hangs(request):
    """A rank stuck in a collective prints its stack and exits after HANG_S seconds,
    which ends the MPI run (the stack goes to the real stderr, not pytest's capture)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=stream)
    yield
    faulthandler.cancel_dump_traceback_later()
    stream.close()


@pytest.fixture
def dp_comm(comm):
    """A private communicator for the wrapper, so a test that leaves an operation
    pending cannot disturb the next one."""
    dup = comm.Dup()
    yield dup
    dup.Free()


# -- harness ------------------------------------------------------------------------


def shard_counts(size: int):
    """Rank r takes r + 1 samples: unequal, odd-sized shards."""
    counts = [r + 1 for r in range(size)]
    return counts, [sum(counts[:r]) for r in range(size)]


def take(batch: dict, start: int, count: int) -> dict:
    return {k: (v[start:start + count] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)


def mismatches(reference: nn.Module, replica: nn.Module, attr: str) -> list:
    """Differences between the models' parameters (attr "data") or gradients (attr "grad")."""
    problems = []
    for (name, p_ref), p_dp in zip(reference.named_parameters(), replica.parameters()):
        a, b = getattr(p_dp, attr), getattr(p_ref, attr)
        if (a is None) != (b is None):
            problems.append(f"{name}.{attr} is {'None' if a is None else 'set'} (serial: "
                            f"{'None' if b is None else 'set'})")
        elif a is not None:
            if a.shape != b.shape:
                problems.append(f"{name}.{attr} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            elif not torch.allclose(a, b, **TOL):
                problems.append(f"{name}.{attr} max abs difference {(a - b).abs().max().item():.3e}")
    return problems


def compare_step(comm, reference, replica, ref_loss, dp_loss, opt_ref, opt_dp, where):
    """Loss, every gradient, then (after both optimizers step) every parameter: DP vs serial, on all ranks."""
    problems = []
    if abs(dp_loss - ref_loss) > TOL["atol"] + TOL["rtol"] * abs(ref_loss):
        problems.append(f"loss {dp_loss!r} vs serial {ref_loss!r}")
    problems += mismatches(reference, replica, "grad")
    opt_ref.step()
    opt_dp.step()
    problems += [f"after optimizer.step(): {p}" for p in mismatches(reference, replica, "data")]
    assert_all_ranks(comm, not problems, f"{where}: " + "; ".join(problems))


def dp_forward_backward(dp, optimizer, loss_fn, batch, order, **backward_kwargs):
    """One DataParallel forward and backward in the given call order; returns the local loss."""
    if order == ZERO_GRAD_FIRST:
        optimizer.zero_grad()
    loss = loss_fn(dp, batch)
    if order == ZERO_GRAD_BETWEEN:
        optimizer.zero_grad()
    loss.backward(**backward_kwargs)
    return loss


def train_and_compare(comm, dp_comm, make_model, make_batch, loss_fn, order, *, device, steps=3,
                      per_shard_reference=False, before_step=None, after_backward=None):
    """Train serial and DataParallel side by side; assert, after every step, equal
    loss, gradients (None-ness included) and parameters on every rank.

    ``make_batch(step, counts)`` gives the global batch (a dict of tensors, samples
    first); ``loss_fn(model, batch)`` the mean loss over the batch's samples.
    ``per_shard_reference``: the serial loss is the sample-weighted mean of the
    loss of each rank's shard run separately (exact reference for BatchNorm).
    Model and batches are made on CPU and moved to ``device``.
    Returns the (reference, replica, dp) triple after training.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    reference = make_model().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, dp_comm)
    opt_ref, opt_dp = make_optimizer(reference), make_optimizer(replica)
    counts, offsets = shard_counts(size)
    total = sum(counts)
    for step in range(steps):
        if before_step is not None:
            before_step(step, reference, replica)
        batch = to_device(make_batch(step, counts), device)

        opt_ref.zero_grad()
        if per_shard_reference:
            ref_loss = sum(loss_fn(reference, take(batch, o, c)) * (c / total) for o, c in zip(offsets, counts))
        else:
            ref_loss = loss_fn(reference, batch)
        ref_loss.backward()

        loss = dp_forward_backward(dp, opt_dp, loss_fn, take(batch, offsets[rank], counts[rank]), order)
        if after_backward is not None:
            after_backward(step, dp, replica)

        dp_loss = comm.allreduce(loss.item() * counts[rank]) / total
        compare_step(comm, reference, replica, ref_loss.item(), dp_loss, opt_ref, opt_dp, f"step {step} ({order})")
    return reference, replica, dp


def classification_batch(features: int, classes: int = 4):
    def make_batch(step, counts):
        generator = torch.Generator().manual_seed(1000 + step)
        total = sum(counts)
        return {"x": torch.randn(total, features, generator=generator, dtype=torch.float64),
                "y": torch.randint(0, classes, (total,), generator=generator)}
    return make_batch


def cross_entropy_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


# -- 0. the harness itself ------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_plain_mlp_equals_serial(comm, dp_comm, order, device):
    """Baseline: every parameter used on every rank."""
    train_and_compare(comm, dp_comm, mlp, classification_batch(6), cross_entropy_loss, order, device=device, steps=4)


@pytest.mark.mpi
def test_harness_detects_a_wrong_gradient(comm, dp_comm, device):
    """The comparison is not vacuous: a replica whose gradient is off by 1e-9 is caught."""
    def perturb(step, dp, replica):
        with torch.no_grad():
            replica[0].weight.grad[0, 0] += 1e-9

    with pytest.raises(AssertionError, match="0.weight.grad max abs difference"):
        train_and_compare(comm, dp_comm, mlp, classification_batch(6), cross_entropy_loss, ZERO_GRAD_FIRST,
                          device=device, steps=1, after_backward=perturb)


# -- 1./2. parameters unused on some or all ranks -------------------------------------


class TwoBranch(nn.Module):
    """``branch`` adds to the samples flagged in ``use``; it is not called at all when
    no sample of the batch is flagged, so it gets no gradient there. Per sample the
    function does not depend on how the batch is split: serial on the whole batch is
    the exact reference."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 4)
        self.branch = nn.Linear(6, 4)

    def forward(self, x, use):
        out = self.trunk(x)
        index = use.nonzero().flatten()
        if len(index):
            out = out.index_add(0, index, self.branch(x[index]))
        return out


def two_branch_batch(uses):
    """``uses(step, rank)``: whether rank's shard has branch samples in ``step``."""
    def make_batch(step, counts):
        batch = classification_batch(6)(step, counts)
        flags = [torch.tensor([uses(step, r) and i % 2 == 0 for i in range(c)]) for r, c in enumerate(counts)]
        batch["use"] = torch.cat(flags)
        return batch
    return make_batch


def two_branch_loss(model, batch):
    return F.cross_entropy(model(batch["x"], batch["use"]), batch["y"])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("order", ORDERS)
def test_parameter_unused_on_some_ranks_equals_serial(comm, dp_comm, order, device):
    """Case 1: the branch is used by ranks r with (r + step) even, so every step some
    ranks use it and some do not (rank 0: used, unused, used, unused). A rank that
    did not use it contributes zeros, never the previous step's gradient."""
    uses = two_branch_batch(lambda step, rank: (rank + step) % 2 == 0)
    train_and_compare(comm, dp_comm, TwoBranch, uses, two_branch_loss, order, device=device, steps=4)


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_parameter_unused_by_all_ranks_in_some_steps_equals_serial(comm, dp_comm, order, device):
    """In odd steps no rank uses the branch: serial leaves its .grad None in those
    steps (momentum and weight decay then skip it), and so must DataParallel."""
    uses = two_branch_batch(lambda step, rank: step % 2 == 0)
    train_and_compare(comm, dp_comm, TwoBranch, uses, two_branch_loss, order, device=device, steps=4)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.never_called = nn.Linear(6, 4)

    def forward(self, x):
        return self.body(x)


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_parameter_no_rank_uses_keeps_none_grad_and_does_not_move(comm, dp_comm, order, device):
    """Case 2: a Linear that is never called: .grad stays None on every rank, and
    weight decay / momentum do not move it (as in serial)."""
    initial = {}

    def remember(step, reference, replica):
        if step == 0:
            initial.update({k: v.detach().clone() for k, v in replica.never_called.named_parameters()})

    _, replica, _ = train_and_compare(comm, dp_comm, WithUnused, classification_batch(6), cross_entropy_loss,
                                      order, device=device, steps=3, before_step=remember)
    ok = all(p.grad is None and torch.equal(p.detach(), initial[k]) for k, p in replica.never_called.named_parameters())
    assert_all_ranks(comm, ok, "never_called moved or has a .grad")


# -- 3. frozen parameters ---------------------------------------------------------


def mlp_first_layer_frozen() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_frozen_before_wrapping_gets_no_grad_and_does_not_move(comm, dp_comm, order, device):
    """Case 3a."""
    torch.manual_seed(0)
    initial = mlp_first_layer_frozen().double()[0].weight.detach().clone().to(device)
    _, replica, _ = train_and_compare(comm, dp_comm, mlp_first_layer_frozen, classification_batch(6),
                                      cross_entropy_loss, order, device=device, steps=3)
    frozen = replica[0].weight
    assert_all_ranks(comm, frozen.grad is None and torch.equal(frozen.detach(), initial),
                     f"frozen weight: grad {'None' if frozen.grad is None else 'set'}, "
                     f"moved {not torch.equal(frozen.detach(), initial)}")


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_frozen_on_every_rank_after_wrapping_gets_no_grad_from_then_on(comm, dp_comm, order, device):
    """Case 3b: after step 1 the first layer's weight is frozen on every rank (and in
    the serial reference): from then on .grad is None after zero_grad, it does not
    move, and everything else still equals serial."""
    frozen_at = {}

    def freeze(step, reference, replica):
        if step == 2:
            reference[0].weight.requires_grad_(False)
            replica[0].weight.requires_grad_(False)
            frozen_at["value"] = replica[0].weight.detach().clone()

    _, replica, _ = train_and_compare(comm, dp_comm, mlp, classification_batch(6), cross_entropy_loss, order,
                                      device=device, steps=4, before_step=freeze)
    w = replica[0].weight
    assert_all_ranks(comm, w.grad is None and torch.equal(w.detach(), frozen_at["value"]),
                     f"weight frozen after wrapping: grad {'None' if w.grad is None else 'set'}, "
                     f"moved {not torch.equal(w.detach(), frozen_at['value'])}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("order", ORDERS)
def test_requires_grad_differing_between_ranks_raises_on_every_rank(comm, dp_comm, order, device):
    """Case 3c: rank 0 alone freezes a parameter after wrapping (and after one good
    step): the next forward + backward raises ValueError on every rank, no hang."""
    rank = comm.Get_rank()
    counts, offsets = shard_counts(comm.Get_size())
    torch.manual_seed(0)
    model = mlp().double().to(device)
    dp = mpipar.DataParallel(model, dp_comm)
    optimizer = make_optimizer(model)
    for step in range(2):
        batch = to_device(take(classification_batch(6)(step, counts), offsets[rank], counts[rank]), device)
        if step == 1:
            if rank == 0:
                model[0].weight.requires_grad_(False)
            with pytest.raises(ValueError, match="requires_grad"):
                dp_forward_backward(dp, optimizer, cross_entropy_loss, batch, order)
        else:
            dp_forward_backward(dp, optimizer, cross_entropy_loss, batch, order)
            optimizer.step()
    assert_comm_still_usable(dp_comm)


# -- 4./5. backward twice, gradient accumulated twice, reentrant checkpoints ---------


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_second_backward_after_one_forward_raises_on_every_rank(comm, dp_comm, order, device):
    """Case 4."""
    rank = comm.Get_rank()
    counts, offsets = shard_counts(comm.Get_size())
    torch.manual_seed(0)
    model = mlp().double().to(device)
    dp = mpipar.DataParallel(model, dp_comm)
    optimizer = make_optimizer(model)
    batch = to_device(take(classification_batch(6)(0, counts), offsets[rank], counts[rank]), device)
    loss = dp_forward_backward(dp, optimizer, cross_entropy_loss, batch, order, retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    assert_comm_still_usable(dp_comm)


class SharedInAndOutOfCheckpoint(nn.Module):
    """``shared`` is used outside and inside a reentrant checkpoint: its .grad is
    accumulated twice in one backward (the inner backward, then the outer one)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = checkpoint(lambda t: torch.tanh(self.shared(t)), h, use_reentrant=True)
        return self.head(h)


@pytest.mark.mpi
def test_gradient_accumulated_twice_in_one_backward_raises_on_every_rank(comm, dp_comm, device):
    """Case 5."""
    rank = comm.Get_rank()
    counts, offsets = shard_counts(comm.Get_size())
    torch.manual_seed(0)
    model = SharedInAndOutOfCheckpoint().double().to(device)
    dp = mpipar.DataParallel(model, dp_comm)
    batch = to_device(take(classification_batch(6)(0, counts), offsets[rank], counts[rank]), device)
    with pytest.raises(RuntimeError, match="more than once"):
        cross_entropy_loss(dp, batch).backward()
    assert_comm_still_usable(dp_comm)


class CheckpointedTail(nn.Module):
    """The model ends in a reentrant checkpoint: the first gradients are produced
    inside the inner backward, the first layer's only after it returns."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x):
        return checkpoint(self.block, torch.tanh(self.pre(x)), use_reentrant=True)


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_reentrant_checkpoint_without_shared_parameters_equals_serial(comm, dp_comm, order, device):
    """Case 5b: the reduction must not finish at the end of the inner backward."""
    train_and_compare(comm, dp_comm, CheckpointedTail, classification_batch(6), cross_entropy_loss, order,
                      device=device, steps=3)


# -- 6. inputs: keyword-only, non-tensor first, no tensor at all -----------------------


class KeywordOnlyLM(nn.Module):
    """Called as Hugging Face models are: ``model(input_ids=..., labels=...)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, *, input_ids, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids).mean(1)))
        return logits if labels is None else F.cross_entropy(logits, labels)


def token_batch(step, counts):
    generator = torch.Generator().manual_seed(2000 + step)
    total = sum(counts)
    return {"input_ids": torch.randint(0, 10, (total, 3), generator=generator),
            "labels": torch.randint(0, 4, (total,), generator=generator)}


class ScaleFirst(nn.Module):
    """The first positional argument is a float; the first tensor comes second."""

    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, scale, x, y):
        return F.cross_entropy(self.body(x) * scale, y)


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("call", ["keyword_only", "non_tensor_first"])
def test_sample_count_from_first_tensor_argument_equals_serial(comm, dp_comm, order, call, device):
    """Case 6: the sample count comes from the first tensor argument, keyword or positional."""
    if call == "keyword_only":
        train_and_compare(comm, dp_comm, KeywordOnlyLM, token_batch,
                          lambda m, b: m(input_ids=b["input_ids"], labels=b["labels"]), order, device=device, steps=3)
    else:
        train_and_compare(comm, dp_comm, ScaleFirst, classification_batch(6),
                          lambda m, b: m(0.5, b["x"], b["y"]), order, device=device, steps=3)


class TakesAnInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(3, dtype=torch.float64))

    def forward(self, n):
        return (self.w ** 2).sum() * n


@pytest.mark.mpi
def test_no_tensor_argument_without_num_samples_raises_on_every_rank(comm, dp_comm, device):
    """Case 6: with grad enabled, no tensor to count samples from and no num_samples: ValueError."""
    dp = mpipar.DataParallel(TakesAnInt().to(device), dp_comm)
    with pytest.raises(ValueError, match="num_samples"):
        dp(n=3)
    with torch.no_grad():  # no backward to prepare: nothing to count
        value = dp(n=3)
    assert_all_ranks(comm, value.item() == 15.0, f"no_grad forward gave {value.item()}")


@pytest.mark.mpi
def test_no_tensor_argument_with_explicit_num_samples_equals_serial(comm, dp_comm, device):
    """Case 6: explicit num_samples is used as the weight: rank k passes n = k + 1 and
    num_samples = k + 1, so the serial gradient is the (k + 1)-weighted mean of the
    ranks' gradients."""
    size, rank = comm.Get_size(), comm.Get_rank()
    reference = TakesAnInt().to(device)
    dp = mpipar.DataParallel(copy.deepcopy(reference), dp_comm)
    counts = [k + 1 for k in range(size)]
    (sum(reference(n) * (n / sum(counts)) for n in counts)).backward()
    dp(n=rank + 1, num_samples=rank + 1).backward()
    assert_close_all_ranks(comm, dp.module.w.grad, reference.w.grad, what="w.grad", **TOL)


# -- 7. models you did not write ---------------------------------------------------


class TiedEmbedding(nn.Module):
    """The output projection's weight IS the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids):
        return self.out(torch.tanh(self.mix(self.embed(input_ids))))


def tied_batch(step, counts):
    generator = torch.Generator().manual_seed(3000 + step)
    total = sum(counts)
    return {"x": torch.randint(0, 10, (total,), generator=generator),
            "y": torch.randint(0, 10, (total,), generator=generator)}


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_tied_weights_equal_serial(comm, dp_comm, order, device):
    """Case 7: tied weights (one parameter, gradient from both uses)."""
    _, replica, _ = train_and_compare(comm, dp_comm, TiedEmbedding, tied_batch, cross_entropy_loss, order,
                                      device=device, steps=4)
    assert_all_ranks(comm, replica.out.weight is replica.embed.weight, "the tie was broken")


def bn_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4))


def image_batch(step, counts):
    generator = torch.Generator().manual_seed(4000 + step)
    total = sum(counts)
    return {"x": torch.randn(total, 1, 4, 4, generator=generator, dtype=torch.float64),
            "y": torch.randint(0, 4, (total,), generator=generator)}


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_batchnorm_equals_sample_weighted_per_shard_reference(comm, dp_comm, order, device):
    """Case 7: BatchNorm in train mode normalises with each rank's own batch
    statistics, so the exact reference runs each rank's shard through the serial
    model separately and weights the shard losses by sample count."""
    train_and_compare(comm, dp_comm, bn_convnet, image_batch, cross_entropy_loss, order, device=device, steps=3,
                      per_shard_reference=True)


# -- 8. zero-copy --------------------------------------------------------------------


@pytest.mark.mpi
def test_grads_are_the_same_bucket_storage_every_step(comm, dp_comm, device):
    """Case 8: with zero_grad (set_to_none) before forward, after every backward each
    .grad is a view into the one bucket of this tiny model, at the same address every step."""
    seen = []

    def record(step, dp, replica):
        grads = [p.grad for p in replica.parameters()]
        seen.append(([g.data_ptr() if g is not None else None for g in grads],
                     {g.untyped_storage().data_ptr() for g in grads if g is not None}))

    train_and_compare(comm, dp_comm, mlp, classification_batch(6), cross_entropy_loss, ZERO_GRAD_FIRST,
                      device=device, steps=4, after_backward=record)
    first_ptrs, first_storages = seen[0]
    ok = None not in first_ptrs and len(first_storages) == 1 and all(s == seen[0] for s in seen)
    assert_all_ranks(comm, ok, f"grad addresses and storages per step: {seen}")


# -- 9. no_sync -----------------------------------------------------------------------


@pytest.mark.mpi
@pytest.mark.parametrize("order", ORDERS)
def test_no_sync_accumulation_equals_serial_over_steps(comm, dp_comm, order, device):
    """Case 9: two micro-batches under no_sync, then a synced one, per step; rank r's
    micro-batches hold r + 1, 2 and 1 samples, each loss weighted by its share of the
    rank's samples. Equals serial on all ranks' micro-batches concatenated."""
    size, rank = comm.Get_size(), comm.Get_rank()
    micro = [[r + 1, 2, 1] for r in range(size)]
    local = [sum(m) for m in micro]
    total = sum(local)
    torch.manual_seed(0)
    reference = mlp().double().to(device)
    replica = copy.deepcopy(reference)
    dp = mpipar.DataParallel(replica, dp_comm)
    opt_ref, opt_dp = make_optimizer(reference), make_optimizer(replica)
    for step in range(3):
        batch = to_device(classification_batch(6)(step, local), device)
        opt_ref.zero_grad()
        ref_loss = cross_entropy_loss(reference, batch)
        ref_loss.backward()

        start = sum(local[:rank])
        pieces = []
        for count in micro[rank]:
            pieces.append(take(batch, start, count))
            start += count
        loss_sum = 0.0
        for i, piece in enumerate(pieces):
            weight = len(piece["y"]) / local[rank]
            if i == 0 and order == ZERO_GRAD_FIRST:
                opt_dp.zero_grad()
            if i < len(pieces) - 1:
                with dp.no_sync():
                    loss = cross_entropy_loss(dp, piece) * weight
                    if i == 0 and order == ZERO_GRAD_BETWEEN:
                        opt_dp.zero_grad()
                    loss.backward()
            else:
                loss = cross_entropy_loss(dp, piece) * weight
                loss.backward()
            loss_sum += loss.item()

        dp_loss = comm.allreduce(loss_sum * local[rank]) / total
        compare_step(comm, reference, replica, ref_loss.item(), dp_loss, opt_ref, opt_dp, f"step {step} ({order})")
