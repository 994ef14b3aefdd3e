"""The tensor-parallel vision transformer against the unsplit one, in float64, on 1 to 4 ranks.

Every rank builds the same tiny ViT (12 heads, hidden 24: splits over 1, 2, 3 and 4 ranks) with
every parameter drawn from a seed (LayerNorms at ones and biases at zero would hide a misplaced
norm or bias), splits a deepcopy over the whole world, and trains both with SGD side by side:
loss, logits and every parameter gradient must agree each step. Shards are gathered back into
the unsplit layout (``full_state_dict``) and compared with the full gradient; replicated
parameters are compared directly and must be the same bits on every rank.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_helpers import assert_all_ranks, assert_comm_still_usable
from mpipar.comm.reducer import CommStats
from mpipar.models.vit import VisionTransformer
from mpipar.tensor_parallel.strategy import (
    TensorParallelConfig,
    TensorParallelStrategy,
    full_state_dict,
    split_parameters,
    split_vit,
)

BATCH, IMAGE, PATCH = 4, 8, 4  # 4 tokens of 4x4 patches
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
REPLICATED = ("patch_embed.", "position", "norm.", "head.")  # besides each block's norms and row biases


def tiny_vit(seed=0, heads=12, hidden=24, dim=24):
    torch.manual_seed(seed)
    model = VisionTransformer(1, 5, IMAGE, patch_size=PATCH, dim=dim, depth=2, heads=heads, hidden=hidden).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return model


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(BATCH, 1, IMAGE, IMAGE, generator=generator)  # float32, as the data gives them
    return images, torch.randint(0, 5, (BATCH,), generator=generator)


def gathered_gradients(model):
    """The split model's gradients in the unsplit model's layout, on every rank: :func:`full_state_dict`
    with every parameter's data swapped for its gradient. Collective."""
    params = list(model.parameters())
    saved = [param.data for param in params]
    try:
        for param in params:
            param.data = param.grad
        return full_state_dict(model)
    finally:
        for param, data in zip(params, saved):
            param.data = data


def difference(mine, theirs):
    return f"{(mine - theirs).abs().max().item():.2e}" if mine.shape == theirs.shape else f"shape {tuple(mine.shape)}"


def replicated_names(model):
    split = split_parameters(model)
    return [name for name, param in model.named_parameters() if id(param) not in split]


@pytest.mark.mpi
def test_tensor_parallel_vit_equals_the_unsplit_one(comm):
    size = comm.Get_size()
    reference = tiny_vit()
    parallel = split_vit(copy.deepcopy(reference), comm, CommStats())
    replicated = replicated_names(parallel)
    expected_replicated = [name for name, _ in parallel.named_parameters()
                           if name.startswith(REPLICATED) or ".norm" in name or name.endswith(("fc2.bias",
                                                                                               "out_proj.bias"))]
    assert_all_ranks(comm, replicated == expected_replicated,
                     f"replicated {replicated}, expected {expected_replicated}")
    local = sum(p.numel() for p in parallel.parameters())
    shards = sum(p.numel() for name, p in parallel.named_parameters() if name not in replicated)
    replicated_count = local - shards
    assert_all_ranks(comm, comm.allreduce(shards) + replicated_count == sum(p.numel() for p in reference.parameters()),
                     "shards summed over the ranks plus replicated parameters are not the unsplit model")
    keys = sorted(full_state_dict(parallel))
    assert_all_ranks(comm, keys == sorted(reference.state_dict()), f"full_state_dict keys {keys}")
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) for model in (reference, parallel)]
    for step in range(3):
        images, labels = batch(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        expected_logits = reference(images)
        expected_loss = F.cross_entropy(expected_logits, labels)
        expected_loss.backward()
        logits = parallel(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        grads = gathered_gradients(parallel)  # shards gathered; replicated parameters: this rank's own
        compared = [("logits", logits, expected_logits), ("loss", loss, expected_loss),
                    *((f"{name}.grad", grads[name], param.grad) for name, param in reference.named_parameters())]
        problems = [f"{what}: max difference {difference(mine, theirs)}" for what, mine, theirs in compared
                    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, **TOLERANCE)]
        mine = {name: param.grad for name, param in parallel.named_parameters() if name in replicated}
        first = comm.bcast(mine, root=0)
        problems += [f"{name}.grad is not rank 0's" for name in replicated if not torch.equal(mine[name], first[name])]
        assert_all_ranks(comm, not problems, f"step {step}: " + "; ".join(problems))
        for optimizer in optimizers:
            optimizer.step()
    state = full_state_dict(parallel)
    problems = [f"{name}: max difference {difference(state[name], value)}"
                for name, value in reference.state_dict().items()
                if state[name].shape != value.shape or not torch.allclose(state[name], value, **TOLERANCE)]
    assert_all_ranks(comm, not problems, "after 3 steps: " + "; ".join(problems))
    assert_all_ranks(comm, size == 1 or any(p.numel() < q.numel() for p, q in zip(parallel.parameters(),
                                                                                    reference.parameters())),
                     "nothing was split")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("what", ["heads", "hidden"])
def test_a_split_the_blocks_cannot_take_is_one_error_on_every_rank(comm, what):
    p = comm.Get_size()
    heads, hidden = (p + 1, 4 * p) if what == "heads" else (p, 4 * p + 1)
    model = tiny_vit(heads=heads, hidden=hidden, dim=2 * heads)
    with pytest.raises(ValueError, match=rf"{p} tensor-parallel ranks cannot split this vision transformer's "
                                         rf"blocks evenly \({heads} attention heads, {hidden} MLP hidden features "
                                         rf"per block\); use a tensor-parallel size \(--tp\) in \[1"):
        TensorParallelStrategy(comm, model, TensorParallelConfig(tp=p))
    assert_comm_still_usable(comm)


@pytest.mark.mpi(min_size=2)
def test_a_tp_size_that_does_not_divide_the_world_is_refused_on_every_rank(comm):
    p = comm.Get_size()
    with pytest.raises(ValueError, match=rf"--tp {p + 1} does not divide the {p} ranks into equal tensor-parallel "
                                         rf"groups"):
        TensorParallelStrategy(comm, tiny_vit(), TensorParallelConfig(tp=p + 1))
    with pytest.raises(TypeError, match="tensor parallelism splits an nn.Sequential MLP or a VisionTransformer, "
                                        "got Linear"):
        TensorParallelStrategy(comm, nn.Linear(2, 2), TensorParallelConfig(tp=p))
    assert_comm_still_usable(comm)
