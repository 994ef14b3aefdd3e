"""ParallelSelfAttention and ParallelTransformerBlock against the unsplit modules, in float64.

Every rank builds the full module from the same seed and cuts the parallel one from a
deepcopy; the serial reference runs whole on every rank. 12 heads and embed 24 split
over 1, 2, 3 and 4 ranks, so every test runs at every size.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_helpers import assert_all_ranks, assert_close_all_ranks, assert_comm_still_usable, count_tensor_calls
from mpipar.tensor_parallel import ParallelSelfAttention, ParallelTransformerBlock

BATCH, LENGTH, EMBED, HEADS, HIDDEN = 2, 5, 24, 12, 24
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def random(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomized(module, seed):
    """``module`` in float64 with every parameter drawn from ``seed`` (nn.MultiheadAttention starts its
    biases at zero and LayerNorm at ones / zeros, which would hide a bias or norm in the wrong place)."""
    module = module.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def make_attention(seed=0, bias=True, embed=EMBED, heads=HEADS, **options):
    return randomized(nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True, **options), seed)


def masks(kind):
    """``(keyword arguments for nn.MultiheadAttention, for ParallelSelfAttention)``."""
    generator = torch.Generator().manual_seed(7)
    allowed_self = ~torch.eye(LENGTH, dtype=torch.bool)  # every query may attend to itself: no empty row
    if kind == "none":
        return {}, {}
    if kind == "causal":  # nn.MultiheadAttention needs the mask with the is_causal hint; ours does not
        causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
        return dict(attn_mask=causal, is_causal=True), dict(is_causal=True)
    if kind == "bool":
        mask = (torch.rand(LENGTH, LENGTH, generator=generator) < 0.4) & allowed_self
    elif kind == "float":
        mask = torch.randn(LENGTH, LENGTH, generator=generator, dtype=torch.float64)
    else:  # "per-head": (batch * heads, T, T), each rank takes its heads' masks
        mask = (torch.rand(BATCH * HEADS, LENGTH, LENGTH, generator=generator) < 0.4) & allowed_self
    return dict(attn_mask=mask), dict(attn_mask=mask)


def my_heads(comm, tensor):
    """Rows of ``in_proj_weight`` / ``in_proj_bias`` (or their gradients) this rank's heads own:
    its q rows, then its k rows, then its v rows."""
    embed, share = tensor.shape[0] // 3, tensor.shape[0] // 3 // comm.Get_size()
    start = comm.Get_rank() * share
    return torch.cat([tensor[part * embed + start:part * embed + start + share] for part in range(3)])


def my_shard(comm, tensor, dim):
    share = tensor.shape[dim] // comm.Get_size()
    return tensor.narrow(dim, comm.Get_rank() * share, share)


def expected_attention_grads(comm, full, prefix=""):
    """The full module's gradients cut the way ParallelSelfAttention holds its parameters."""
    expected = {"qkv.weight": my_heads(comm, full.in_proj_weight.grad),
                "out_proj.weight": my_shard(comm, full.out_proj.weight.grad, 1)}
    if full.in_proj_bias is not None:
        expected["qkv.bias"] = my_heads(comm, full.in_proj_bias.grad)
        expected["out_proj.bias"] = full.out_proj.bias.grad
    return {prefix + name: grad for name, grad in expected.items()}


def assert_gradients(comm, parallel, expected, what):
    names = [name for name, _ in parallel.named_parameters()]
    assert_all_ranks(comm, sorted(names) == sorted(expected), f"{what}: parameters {names}, expected {list(expected)}")
    for name, param in parallel.named_parameters():
        assert_close_all_ranks(comm, param.grad, expected[name], **TOLERANCE, what=f"{what} {name}.grad")


def assert_state(comm, gathered, reference, what):
    assert_all_ranks(comm, list(gathered) == list(reference), f"{what}: keys {list(gathered)}, expected "
                     f"{list(reference)}")
    for name, value in reference.items():
        assert_close_all_ranks(comm, gathered[name], value, **TOLERANCE, what=f"{what} {name}")


def attention_step(comm, mask="none", bias=True, after_backward=None):
    """One forward and backward of the full and the parallel attention; compares output and gradients."""
    full = make_attention(bias=bias)
    parallel = ParallelSelfAttention(copy.deepcopy(full), comm)
    assert_all_ranks(comm, all(torch.equal(parallel.full_state_dict()[k], v) for k, v in full.state_dict().items()),
                     "full_state_dict right after the cut differs from the full module")
    full_kwargs, parallel_kwargs = masks(mask)
    x_full = random(BATCH, LENGTH, EMBED).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    grad_output = random(BATCH, LENGTH, EMBED, seed=2)
    expected = full(x_full, x_full, x_full, need_weights=False, **full_kwargs)[0]
    expected.backward(grad_output)
    output = parallel(x_split, **parallel_kwargs)
    output.backward(grad_output)
    if after_backward is not None:
        after_backward(parallel)
    assert_close_all_ranks(comm, output, expected, **TOLERANCE, what="output")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, **TOLERANCE, what="input gradient")
    assert_gradients(comm, parallel, expected_attention_grads(comm, full), "attention")


@pytest.mark.mpi
@pytest.mark.parametrize("mask, bias", [("none", True), ("causal", True), ("bool", True), ("float", True),
                                        ("per-head", True), ("none", False), ("causal", False)])
def test_attention_equals_unsplit(comm, mask, bias):
    attention_step(comm, mask, bias)


@pytest.mark.mpi
def test_harness_detects_a_wrong_gradient(comm):
    """The comparison is not vacuous: one q/k/v weight gradient off by 1e-9 on the last rank is caught."""
    def perturb(parallel):
        if comm.Get_rank() == comm.Get_size() - 1:
            with torch.no_grad():
                parallel.qkv.weight.grad[0, 0] += 1e-9

    with pytest.raises(AssertionError, match=r"attention qkv.weight.grad: max abs difference 1\.0"):
        attention_step(comm, "causal", after_backward=perturb)


@pytest.mark.mpi
def test_attention_training_equals_unsplit(comm):
    reference = make_attention()
    random_state = torch.random.get_rng_state()
    parallel = ParallelSelfAttention(copy.deepcopy(reference), comm)
    assert_all_ranks(comm, torch.equal(random_state, torch.random.get_rng_state()),
                     "cutting the module drew from the global random stream")
    optimizers = [sgd(model) for model in (reference, parallel)]
    target = random(BATCH, LENGTH, EMBED, seed=6)
    full_kwargs, parallel_kwargs = masks("causal")
    for step in range(3):
        x = random(BATCH, LENGTH, EMBED, seed=10 + step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        F.mse_loss(reference(x, x, x, need_weights=False, **full_kwargs)[0], target).backward()
        F.mse_loss(parallel(x, **parallel_kwargs), target).backward()
        assert_gradients(comm, parallel, expected_attention_grads(comm, reference), f"step {step}")
        for optimizer in optimizers:
            optimizer.step()
    assert_state(comm, parallel.full_state_dict(), reference.state_dict(), "after 3 steps")


class Block(nn.Module):
    """The serial reference of ParallelTransformerBlock (same parameter names as its full_state_dict)."""

    def __init__(self, seed=0):
        super().__init__()
        self.attention = make_attention(seed)
        self.fc1 = randomized(nn.Linear(EMBED, HIDDEN), seed + 1)
        self.fc2 = randomized(nn.Linear(HIDDEN, EMBED), seed + 2)
        self.norm1 = randomized(nn.LayerNorm(EMBED), seed + 3)
        self.norm2 = randomized(nn.LayerNorm(EMBED), seed + 4)

    def forward(self, x, **mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False, **mask)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def parallel(self, comm, **kwargs):
        parts = copy.deepcopy([self.attention, self.fc1, self.fc2, self.norm1, self.norm2])
        return ParallelTransformerBlock(*parts, comm, **kwargs)


def expected_block_grads(comm, reference):
    expected = expected_attention_grads(comm, reference.attention, "attention.")
    expected.update({"mlp.fc1.weight": my_shard(comm, reference.fc1.weight.grad, 0),
                     "mlp.fc1.bias": my_shard(comm, reference.fc1.bias.grad, 0),
                     "mlp.fc2.weight": my_shard(comm, reference.fc2.weight.grad, 1),
                     "mlp.fc2.bias": reference.fc2.bias.grad})
    expected.update({f"{name}.{key}": param.grad for name in ("norm1", "norm2")
                     for key, param in getattr(reference, name).named_parameters()})
    return expected


@pytest.mark.mpi
def test_transformer_block_equals_unsplit(comm):
    reference = Block()
    block = reference.parallel(comm)
    optimizers = [sgd(model) for model in (reference, block)]
    full_kwargs, parallel_kwargs = masks("causal")
    for step in range(2):
        x_full = random(BATCH, LENGTH, EMBED, seed=10 + step).requires_grad_()
        x_split = x_full.detach().clone().requires_grad_()
        grad_output = random(BATCH, LENGTH, EMBED, seed=20 + step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        expected = reference(x_full, **full_kwargs)
        expected.backward(grad_output)
        output = block(x_split, **parallel_kwargs)
        output.backward(grad_output)
        assert_close_all_ranks(comm, output, expected, **TOLERANCE, what=f"step {step} output")
        assert_close_all_ranks(comm, x_split.grad, x_full.grad, **TOLERANCE, what=f"step {step} input gradient")
        assert_gradients(comm, block, expected_block_grads(comm, reference), f"step {step}")
        # The replicated LayerNorms need no reduction: their gradients are the same bits on every rank.
        norms = [param.grad for name, param in block.named_parameters() if name.startswith("norm")]
        every_rank = comm.allgather(norms)
        assert_all_ranks(comm, all(torch.equal(mine, first) for mine, first in zip(norms, every_rank[0])),
                         f"step {step}: LayerNorm gradients differ from rank 0's")
        for optimizer in optimizers:
            optimizer.step()
    assert_state(comm, block.full_state_dict(), reference.state_dict(), "after 2 steps")


@pytest.mark.mpi
@pytest.mark.parametrize("module, allreduces", [("attention", 1), ("block", 2)])
def test_allreduces_each_way(comm, monkeypatch, module, allreduces):
    p = comm.Get_size()
    layer = ParallelSelfAttention(make_attention(), comm) if module == "attention" else Block().parallel(comm)
    calls = count_tensor_calls(monkeypatch)
    output = layer(random(BATCH, LENGTH, EMBED).requires_grad_(), is_causal=True)
    forward_calls, forward_stats = list(calls), layer.stats.take()
    calls.clear()
    output.sum().backward()
    backward_calls, backward_stats = list(calls), layer.stats.take()
    count = allreduces if p > 1 else 0
    assert_all_ranks(comm, forward_calls == ["allreduce_"] * count and backward_calls == ["iallreduce_"] * count,
                     f"forward {forward_calls}, backward {backward_calls}")
    expected_bytes = count * 2 * (p - 1) / p * BATCH * LENGTH * EMBED * 8
    assert_all_ranks(comm, math.isclose(forward_stats.bytes_sent, expected_bytes, abs_tol=1e-9) and
                     math.isclose(backward_stats.bytes_sent, expected_bytes, abs_tol=1e-9),
                     f"bytes {forward_stats.bytes_sent}, {backward_stats.bytes_sent}; expected {expected_bytes}")


@pytest.mark.mpi(min_size=2)
def test_heads_the_group_cannot_split_raise_on_every_rank(comm):
    p = comm.Get_size()
    with pytest.raises(ValueError, match=rf"{p + 1} attention heads cannot be split evenly over {p} tensor-parallel"):
        ParallelSelfAttention(make_attention(embed=2 * (p + 1), heads=p + 1), comm)
    assert_comm_still_usable(comm)


@pytest.mark.mpi
def test_unsupported_or_mismatched_modules_raise_on_every_rank(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    with pytest.raises(ValueError, match=r"dropout=0\.1 is not supported: .*per-rank RNG streams"):
        ParallelSelfAttention(make_attention(dropout=0.1), comm)
    with pytest.raises(ValueError, match="batch_first=True"):
        ParallelSelfAttention(nn.MultiheadAttention(EMBED, HEADS), comm)
    with pytest.raises(ValueError, match="kdim 8 / vdim 8 differ from embed_dim 24"):
        ParallelSelfAttention(nn.MultiheadAttention(EMBED, HEADS, kdim=8, vdim=8, batch_first=True), comm)
    with pytest.raises(ValueError, match="add_bias_kv"):
        ParallelSelfAttention(nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True, batch_first=True), comm)
    with pytest.raises(TypeError, match=r"must be an nn.MultiheadAttention, got Linear \[failed on rank 0\]"):
        ParallelSelfAttention(nn.Linear(2, 2) if rank == 0 else make_attention(), comm)
    if p > 1:
        with pytest.raises(ValueError, match="ranks were given different nn.MultiheadAttention"):
            ParallelSelfAttention(make_attention(embed=EMBED * (1 + (rank == 1))), comm)
    reference = Block()
    with pytest.raises(ValueError, match=r"embed dim is 24 but norm2 \(12,\), fc1 input \(12,\)"):
        ParallelTransformerBlock(reference.attention, nn.Linear(12, HIDDEN), reference.fc2, reference.norm1,
                                 nn.LayerNorm(12), comm)
    with pytest.raises(TypeError, match="norm1 must be an nn.LayerNorm, got Identity"):
        ParallelTransformerBlock(reference.attention, reference.fc1, reference.fc2, nn.Identity(), reference.norm2,
                                 comm)
    assert_comm_still_usable(comm)
