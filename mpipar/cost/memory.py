"""Bytes a rank holds at its peak: parameters, gradients, optimizer state (per ZeRO stage) and activations.

Pure. Parameters are fp32 master weights whatever the autocast precision (4 bytes each), gradients fp32,
the optimizer's state :data:`~mpipar.cost.options.OPTIMIZER_STATE_BYTES` per parameter. The ZeRO stages
hold what ``docs/sharded.md`` describes of ``mpipar/sharded``, at its peak within a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mpipar.cost.machine import LayerCost
from mpipar.cost.options import ASSUMED_ACTIVATION_RATIO, TrainingOptions

__all__ = ["Memory", "state_memory", "activation_memory", "shard_bytes", "GiB"]

GiB = 2**30
FP32 = 4


@dataclass(frozen=True)
class Memory:
    """Bytes per rank by kind. ``params``, ``grads``, ``optimizer``: held between steps (what
    ``ShardedDataParallel.memory`` reports); ``transient``: held only within a step (ZeRO-2's whole
    gradient buffer, ZeRO-3's gathered units and a unit's whole gradients); ``total``: the peak."""

    params: float
    grads: float
    optimizer: float
    activations: float = 0.0
    transient: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transient


def shard_bytes(nbytes: float, ranks: int) -> float:
    """One rank's shard of a flat fp32 buffer of ``nbytes``, padded to a multiple of ``ranks`` elements."""
    elements = -(-int(nbytes) // FP32)
    return FP32 * max(1, -(-elements // ranks)) if elements else 0.0


def state_memory(unit_bytes: Sequence[float], ranks: int, zero: int, options: TrainingOptions) -> Memory:
    """Parameters, gradients and optimizer state per rank (no activations) of a model whose units (layers)
    hold ``unit_bytes`` of fp32 parameters each, on ``ranks`` data-parallel ranks at ZeRO stage ``zero``.

    * 0 (data parallelism): ``P`` parameters, ``P`` gradients, ``s P / 4`` state (``s`` bytes per parameter).
    * 1: the state sharded, ``s P / 4 N`` (shards padded to whole elements; the flat parameter buffer too).
    * 2: gradients reduce-scattered into a shard (``P / N``), but the flat gradient buffer they fill is
      whole from the forward to the step: ``P`` transient.
    * 3: parameters, gradients and state sharded per unit; transient: the unit gathered and the next
      one prefetched (the largest two consecutive units) and the largest unit's gradients twice (its
      autograd ``.grad`` and the flat copy that is reduce-scattered). On one rank nothing is gathered.

    Raises ValueError for a stage other than 0-3 or ``ranks`` < 1.
    """
    if zero not in (0, 1, 2, 3) or ranks < 1:
        raise ValueError(f"ZeRO stage must be 0-3 and ranks >= 1, got {zero} and {ranks}")
    total = float(sum(unit_bytes))
    state = options.state_bytes / FP32
    if zero == 0:
        return Memory(total, total, state * total)
    shard = shard_bytes(total, ranks)
    if zero == 1:
        return Memory(ranks * shard, total, state * shard)
    if zero == 2:
        return Memory(ranks * shard, shard, state * shard, transient=total)
    shards = sum(shard_bytes(size, ranks) for size in unit_bytes)
    if ranks == 1:
        return Memory(shards, shards, state * shards)
    pairs = [a + b for a, b in zip(unit_bytes, unit_bytes[1:])] or list(unit_bytes) or [0.0]
    return Memory(shards, shards, state * shards, transient=max(pairs) + 2 * max(unit_bytes, default=0.0))


def activation_memory(layers: Sequence[LayerCost], options: TrainingOptions, *, in_flight: int = 1,
                      input_bytes: float = 0.0) -> float:
    """What autograd keeps for the backward of ``in_flight`` micro-batches through ``layers``.

    ``recompute="none"``: every layer's saved tensors. ``"full"``: each layer keeps only its input
    (``input_bytes`` for the first: a pipeline stage's received activation, 0 for the model's input
    batch, which the step holds anyway), plus one layer's saved tensors while it is recomputed.
    16-bit autocast: saved activations at :data:`~mpipar.cost.options.ASSUMED_ACTIVATION_RATIO` of
    fp32's (an assumption, not measured).
    """
    ratio = 1.0 if options.precision == "fp32" else ASSUMED_ACTIVATION_RATIO
    if options.recompute == "none":
        return ratio * in_flight * sum(layer.saved_bytes for layer in layers)
    inputs = input_bytes + sum(layer.activation_bytes for layer in layers[:-1])
    return ratio * (in_flight * inputs + max((layer.saved_bytes for layer in layers), default=0))
