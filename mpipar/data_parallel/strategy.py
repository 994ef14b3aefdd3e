"""Data parallelism as a strategy of the training loop: every rank a replica, gradients averaged by DataParallel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.compress import parse_compress
from mpipar.comm.wire import wire_dtype
from mpipar.data.arrays import ImageDataset
from mpipar.data_parallel.wrapper import DataParallel
from mpipar.run.evaluate import EvalResult, evaluate, forward
from mpipar.run.metrics import MetricsWriter
from mpipar.run.recompute import RECOMPUTES, apply_recompute
from mpipar.run.strategy import StepRecord, Strategy, memory_record, tensor_bytes

__all__ = ["DataParallelStrategy"]


class DataParallelStrategy:
    """Synchronous data parallelism over ``comm`` for :func:`mpipar.run.loop.train`.

    Each rank holds the whole model and takes its share of every global batch;
    :class:`DataParallel` averages gradients (sample-weighted) during backward.
    Checkpoints are rank 0's model plus every rank's buffers (replicas' BatchNorm
    statistics differ between epoch ends; storing them all means saving never
    changes the run); they resume on any number of ranks. ``device``: where the
    model goes (batches come there from the loop); ``grad_wire``: ``--grad-wire`` (fp32, bf16 or fp16,
    :class:`~mpipar.comm.wire.WireSum`); ``compress``: ``--compress`` (none or ``powersgd:RANK``,
    :class:`~mpipar.comm.compress.PowerSGDSum`: its warm starts and every rank's errors are checkpointed
    on rank 0 and resume on any number of ranks). ``loss_fn(outputs, targets)``: the batch's mean loss (default
    cross-entropy); ``metric(outputs, targets)``: the batch's mean score, the evaluation's ``accuracy``
    (default accuracy with the default loss). A batch is ``(inputs, targets)``, ``inputs`` a tensor or a
    dict of keyword inputs. ``reentrant_recompute``: ``--recompute`` checkpoints with ``use_reentrant=True``
    (default False). Every step records the bytes the rank holds, as ``ShardedStrategy`` does (ZeRO stage 0
    beside stages 1-3): ``param_bytes`` (the whole model's parameters), ``grad_bytes`` (the gradients after
    the step's reduction) and ``optimizer_bytes`` (the loop's optimizer's state tensors as the step found
    them: AdamW's moments appear from the second step). Collective over ``comm``, like the loop.
    """

    name = "data_parallel"
    full_steps_only = False
    checkpoint_per_rank = False
    precisions = ("fp32", "bf16", "fp16")  # --precision; fp16 through bind_loss_scaler
    recomputes = RECOMPUTES  # --recompute, through bind_recompute

    def __init__(self, model: nn.Module, comm: MPI.Intracomm, *, bucket_mb: float = 25.0,
                 device: torch.device | str = "cpu", grad_wire: str = "fp32", loss_fn: Optional[Callable] = None,
                 metric: Optional[Callable] = None, reentrant_recompute: bool = False, compress: str = "none"):
        self.model = model.to(device)
        self.reentrant_recompute = reentrant_recompute
        self.loss_fn, self.metric = loss_fn, metric
        self.comm = comm
        self.compress = compress  # --compress, checked by the loop against the run's
        self.dp = DataParallel(model, comm, bucket_cap_mb=bucket_mb, wire=wire_dtype(grad_wire),
                               compress=parse_compress(compress))
        self.replicas, self.replica = comm.Get_size(), comm.Get_rank()
        self.wait_groups = [list(range(comm.Get_size()))]
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.metrics_attrs = {"parameters": self.parameter_count, **_names(loss=loss_fn, test_metric=metric)}
        self.loss_scaler = None
        self.optimizer: Optional[torch.optim.Optimizer] = None  # the loop's, through observe_optimizer
        self.compress_resumed = ""  # what load_state_dict did with PowerSGD's state, for describe()

    def parameters(self):
        return list(self.model.parameters())

    def describe(self) -> str:
        described = f"{self.parameter_count:,} parameters, a replica on every rank"
        if self.compress != "none":
            described += f"; gradients compressed by PowerSGD rank {parse_compress(self.compress)} with error " \
                         f"feedback{self.compress_resumed}"
        return described

    def needs_batch(self) -> bool:
        return True

    def bind_loss_scaler(self, scaler) -> None:
        """fp16: backpropagate ``scaler.scale(loss)`` (the loop unscales, checks and steps)."""
        self.loss_scaler = scaler

    def observe_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The loop's optimizer (the loop steps it), for the optimizer bytes each step records. Local."""
        self.optimizer = optimizer

    def bind_recompute(self, mode: str) -> None:
        """``--recompute``: checkpoint the model's units (:func:`~mpipar.run.recompute.apply_recompute`),
        ``use_reentrant`` as ``reentrant_recompute`` says; the reducer's hooks see each gradient once."""
        apply_recompute(self.model, mode, reentrant=self.reentrant_recompute)

    def train_step(self, batch) -> StepRecord:
        images, labels = batch
        loss = (self.loss_fn or F.cross_entropy)(forward(self.dp, images), labels)
        (loss if self.loss_scaler is None else self.loss_scaler.scale(loss)).backward()
        stats = self.dp.stats.take()
        params = list(self.model.parameters())
        held = memory_record(tensor_bytes(params), [p.grad for p in params if p.grad is not None], self.optimizer)
        return StepRecord(loss=loss.item(), samples=len(labels), wait_time=stats.wait_time,
                          bytes_sent=stats.bytes_sent, extra=held)

    def end_epoch(self) -> None:
        self.dp.sync_buffers()

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        return evaluate(self.model, dataset, self.comm, loss_fn=self.loss_fn, metric=self.metric)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "rank_buffers": self.dp.gather_buffers()}
        if self.compress != "none":  # absent otherwise: checkpoints as before
            state["rank_compress"] = self.dp.gather_compress_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Every rank takes rank 0's model; each its own buffers (BatchNorm statistics) when
        the checkpoint has as many ranks, else rank 0's (a resume on another number of ranks). PowerSGD's
        state likewise, except that on another number of ranks rank 0 takes the sum of the saved errors
        (:meth:`DataParallel.load_compress_state`: the run continues as it would have)."""
        self.model.load_state_dict(state["model"])
        self.dp.load_rank_buffers(state["rank_buffers"])
        saved = state.get("rank_compress")
        if self.compress != "none" and saved is not None:
            same = self.dp.load_compress_state(saved)
            self.compress_resumed = "" if same else \
                f" (resumed from {len(saved)} ranks' errors: their sum on rank 0, zero on the others)"

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """Nothing to add to the metrics file."""


def _names(**functions) -> dict:
    """The names of the functions given (not None), for the metrics file's attributes."""
    return {key: getattr(fn, "__name__", type(fn).__name__) for key, fn in functions.items() if fn is not None}


if TYPE_CHECKING:
    def _is_a_strategy(strategy: DataParallelStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
