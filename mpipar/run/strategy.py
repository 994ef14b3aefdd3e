"""What the training loop asks of a strategy (data parallel, pipeline, ...): the protocol and the step record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import torch
from torch import nn

from mpipar.data.arrays import ImageDataset
from mpipar.run.evaluate import EvalResult
from mpipar.run.metrics import MetricsWriter

__all__ = ["StepRecord", "StepShards", "Strategy", "memory_record", "tensor_bytes"]


@dataclass
class StepRecord:
    """What one training step (forward, backward, gradient reduction; not the optimizer
    step) cost and gave on this rank.

    Attributes:
        loss: the mean loss of the batch this rank saw (or its pipeline's batch).
        samples: samples this rank counts for the metrics (0 where another rank of the
            same pipeline counts them).
        compute_time: seconds computing; None: the step's time less data, comm, idle and wait.
        comm_time: seconds moving data, known as such (point-to-point transfers).
        idle_time: seconds known to be waiting for other ranks; None: what is left of the step.
        wait_time: seconds blocked in collectives (gradient Allreduce): the metrics file
            splits it into communication (the least wait in the reducing group) and idle.
        bytes_sent: bytes this rank put on the wire.
        data_time: seconds loading data inside the step (a strategy that fetches its own shards).
        extra: further per-rank values recorded as ``/steps/<name>`` (e.g. ``pipeline_busy``).
        loss_weight: the weight of ``loss`` in this rank's running mean of the training loss
            (the progress lines); None: the samples this rank read this step.
    """

    loss: float
    samples: int
    compute_time: Optional[float] = None
    comm_time: float = 0.0
    idle_time: Optional[float] = None
    wait_time: float = 0.0
    bytes_sent: float = 0.0
    data_time: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)
    loss_weight: Optional[float] = None


@dataclass
class StepShards:
    """Every data shard of one step, for a strategy that hands them out itself
    (``Strategy.shares_shards``: a parameter server's workers take shards as they
    become free, so a fast worker computes more of them than a slow one).

    Attributes:
        step: the loop's step index (counted over the whole run).
        count: how many shards the step has (``strategy.replicas``).
        fetch: ``fetch(j)`` is shard ``j``'s ``(inputs, targets)`` on this rank's device.
        samples: the samples of all shards (fewer in an epoch's short last step).
    """

    step: int
    count: int
    fetch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]
    samples: int


class Strategy(Protocol):
    """A way of training one model on the ranks of a job; :func:`mpipar.run.loop.train` runs it.

    The loop owns everything else (epochs, optimizer and learning-rate schedule,
    checkpoints, stop and requeue, progress lines, metrics, evaluation cadence,
    summary). Every method is called on every rank, in the same order; the
    collective contract of each is the strategy's own.

    Attributes:
        name: stored as the metrics file's ``strategy`` attribute.
        replicas: how many data-parallel copies read different samples each step.
        replica: which of them this rank belongs to (its data shard).
        full_steps_only: drop a short last step of an epoch (it could not be split
            into equal micro-batches); data parallelism keeps it.
        checkpoint_per_rank: every rank saves its own state (partitions) instead of
            rank 0 saving for all (replicas).
        wait_groups: the ranks that reduce together, for splitting ``wait_time`` into
            communication and idle in the metrics file.
        metrics_attrs: root attributes for the metrics file.

    Optional members (absent means False):
        steps_optimizer: the strategy applies updates itself (a parameter server's
            servers, local SGD); the loop calls ``bind_optimizer(optimizer)`` once
            before the first step and never ``optimizer.step()``. The learning-rate
            schedule still steps once per loop step.
        observe_optimizer: ``observe_optimizer(optimizer)``, called once before the first step where
            present: the loop's optimizer, which the loop keeps stepping, for a strategy that reads it (data
            parallelism records its state's bytes).
        shares_shards: ``train_step`` gets a :class:`StepShards` (every shard of the
            step) instead of this rank's batch.
        metrics_tables: :class:`~mpipar.run.metrics.Table` s the metrics file appends
            to at every flush (a parameter server's ``/updates``); absent: none.
        precisions: the ``--precision`` values it trains with (absent: ``("fp32",)``); the
            loop runs ``train_step`` under autocast for bf16 and fp16.
        bind_loss_scaler: ``bind_loss_scaler(scaler)``, called once before the first step at
            fp16: ``train_step`` backpropagates ``scaler.scale(loss)``; the loop unscales, skips
            a step that overflowed on any rank and updates the scale
            (:class:`~mpipar.run.precision.LossScaler`).
        recomputes: the ``--recompute`` values it trains with (absent: ``("none",)``).
        bind_recompute: ``bind_recompute(mode)``, called once before the first step when ``--recompute`` is
            not ``none``: checkpoint the model's units (:mod:`mpipar.run.recompute`); raises ValueError
            when the model has none for ``mode``.
    """

    name: str
    replicas: int
    replica: int
    full_steps_only: bool
    checkpoint_per_rank: bool
    wait_groups: List[List[int]]
    metrics_attrs: dict

    def parameters(self) -> List[nn.Parameter]:
        """The parameters this rank's optimizer updates."""

    def describe(self) -> str:
        """One line for the start of the run (how the model is laid out)."""

    def needs_batch(self) -> bool:
        """Whether this rank reads the step's samples (a pipeline's middle stages do not)."""

    def train_step(self, batch: Any) -> StepRecord:
        """Forward, backward and gradient reduction of one step; ``batch`` is
        ``(inputs, targets)`` or None where :meth:`needs_batch` is False, or the step's
        :class:`StepShards` where ``shares_shards`` (typed ``Any``: which one depends on that flag)."""

    def end_epoch(self) -> None:
        """Before evaluation at an epoch end (e.g. average BatchNorm statistics)."""

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        """Loss and accuracy over ``dataset``, the same on every rank."""

    def state_dict(self) -> dict:
        """This rank's model state for a checkpoint (``model`` plus what the strategy needs)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s result."""

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """After the last step and the metrics' final flush (e.g. the pipeline bubble)."""


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> float:
    """The bytes of ``tensors`` together. Local."""
    return float(sum(t.numel() * t.element_size() for t in tensors))


def memory_record(param_bytes: float, gradients: Iterable[torch.Tensor],
                  optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, float]:
    """The bytes a rank holds, for :attr:`StepRecord.extra` (data parallelism, ZeRO): ``param_bytes``, the bytes
    of ``gradients`` and of ``optimizer``'s state tensors (none without an optimizer). Local."""
    state = [] if optimizer is None else [value for per_param in optimizer.state.values()
                                          for value in per_param.values() if isinstance(value, torch.Tensor)]
    return {"param_bytes": param_bytes, "grad_bytes": tensor_bytes(gradients), "optimizer_bytes": tensor_bytes(state)}
