"""Sharded data parallelism (ZeRO-1/2/3) as a strategy of the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from mpipar.comm.wire import wire_dtype
from mpipar.data.arrays import ImageDataset
from mpipar.diagnostics.agree import collective_check
from mpipar.diagnostics.failure import agreed
from mpipar.run.evaluate import EvalResult, evaluate
from mpipar.run.metrics import MetricsWriter
from mpipar.run.strategy import StepRecord, Strategy
from mpipar.sharded.config import ShardedConfig
from mpipar.sharded.consolidate import shard_optimizer_state, training_state
from mpipar.sharded.zero import ShardedDataParallel

__all__ = ["ShardedStrategy"]


class ShardedStrategy:
    """Data parallelism with the optimizer state (``--zero 1``), gradients (``--zero 2``) and parameters
    (``--zero 3``) sharded over ``comm`` (:class:`ShardedDataParallel`), for :func:`mpipar.run.loop.train`.

    The loop's optimizer is built on this rank's pieces of the parameters and stepped here
    (``steps_optimizer``), between the reduction and the all-gather. Every rank checkpoints its
    shard, its optimizer state, its buffers and the layout; a resume on another number of ranks
    reads every file of ``checkpoint`` and cuts the parameters and the optimizer state again (the
    buffers are rank 0's then, as for data parallelism). Per step and rank the metrics get
    ``param_bytes``, ``grad_bytes`` and ``optimizer_bytes`` held. ``grad_wire``: ``--grad-wire`` (fp32,
    bf16 or fp16: the gradients' reduction sent in 16 bits, ``ShardedDataParallel(wire=)``). Collective over
    ``comm``.
    """

    name = "sharded"
    full_steps_only = False
    checkpoint_per_rank = True
    steps_optimizer = True
    precisions = ("fp32", "bf16")  # --precision: autocast around train_step; fp16's loss scaling needs the loop to
    # unscale the pieces' gradients between the reduction and the optimizer step, which runs in train_step here

    def __init__(self, model: nn.Module, comm: MPI.Intracomm, settings: ShardedConfig, *, bucket_mb: float = 25.0,
                 device: torch.device | str = "cpu", checkpoint: Optional[Path] = None, grad_wire: str = "fp32"):
        self.model = model.to(device)
        self.comm, self.settings, self.checkpoint = comm, settings, checkpoint
        self.parameter_count = sum(p.numel() for p in model.parameters())  # before stage 3 frees them
        self.sdp = ShardedDataParallel(self.model, comm, stage=settings.zero, bucket_cap_mb=bucket_mb,
                                       wire=wire_dtype(grad_wire))
        self.replicas, self.replica = comm.Get_size(), comm.Get_rank()
        self.wait_groups = [list(range(comm.Get_size()))]
        self.metrics_attrs = {"parameters": self.parameter_count, "zero": settings.zero}
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def parameters(self):
        return self.sdp.parameters()

    def describe(self) -> str:
        return f"{self.parameter_count:,} parameters; {self.settings.describe()} ({self.sdp.layout.describe()})"

    def needs_batch(self) -> bool:
        return True

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The loop's optimizer (over :meth:`parameters`), stepped in :meth:`train_step`."""
        self.optimizer = optimizer

    def train_step(self, batch) -> StepRecord:
        images, labels = batch
        loss = F.cross_entropy(self.sdp(images), labels)
        loss.backward()
        self.sdp.step(self.optimizer)
        self.sdp.take_calls()
        stats = self.sdp.stats.take()
        return StepRecord(loss=loss.item(), samples=len(labels), wait_time=stats.wait_time,
                          bytes_sent=stats.bytes_sent, extra=self.sdp.memory(self.optimizer))

    def end_epoch(self) -> None:
        self.sdp.sync_buffers()

    def evaluate(self, dataset: ImageDataset) -> EvalResult:
        with self.sdp.full_parameters():
            return evaluate(self.model, dataset, self.comm)

    def state_dict(self) -> dict:
        """This rank's shards, buffers and frozen parameters, and the layout (``sharded``)."""
        sdp = self.sdp
        trainable = set(sdp.aliases)
        return {"model": {k: v for k, v in self.model.state_dict().items() if k not in trainable},
                "shards": [shard.detach().cpu().clone() for shard in sdp.shards],
                "sharded": {"zero": sdp.stage, "world_size": sdp.size, "rank": sdp.rank,
                            "entries": [list(entry) for entry in sdp.layout.entries],
                            "shapes": [list(shape) for shape in sdp.shapes], "aliases": sdp.aliases,
                            "pieces": [[sdp.names[pc.param], pc.start, pc.stop] for pc in sdp.pieces]}}

    def load_state_dict(self, state: dict) -> None:
        """This rank's shards; on another number of ranks (``state["relayout"]``) cut from every
        file of the checkpoint, and ``state["optimizer"]`` becomes this rank's pieces' state.
        Collective; a checkpoint of another model is a ValueError on every rank."""
        sdp = self.sdp
        entries = [list(entry) for entry in sdp.layout.entries]

        def check(saved: dict) -> None:
            if saved["sharded"]["entries"] != entries:
                raise ValueError(f"the checkpoint's sharded parameters {saved['sharded']['entries']} are not this "
                                 f"model's {entries}")

        if not state.get("relayout"):
            collective_check(self.comm, lambda: check(state), "--resume")
            self.model.load_state_dict(state["model"], strict=False)
            sdp.load_shards(state["shards"])
            return
        if self.checkpoint is None:
            raise agreed(ValueError)("resuming a sharded checkpoint on another number of ranks needs its path "
                                     "(ShardedStrategy(checkpoint=...))")
        full = collective_check(self.comm, lambda: training_state(self.checkpoint), "re-sharding")
        collective_check(self.comm, lambda: check(full), "--resume")
        with sdp.full_parameters():  # stage 3: the whole model while it loads (shards cut from its buffers)
            missing = self.model.load_state_dict(full["model"], strict=False)
            collective_check(self.comm, lambda: _no_missing(missing), "--resume")
            shards = [flat[sdp.rank * g.shard:(sdp.rank + 1) * g.shard].clone()
                      for flat, g in zip(sdp.flats, sdp.layout.groups)]
        sdp.load_shards(shards)
        pieces = [(sdp.names[pc.param], pc.start, pc.stop) for pc in sdp.pieces]
        state["optimizer"] = shard_optimizer_state(full["optimizer_by_name"], pieces,
                                                   full["optimizer"]["param_groups"][0])

    def finish(self, metrics: MetricsWriter, say: Callable[[str], None], steps_run: int) -> None:
        """The end of training: :meth:`ShardedDataParallel.close` (stage 3: the model whole again, the
        gathers' communicator freed). Nothing to add to the metrics file (the bytes held are per step).
        Collective."""
        self.sdp.close()


def _no_missing(result) -> None:
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not fit the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")


if TYPE_CHECKING:
    def _is_a_strategy(strategy: ShardedStrategy) -> Strategy:
        """Holds the class to the loop's protocol (checked by mypy, see tests/run.sh)."""
        return strategy
