"""Profile each layer and choose contiguous stages that minimise the slowest stage."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from mpi4py import MPI
from torch import nn

from mpipar.diagnostics import collectives
from mpipar.diagnostics.failure import agreed
from mpipar.pipeline.placement import even_balance

__all__ = ["LayerProfile", "profile_layers", "balance_by_time", "stage_sums", "auto_balance",
           "gather_stage_times", "format_report"]


@dataclass(frozen=True)
class LayerProfile:
    """One layer on one micro-batch: seconds and bytes."""

    name: str
    forward_time: float
    backward_time: float
    param_bytes: int
    activation_bytes: int  # output of one micro-batch (what crosses a boundary after this layer)

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


def profile_layers(module: nn.Sequential, sample: torch.Tensor, *, repeats: int = 7,
                   warmup: int = 1) -> List[LayerProfile]:
    """Time each layer's forward and backward on ``sample`` (one micro-batch). Local.

    Each layer runs on the previous layer's output. Timing goes in rounds that
    visit every layer once, so a change in machine load hits all layers alike; the
    median over ``repeats`` rounds (after ``warmup``) is kept. A layer computes
    its input's gradient only when an earlier layer has trainable parameters, as
    in the real backward pass (the first stage never differentiates the batch).
    Gradients come from ``torch.autograd.grad`` so ``.grad`` is untouched, and
    buffers (BatchNorm statistics) are restored.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    layers = list(module.named_children())
    try:
        inputs, outputs, needs_input_grad, trainable_before = [], [], [], False
        x = sample
        with torch.no_grad():
            for _, layer in layers:
                inputs.append(x.detach())
                needs_input_grad.append(trainable_before and x.is_floating_point())
                trainable_before |= any(p.requires_grad for p in layer.parameters())
                x = layer(x)
                outputs.append(x)
        forward = [[] for _ in layers]
        backward = [[] for _ in layers]
        for run in range(warmup + repeats):
            for index, (_, layer) in enumerate(layers):
                x = inputs[index].clone().requires_grad_(needs_input_grad[index])  # layers may work in place
                begin = time.perf_counter()
                with torch.enable_grad():
                    y = layer(x)
                middle = time.perf_counter()
                wrt = [x] if needs_input_grad[index] else []
                wrt += [p for p in layer.parameters() if p.requires_grad]
                if wrt and y.requires_grad:
                    torch.autograd.grad(y, wrt, grad_outputs=torch.ones_like(y), allow_unused=True)
                end = time.perf_counter()
                if run >= warmup:
                    forward[index].append(middle - begin)
                    backward[index].append(end - middle)
        profiles = []
        for index, (name, layer) in enumerate(layers):
            params = sum(p.numel() * p.element_size() for p in layer.parameters())
            y = outputs[index]
            profiles.append(LayerProfile(name, statistics.median(forward[index]),
                                         statistics.median(backward[index]), params,
                                         y.numel() * y.element_size()))
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])
    return profiles


def balance_by_time(times: Sequence[float], stages: int) -> List[int]:
    """Contiguous split of layers with ``times`` into ``stages`` non-empty stages
    minimising the largest stage sum (exact dynamic programme, O(stages * n^2)).

    Among equally good splits the one with the earliest cut points is returned.

    Raises:
        ValueError: fewer layers than stages, or a negative time.
    """
    times = [float(t) for t in times]
    even_balance(len(times), stages)  # validates the counts
    if any(t < 0 for t in times):
        raise ValueError(f"layer times must be >= 0, got {times}")
    n = len(times)
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    inf = float("inf")
    # best[k][i]: smallest slowest-stage time splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-15:
                    best[k][i], cut[k][i] = value, j
    balance, i = [], n
    for k in range(stages, 0, -1):
        balance.append(i - cut[k][i])
        i = cut[k][i]
    return balance[::-1]


def stage_sums(values: Sequence[float], balance: Sequence[int]) -> List[float]:
    """Per-stage sums of per-layer ``values`` for a contiguous ``balance``."""
    if sum(balance) != len(values):
        raise ValueError(f"balance {list(balance)} covers {sum(balance)} layers, not {len(values)}")
    sums, start = [], 0
    for count in balance:
        sums.append(float(sum(values[start:start + count])))
        start += count
    return sums


def auto_balance(module: nn.Sequential, sample: Optional[torch.Tensor], stages: int, comm: MPI.Intracomm,
                 *, root: int = 0, repeats: int = 7) -> tuple:
    """Profile on ``root`` (the others wait) and give every rank the same balance.

    Collective over ``comm``: every rank calls it; ``sample`` (one micro-batch) is
    needed on ``root`` only. Size 1 profiles locally.

    Returns:
        ``(balance, profiles)``, equal on every rank.

    Raises:
        ValueError: on every rank, when profiling or balancing fails on ``root``.
    """
    reply = None
    if comm.Get_rank() == root:
        try:
            profiles = profile_layers(module, sample, repeats=repeats)
            reply = (balance_by_time([p.time for p in profiles], stages), profiles, None)
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
