"""Tensor parallelism (an MLP's linear layers, or a vision transformer's blocks, split over a group), replicated
with data parallelism."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, Union, cast

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.reducer import CommStats
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.topology import ProcessGrid
from mpipar.comm.wire import wire_dtype
from mpipar.data.arrays import ImageDataset
from mpipar.diagnostics.agree import agree_on, collective_check
from mpipar.diagnostics.failure import agreed
from mpipar.models.vit import TransformerBlock, VisionTransformer
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter
from mpipar.run.recompute import RECOMPUTES, apply_recompute
from mpipar.run.strategy import StepRecord, Strategy
from mpipar.sharded.consolidate import GRID_KEY
from mpipar.sharded.optimizer import ShardedUpdate
from mpipar.sharded.zero import ShardedDataParallel
from mpipar.tensor_parallel.attention import ParallelTransformerBlock
from mpipar.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpipar.tensor_parallel.mlp import ParallelMLP
from mpipar.tensor_parallel.partition import shard_bounds
from mpipar.tensor_parallel.random import TensorParallelRNG

__all__ = ["TensorParallelConfig", "TensorParallelStrategy", "split_mlp", "ELEMENTWISE", "shard_layout", "Splitter",
           "SPLITTERS", "split_vit", "split_transformer", "model_kind", "split_parameters", "full_state_dict"]


@dataclass(frozen=True)
class TensorParallelConfig:
    """``tp``: ranks that split every layer (consecutive ranks); the world size divided by
    it is the number of data-parallel replicas. ``zero``: 1 shards the optimizer state over the
    replicas (ZeRO-1, :class:`~mpipar.sharded.optimizer.ShardedUpdate`), 2 the gradients too
    (:class:`~mpipar.sharded.zero.ShardedDataParallel` over the replicas), 0 nothing. Raises
    ValueError naming the flag."""

    tp: int = 2
    zero: int = 0

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.zero not in (0, 1, 2):
            raise ValueError(f"--zero {self.zero}: tensor parallelism shards over its replicas the optimizer state "
                             f"(--zero 1) and the gradients (--zero 2), or nothing (--zero 0); parameters (--zero 3) "
                             f"are sharded only without a split: --tp 1 (see docs/sharded.md, Grids)")

    def to_dict(self) -> dict:
        """The settings; ``zero`` only when set (checkpoints from before it compare equal)."""
        settings = dataclasses.asdict(self)
        if not settings["zero"]:
            del settings["zero"]
        return settings


ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
               nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold)
"""Modules that may run on split hidden features (between a pair's two layers): element-wise, without
parameters or randomness (these exact types: a subclass may do anything)."""


def split_mlp(model: nn.Sequential, comm: MPI.Intracomm, stats: CommStats,
              rng: Optional[TensorParallelRNG] = None) -> nn.Sequential:
    """``model`` (as :func:`mpipar.models.mlp` builds it: layers without weights such as Flatten,
    then entries each a Linear or a Sequential starting with one) as pairs of linear layers, each pair
    a :class:`ParallelMLP` (column then row parallel). The modules after each linear layer in its entry
    are kept: a pair's first entry's run between its two layers, on split features (only
    :data:`ELEMENTWISE` ones can), its second entry's after the pair, on the replicated output (any
    module without parameters or buffers: a dropout there draws the same mask on every rank, as it must).
    ``rng`` is not needed (no split region holds a draw). Collective over ``comm``.

    Raises:
        ValueError: on every rank, when the model has an odd number of linear layers, a hidden size the
            group's size does not divide (naming the sizes), or a module that cannot be split (naming it).
    """
    head, named = _linear_layers(model)
    linears = [layer for _, layer in named]
    if not linears or len(linears) % 2 or any(layer is None for layer in linears):
        raise agreed(ValueError)(f"tensor parallelism pairs linear layers (column then row parallel); this model "
                                 f"has {len(linears)} linear layers: use an even number")
    following = _after_linears(model, len(head))
    blocks: List[nn.Module] = list(head)
    for index in range(0, len(linears), 2):
        between = following[index]
        activation = between[0] if len(between) == 1 else nn.Sequential(*between) if between else nn.Identity()
        blocks.append(ParallelMLP(linears[index], linears[index + 1], comm, activation, stats=stats))
        blocks.extend(following[index + 1])
    return nn.Sequential(*blocks)


def _linear_layers(model: nn.Sequential):
    """``(head, [(name in model, linear or None), ...])``: the layers before the first linear one
    (Flatten, casts), then every later entry's linear layer (a Linear, or a Sequential's first
    entry) under its name in ``model``'s state dict; None where an entry has none."""
    def linear(layer):
        if isinstance(layer, nn.Sequential) and len(layer):
            return ("0", layer[0]) if isinstance(layer[0], nn.Linear) else None
        return ("", layer) if isinstance(layer, nn.Linear) else None

    layers = list(model)
    first = next((i for i, layer in enumerate(layers) if linear(layer) is not None), len(layers))
    named = []
    for index, layer in enumerate(layers[first:], start=first):
        found = linear(layer)
        named.append((None, None) if found is None else (".".join(filter(None, (str(index), found[0]))), found[1]))
    return layers[:first], named


def _after_linears(model: nn.Sequential, first: int) -> List[List[nn.Module]]:
    """Per entry from ``model[first]`` on, the modules after its linear layer, checked: only
    :data:`ELEMENTWISE` ones after a pair's first layer, nothing with parameters or buffers anywhere
    (neither split nor consolidated). Raises ValueError (agreed: the model is the same on every rank)."""
    following: List[List[nn.Module]] = []
    for index, entry in enumerate(list(model)[first:], start=first):
        rest = list(entry)[1:] if isinstance(entry, nn.Sequential) else []
        for position, module in enumerate(rest, start=1):
            where = f"model[{index}][{position}] ({type(module).__name__})"
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                raise agreed(ValueError)(
                    f"tensor parallelism cannot split {where}: it has parameters or buffers, and split_mlp splits "
                    f"only the linear layers; remove it or keep the model whole")
            if len(following) % 2 == 0 and type(module) not in ELEMENTWISE:
                dropout = isinstance(module, nn.modules.dropout._DropoutNd)
                hint = ("dropout there needs a different mask on each rank: put it after the pair's second linear "
                        "layer, where the output is whole") if dropout else "use an element-wise activation there"
                raise agreed(ValueError)(
                    f"tensor parallelism cannot split {where}: it runs between a column- and a row-parallel layer, "
                    f"where each rank holds part of the hidden features, and only element-wise modules without "
                    f"randomness can ({', '.join(kind.__name__ for kind in ELEMENTWISE)}); {hint}")
        following.append(rest)
    return following


def shard_layout(model: nn.Sequential, split: nn.Module) -> Dict[str, Dict[str, Any]]:
    """How each tensor of ``split`` (``split_mlp(model, ...)``) is cut from ``model``'s: for every
    name in ``split.state_dict()``, ``{"name": the unsplit model's name, "dim": the dimension the
    group's shards are concatenated along (None: the whole tensor on every rank), "size": the unsplit
    size along it (shards beyond it are padding)}``. Plain values, stored in checkpoints so that
    ``mpipar-consolidate`` can merge the ranks' shards. Local."""
    names = [name for name, _ in _linear_layers(model)[1]]
    layers = [(prefix, module) for prefix, module in split.named_modules()
              if isinstance(module, (ColumnParallelLinear, RowParallelLinear))]
    if len(names) != len(layers) or None in names:
        raise ValueError(f"shard_layout: {len(layers)} split linear layers, but the model has {len(names)} entries "
                         f"after its head, not all of them linear")
    layout: Dict[str, Dict[str, Any]] = {}
    for unsplit, (prefix, layer) in zip(names, layers):
        column = isinstance(layer, ColumnParallelLinear)
        for tensor, _ in layer.named_parameters(recurse=False):
            if column:  # rows: output features, possibly padded
                dim, size = 0, layer.out_features
            elif tensor == "weight":  # columns: input features
                dim, size = 1, layer.in_features
            else:  # a row-parallel bias is whole on every rank
                dim, size = None, layer.out_features
            layout[f"{prefix}.{tensor}"] = {"name": f"{unsplit}.{tensor}", "dim": dim, "size": size}
    return layout


def split_vit(model: VisionTransformer, comm: MPI.Intracomm, stats: CommStats,
              rng: Optional[TensorParallelRNG] = None) -> VisionTransformer:
    """A copy of ``model`` whose every block is a :class:`ParallelTransformerBlock` (attention heads and
    MLP hidden features split over ``comm``); the patch embedding, position embedding, final LayerNorm
    and head stay whole on every rank (replicated: their inputs and output gradients are the same on
    every rank, so their gradients are too). ``model`` is not modified. ``rng``: the group's split stream,
    which each block's attention dropout draws from (a block whose ``nn.MultiheadAttention`` has
    ``dropout > 0`` is refused without it). Collective over ``comm``.

    Raises:
        ValueError: on every rank, when the ranks' blocks differ, or when the group's size does not
            divide every block's attention heads and MLP hidden features (naming the sizes that do).
    """
    blocks = model.blocks
    parallel = nn.ModuleList(_parallel_blocks(cast(List[TransformerBlock], list(blocks)), comm, stats,
                                              "vision transformer", rng))
    # Copy everything but the blocks (deepcopy takes the memo's entry for the block list).
    return copy.deepcopy(model, memo={id(blocks): parallel})


def split_transformer(model: nn.Sequential, comm: MPI.Intracomm, stats: CommStats,
                      rng: Optional[TensorParallelRNG] = None) -> nn.Sequential:
    """A copy of ``model`` (an ``nn.Sequential`` such as :func:`mpipar.models.gpt.gpt`) whose every
    :class:`~mpipar.models.vit.TransformerBlock` entry is a :class:`ParallelTransformerBlock` (causal
    when the block is); the other entries (embedding, tied head) are copied whole, parameters tied
    between them stay tied. ``model`` is not modified. ``rng``: as :func:`split_vit`. Collective over ``comm``.

    Raises:
        ValueError: on every rank, as :func:`split_vit`.
    """
    blocks = [layer for layer in model if isinstance(layer, TransformerBlock)]
    parallel = _parallel_blocks(blocks, comm, stats, "transformer", rng)
    return copy.deepcopy(model, memo={id(block): split for block, split in zip(blocks, parallel)})


def _parallel_blocks(blocks: List[TransformerBlock], comm: MPI.Intracomm, stats: CommStats,
                     what: str, rng: Optional[TensorParallelRNG]) -> List[ParallelTransformerBlock]:
    """Each block split over ``comm`` (its attention dropout drawn from ``rng``), after checking (agreed) that
    every rank has the same blocks and the group's size divides their heads and hidden features. Collective
    over ``comm``."""
    shapes = [(block.attention.num_heads, block.fc1.out_features) for block in blocks]
    agree_on(comm, f"the {what}'s blocks (heads, hidden features)", shapes,
             hint="build the same model on every rank")
    size = comm.Get_size()
    if any(heads % size or hidden % size for heads, hidden in shapes):
        heads = sorted({h for h, _ in shapes})
        hidden = sorted({f for _, f in shapes})
        fits = [d for d in range(1, max(heads + hidden) + 1) if all(h % d == 0 and f % d == 0 for h, f in shapes)]
        raise agreed(ValueError)(
            f"tensor parallelism: {size} tensor-parallel ranks cannot split this {what}'s blocks "
            f"evenly ({'/'.join(map(str, heads))} attention heads, {'/'.join(map(str, hidden))} MLP hidden "
            f"features per block); use a tensor-parallel size (--tp) in {fits}")
    return [ParallelTransformerBlock(block.attention, block.fc1, block.fc2, block.norm1, block.norm2, comm,
                                     stats=stats, rng=rng, causal=getattr(block, "causal", False))
            for block in blocks]


@dataclass(frozen=True)
class Splitter:
    """How a kind of model is split: ``split(model, comm, stats, rng)`` returns the model with this rank's
    shards (collective over the tensor-parallel group), its split regions' random draws (attention
    dropout) from ``rng``, the group's :class:`~mpipar.tensor_parallel.random.TensorParallelRNG`;
    ``what`` says what it splits (progress lines)."""

    kind: str
    split: Callable[[Any, MPI.Intracomm, CommStats, Optional[TensorParallelRNG]], nn.Module]  # takes its kind
    what: str


SPLITTERS: Dict[str, Splitter] = {
    "mlp": Splitter("mlp", split_mlp, "every linear layer split"),
    "vit": Splitter("vit", split_vit, "every block's attention heads and MLP split (embeddings, norms and head "
                                      "replicated)"),
    "transformer": Splitter("transformer", split_transformer, "every block's attention heads and MLP split "
                                                              "(embedding, norms and tied head replicated)"),
}
"""The splitters by model kind (:func:`model_kind`)."""


def model_kind(model: nn.Module) -> str:
    """``"vit"`` for a :class:`~mpipar.models.vit.VisionTransformer`, ``"transformer"`` for an
    ``nn.Sequential`` holding :class:`~mpipar.models.vit.TransformerBlock` entries (a GPT), ``"mlp"`` for
    another ``nn.Sequential`` (:func:`split_mlp` checks the rest). Local.

    Raises:
        TypeError: for any other model.
    """
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, nn.Sequential):
        return "transformer" if any(isinstance(layer, TransformerBlock) for layer in model) else "mlp"
    raise TypeError(f"tensor parallelism splits an nn.Sequential MLP or a VisionTransformer, got "
                    f"{type(model).__name__}")


def split_parameters(model: nn.Module) -> set:
    """The ids of the parameters of ``model`` that are shards (a column-parallel layer's weight and
    bias, a row-parallel layer's weight); every other parameter is replicated: whole and equal, with
    equal gradients, on every rank of the tensor-parallel group. Local."""
    split: Set[int] = set()
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            split.update(id(p) for p in (module.weight, module.bias) if p is not None)
        elif isinstance(module, RowParallelLinear):
            split.add(id(module.weight))
    return split


def _real_elements(model: nn.Module, comm: MPI.Intracomm) -> int:
    """This rank's parameter elements that belong to the unsplit model: shards count their features
    without padding, replicated parameters count on rank 0 of the group only. Local."""
    rank, size = comm.Get_rank(), comm.Get_size()
    split, total = split_parameters(model), 0
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            start, stop = shard_bounds(module.out_features, size, rank, pad=True)
            total += (stop - start) * (module.in_features + (module.bias is not None))
        elif isinstance(module, RowParallelLinear):
            total += module.weight.numel()
    if rank == 0:
        total += sum(p.numel() for p in model.parameters() if id(p) not in split)
    return total


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The unsplit model's state dict, on every rank: each submodule with a ``full_state_dict()``
    (the parallel layers and blocks) gathered under its name, every other tensor as this rank holds
    it. Collective over the tensor-parallel group (every rank calls it together)."""
    state: Dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        full = getattr(module, "full_state_dict", None)  # the parallel layers and blocks
        if full is not None:
            state.update({prefix + key: value for key, value in full().items()})
            return
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and name not in module._non_persistent_buffers_set:
                state[prefix + name] = tensor.detach().clone()
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return state


class TensorParallelStrategy:
    """Groups of ``config.tp`` consecutive ranks each hold the model split by a :class:`Splitter`
    (an MLP: every linear layer split by neurons; a vision transformer: every block's heads and MLP
    hidden features, the rest replicated); the ``world size / tp`` groups are data-parallel replicas.

    Within a group every rank sees the same batch and computes the full output (one
    Allreduce per layer pair forward, one backward, overlapped with the weight
    gradient); across groups each position's gradients are averaged by a
    :class:`ReplicaAverager`. A replicated parameter has the same gradient on every rank of
    a group, and the groups average it alike, so it stays equal. With ``config.zero == 1`` the
    optimizer state is sharded over the replicas (:class:`ShardedUpdate` over the data-parallel
    communicator): the loop's optimizer is built on this rank's pieces and stepped here after the
    average (``steps_optimizer``), then the replicas all-gather; with ``config.zero == 2`` a
    :class:`ShardedDataParallel` (stage 2) over the replicas replaces the averager: the gradients
    are reduce-scattered (sample-weighted) into each replica's shard. At construction the
    parameters are counted (one small Allreduce): the shards summed over the group plus the
    replicated ones must be the unsplit model's parameters. Every rank checkpoints its own
    shards and its group's split random stream (``self.rng``: dropout of split activations, recompute
    with ``self.rng.recomputable``), so a resumed run draws the masks the straight run draws.
    Collective over ``world``, like the loop.

    Args:
        world: the job's ranks.
        model: the unsplit model (every rank builds it from the same seed).
        config: the tensor-parallel degree.
        splitter: how to split it: a :class:`Splitter`, a key of :data:`SPLITTERS`, or None
            (chosen by :func:`model_kind`).
        bucket_mb: gradient bucket size for the replicas' Allreduce.
        grad_wire: ``--grad-wire``: the replicas' buckets in fp32, or sent in bf16/fp16 and summed in fp32.
        state: the checkpoint being resumed or None (it must have the same layout).
        device: where this rank's shards go.
        seed: the split streams' seed, the same on every rank (default ``torch.initial_seed()``: the
            run's seed, as ``Session`` sets it).

    Raises:
        ValueError: on every rank, when ``config.tp`` does not divide the world size, or for
            what the splitter refuses.
        TypeError: on every rank, for a model no splitter takes.
    """

    name = "tensor_parallel"
    full_steps_only = False
    checkpoint_per_rank = True
    precisions: Tuple[str, ...] = ("fp32", "bf16", "fp16")  # --precision; fp16 through bind_loss_scaler
    recomputes = RECOMPUTES  # --recompute, through bind_recompute

    def __init__(self, world: MPI.Intracomm, model: nn.Module, config: TensorParallelConfig, *,
                 splitter: Union[Splitter, str, None] = None, bucket_mb: float = 25.0, state: Optional[dict] = None,
                 device: torch.device | str = "cpu", seed: Optional[int] = None, grad_wire: str = "fp32"):
        if state is not None and state.get("relayout"):
            raise agreed(ValueError)("a tensor-parallel checkpoint resumes only on the ranks that wrote it; "
                                     "re-laying it out on other ranks is not supported yet")
        size = world.Get_size()

        def check_tp():
            if size % config.tp:
                divisors = [d for d in range(1, size + 1) if size % d == 0]
                raise ValueError(f"--tp {config.tp} does not divide the {size} ranks into equal tensor-parallel "
                                 f"groups; use --tp in {divisors} or launch a multiple of {config.tp} ranks")

        collective_check(world, check_tp, "tensor parallelism")
        if splitter is None or isinstance(splitter, str):
            kind = collective_check(world, lambda: model_kind(model) if splitter is None else splitter,
                                    "tensor parallelism")
            if kind not in SPLITTERS:
                raise agreed(ValueError)(f"no tensor-parallel splitter {kind!r}; known: {sorted(SPLITTERS)}")
            splitter = SPLITTERS[kind]
        self.splitter = splitter
        self.world, self.config = world, config
        self.grid = ProcessGrid(world, 1, tp=config.tp)  # groups of consecutive ranks inside a node
        self.tp_comm = self.grid.tp_comm

        def check_placement():
            saved = None if state is None else state.get("grid_order")
            if saved is not None and list(saved) != self.grid.order:
                raise ValueError("a tensor-parallel checkpoint resumes only with every rank at the place in the "
                                 "grid that wrote it; the ranks now sit on the nodes in another order (launch "
                                 "with the same ranks per node and the same --map-by)")

        collective_check(world, check_placement, "resuming tensor parallelism")
        if state is not None and bool(state.get(GRID_KEY)) != bool(config.zero):
            raise agreed(ValueError)(f"this tensor-parallel checkpoint was written with --zero "
                                     f"{int(bool(state.get(GRID_KEY)))}; resume it with the same --zero")
        self.stats = CommStats()
        self.rng = TensorParallelRNG(self.tp_comm, torch.initial_seed() if seed is None else seed)
        self.model = splitter.split(model, self.tp_comm, self.stats, self.rng).to(device)
        self.parameter_count = sum(p.numel() for p in model.parameters())
        counted = self.tp_comm.allreduce(_real_elements(self.model, self.tp_comm))
        if counted != self.parameter_count:  # the same sum on every rank of a group, hence every rank
            raise agreed(ValueError)(
                f"tensor parallelism ({splitter.kind}): the split model holds {counted:,} parameter elements "
                f"(shards summed over the group, replicated ones once), the unsplit model {self.parameter_count:,}: "
                f"the splitter lost or duplicated parameters")
        # mpipar-consolidate's layout: MLPs only (a ViT's fused q/k/v rows are permuted per rank)
        self.layout = shard_layout(cast(nn.Sequential, model), self.model) if splitter.kind == "mlp" else None
        if config.zero == 2 and grad_wire != "fp32":
            raise agreed(ValueError)("--zero 2 reduce-scatters the gradients in fp32; use --grad-wire fp32 with it")
        self.averager: Optional[ReplicaAverager] = None  # --zero 0, 1: the replicas' gradient average
        self.update: Optional[ShardedUpdate] = None  # --zero 1: this replica's shard of the optimizer state
        self.sdp: Optional[ShardedDataParallel] = None  # --zero 2: gradients reduce-scattered into the shard
        if config.zero == 2:
            self.sdp = ShardedDataParallel(self.model, self.grid.data_comm, stage=2, bucket_cap_mb=bucket_mb)
        else:
            self.averager = ReplicaAverager(self.model, self.grid.data_comm, bucket_cap_mb=bucket_mb,
                                            wire=wire_dtype(grad_wire))
        if config.zero == 1:
            self.update = ShardedUpdate(list(self.model.named_parameters()), self.grid.data_comm)
        self.steps_optimizer = bool(config.zero)
        if config.zero:
            self.precisions = ("fp32", "bf16")  # fp16's loss scaling is the loop's, around its own optimizer step
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.loss_scaler = None  # fp16: the loop's LossScaler (bind_loss_scaler)
        self.replicas, self.replica = self.grid.replicas, self.grid.replica
        self.counts_samples = self.grid.tp_rank == 0  # one rank of each group counts its samples
        self.wait_groups = [list(range(world.Get_size()))]  # tensor and replica waits split over the world
        self.metrics_attrs = {"parameters": self.parameter_count, "tp": config.tp, "replicas": self.replicas,
                              "zero": config.zero, **self.grid.metrics_attrs()}

    def parameters(self):
        """What the loop's optimizer steps: the model's parameters, or (``--zero 1, 2``) this rank's pieces."""
        sharded = self.update or self.sdp
        return list(self.model.parameters()) if sharded is None else sharded.parameters()

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``--zero 1, 2``: the loop's optimizer (over :meth:`parameters`), stepped in :meth:`train_step`."""
        self.optimizer = optimizer

    def describe(self) -> str:
        local = sum(p.numel() for p in self.model.parameters())
        return (f"{self.parameter_count:,} parameters, {self.splitter.what} over {self.config.tp} ranks "
                f"({local:,} on this rank), {self.replicas} replica(s)\n{self.grid.describe()}")

    def needs_batch(self) -> bool:
        return True

    def bind_loss_scaler(self, scaler) -> None:
        """fp16: backpropagate ``scaler.scale(loss)`` (the loop unscales, checks and steps)."""
        self.loss_scaler = scaler

    def bind_recompute(self, mode: str) -> None:
        """``--recompute``: checkpoint the split model's units (``full``: each block, or each entry of a
        split MLP; ``selective``: each block's attention core), their split-region draws replayed by
        ``self.rng.recomputable`` and their Allreduces repeated in the backward in the same order on every
        rank of the group."""
        apply_recompute(self.model, mode, replay=self.rng.recomputable)

    def train_step(self, batch) -> StepRecord:
        images, labels = batch
        if self.sdp is not None:
            return self._reduce_scatter_step(self.sdp, images, labels)
        assert self.averager is not None  # --zero 0, 1
        self.averager.begin_step()
        loss = F.cross_entropy(self.model(images), labels)
        (loss if self.loss_scaler is None else self.loss_scaler.scale(loss)).backward()
        self.averager.average()
        extra: dict = {}
        if self.update is not None:
            assert self.optimizer is not None, "bind_optimizer before train_step (the loop does)"
            extra = self.update.step_after(self.optimizer, self.averager.stats,
                                          [bucket.buffer for bucket in self.averager.buckets])
        tensor, replicas = self.stats.take(), self.averager.stats.take()
        return StepRecord(loss=loss.item(), samples=len(labels) if self.counts_samples else 0,
                          wait_time=tensor.wait_time + replicas.wait_time,
                          bytes_sent=tensor.bytes_sent + replicas.bytes_sent, extra=extra)

    def _reduce_scatter_step(self, sdp: ShardedDataParallel, images, labels) -> StepRecord:
        """``--zero 2``: forward and backward through ``sdp`` (the gradients reduce-scattered over the
        replicas), the optimizer on this rank's pieces, the shards all-gathered."""
        assert self.optimizer is not None, "bind_optimizer before train_step (the loop does)"
        loss = F.cross_entropy(sdp(images), labels)
        loss.backward()
        sdp.step(self.optimizer)
        sdp.take_calls()
        tensor, replicas = self.stats.take(), sdp.stats.take()
        return StepRecord(loss=loss.item(), samples=len(labels) if self.counts_samples else 0,
                          wait_time=tensor.wait_time + replicas.wait_time,
                          bytes_sent=tensor.bytes_sent + replicas.bytes_sent, extra=sdp.memory(self.optimizer))

    def end_epoch(self) -> None:
        if self.sdp is not None:
            self.sdp.sync_buffers()
        elif self.averager is not None:
            self.averager.sync_buffers(self.model)

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        """Loss and accuracy over ``dataset``, each replica taking a share; every rank of a
        group computes the same outputs, one counts them. Collective over the world."""
        result = evaluate(self.model, dataset, self.world, shards=self.replicas, shard=self.replica,
                          counts=self.counts_samples)
        self.stats.take()  # the evaluation's Allreduces: not the next training step's communication
        return result

    def state_dict(self) -> dict:
        """This rank's shards, with what ``mpipar-consolidate`` needs to merge a group's files:
        ``tp``, this rank's position in its group (``tp_rank``) and :func:`shard_layout`; and this rank's
        split random stream (``tp_rng``)."""
        state = {"model": self.model.state_dict(), "tp": self.config.tp, "tp_rank": self.tp_comm.Get_rank(),
                 "tp_layout": self.layout, "grid_order": self.grid.order, "tp_rng": self.rng.state_dict()}
        shard = self._shard_layout()
        if shard is not None:  # the layout of this rank's pieces, which the optimizer state follows
            state[GRID_KEY] = shard
        return state

    def _shard_layout(self) -> Optional[dict]:
        """``--zero 1, 2``: the entries and this rank's pieces (the checkpoint's ``zero_shard``); else None."""
        if self.update is not None:
            return self.update.state_dict()
        sdp = self.sdp
        if sdp is None:
            return None
        return {"zero": 2, "replicas": sdp.size, "replica": sdp.rank,
                "entries": [list(entry) for entry in sdp.layout.entries],
                "pieces": [[sdp.names[pc.param], pc.start, pc.stop] for pc in sdp.pieces]}

    def load_state_dict(self, state: dict) -> None:
        """This rank's shards and split random stream; with ``--zero 1, 2`` the checkpoint's pieces must be
        this rank's (same grid: checked at construction). Collective over the world (the check)."""
        layout = self._shard_layout()
        if layout is not None:
            collective_check(self.world, lambda: _same_pieces(layout, state.get(GRID_KEY)), "--resume")
        self.model.load_state_dict(state["model"])
        if "tp_rng" in state:  # checkpoints before it: the stream starts anew from the seed
            self.rng.load_state_dict(state["tp_rng"])

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Free the grid. Collective over the world."""
        self.grid.free()


def _same_pieces(layout: dict, saved: Optional[dict]) -> None:
    if saved is None or (saved.get("entries"), saved.get("pieces")) != (layout["entries"], layout["pieces"]):
        raise ValueError("the checkpoint's ZeRO-1 shard layout is not this rank's (another model, or its "
                         "parameters cut over another number of replicas); resume on the grid that wrote it")


if TYPE_CHECKING:
    def _is_a_strategy(strategy: TensorParallelStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
