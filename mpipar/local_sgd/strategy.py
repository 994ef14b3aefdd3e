"""Local SGD as a strategy of the training loop: ranks step their own models and average them every H steps."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.averaging import average_tensors
from mpipar.data.arrays import ImageDataset
from mpipar.data_parallel.wrapper import DataParallel
from mpipar.diagnostics.failure import agreed
from mpipar.local_sgd.config import LocalSGDConfig
from mpipar.local_sgd.outer import OuterOptimizer
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter
from mpipar.run.strategy import StepRecord, Strategy

__all__ = ["LocalSGDStrategy"]


class LocalSGDStrategy:
    """Local SGD over ``comm`` for :func:`mpipar.run.loop.train` (``steps_optimizer``: it
    applies the loop's optimizer itself).

    Every rank holds the whole model and takes its share of every global batch. The first
    ``config.local_warmup`` steps are data parallelism (:class:`DataParallel` averages the
    gradients during backward; every rank then takes the same optimizer step). After them
    each step is local (forward and backward under ``DataParallel.no_sync()``, then this
    rank's optimizer step), and after every ``config.sync_every``-th local step, and at every
    epoch end, the ranks' trainable parameters and floating-point buffers (BatchNorm
    statistics) are averaged, weighted by the samples each rank read since the last average,
    in one flat Allreduce (:func:`~mpipar.comm.averaging.average_tensors`); with an outer
    optimizer (DiLoCo) the average then moves the global weights of the last average
    (:class:`~mpipar.local_sgd.outer.OuterOptimizer`). Optimizer state (momentum) stays
    each rank's own. Frozen parameters are never averaged (they stay as rank 0 broadcast them).

    Evaluation: epoch ends are averages, so every rank evaluates the same model (the
    average), and the epoch's checkpoint holds it. Checkpoints: every rank saves its own
    model and optimizer state (they differ between averages), so a resume continues
    bitwise; it needs the number of ranks that wrote the checkpoint (else refused on every
    rank). Per step the record carries ``synced`` (1: the ranks' parameters are equal after
    the step: a warm-up step or an average), the bytes sent and the time blocked in the
    reductions (``wait_time``).

    Collective over ``comm``, like the loop; size 1 runs the same code (averages are no-ops).

    Args:
        model: the model (every rank builds it; rank 0's initial weights are broadcast).
        comm: the ranks.
        config: H, warm-up and the outer optimizer.
        bucket_mb: gradient bucket size of the warm-up's Allreduce.
        device: where the model goes.
        state: the checkpoint being resumed (written on as many ranks) or None.

    Raises:
        ValueError: on every rank, when ``state`` was written by another number of ranks.
    """

    name = "local_sgd"
    full_steps_only = False
    checkpoint_per_rank = True
    steps_optimizer = True

    def __init__(self, model: nn.Module, comm: MPI.Intracomm, config: LocalSGDConfig, *, bucket_mb: float = 25.0,
                 device: torch.device | str = "cpu", state: Optional[dict] = None):
        if state is not None and state.get("relayout"):
            raise agreed(ValueError)(f"a local-SGD checkpoint resumes only on the number of ranks that wrote it (its "
                                     f"ranks' models differ between averages), not on {comm.Get_size()}; resume with "
                                     f"as many ranks as before")
        self.model = model.to(device)
        self.comm, self.config = comm, config
        self.dp = DataParallel(self.model, comm, bucket_cap_mb=bucket_mb)  # rank 0's weights everywhere
        self.stats = self.dp.stats  # the warm-up's gradient reductions and the averages, one account
        self.averaged = [p for p in self.model.parameters() if p.requires_grad]
        self.outer = OuterOptimizer(self.averaged, lr=config.outer_lr, momentum=config.outer_momentum) \
            if config.outer_optimizer else None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.step = 0                      # steps taken (the loop's step count)
        self.local_steps = 0               # local steps since the last average (the schedule)
        self.steps_since_average = 0       # any steps since the last average (warm-up steps move buffers)
        self.samples_since_average = 0     # this rank's weight in the next average
        self.replicas, self.replica = comm.Get_size(), comm.Get_rank()
        self.wait_groups = [list(range(comm.Get_size()))]
        self.parameter_count = sum(p.numel() for p in self.model.parameters())
        self.metrics_attrs = {"parameters": self.parameter_count}

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The loop's optimizer, stepped by :meth:`train_step` (the loop steps its schedule)."""
        self.optimizer = optimizer

    def parameters(self):
        return list(self.model.parameters())

    def describe(self) -> str:
        return f"{self.parameter_count:,} parameters, a replica on every rank; local SGD: {self.config.describe()}"

    def needs_batch(self) -> bool:
        return True

    def train_step(self, batch) -> StepRecord:
        """Forward, backward, this rank's optimizer step and, when due, the average. Collective."""
        images, labels = batch
        warmup = self.step < self.config.local_warmup
        if self.outer is not None and self.step == self.config.local_warmup:
            self.outer.reset()  # the warm-up's result (or the initial weights) is the first global weights
        with contextlib.nullcontext() if warmup else self.dp.no_sync():  # warm-up: gradients averaged in backward
            loss = F.cross_entropy(self.dp(images), labels)
            loss.backward()
        assert self.optimizer is not None, "the loop binds the optimizer (bind_optimizer) before the first step"
        self.optimizer.step()
        self.step += 1
        self.steps_since_average += 1
        self.samples_since_average += len(labels)
        self.local_steps += not warmup
        synced = warmup
        if not warmup and self.local_steps == self.config.sync_every:
            self.average()
            synced = True
        stats = self.stats.take()
        return StepRecord(loss=loss.item(), samples=len(labels), wait_time=stats.wait_time,
                          bytes_sent=stats.bytes_sent, extra={"synced": float(synced)})

    def average(self) -> None:
        """Average the ranks' trainable parameters and floating-point buffers, weighted by the
        samples each read since the last average (then the outer step, if any). Collective."""
        average_tensors([*self.averaged, *self.model.buffers()], self.comm, weight=self.samples_since_average,
                        stats=self.stats)
        if self.outer is not None:
            self.outer.step()
        self.local_steps = self.steps_since_average = self.samples_since_average = 0

    def end_epoch(self) -> None:
        """An average, unless nothing moved since the last one: every rank evaluates (and the
        epoch's checkpoint holds) the same model. Its cost is not counted in any step."""
        if self.steps_since_average:
            self.average()
            self.stats.take()

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        return evaluate(self.model, dataset, self.comm)

    def state_dict(self) -> dict:
        """This rank's model and position in the schedule (its optimizer state is the loop's)."""
        return {"model": self.model.state_dict(),
                "local_sgd": {"step": self.step, "local_steps": self.local_steps,
                              "steps_since_average": self.steps_since_average,
                              "samples_since_average": self.samples_since_average,
                              "outer": None if self.outer is None else self.outer.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        position = state["local_sgd"]
        self.step, self.local_steps = position["step"], position["local_steps"]
        self.steps_since_average = position["steps_since_average"]
        self.samples_since_average = position["samples_since_average"]
        if self.outer is not None:
            self.outer.load_state_dict(position["outer"])

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Nothing to add to the metrics file."""


if TYPE_CHECKING:
    def _is_a_strategy(strategy: LocalSGDStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
