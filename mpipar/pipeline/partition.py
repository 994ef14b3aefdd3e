"""Choose contiguous stages that minimise the slowest stage, from a profile taken on one rank (the profiler:
:mod:`mpipar.cost.profile`; the split: :mod:`mpipar.pipeline_plan.balance`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from mpi4py import MPI
from torch import nn

from mpipar.cost.profile import LayerProfile, profile_layers
from mpipar.diagnostics import collectives
from mpipar.diagnostics.failure import agreed
from mpipar.pipeline_plan.balance import balance_by_time, stage_sums

__all__ = ["LayerProfile", "profile_layers", "balance_by_time", "stage_sums", "stage_memory", "auto_balance",
           "gather_stage_times", "format_report"]


def stage_memory(profiles: Sequence[LayerProfile], balance: Sequence[int], in_flight: Sequence[int],
                 *, param_copies: int = 3) -> List[float]:
    """Bytes per stage: ``in_flight`` micro-batches of saved activations plus ``param_copies`` times the
    parameters (weights, gradients, momentum)."""
    saved = stage_sums([p.saved_bytes for p in profiles], balance)
    params = stage_sums([p.param_bytes for p in profiles], balance)
    return [count * a + param_copies * w for count, a, w in zip(in_flight, saved, params)]


def auto_balance(module: nn.Sequential, sample: Optional[torch.Tensor], stages: int, comm: MPI.Intracomm,
                 *, root: int = 0, repeats: int = 7, in_flight: Optional[Sequence[int]] = None,
                 memory_limit: Optional[float] = None, param_copies: int = 3) -> tuple:
    """Profile on ``root`` (the others wait) and give every rank the same balance.

    Collective over ``comm``: every rank calls it; ``sample`` (one micro-batch) is
    needed on ``root`` only. Size 1 profiles locally. With ``memory_limit`` (bytes)
    every stage's :func:`stage_memory` (``in_flight`` micro-batches per stage, default
    one) stays within it.

    Returns:
        ``(balance, profiles)``, equal on every rank.

    Raises:
        ValueError: on every rank, when profiling or balancing fails on ``root``.
    """
    reply: Optional[tuple] = None  # (balance, profiles, error message)
    if comm.Get_rank() == root:
        try:
            if sample is None:
                raise ValueError(f"rank {root} profiles the layers and needs a sample batch, got None")
            profiles = profile_layers(module, sample, repeats=repeats)
            balance = balance_by_time(
                [p.time for p in profiles], stages, memory=[p.saved_bytes for p in profiles],
                fixed_memory=[param_copies * p.param_bytes for p in profiles], in_flight=in_flight,
                memory_limit=memory_limit)
            reply = (balance, profiles, None)
        except Exception as exc:  # noqa: BLE001 - sent to every rank below
            reply = (None, None, f"{type(exc).__name__}: {exc}")
    balance, profiles, error = collectives.bcast(comm, reply, "automatic balance", root=root)
    if error is not None:
        raise agreed(ValueError)(f"automatic balance on rank {root} failed: {error}")
    return balance, profiles


def gather_stage_times(comm: MPI.Intracomm, stage_busy: Dict[int, float], num_stages: int) -> List[float]:
    """Every stage's measured compute seconds, from each rank's ``StepResult.stage_busy``.

    Collective (one allgather); every rank gets the list.
    """
    times = [0.0] * num_stages
    gathered = collectives.allgather(comm, dict(stage_busy), "stage times")
    for busy in gathered:
        for stage, seconds in busy.items():
            times[stage] += seconds
    return times


def format_report(balance: Sequence[int], predicted: Sequence[float], measured: Sequence[float]) -> str:
    """A table of predicted and measured seconds per stage, with max/mean imbalance."""
    lines = ["stage  layers  predicted ms  measured ms"]
    for stage, (count, p, m) in enumerate(zip(balance, predicted, measured)):
        lines.append(f"{stage:5d}  {count:6d}  {1e3 * p:12.3f}  {1e3 * m:11.3f}")

    def imbalance(values):
        mean = sum(values) / len(values)
        return max(values) / mean if mean > 0 else float("nan")

    lines.append(f"slowest/mean stage: predicted {imbalance(predicted):.2f}, measured {imbalance(measured):.2f}")
    return "\n".join(lines)
