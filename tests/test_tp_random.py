"""Dropout under tensor parallelism: the replicated stream and the per-rank split streams.

Replicated activations are dropped with torch's default generator, seeded alike on every
rank; split activations inside ``TensorParallelRNG.split_region()`` with this rank's own
stream. The exactness tests replay a split region's draws from ``rng.state_dict()`` to
get each rank's mask, gather the masks into the full model's mask, and compare with the
unsplit layer run with it (float64; CPU and, where a GPU exists, CUDA).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_helpers import assert_all_ranks, assert_close_all_ranks, assert_comm_still_usable
from mpipar.tensor_parallel import (
    ColumnParallelLinear,
    ParallelDropout,
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformerBlock,
    TensorParallelRNG,
    split_dropout,
)

SEED, P_DROP = 1234, 0.4
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def gathered(comm, tensor):
    """Every rank's ``tensor`` (on CPU), as a list by rank."""
    return comm.allgather(tensor.detach().cpu())


def replayed_mask(rng, state, like):
    """The dropout scale (0 or 1 / (1 - p)) a split region drew for ``like``, replayed from ``state``:
    the draws depend only on the shape, dtype and device, not on the values."""
    rng.load_state_dict(state)
    with rng.split_region():
        return F.dropout(torch.ones_like(like), P_DROP, training=True)


@pytest.mark.mpi
def test_replicated_dropout_draws_the_same_mask_on_every_rank(comm):
    torch.manual_seed(SEED)
    rng = TensorParallelRNG(comm, SEED)
    rng.check_replicated()
    x = torch.ones(64, 32)
    before = F.dropout(x, P_DROP)
    with rng.split_region():
        F.dropout(x, P_DROP)  # split draws between two replicated ones
    after = F.dropout(x, P_DROP)
    rng.check_replicated()
    masks = gathered(comm, torch.stack([before, after]))
    assert_all_ranks(comm, all(torch.equal(mask, masks[0]) for mask in masks),
                     "replicated dropout masks differ between ranks")
    assert_all_ranks(comm, not torch.equal(before, after), "two replicated draws gave the same mask")


@pytest.mark.mpi
def test_split_dropout_masks_differ_between_ranks_and_are_reproducible(comm):
    p = comm.Get_size()
    x = torch.ones(64, 32)

    def masks(seed, draws=2):
        torch.manual_seed(SEED)
        rng = TensorParallelRNG(comm, seed)
        return [split_dropout(x, P_DROP, rng) for _ in range(draws)]

    first, again, other = masks(SEED), masks(SEED), masks(SEED + 1)
    ok = all(torch.equal(a, b) for a, b in zip(first, again))
    assert_all_ranks(comm, ok, "the same seed gave different split masks")
    assert_all_ranks(comm, not torch.equal(first[0], first[1]), "two split draws gave the same mask")
    assert_all_ranks(comm, not torch.equal(first[0], other[0]), "another seed gave the same split mask")
    every_rank = gathered(comm, first[0])
    same = [(a, b) for a in range(p) for b in range(a + 1, p) if torch.equal(every_rank[a], every_rank[b])]
    assert_all_ranks(comm, not same, f"ranks drew the same split mask: {same}")


@pytest.mark.mpi
def test_split_region_leaves_the_default_stream_as_it_was(comm, device):
    torch.manual_seed(SEED)
    rng = TensorParallelRNG(comm, SEED)
    x = torch.ones(1000, device=device)
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    with rng.split_region():
        F.dropout(x, P_DROP)
        torch.rand(7, device=device)
    ok = torch.equal(torch.get_rng_state(), state)
    if cuda_state is not None:
        ok = ok and torch.equal(torch.cuda.get_rng_state(device), cuda_state)
    assert_all_ranks(comm, ok, "the default generator's state changed across a split region")
    with pytest.raises(KeyError):
        with rng.split_region():
            torch.rand(3, device=device)
            raise KeyError("inside the region")
    assert_all_ranks(comm, torch.equal(torch.get_rng_state(), state), "an exception in a region left its stream in")
    with pytest.raises(RuntimeError, match="already active"):
        with rng.split_region(), rng.split_region():
            pass
    # without any split region, the replicated draw is the same one
    replicated = F.dropout(x, P_DROP)
    torch.manual_seed(SEED)
    assert_all_ranks(comm, torch.equal(replicated, F.dropout(x, P_DROP)), "the replicated draw was shifted")
    rng.check_replicated()
    with pytest.raises(ValueError, match="split seed"):
        TensorParallelRNG(comm, SEED + 1).load_state_dict(rng.state_dict())


@pytest.mark.mpi
def test_column_parallel_layer_with_split_dropout_equals_unsplit_with_the_gathered_mask(comm, device):
    """Replicated dropout on the input, column-parallel layer, split dropout on its output shard."""
    p = comm.Get_size()
    torch.manual_seed(0)
    full = nn.Linear(12, 10 * p).to(torch.float64).to(device)
    layer = ColumnParallelLinear(copy.deepcopy(full), comm)
    rng = TensorParallelRNG(comm, SEED)
    split_drop, replicated_drop = ParallelDropout(P_DROP, rng), nn.Dropout(P_DROP)
    generator = torch.Generator().manual_seed(1)
    x_full = torch.randn(6, 12, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    grad_output = torch.randn(6, 10 * p, generator=generator, dtype=torch.float64).to(device)

    torch.manual_seed(SEED)
    state = rng.state_dict()
    hidden = layer(replicated_drop(x_split))
    output = split_drop(hidden)
    local_mask = replayed_mask(rng, state, hidden)
    assert_all_ranks(comm, torch.equal(output, hidden * local_mask), "split dropout is not hidden * replayed mask")
    full_mask = torch.cat(gathered(comm, local_mask), dim=-1).to(device)
    output.backward(grad_output.narrow(-1, comm.Get_rank() * 10, 10))

    torch.manual_seed(SEED)  # the replicated stream again: the same input mask as on every rank
    expected = full(replicated_drop(x_full)) * full_mask
    expected.backward(grad_output)
    rank_columns = slice(comm.Get_rank() * 10, (comm.Get_rank() + 1) * 10)
    assert_close_all_ranks(comm, output, expected[:, rank_columns], **TOLERANCE, what="output")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, **TOLERANCE, what="input gradient")
    assert_close_all_ranks(comm, layer.weight.grad, full.weight.grad[rank_columns], **TOLERANCE, what="dW")
    assert_close_all_ranks(comm, layer.bias.grad, full.bias.grad[rank_columns], **TOLERANCE, what="db")
    dropped = (full_mask == 0).double().mean().item()
    assert_all_ranks(comm, 0.2 < dropped < 0.6, f"{dropped:.2f} of the full mask dropped, p = {P_DROP}")


BATCH, LENGTH, EMBED, HEADS = 2, 5, 24, 12


def make_attention(device, dropout=P_DROP):
    module = nn.MultiheadAttention(EMBED, HEADS, dropout=dropout, batch_first=True).to(torch.float64)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module.to(device)


def reference_attention(full, x, scale, causal):
    """``full``'s self-attention written out, the probabilities multiplied by ``scale`` (B, h, T, T)."""
    batch, length, embed = x.shape
    head_dim = embed // full.num_heads
    qkv = F.linear(x, full.in_proj_weight, full.in_proj_bias).view(batch, length, 3, full.num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(head_dim)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1),
                                    float("-inf"))
    heads = (torch.softmax(scores, dim=-1) * scale).matmul(v)
    return full.out_proj(heads.transpose(1, 2).reshape(batch, length, embed))


@pytest.mark.mpi
@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_equals_unsplit_with_the_gathered_mask(comm, causal, device):
    p, rank = comm.Get_size(), comm.Get_rank()
    full = make_attention(device)
    rng = TensorParallelRNG(comm, SEED)
    parallel = ParallelSelfAttention(copy.deepcopy(full), comm, rng=rng)
    x_full = torch.randn(BATCH, LENGTH, EMBED, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(device).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    grad_output = torch.randn(BATCH, LENGTH, EMBED, generator=torch.Generator().manual_seed(2),
                              dtype=torch.float64).to(device)

    state = rng.state_dict()
    output = parallel(x_split, is_causal=causal)
    output.backward(grad_output)
    local = torch.empty(BATCH, HEADS // p, LENGTH, LENGTH, dtype=torch.float64, device=device)
    full_mask = torch.cat(gathered(comm, replayed_mask(rng, state, local)), dim=1).to(device)
    expected = reference_attention(full, x_full, full_mask, causal)
    expected.backward(grad_output)
    assert_close_all_ranks(comm, output, expected, **TOLERANCE, what="output")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, **TOLERANCE, what="input gradient")
    share = EMBED // p
    rows = torch.cat([torch.arange(part * EMBED + rank * share, part * EMBED + (rank + 1) * share)
                      for part in range(3)]).to(device)
    assert_close_all_ranks(comm, parallel.qkv.weight.grad, full.in_proj_weight.grad[rows], **TOLERANCE,
                           what="q/k/v dW")
    assert_close_all_ranks(comm, parallel.out_proj.weight.grad, full.out_proj.weight.grad[:, rank * share:
                           (rank + 1) * share], **TOLERANCE, what="out_proj dW")

    # the written-out reference is nn.MultiheadAttention's attention, and eval mode drops nothing
    full.eval()
    parallel.eval()
    kwargs = dict(attn_mask=torch.ones(LENGTH, LENGTH, dtype=torch.bool, device=device).triu(1),
                  is_causal=True) if causal else {}
    with torch.no_grad():
        module = full(x_full, x_full, x_full, need_weights=False, **kwargs)[0]
        assert_close_all_ranks(comm, reference_attention(full, x_full, 1.0, causal), module, **TOLERANCE,
                               what="reference vs nn.MultiheadAttention")
        assert_close_all_ranks(comm, parallel(x_split, is_causal=causal), module, **TOLERANCE, what="eval")


@pytest.mark.mpi
def test_transformer_block_passes_the_rng_to_its_attention(comm):
    rng = TensorParallelRNG(comm, SEED)
    p = comm.Get_size()
    block = ParallelTransformerBlock(make_attention("cpu"), nn.Linear(EMBED, 4 * p).double(),
                                     nn.Linear(4 * p, EMBED).double(), nn.LayerNorm(EMBED).double(),
                                     nn.LayerNorm(EMBED).double(), comm, rng=rng)
    state = rng.state_dict()["cpu"]
    block(torch.randn(BATCH, LENGTH, EMBED, dtype=torch.float64)).sum().backward()
    assert_all_ranks(comm, block.attention.rng is rng and not torch.equal(rng.state_dict()["cpu"], state),
                     "the block's attention did not draw from the split stream")


@pytest.mark.mpi
def test_misuse_raises_on_every_rank(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    with pytest.raises(ValueError, match=r"dropout=0\.4 is not supported: without rng="):
        ParallelSelfAttention(make_attention("cpu"), comm)
    with pytest.raises(ValueError, match="needs the group's TensorParallelRNG"):
        split_dropout(torch.ones(3), 0.5, None)
    assert_all_ranks(comm, torch.equal(split_dropout(torch.ones(3), 0.5, None, training=False), torch.ones(3)),
                     "eval-mode split dropout changed its input")
    if p > 1:
        with pytest.raises(ValueError, match="ranks disagree on TensorParallelRNG seed"):
            TensorParallelRNG(comm, SEED + rank)
        torch.manual_seed(SEED + rank)
        rng = TensorParallelRNG(comm, SEED)
        with pytest.raises(RuntimeError, match="default random generators differ"):
            rng.check_replicated()
        torch.manual_seed(SEED)
        with pytest.raises(ValueError, match="different nn.MultiheadAttention modules"):
            ParallelSelfAttention(make_attention("cpu"), comm, rng=rng if rank else None)
    assert_comm_still_usable(comm)


def dropout_mlps(comm, rng, device, count=2):
    """``count`` ParallelMLP blocks with split dropout between their layers and no replicated draw between
    them, so every block enters its split region with the same default-generator state."""
    p = comm.Get_size()
    torch.manual_seed(SEED)
    return [ParallelMLP(nn.Linear(6, 4 * p).double().to(device), nn.Linear(4 * p, 6).double().to(device), comm,
                        ParallelDropout(P_DROP, rng)) for _ in range(count)]


def gradients_with(comm, recompute, device, steps=2):
    """Input and parameter gradients of two steps through two dropout blocks, each block run through
    ``recompute(rng, block, x)``; and the split stream's state afterwards."""
    rng = TensorParallelRNG(comm, SEED)
    blocks = dropout_mlps(comm, rng, device)
    found = []
    for step in range(steps):
        x = torch.randn(BATCH, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        x = x.to(device).requires_grad_()
        y = x
        for block in blocks:
            y = recompute(rng, block, y)
        y.square().sum().backward()
        found += [x.grad] + [parameter.grad.clone() for block in blocks for parameter in block.parameters()]
    return found, rng.state_dict()


@pytest.mark.mpi
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_recomputed_split_regions_draw_the_forward_masks(comm, use_reentrant, device):
    """torch.utils.checkpoint of ``rng.recomputable(block)`` replays the forward's split masks in the
    recompute: every gradient equals the run without recompute bitwise, and the split stream ends where it
    does without recompute. A plain checkpoint (whose recompute would draw new masks) raises instead."""
    from torch.utils.checkpoint import checkpoint

    straight, straight_state = gradients_with(comm, lambda rng, block, x: block(x), device)
    recomputed, recomputed_state = gradients_with(
        comm, lambda rng, block, x: checkpoint(rng.recomputable(block), x, use_reentrant=use_reentrant), device)
    differing = [index for index, (a, b) in enumerate(zip(straight, recomputed)) if not torch.equal(a, b)]
    same_stream = torch.equal(straight_state["cpu"], recomputed_state["cpu"]) and straight_state["cuda"].keys() == \
        recomputed_state["cuda"].keys() and all(torch.equal(v, recomputed_state["cuda"][k])
                                                for k, v in straight_state["cuda"].items())
    assert_all_ranks(comm, not differing and same_stream,
                     f"gradients {differing} differ from the run without recompute")
    with pytest.raises(RuntimeError, match="recomputable"):
        gradients_with(comm, lambda rng, block, x: checkpoint(block, x, use_reentrant=use_reentrant), device,
                       steps=1)
    assert_comm_still_usable(comm)


@pytest.mark.mpi
def test_tensor_parallel_strategy_checkpoints_its_split_stream(comm):
    """The strategy's state holds the split stream (loading with weights_only); a resumed strategy draws
    the masks the straight run draws next."""
    import io

    from mpipar import models
    from mpipar.run.checkpoint import read_state
    from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

    p = comm.Get_size()
    torch.manual_seed(SEED)
    config = TensorParallelConfig(tp=p)
    straight = TensorParallelStrategy(comm, models.mlp([6, 4 * p, 3], flatten=False), config)
    with straight.rng.split_region():
        torch.rand(9)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    with straight.rng.split_region():
        expected = torch.rand(9)
    buffer.seek(0)
    state = read_state(buffer)
    torch.manual_seed(SEED)
    resumed = TensorParallelStrategy(comm, models.mlp([6, 4 * p, 3], flatten=False), config, state=state)
    resumed.load_state_dict(state)
    with resumed.rng.split_region():
        drawn = torch.rand(9)
    assert_all_ranks(comm, torch.equal(drawn, expected), "the resumed run drew other split masks")
    straight.finish(None, print, 0)
    resumed.finish(None, print, 0)


class TokenMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


@pytest.mark.mpi
def test_strategy_passes_its_rng_to_the_blocks_it_splits(comm):
    """A user's transformer block with attention dropout, split by TensorParallelStrategy over every rank:
    accepted (the strategy hands its split stream to the blocks), each rank drops its heads with its own
    mask, and output, loss and the gradients of replicated and split parameters equal the unsplit model
    run with the gathered mask (float64), the same on every rank of the group."""
    from mpipar.models.vit import TransformerBlock
    from mpipar.tensor_parallel.strategy import TensorParallelConfig, TensorParallelStrategy

    p, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(SEED)
    block = TransformerBlock(EMBED, HEADS, 24)
    block.attention = make_attention("cpu")  # a user's block: attention dropout P_DROP
    full = nn.Sequential(block, TokenMean(), nn.Linear(EMBED, 3)).double()
    strategy = TensorParallelStrategy(comm, copy.deepcopy(full), TensorParallelConfig(tp=p), seed=SEED)
    split = strategy.model[0]
    assert_all_ranks(comm, split.attention.rng is strategy.rng, "the split block's attention lacks the strategy's rng")

    x = torch.randn(BATCH, LENGTH, EMBED, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 2])
    state = strategy.rng.state_dict()
    loss = F.cross_entropy(strategy.model(x), labels)
    loss.backward()
    local = replayed_mask(strategy.rng, state,
                          torch.empty(BATCH, HEADS // p, LENGTH, LENGTH, dtype=torch.float64))
    masks = gathered(comm, local)
    full_mask = torch.cat(masks, dim=1)

    h = block.norm1(x)
    y = x + reference_attention(block.attention, h, full_mask, causal=False)
    y = y + block.fc2(F.gelu(block.fc1(block.norm2(y))))
    expected = F.cross_entropy(full[2](y.mean(1)), labels)
    expected.backward()
    assert_close_all_ranks(comm, loss, expected, **TOLERANCE, what="loss")
    for name in ("norm1.weight", "norm2.bias"):  # replicated: whole and equal on every rank
        assert_close_all_ranks(comm, dict(split.named_parameters())[name].grad,
                               dict(block.named_parameters())[name].grad, **TOLERANCE, what=f"{name} gradient")
    assert_close_all_ranks(comm, strategy.model[2].weight.grad, full[2].weight.grad, **TOLERANCE,
                           what="head gradient")
    share = EMBED // p
    assert_close_all_ranks(comm, split.attention.out_proj.weight.grad,
                           block.attention.out_proj.weight.grad[:, rank * share:(rank + 1) * share], **TOLERANCE,
                           what="out_proj gradient (split)")
    dropped = (full_mask == 0).double().mean().item()
    distinct = p == 1 or any(not torch.equal(masks[0], other) for other in masks[1:])
    assert_all_ranks(comm, 0.2 < dropped < 0.6 and distinct,
                     f"{dropped:.2f} of the full mask dropped (p = {P_DROP}); ranks' masks distinct: {distinct}")
