"""Profile each layer and choose contiguous stages that minimise the slowest stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from mpi4py import MPI
from torch import nn

from mpipar.diagnostics import collectives
from mpipar.diagnostics.failure import agreed
from mpipar.pipeline.placement import even_balance
from mpipar.pipeline.skip import SaveSkip, SkipConsumer
from mpipar.pipeline.stage import counting_saved_bytes

__all__ = ["LayerProfile", "profile_layers", "balance_by_time", "stage_sums", "stage_memory", "auto_balance",
           "gather_stage_times", "format_report"]


@dataclass(frozen=True)
class LayerProfile:
    """One layer on one micro-batch: seconds and bytes."""

    name: str
    forward_time: float
    backward_time: float
    param_bytes: int
    activation_bytes: int  # output of one micro-batch (what crosses a boundary after this layer)
    saved_bytes: int = 0  # what autograd keeps of one micro-batch for the backward (parameters not counted)

    @property
    def time(self) -> float:
        return self.forward_time + self.backward_time


def _saved_bytes(layer: nn.Module, args: tuple) -> int:
    """Bytes autograd saves for the backward when ``layer(*args)`` runs (parameters not counted)."""
    with torch.enable_grad(), counting_saved_bytes(layer.parameters()) as seen:
        layer(*args)
    return sum(seen.values())


def profile_layers(module: nn.Sequential, sample: torch.Tensor, *, repeats: int = 7,
                   warmup: int = 1) -> List[LayerProfile]:
    """Time each layer's forward and backward on ``sample`` (one micro-batch). Local.

    Each layer runs on the previous layer's output (a skip consumer also on the skip
    its ``SaveSkip`` kept). Timing goes in rounds that visit every layer once, so a
    change in machine load hits all layers alike; the fastest of ``repeats`` rounds
    (after ``warmup``) is kept (load on a shared machine only ever adds time, and one
    preempted layer would otherwise skew the split). A layer computes its inputs' gradients only when an
    earlier layer has trainable parameters, as in the real backward pass (the first
    stage never differentiates the batch). Gradients come from
    ``torch.autograd.grad`` so ``.grad`` is untouched, and buffers (BatchNorm
    statistics) are restored.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    layers = list(module.named_children())
    try:
        inputs, outputs, needs_grad, trainable_before = [], [], [], False
        x, skips = sample, {}
        with torch.no_grad():
            for _, layer in layers:
                args = (x, skips.pop(layer.name)) if isinstance(layer, SkipConsumer) else (x,)
                inputs.append(tuple(arg.detach() for arg in args))
                needs_grad.append([trainable_before and arg.is_floating_point() for arg in args])
                trainable_before |= any(p.requires_grad for p in layer.parameters())
                if isinstance(layer, SaveSkip):
                    skips[layer.name] = x
                x = layer(*args)
                outputs.append(x)
        forward = [[] for _ in layers]
        backward = [[] for _ in layers]
        for run in range(warmup + repeats):
            for index, (_, layer) in enumerate(layers):
                args = [arg.clone().requires_grad_(needs)  # layers may work in place
                        for arg, needs in zip(inputs[index], needs_grad[index])]
                begin = time.perf_counter()
                with torch.enable_grad():
                    y = layer(*args)
                middle = time.perf_counter()
                wrt = [arg for arg, needs in zip(args, needs_grad[index]) if needs]
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
            args = tuple(arg.clone().requires_grad_(needs) for arg, needs in zip(inputs[index], needs_grad[index]))
            profiles.append(LayerProfile(name, min(forward[index]), min(backward[index]), params,
                                         y.numel() * y.element_size(), _saved_bytes(layer, args)))
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])
    return profiles


def balance_by_time(times: Sequence[float], stages: int, *, memory: Optional[Sequence[float]] = None,
                    fixed_memory: Optional[Sequence[float]] = None, in_flight: Optional[Sequence[int]] = None,
                    memory_limit: Optional[float] = None) -> List[int]:
    """Contiguous split of layers with ``times`` into ``stages`` non-empty stages
    minimising the largest stage sum, and among those maximising the smallest (exact
    dynamic programmes, O(stages * n^2)), optionally with each stage's memory at most
    ``memory_limit``.

    A stage's memory is ``in_flight[stage] * sum(memory) + sum(fixed_memory)`` over its
    layers: the activations autograd keeps for each micro-batch in flight (the
    schedule's ``max_in_flight``) plus what does not grow with them (parameters,
    gradients, optimizer state). Among equally good splits the one with the earliest
    cut points is returned.

    Raises:
        ValueError: fewer layers than stages, a negative time, or no split within
            ``memory_limit`` (with the least memory any split needs).
    """
    times = [float(t) for t in times]
    even_balance(len(times), stages)  # validates the counts
    if any(t < 0 for t in times):
        raise ValueError(f"layer times must be >= 0, got {times}")
    n = len(times)
    limit = float("inf") if memory_limit is None else float(memory_limit)
    memory = [0.0] * n if memory is None else [float(m) for m in memory]
    fixed_memory = [0.0] * n if fixed_memory is None else [float(m) for m in fixed_memory]
    in_flight = [1] * stages if in_flight is None else list(in_flight)
    if len(memory) != n or len(fixed_memory) != n or len(in_flight) != stages:
        raise ValueError(f"need {n} per-layer memories and {stages} in-flight counts, got {len(memory)}, "
                         f"{len(fixed_memory)} and {len(in_flight)}")

    def prefix_sums(values):
        sums = [0.0]
        for value in values:
            sums.append(sums[-1] + value)
        return sums

    prefix, activations, fixed = prefix_sums(times), prefix_sums(memory), prefix_sums(fixed_memory)
    inf = float("inf")
    # best[k][i]: smallest slowest-stage time splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    least = inf  # the least memory of a stage that did not fit, for the message
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                used = in_flight[k - 1] * (activations[i] - activations[j]) + fixed[i] - fixed[j]
                if used > limit:
                    least = min(least, used)
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-15:
                    best[k][i], cut[k][i] = value, j
    if best[stages][n] == inf:
        raise ValueError(f"no split of {n} layers into {stages} stages keeps every stage within "
                         f"{limit / 2**20:.1f} MiB (the smallest stage that did not fit needs "
                         f"{least / 2**20:.1f} MiB); use more stages, fewer micro-batches in flight (1f1b) or "
                         f"a larger limit")
    # among the splits whose slowest stage is that fast, the one whose fastest stage is slowest
    ceiling = best[stages][n] * (1 + 1e-12)
    most = [[-inf] * (n + 1) for _ in range(stages + 1)]
    most[0][0] = inf
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                stage_time = prefix[i] - prefix[j]
                used = in_flight[k - 1] * (activations[i] - activations[j]) + fixed[i] - fixed[j]
                if stage_time > ceiling or used > limit or most[k - 1][j] == -inf:
                    continue
                value = min(most[k - 1][j], stage_time)
                if value > most[k][i] + 1e-15:
                    most[k][i], cut[k][i] = value, j
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
    reply = None
    if comm.Get_rank() == root:
        try:
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
