"""Pieces of a training loop shared by the jobs: evaluation and step timing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mpipar.comm.device import module_device, to_device
from mpipar.data.arrays import ImageDataset
from mpipar.data.sharding import rank_batches
from mpipar.diagnostics import collectives

__all__ = ["evaluate", "forward", "EvalResult", "Stopwatch"]


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    samples: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ImageDataset, comm: MPI.Intracomm, batch_size: int = 1000, *,
             shards: Optional[int] = None, shard: Optional[int] = None,
             outputs: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None,
             counts: bool = True, device: Optional[torch.device] = None,
             loss_fn: Optional[Callable] = None, metric: Optional[Callable] = None) -> EvalResult:
    """Mean cross-entropy and accuracy over the whole ``dataset``, in eval mode, per label: a sample
    with several (a language model's tokens, logits ``(batch, classes, tokens)``) counts each.
    Collective over ``comm``; every rank gets the same result.

    Args:
        model: put in eval mode for the pass (and back).
        dataset: what to evaluate.
        comm: every rank of the job.
        shards, shard: the dataset is split into ``shards`` parts (data-parallel
            replicas; default: the ranks of ``comm``) and this rank takes part ``shard``.
        outputs: ``outputs(images, labels)``, the logits of a batch, or None on a rank
            that holds none (a pipeline's other stages); default ``model(images)``.
        counts: whether this rank's totals count (one rank per replica does).
        device: where batches go (default: where ``model``'s first parameter is).
        loss_fn, metric: ``fn(outputs, targets)``, a batch's mean loss and score, weighted by its samples
            (then the result's ``accuracy`` is ``metric``'s mean, NaN without one); default cross-entropy
            and accuracy per label.
    """
    shards = comm.Get_size() if shards is None else shards
    shard = comm.Get_rank() if shard is None else shard
    if device is None:
        device = module_device(model)
    was_training = model.training
    model.eval()
    totals = np.zeros(3)  # loss sum, correct, count
    for indices in rank_batches(len(dataset), batch_size, shards, shard, seed=0, epoch=0, shuffle=False):
        images, labels = to_device(dataset.batch(indices), device)
        logits = forward(model, images) if outputs is None else outputs(images, labels)
        if counts and logits is not None and loss_fn is None and metric is None:
            totals += (F.cross_entropy(logits, labels, reduction="sum").item(),
                       (logits.argmax(1) == labels).sum().item(), labels.numel())
        elif counts and logits is not None:  # the user's: batch means weighted by samples
            samples = len(labels)
            loss = loss_fn(logits, labels) if loss_fn is not None else F.cross_entropy(logits, labels)
            score = metric(logits, labels) if metric is not None else float("nan")
            totals += (float(loss) * samples, float(score) * samples, samples)
    collectives.allreduce_sum(comm, totals, "evaluation")
    model.train(was_training)
    return EvalResult(totals[0] / totals[2], totals[1] / totals[2], int(totals[2]))


def forward(model, inputs):
    """``model(**inputs)`` for a dict of keyword inputs, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


class Stopwatch:
    """Laps of wall time: ``lap()`` returns seconds since the previous lap."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
