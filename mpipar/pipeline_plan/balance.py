"""Contiguous stages from per-layer costs: the split that minimises the slowest stage, and per-stage sums. Pure."""

from __future__ import annotations

from typing import List, Optional, Sequence

from mpipar.pipeline_plan.placement import even_balance

__all__ = ["balance_by_time", "stage_sums"]


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
