"""Tensor parallelism (every linear layer of an MLP split over a group), replicated with data parallelism."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.reducer import CommStats
from mpipar.comm.replicas import ReplicaAverager
from mpipar.comm.topology import ProcessGrid
from mpipar.data.datasets import ArrayDataset
from mpipar.diagnostics.failure import agreed
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter
from mpipar.run.strategy import StepRecord
from mpipar.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from mpipar.tensor_parallel.mlp import ParallelMLP

__all__ = ["TensorParallelConfig", "TensorParallelStrategy", "split_mlp", "shard_layout"]


@dataclass(frozen=True)
class TensorParallelConfig:
    """``tp``: ranks that split every layer (consecutive ranks); the world size divided by
    it is the number of data-parallel replicas. Raises ValueError naming the flag."""

    tp: int = 2

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_mlp(model: nn.Sequential, comm: MPI.Intracomm, stats: CommStats) -> nn.Sequential:
    """``model`` (as :func:`mpipar.models.mlp` builds it: layers without weights such as Flatten,
    then Linear+ReLU blocks and a last Linear) as pairs of linear layers, each pair a :class:`ParallelMLP`
    (column then row parallel), with the ReLU between pairs kept. Collective over ``comm``.

    Raises:
        ValueError: on every rank, when the model has an odd number of linear layers or a
            hidden size the group's size does not divide (naming the sizes).
    """
    head, named = _linear_layers(model)
    linears = [layer for _, layer in named]
    if not linears or len(linears) % 2 or any(layer is None for layer in linears):
        raise agreed(ValueError)(f"tensor parallelism pairs linear layers (column then row parallel); this model "
                                 f"has {len(linears)} linear layers: use an even number")
    blocks: List[nn.Module] = list(head)
    for index in range(0, len(linears), 2):
        if blocks[len(head):]:
            blocks.append(nn.ReLU())
        blocks.append(ParallelMLP(linears[index], linears[index + 1], comm, nn.ReLU(), stats=stats))
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


class TensorParallelStrategy:
    """Groups of ``config.tp`` consecutive ranks each hold every linear layer split by
    neurons; the ``world size / tp`` groups are data-parallel replicas.

    Within a group every rank sees the same batch and computes the full output (one
    Allreduce per layer pair forward, one backward, overlapped with the weight
    gradient); across groups each position's gradients are averaged by a
    :class:`ReplicaAverager`. Every rank checkpoints its own shards. Collective over
    ``world``, like the loop.

    Args:
        world: the job's ranks.
        model: the unsplit MLP (every rank builds it from the same seed).
        config: the tensor-parallel degree.
        bucket_mb: gradient bucket size for the replicas' Allreduce.
        state: the checkpoint being resumed or None (it must have the same layout).
        device: where this rank's shards go.
    """

    name = "tensor_parallel"
    full_steps_only = False
    checkpoint_per_rank = True

    def __init__(self, world: MPI.Intracomm, model: nn.Sequential, config: TensorParallelConfig, *,
                 bucket_mb: float = 25.0, state: Optional[dict] = None,
                 device: torch.device | str = "cpu"):
        if state is not None and state.get("relayout"):
            raise agreed(ValueError)("a tensor-parallel checkpoint resumes only on the ranks that wrote it; "
                                     "re-laying it out on other ranks is not supported yet")
        self.world, self.config = world, config
        self.grid = ProcessGrid(world, config.tp)
        self.tp_comm = self.grid.pipeline_comm  # consecutive ranks: the neighbours that talk every layer
        self.stats = CommStats()
        self.model = split_mlp(model, self.tp_comm, self.stats).to(device)
        self.layout = shard_layout(model, self.model)
        self.averager = ReplicaAverager(self.model, self.grid.data_comm, bucket_cap_mb=bucket_mb)
        self.replicas, self.replica = self.grid.replicas, self.grid.replica
        self.counts_samples = self.grid.stage == 0  # one rank of each group counts its samples
        self.wait_groups = [list(range(world.Get_size()))]  # tensor and replica waits split over the world
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.metrics_attrs = {"parameters": self.parameter_count, "tp": config.tp, "replicas": self.replicas}

    def parameters(self):
        return list(self.model.parameters())

    def describe(self) -> str:
        local = sum(p.numel() for p in self.model.parameters())
        return (f"{self.parameter_count:,} parameters, every linear layer split over {self.config.tp} ranks "
                f"({local:,} on this rank), {self.replicas} replica(s)")

    def needs_batch(self) -> bool:
        return True

    def train_step(self, batch) -> StepRecord:
        images, labels = batch
        self.averager.begin_step()
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        self.averager.average()
        tensor, replicas = self.stats.take(), self.averager.stats.take()
        return StepRecord(loss=loss.item(), samples=len(labels) if self.counts_samples else 0,
                          wait_time=tensor.wait_time + replicas.wait_time,
                          bytes_sent=tensor.bytes_sent + replicas.bytes_sent)

    def end_epoch(self) -> None:
        self.averager.sync_buffers(self.model)

    def evaluate(self, dataset: ArrayDataset) -> EvalResult:
        """Loss and accuracy over ``dataset``, each replica taking a share; every rank of a
        group computes the same outputs, one counts them. Collective over the world."""
        result = evaluate(self.model, dataset, self.world, shards=self.replicas, shard=self.replica,
                          counts=self.counts_samples)
        self.stats.take()  # the evaluation's Allreduces: not the next training step's communication
        return result

    def state_dict(self) -> dict:
        """This rank's shards, with what ``mpipar-consolidate`` needs to merge a group's files:
        ``tp``, this rank's position in its group (``tp_rank``) and :func:`shard_layout`."""
        return {"model": self.model.state_dict(), "tp": self.config.tp, "tp_rank": self.tp_comm.Get_rank(),
                "tp_layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Free the grid. Collective over the world."""
        self.grid.free()
