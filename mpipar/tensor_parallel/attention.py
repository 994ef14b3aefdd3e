"""Tensor-parallel self-attention (heads split over the group) and a pre-norm transformer block."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.reducer import CommStats
from mpipar.diagnostics.agree import gather_checked
from mpipar.diagnostics.failure import agreed
from mpipar.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpipar.tensor_parallel.mlp import ParallelMLP
from mpipar.tensor_parallel.partition import shard_size
from mpipar.tensor_parallel.random import TensorParallelRNG, split_dropout

__all__ = ["AttentionCore", "ParallelSelfAttention", "ParallelTransformerBlock"]


def _attention_config(full: Any) -> Dict[str, Any]:
    """What has to be equal on every rank (and supported) about an ``nn.MultiheadAttention``; local."""
    if not isinstance(full, nn.MultiheadAttention):
        raise TypeError(f"full must be an nn.MultiheadAttention, got {type(full).__name__}")
    weight = full.in_proj_weight if full._qkv_same_embed_dim else full.q_proj_weight
    return {"embed_dim": full.embed_dim, "num_heads": full.num_heads, "kdim": full.kdim, "vdim": full.vdim,
            "in_proj_bias": full.in_proj_bias is not None, "out_proj_bias": full.out_proj.bias is not None,
            "add_bias_kv": full.bias_k is not None, "add_zero_attn": bool(full.add_zero_attn),
            "dropout": float(full.dropout), "batch_first": bool(full.batch_first), "dtype": str(weight.dtype)}


def _agree_on_attention(comm: MPI.Intracomm, full: nn.MultiheadAttention, what: str,
                        rng: Optional[TensorParallelRNG] = None) -> Dict[str, Any]:
    """:func:`_attention_config` (and whether an RNG tracker was given) checked on every rank and compared
    across ranks (one small allgather); then the configurations this layer cannot split, refused. Every
    error is raised on every rank."""

    def local_config():
        if rng is not None and not isinstance(rng, TensorParallelRNG):
            raise TypeError(f"rng must be a TensorParallelRNG, got {type(rng).__name__}")
        found = _attention_config(full)
        found["rng group size"] = None if rng is None else rng.size
        return found

    every_rank = gather_checked(comm, local_config, what)
    config = every_rank[0]
    differing = [rank for rank, found in enumerate(every_rank) if found != config]
    if differing:
        listed = "; ".join(f"rank {rank}: {every_rank[rank]}" for rank in [0, *differing[:3]])
        raise agreed(ValueError)(f"{what}: the ranks were given different nn.MultiheadAttention modules ({listed}); "
                                 f"build the full module identically on every rank")
    unsupported = []
    if config["kdim"] != config["embed_dim"] or config["vdim"] != config["embed_dim"]:
        unsupported.append(f"kdim {config['kdim']} / vdim {config['vdim']} differ from embed_dim "
                           f"{config['embed_dim']} (self-attention needs one fused q/k/v projection)")
    if config["add_bias_kv"] or config["add_zero_attn"]:
        unsupported.append("add_bias_kv / add_zero_attn are not supported")
    if not config["batch_first"]:
        unsupported.append("it must be built with batch_first=True (inputs are (batch, sequence, embed))")
    if unsupported:
        raise agreed(ValueError)(f"{what}: cannot split this nn.MultiheadAttention: " + "; ".join(unsupported))
    size = comm.Get_size()
    if config["dropout"] > 0 and rng is None:
        raise agreed(ValueError)(
            f"{what}: dropout={config['dropout']} is not supported: without rng=, dropout inside a split region "
            f"needs per-rank RNG streams (each rank drops different heads' probabilities) besides the one "
            f"shared by the replicated regions; pass rng=TensorParallelRNG(comm, seed), or build the "
            f"nn.MultiheadAttention with dropout=0.0")
    if rng is not None and config["rng group size"] != size:
        raise agreed(ValueError)(f"{what}: rng was built over a group of {config['rng group size']} ranks, "
                                 f"the attention over {size}; build it over the same tensor-parallel group")
    config.pop("rng group size")
    heads = config["num_heads"]
    try:
        shard_size(heads, size, what=what)
    except ValueError:
        raise agreed(ValueError)(
            f"{what}: {heads} attention heads cannot be split evenly over {size} tensor-parallel ranks "
            f"({heads} = {heads // size} x {size} + {heads % size}); use a number of heads that is a "
            f"multiple of {size}, or a tensor-parallel size that divides {heads}") from None
    return config


def _qkv_order(embed_dim: int, size: int) -> torch.Tensor:
    """Row order of the fused q/k/v projection such that rank r's contiguous shard of ``3 E / p`` rows is
    ``[q rows of its heads; k rows; v rows]``: position ``i`` of the permuted weight holds row ``order[i]``
    of ``in_proj_weight``."""
    return torch.arange(3 * embed_dim).view(3, size, embed_dim // size).transpose(0, 1).reshape(-1)


class AttentionCore(nn.Module):
    """``softmax(q k^T / sqrt(d) + mask) v`` of this rank's heads: no parameters, no communication, the
    memory-heavy part of attention that ``--recompute selective`` recomputes (``recompute_unit``). In
    training with ``dropout > 0`` the probabilities are dropped with ``rng``'s split stream (this rank's
    heads' part of the full model's mask), written out in ``nn.MultiheadAttention``'s order so the mask
    is drawn over ``(batch, h/p, T, T)``; otherwise ``scaled_dot_product_attention``. Local."""

    recompute_unit = "attention"

    def __init__(self, head_dim: int, dropout: float, rng: Optional[TensorParallelRNG]):
        super().__init__()
        self.head_dim, self.dropout, self.rng = head_dim, dropout, rng

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                is_causal: bool) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        scores = q.matmul(k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if is_causal:
            length = q.shape[-2]
            causal = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probabilities = split_dropout(torch.softmax(scores, dim=-1), self.dropout, self.rng)
        return probabilities.matmul(v)


class ParallelSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention with its heads split over ``comm``.

    Rank r holds heads ``[r h/p, (r+1) h/p)``: their rows of the q, k and v projections,
    as one :class:`ColumnParallelLinear` (the rows of ``in_proj_weight`` permuted so that
    each rank's contiguous shard is its q, k and v rows), and the matching columns of
    ``out_proj``, as a :class:`RowParallelLinear` taking the split heads. The attention of
    a head needs only that head's q, k and v, so from the replicated input ``x`` every
    rank computes its heads' outputs without communicating; the row-parallel projection
    sums the partial products (one Allreduce forward). Backward: one Allreduce of the
    input gradient, overlapped with the q/k/v weight gradient. Both move batch x sequence
    x embed elements.

    Supported: ``batch_first=True``, one embed dim for q, k and v, with or without
    biases, no ``add_bias_kv`` / ``add_zero_attn``. Dropout of the attention probabilities
    (``full.dropout > 0``, in training mode) needs ``rng``: the probabilities are split by
    heads, so each rank drops its heads' with its own mask, drawn inside
    ``rng.split_region()``; the result is the unsplit attention with the full mask made
    of the ranks' masks (head blocks in rank order). Without ``rng`` it is refused.

    Collective contract: every rank of ``comm`` builds the layer together from a full
    module of the same configuration (one small allgather checks it, before any
    tensor is communicated) and the same values (the caller's part: same seed or
    checkpoint), then runs forward and backward together on the same replicated input
    shape. Size 1: the unsplit attention, nothing communicated.

    Args:
        full: the unsplit module (copied; not modified).
        comm: the tensor-parallel group.
        stats: where the time blocked in MPI and the bytes sent accumulate (default: a new
            :class:`CommStats`, ``self.stats``).
        rng: the group's :class:`~mpipar.tensor_parallel.random.TensorParallelRNG`, needed
            for ``dropout > 0`` (given on every rank or on none).

    Raises:
        TypeError: on every rank, when some rank's ``full`` is not an ``nn.MultiheadAttention``.
        ValueError: on every rank, when the configurations differ between ranks, one is not
            supported (above), ``dropout > 0`` without ``rng``, or p does not divide the number
            of heads.
    """

    def __init__(self, full: nn.MultiheadAttention, comm: MPI.Intracomm, *, stats: Optional[CommStats] = None,
                 rng: Optional[TensorParallelRNG] = None):
        super().__init__()
        what = "ParallelSelfAttention"
        config = _agree_on_attention(comm, full, what, rng)
        self.dropout, self.rng = config["dropout"], rng
        self.core = AttentionCore(config["embed_dim"] // config["num_heads"], self.dropout, rng)
        size = comm.Get_size()
        self.comm = comm
        self.embed_dim, self.num_heads = config["embed_dim"], config["num_heads"]
        self.head_dim = self.embed_dim // self.num_heads
        self.heads_per_rank = self.num_heads // size
        self.first_head = comm.Get_rank() * self.heads_per_rank
        self.stats = CommStats() if stats is None else stats
        order = _qkv_order(self.embed_dim, size).to(full.in_proj_weight.device)
        weight = full.in_proj_weight
        # skip_init: the fused layer is filled below, so it draws nothing from the caller's random stream
        fused = nn.utils.skip_init(nn.Linear, self.embed_dim, 3 * self.embed_dim, bias=full.in_proj_bias is not None,
                                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(weight[order])
            if full.in_proj_bias is not None:
                fused.bias.copy_(full.in_proj_bias[order])
        self.qkv = ColumnParallelLinear(fused, comm, gather_output=False, stats=self.stats)
        self.out_proj = RowParallelLinear(full.out_proj, comm, input_is_parallel=True, stats=self.stats)

    def forward(self, x: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """``full(x, x, x, attn_mask=attn_mask, need_weights=False)[0]``, on every rank.

        Args:
            x: the replicated input, ``(batch, sequence, embed)``.
            attn_mask: as in ``nn.MultiheadAttention``: ``(T, T)`` or ``(batch * num_heads, T, T)``
                (this rank uses its heads' slices); boolean True = not allowed to attend, or
                float, added to the scores.
            is_causal: apply the causal mask (no ``attn_mask`` needed; one given with it is
                taken to be the causal mask and not used, as ``nn.MultiheadAttention`` does).

        Collective over ``comm``: one Allreduce forward, one in backward.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise agreed(ValueError)(f"ParallelSelfAttention: expected input (batch, sequence, {self.embed_dim}), "
                                     f"got {tuple(x.shape)}")
        batch, length, _ = x.shape
        local = self.heads_per_rank
        q, k, v = self.qkv(x).view(batch, length, 3, local, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if is_causal else self._local_mask(attn_mask, batch, length, x.dtype)
        heads = self.core(q, k, v, mask, is_causal)  # (B, h/p, T, d)
        return self.out_proj(heads.transpose(1, 2).reshape(batch, length, local * self.head_dim))

    def _local_mask(self, mask: Optional[torch.Tensor], batch: int, length: int,
                    dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``nn.MultiheadAttention``'s mask as ``scaled_dot_product_attention`` takes it, for this rank's heads."""
        if mask is None:
            return None
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise agreed(ValueError)(f"ParallelSelfAttention: attn_mask must be bool or floating, got {mask.dtype}")
        shapes = [(length, length), (batch * self.num_heads, length, length)]
        if tuple(mask.shape) not in shapes:
            raise agreed(ValueError)(f"ParallelSelfAttention: attn_mask of shape {tuple(mask.shape)}; expected one of "
                                     f"{shapes}")
        if mask.dtype == torch.bool:  # True = masked out, as nn.MultiheadAttention converts it
            mask = torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
        if mask.dim() == 3:
            heads = slice(self.first_head, self.first_head + self.heads_per_rank)
            return mask.view(batch, self.num_heads, length, length)[:, heads]
        return mask

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsplit module's ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
        ``out_proj.bias`` (the biases where it has them), on every rank, in
        ``nn.MultiheadAttention``'s layout (the q/k/v row permutation undone).

        Collective: every rank of ``comm`` calls it together (an all-gather per tensor;
        a copy at size 1).
        """
        qkv = self.qkv.full_state_dict()
        inverse = torch.argsort(_qkv_order(self.embed_dim, self.comm.Get_size()))
        state = {f"in_proj_{key}": value[inverse.to(value.device)] for key, value in qkv.items()}
        state.update({f"out_proj.{key}": value for key, value in self.out_proj.full_state_dict().items()})
        return state

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, heads_per_rank={self.heads_per_rank}, "
                f"first_head={self.first_head}, dropout={self.dropout}")


class ParallelTransformerBlock(nn.Module):
    """Pre-norm transformer block ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` split over ``comm``
    (a ``recompute_unit``: ``--recompute full`` checkpoints it whole, its Allreduces repeated in the backward).

    The attention is a :class:`ParallelSelfAttention` (heads split), the MLP a
    :class:`~mpipar.tensor_parallel.mlp.ParallelMLP` (hidden features split); the
    LayerNorms and the residual stream are replicated: ordinary modules, whose inputs
    and output gradients are the same on every rank, so their gradients are too and
    need no reduction. Two Allreduces forward and two backward per block, each of
    batch x sequence x embed elements; all share one :class:`CommStats`, ``self.stats``.

    Collective contract: every rank of ``comm`` builds the block together from full
    modules of the same shapes and values, then runs forward and backward together on
    replicated inputs of the same shape. Size 1: the unsplit block, no communication.

    Args:
        attention: the full ``nn.MultiheadAttention`` (see :class:`ParallelSelfAttention`).
        fc1, fc2: the full MLP layers (``embed -> hidden -> embed``).
        norm1, norm2: ``nn.LayerNorm`` over the embed dim (copied).
        comm: the tensor-parallel group.
        activation: the MLP's element-wise activation (default: ``nn.GELU()``).
        stats: where the time blocked in MPI and the bytes sent accumulate.
        rng: the group's ``TensorParallelRNG``, for attention dropout (see :class:`ParallelSelfAttention`).
        causal: every forward is causal (a language model's block, as ``TransformerBlock(causal=True)``).

    Raises:
        TypeError: on every rank, when some rank's module has the wrong type.
        ValueError: on every rank, naming the sizes, when shapes differ between ranks or do
            not fit together, or for what :class:`ParallelSelfAttention` and ``ParallelMLP`` refuse.
    """

    recompute_unit = "block"

    def __init__(self, attention: nn.MultiheadAttention, fc1: nn.Linear, fc2: nn.Linear, norm1: nn.LayerNorm,
                 norm2: nn.LayerNorm, comm: MPI.Intracomm, *, activation: Optional[nn.Module] = None,
                 stats: Optional[CommStats] = None, rng: Optional[TensorParallelRNG] = None, causal: bool = False):
        super().__init__()
        what = "ParallelTransformerBlock"
        self.causal = causal

        def norm_shapes():
            for name, norm in (("norm1", norm1), ("norm2", norm2)):
                if not isinstance(norm, nn.LayerNorm):
                    raise TypeError(f"{name} must be an nn.LayerNorm, got {type(norm).__name__}")
            return [(tuple(norm.normalized_shape), norm.weight is not None, norm.bias is not None)
                    for norm in (norm1, norm2)]

        every_rank = gather_checked(comm, norm_shapes, what)
        if any(found != every_rank[0] for found in every_rank):
            listed = "; ".join(f"rank {rank}: {found}" for rank, found in enumerate(every_rank))
            raise agreed(ValueError)(f"{what}: the ranks were given LayerNorms of different shapes ({listed})")
        self.stats = CommStats() if stats is None else stats
        self.attention = ParallelSelfAttention(attention, comm, stats=self.stats, rng=rng)
        self.mlp = ParallelMLP(fc1, fc2, comm, activation, stats=self.stats)
        embed = self.attention.embed_dim
        found = {"norm1": every_rank[0][0][0], "norm2": every_rank[0][1][0],
                 "fc1 input": (self.mlp.fc1.in_features,), "fc2 output": (self.mlp.fc2.out_features,)}
        wrong = [f"{name} {shape}" for name, shape in found.items() if shape != (embed,)]
        if wrong:
            raise agreed(ValueError)(f"{what}: the attention's embed dim is {embed} but " + ", ".join(wrong))
        self.norm1, self.norm2 = copy.deepcopy(norm1), copy.deepcopy(norm2)

    def forward(self, x: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """The block's output ``(batch, sequence, embed)`` on every rank. Collective over ``comm``
        (two Allreduces forward, two in backward)."""
        x = x + self.attention(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal or self.causal)
        return x + self.mlp(self.norm2(x))

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The unsplit block on every rank: ``attention.*`` (``nn.MultiheadAttention``'s keys),
        ``fc1.*``, ``fc2.*``, ``norm1.*``, ``norm2.*``. Collective over ``comm``."""
        state = {f"attention.{key}": value for key, value in self.attention.full_state_dict().items()}
        state.update(self.mlp.full_state_dict())
        for name in ("norm1", "norm2"):
            state.update({f"{name}.{key}": value.detach().clone()
                          for key, value in getattr(self, name).state_dict().items()})
        return state
