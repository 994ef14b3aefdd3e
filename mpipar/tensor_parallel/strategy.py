"""Tensor parallelism (every linear layer of an MLP split over a group), replicated with data parallelism."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional

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
from mpipar.tensor_parallel.mlp import ParallelMLP

__all__ = ["TensorParallelConfig", "TensorParallelStrategy", "split_mlp"]


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
    def linear(layer):
        inner = layer[0] if isinstance(layer, nn.Sequential) and len(layer) else layer
        return inner if isinstance(inner, nn.Linear) else None

    layers = list(model)
    first = next((i for i, layer in enumerate(layers) if linear(layer) is not None), len(layers))
    head, linears = layers[:first], [linear(layer) for layer in layers[first:]]  # head: Flatten, casts
    if not linears or len(linears) % 2 or any(layer is None for layer in linears):
        raise agreed(ValueError)(f"tensor parallelism pairs linear layers (column then row parallel); this model "
                                 f"has {len(linears)} linear layers: use an even number")
    blocks: List[nn.Module] = list(head)
    for index in range(0, len(linears), 2):
        if blocks[len(head):]:
            blocks.append(nn.ReLU())
        blocks.append(ParallelMLP(linears[index], linears[index + 1], comm, nn.ReLU(), stats=stats))
    return nn.Sequential(*blocks)


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
        return evaluate(self.model, dataset, self.world, shards=self.replicas, shard=self.replica,
                        counts=self.counts_samples)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "tp": self.config.tp}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Free the grid. Collective over the world."""
        self.grid.free()
