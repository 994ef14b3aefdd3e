"""Tensor parallelism against the unsplit layers, computed on every rank from the same seed.

The equality tests run on CPU and, where a GPU exists, on CUDA (the ``device`` fixture,
``tests/conftest.py``): layers and inputs are made on CPU from the seed and moved there.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpi_helpers import assert_all_ranks, assert_close_all_ranks, assert_comm_still_usable, count_tensor_calls
from mpipar.comm import mpi_tensor
from mpipar.tensor_parallel import (
    ColumnParallelLinear,
    ParallelMLP,
    RowParallelLinear,
    copy_to_parallel,
    gather_from_parallel,
    reduce_from_parallel,
    scatter_to_parallel,
    shard_bounds,
    shard_size,
    vocab_parallel_cross_entropy,
)
from mpipar.tensor_parallel import layers as tp_layers

BATCH = 7
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def make_linear(in_features, out_features, dtype=torch.float64, seed=0, bias=True, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype).to(device)


def random(*shape, dtype=torch.float64, seed=1, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def my_shard(tensor, comm, dim=-1):
    """This rank's equal shard of ``tensor`` along ``dim``."""
    width = tensor.shape[dim] // comm.Get_size()
    return tensor.narrow(dim, comm.Get_rank() * width, width)


def test_shard_rule():
    assert shard_size(34, 2) == 17 and shard_size(13, 4, pad=True) == 4
    assert [shard_bounds(13, 4, rank, pad=True) for rank in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert shard_bounds(5, 4, 3, pad=True) == (5, 5)  # padding only
    with pytest.raises(ValueError, match=r"13 features cannot be split evenly over 4 .*13 = 3 x 4 \+ 1"):
        shard_size(13, 4)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_linear_equals_unsplit(comm, dtype, gather_output, device):
    p = comm.Get_size()
    full = make_linear(13 * p, 17 * p, dtype, device=device)
    layer = ColumnParallelLinear(full, comm, gather_output=gather_output)
    x_full = random(BATCH, 13 * p, dtype=dtype, device=device).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    grad_output = random(BATCH, 17 * p, dtype=dtype, seed=2, device=device)
    expected = full(x_full)
    expected.backward(grad_output)
    output = layer(x_split)
    output.backward(grad_output if gather_output else my_shard(grad_output, comm))
    tolerance = TOLERANCE[dtype]
    assert_close_all_ranks(comm, output, expected if gather_output else my_shard(expected, comm), **tolerance,
                           what="output")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, **tolerance, what="input gradient")
    assert_close_all_ranks(comm, layer.weight.grad, my_shard(full.weight.grad, comm, 0), **tolerance, what="dW")
    assert_close_all_ranks(comm, layer.bias.grad, my_shard(full.bias.grad, comm, 0), **tolerance, what="db")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear_equals_unsplit(comm, dtype, input_is_parallel, device):
    p = comm.Get_size()
    full = make_linear(13 * p, 17 * p, dtype, device=device)
    layer = RowParallelLinear(full, comm, input_is_parallel=input_is_parallel)
    x_full = random(BATCH, 13 * p, dtype=dtype, device=device).requires_grad_()
    x_split = (my_shard(x_full, comm) if input_is_parallel else x_full).detach().clone().requires_grad_()
    grad_output = random(BATCH, 17 * p, dtype=dtype, seed=2, device=device)
    expected = full(x_full)
    expected.backward(grad_output)
    output = layer(x_split)
    output.backward(grad_output)
    tolerance = TOLERANCE[dtype]
    assert_close_all_ranks(comm, output, expected, **tolerance, what="output")
    assert_close_all_ranks(comm, x_split.grad, my_shard(x_full.grad, comm) if input_is_parallel else x_full.grad,
                           **tolerance, what="input gradient")
    assert_close_all_ranks(comm, layer.weight.grad, my_shard(full.weight.grad, comm), **tolerance, what="dW")
    assert_close_all_ranks(comm, layer.bias.grad, full.bias.grad, **tolerance, what="db")


@pytest.mark.mpi
def test_full_state_dict_gathers_the_unsplit_layers(comm, device):
    p = comm.Get_size()
    full = make_linear(13 * p, 17 * p, device=device)
    column, row = ColumnParallelLinear(full, comm), RowParallelLinear(full, comm)
    padded = ColumnParallelLinear(make_linear(5, 13, seed=3, device=device), comm, pad_output=True)
    no_bias = RowParallelLinear(make_linear(4 * p, 3, bias=False, device=device), comm)
    ok = all(torch.equal(layer.full_state_dict()["weight"], full.weight) and
             torch.equal(layer.full_state_dict()["bias"], full.bias) for layer in (column, row))
    ok = ok and torch.equal(padded.full_state_dict()["weight"], make_linear(5, 13, seed=3, device=device).weight)
    ok = ok and list(no_bias.full_state_dict()) == ["weight"]
    assert_all_ranks(comm, ok, "full_state_dict differs from the unsplit layer")


@pytest.mark.mpi
def test_padded_column_layer_with_gathered_output_equals_unsplit(comm, device):
    full = make_linear(6, 13, device=device)  # 13 classes: padded to a multiple of 2, 3 and 4
    layer = ColumnParallelLinear(full, comm, gather_output=True, pad_output=True)
    x = random(BATCH, 6, device=device)
    expected = full(x)
    expected.sum().backward()
    output = layer(x)
    output.sum().backward()
    start, stop = shard_bounds(13, comm.Get_size(), comm.Get_rank(), pad=True)
    real = stop - start
    assert_close_all_ranks(comm, output, expected, rtol=1e-10, atol=1e-12, what="output")
    assert_close_all_ranks(comm, layer.weight.grad[:real], full.weight.grad[start:stop], rtol=1e-10, atol=1e-12,
                           what="dW")
    assert_all_ranks(comm, not layer.weight.grad[real:].any(), "padding rows received a gradient")


@pytest.mark.mpi
def test_mappings_are_conjugate_pairs(comm, device):
    p, rank = comm.Get_size(), comm.Get_rank()
    x = torch.arange(4.0 * p, dtype=torch.float64, device=device).reshape(2, 2 * p).requires_grad_()
    copy_to_parallel(x, comm).mul(rank + 1).sum().backward()
    ok = torch.equal(x.grad, torch.full_like(x, p * (p + 1) / 2))
    x.grad = None
    reduced = reduce_from_parallel(x * (rank + 1), comm)
    reduced.sum().backward()
    ok = ok and torch.equal(reduced, x.detach() * p * (p + 1) / 2) and torch.equal(x.grad, torch.full_like(x, rank + 1))
    x.grad = None
    shard = scatter_to_parallel(x, comm)
    gathered = gather_from_parallel(shard * 2, comm)
    gathered.sum().backward()
    ok = ok and torch.equal(shard, my_shard(x.detach(), comm)) and torch.equal(gathered, 2 * x.detach())
    ok = ok and torch.equal(x.grad, torch.full_like(x, 2.0))
    assert_all_ranks(comm, ok, "a mapping's forward or backward is wrong")


def mlp_pair(comm, width=6, hidden_per_rank=5, device="cpu"):
    """Full fc1/fc2 and the same block split over ``comm`` (hidden = hidden_per_rank * p)."""
    hidden = hidden_per_rank * comm.Get_size()
    fc1, fc2 = make_linear(width, hidden, seed=4, device=device), make_linear(hidden, width, seed=5, device=device)
    reference = nn.Sequential(copy.deepcopy(fc1), nn.GELU(), copy.deepcopy(fc2))
    return reference, ParallelMLP(fc1, fc2, comm)


@pytest.mark.mpi
def test_parallel_mlp_training_equals_unsplit(comm, device):
    reference, mlp = mlp_pair(comm, device=device)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) for model in (reference, mlp)]
    target = random(BATCH, 6, seed=6, device=device)
    for step in range(3):
        x_full = random(BATCH, 6, seed=10 + step, device=device).requires_grad_()
        x_split = x_full.detach().clone().requires_grad_()
        outputs = []
        for model, x, optimizer in zip((reference, mlp), (x_full, x_split), optimizers):
            optimizer.zero_grad()
            output = model(x)
            F.mse_loss(output, target).backward()
            outputs.append(output)
        assert_close_all_ranks(comm, outputs[1], outputs[0], rtol=1e-10, atol=1e-12, what=f"step {step} output")
        assert_close_all_ranks(comm, x_split.grad, x_full.grad, rtol=1e-10, atol=1e-12, what=f"step {step} dx")
        pairs = [(mlp.fc1.weight, my_shard(reference[0].weight.grad, comm, 0)),
                 (mlp.fc1.bias, my_shard(reference[0].bias.grad, comm, 0)),
                 (mlp.fc2.weight, my_shard(reference[2].weight.grad, comm)), (mlp.fc2.bias, reference[2].bias.grad)]
        for index, (param, expected) in enumerate(pairs):
            assert_close_all_ranks(comm, param.grad, expected, rtol=1e-10, atol=1e-12,
                                   what=f"step {step} gradient {index}")
        for optimizer in optimizers:
            optimizer.step()
    gathered = mlp.full_state_dict()
    for name, value in reference.state_dict().items():
        name = name.replace("0.", "fc1.").replace("2.", "fc2.")
        assert_close_all_ranks(comm, gathered[name], value, rtol=1e-10, atol=1e-12, what=name)


@pytest.mark.mpi
def test_parallel_mlp_communicates_one_allreduce_each_way(comm, monkeypatch):
    p, width = comm.Get_size(), 6
    _, mlp = mlp_pair(comm, width=width)
    calls = count_tensor_calls(monkeypatch)
    x = random(BATCH, width).requires_grad_()
    output = mlp(x)
    forward_calls, forward_stats = list(calls), mlp.stats.take()
    calls.clear()
    output.sum().backward()
    backward_calls, backward_stats = list(calls), mlp.stats.take()
    one = 1 if p > 1 else 0
    assert_all_ranks(comm, forward_calls == ["allreduce_"] * one and backward_calls == ["iallreduce_"] * one,
                     f"forward {forward_calls}, backward {backward_calls}")
    expected_bytes = 2 * (p - 1) / p * BATCH * width * 8
    assert_all_ranks(comm, math.isclose(forward_stats.bytes_sent, expected_bytes, abs_tol=1e-9) and
                     math.isclose(backward_stats.bytes_sent, expected_bytes, abs_tol=1e-9),
                     f"bytes {forward_stats.bytes_sent}, {backward_stats.bytes_sent}; expected {expected_bytes}")


@pytest.mark.mpi
def test_column_backward_starts_the_allreduce_before_dw_and_waits_after(comm, monkeypatch):
    """The overlap, checked by order (timings on a busy 2-core machine would be flaky)."""
    p = comm.Get_size()
    layer = ColumnParallelLinear(make_linear(3 * p, 4 * p), comm)
    events = []
    start_allreduce, weight_gradient = mpi_tensor.iallreduce_, tp_layers._weight_gradient

    def start(*args, **kwargs):
        pending = start_allreduce(*args, **kwargs)
        events.append("start")
        wait = pending.wait
        pending.wait = lambda: (events.append("wait"), wait())[1]
        return pending

    monkeypatch.setattr(mpi_tensor, "iallreduce_", start)
    monkeypatch.setattr(tp_layers, "_weight_gradient", lambda *args: (events.append("dW"), weight_gradient(*args))[1])
    layer(random(BATCH, 3 * p).requires_grad_()).sum().backward()
    expected = ["start", "dW", "wait"] if p > 1 else ["dW"]
    assert_all_ranks(comm, events == expected, f"backward order {events}, expected {expected}")


@pytest.mark.mpi
@pytest.mark.parametrize("classes", ["6p", 13, 5])  # 13 and 5: uneven at p = 2..4; 5 at p = 4: a rank of padding
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_vocab_parallel_cross_entropy_equals_unsplit(comm, classes, scale, device):
    p = comm.Get_size()
    num_classes = 6 * p if classes == "6p" else classes
    width = shard_size(num_classes, p, pad=True)
    logits = (random(BATCH, num_classes, device=device) * scale).requires_grad_()
    target = torch.arange(BATCH, device=device) * 5 % num_classes
    target[0] = num_classes - 1
    garbage = random(BATCH, width * p - num_classes, seed=3, device=device) * 1e5  # padding logits: must be ignored
    padded = torch.cat([logits.detach(), garbage], dim=-1)
    local = my_shard(padded, comm).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, comm, num_classes=num_classes)
    loss.backward()
    expected = F.cross_entropy(logits, target)
    expected.backward()
    expected_grad = my_shard(torch.cat([logits.grad, torch.zeros_like(garbage)], dim=-1), comm)
    assert_close_all_ranks(comm, loss, expected, rtol=1e-10, atol=1e-12, what="loss")
    assert_close_all_ranks(comm, local.grad, expected_grad, rtol=1e-10, atol=1e-12, what="logits gradient")
    per_sample = vocab_parallel_cross_entropy(local.detach(), target, comm, num_classes=num_classes, reduction="none")
    assert_close_all_ranks(comm, per_sample, F.cross_entropy(logits.detach(), target, reduction="none"),
                           rtol=1e-10, atol=1e-12, what="per-sample losses")


@pytest.mark.mpi
def test_padded_classifier_with_split_cross_entropy_equals_unsplit(comm, device):
    head = make_linear(6, 13, seed=7, device=device)
    layer = ColumnParallelLinear(head, comm, pad_output=True)
    x_full = random(BATCH, 6, device=device).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    target = torch.arange(BATCH, device=device) * 3 % 13
    expected = F.cross_entropy(head(x_full) * 100, target)
    expected.backward()
    loss = vocab_parallel_cross_entropy(layer(x_split) * 100, target, comm, num_classes=layer.out_features)
    loss.backward()
    start, stop = shard_bounds(13, comm.Get_size(), comm.Get_rank(), pad=True)
    assert_close_all_ranks(comm, loss, expected, rtol=1e-10, atol=1e-12, what="loss")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, rtol=1e-10, atol=1e-12, what="input gradient")
    assert_close_all_ranks(comm, layer.weight.grad[:stop - start], head.weight.grad[start:stop], rtol=1e-10,
                           atol=1e-12, what="dW")


@pytest.mark.mpi(min_size=2)
def test_sizes_the_group_cannot_split_raise_on_every_rank(comm):
    p = comm.Get_size()
    with pytest.raises(ValueError, match=rf"ColumnParallelLinear output \({13 * p}->{17 * p + 1}\).* over {p} "):
        ColumnParallelLinear(make_linear(13 * p, 17 * p + 1), comm)
    with pytest.raises(ValueError, match=rf"RowParallelLinear input \({13 * p + 1}->{17 * p}\).* over {p} "):
        RowParallelLinear(make_linear(13 * p + 1, 17 * p), comm)
    with pytest.raises(ValueError, match=rf"{5 * p + 1} features cannot be split evenly over {p} "):
        ParallelMLP(make_linear(6, 5 * p + 1), make_linear(5 * p + 1, 6), comm)
    with pytest.raises(ValueError, match=rf"logits of 4 classes per rank do not fit {4 * p + 5} classes over {p} "):
        vocab_parallel_cross_entropy(torch.zeros(BATCH, 4), torch.zeros(BATCH, dtype=torch.long), comm,
                                     num_classes=4 * p + 5)
    assert_comm_still_usable(comm)


@pytest.mark.mpi
def test_mismatched_layers_raise_on_every_rank(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    with pytest.raises(ValueError, match="fc1 has 10 outputs but fc2 has 12 inputs"):
        ParallelMLP(make_linear(6, 10), make_linear(12, 6), comm)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        ColumnParallelLinear(nn.Linear(2 * p, 2 * p) if rank else nn.Identity(), comm)
    if p > 1:
        with pytest.raises(ValueError, match=rf"different shapes \(rank 0: full {2 * p}->{2 * p}; rank 1: full"):
            RowParallelLinear(make_linear(2 * p, 2 * p * (1 + rank)), comm)
    assert_comm_still_usable(comm)


def user_mlp():
    """Entries holding other activations than ReLU, and a dropout on a pair's (replicated) output."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(6, 12), nn.GELU()),
                         nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Dropout(0.3)),
                         nn.Sequential(nn.Linear(5, 24), nn.SiLU()), nn.Linear(24, 3)).double()


@pytest.mark.mpi
def test_split_mlp_keeps_the_models_activations_and_dropout(comm):
    """Training mode: the pair's output is replicated, so its dropout draws the same mask as the unsplit model's
    (same seed, same draws before it); outputs and input gradients equal the unsplit model's."""
    from mpipar.comm.reducer import CommStats
    from mpipar.tensor_parallel.strategy import split_mlp

    reference = user_mlp()
    split = split_mlp(user_mlp(), comm, CommStats())
    kept = [type(module).__name__ for module in split.modules()
            if not isinstance(module, (nn.Sequential, ParallelMLP, ColumnParallelLinear, RowParallelLinear))]
    assert_all_ranks(comm, kept == ["Flatten", "GELU", "Tanh", "Dropout", "SiLU"], f"{kept}")
    x_full = random(BATCH, 2, 3, seed=7).requires_grad_()
    x_split = x_full.detach().clone().requires_grad_()
    outputs = []
    for model, x in ((reference, x_full), (split, x_split)):
        torch.manual_seed(11)
        output = model(x)
        output.square().sum().backward()
        outputs.append(output)
    assert_close_all_ranks(comm, outputs[1], outputs[0], rtol=1e-10, atol=1e-12, what="output")
    assert_close_all_ranks(comm, x_split.grad, x_full.grad, rtol=1e-10, atol=1e-12, what="input gradient")


@pytest.mark.mpi
@pytest.mark.parametrize("between, named", [(nn.Softmax(dim=1), "Softmax"), (nn.Dropout(0.1), "Dropout"),
                                            (nn.LayerNorm(12), "LayerNorm")])
def test_split_mlp_refuses_what_cannot_act_on_split_features(comm, between, named):
    """Between a pair's column- and row-parallel layers each rank holds part of the hidden features:
    only element-wise, deterministic modules without parameters can run there."""
    from mpipar.comm.reducer import CommStats
    from mpipar.tensor_parallel.strategy import split_mlp

    model = nn.Sequential(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), between), nn.Linear(12, 3))
    with pytest.raises(ValueError, match=rf"model\[0\]\[2\] \({named}\)"):
        split_mlp(model, comm, CommStats())
    assert_comm_still_usable(comm)
