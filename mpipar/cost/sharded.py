"""Sharded data parallelism (ZeRO-1/2/3) in the cost model: the step with its reduce-scatters and all-gathers
on the calibrated links, and the memory per rank. Pure (no torch, no MPI)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from mpipar.comm.buckets import assign_buckets
from mpipar.cost.compress import FP32, WIRE16
from mpipar.cost.machine import Machine, ModelProfile
from mpipar.cost.memory import activation_memory, shard_bytes, state_memory
from mpipar.cost.model import (
    DEFAULT,
    Layout,
    Prediction,
    backward_timeline,
    layers_at,
    precision_assumptions,
    predict_data_parallel,
    step_overhead,
)
from mpipar.cost.options import TrainingOptions

__all__ = ["predict_sharded", "ShardedPrediction"]


@dataclass(frozen=True)
class ShardedPrediction(Prediction):
    """A ZeRO stage's :class:`Prediction`; ``gathers``: the all-gathers' seconds not hidden behind compute."""

    def _where(self) -> str:
        if self.layout.dp == 1:
            return "one rank: compute only"
        on = f" on {self.link}" if self.link else ""
        reduce = "Allreduce" if self.strategy == "ZeRO-1" else "reduce-scatter"
        return (f"{self.share(self.exposed_comm - self.gathers)} exposed {reduce}, {self.share(self.gathers)} "
                f"exposed all-gather{on}")


def _reduce_scatter(machine: Machine, nbytes: float, nodes: Sequence[int], grad_wire: str) -> float:
    """A gradient reduce-scatter of ``nbytes`` of fp32 (on a 16-bit wire: an all-to-all of half the bytes,
    the fp32 sum of the chunks received and the casts: the buffer to 16 bits and the chunks received to
    fp32, a pass each at ``reduce_seconds_per_byte`` per fp32 byte, as :func:`~mpipar.cost.compress.wire16_seconds`)."""
    if grad_wire == "fp32":
        return machine.collective_seconds("reduce_scatter", nbytes, nodes)
    p = len(nodes)
    add = machine.reduce_seconds_per_byte * (p - 1) * nbytes / p if p > 1 else 0.0
    casts = machine.reduce_seconds_per_byte * 2 * nbytes if p > 1 else 0.0
    return machine.collective_seconds("alltoall", nbytes * WIRE16 / FP32, nodes) + add + casts


def predict_sharded(profile: ModelProfile, batch: int, layout: Layout, machine: Machine, *, zero: int,
                    bucket_mb: float = 25.0, options: TrainingOptions = DEFAULT) -> Prediction:
    """ZeRO stage ``zero`` over ``layout.dp`` ranks (pp = tp = 1), ``batch`` samples per rank, as
    ``mpipar/sharded`` runs it (``docs/sharded.md``); each collective one after the other on the link.

    * 1: data parallelism's step (the reducer's bucketed Allreduces, overlapped), then after the
      optimizer's step an all-gather of the flat parameter buffer.
    * 2: buckets of whole parameters reduce-scattered as they fill (overlapped like the Allreduces),
      two small Allreduces (sample counts, used flags), the step, the all-gather.
    * 3: per unit (layer) an all-gather before its forward, the next one's started when it begins
      (prefetch); in the backward the unit's gather (all but the last unit's, kept) started when the
      unit after it begins its backward, its reduce-scatter when its backward ends; the two small
      Allreduces; no all-gather after the step.

    Memory: :func:`~mpipar.cost.memory.state_memory` of the stage plus the activations.

    On a dp x 1 x tp layout (stages 1 and 2: the replicas of each tensor-parallel rank, ``data_comm``)
    ``profile`` is what one tensor-parallel rank computes and holds (:func:`~mpipar.cost.tensor.predict_tensor_grid`
    passes it, its layers' times including their Allreduces). Raises ValueError for a stage other than 1-3, a
    layout with pipelines, or stage 3 with tensor parallelism.
    """
    if zero not in (1, 2, 3):
        raise ValueError(f"ZeRO stages are 1, 2 and 3 (0 is data parallelism), got {zero}")
    if layout.pp != 1 or (layout.tp != 1 and zero == 3):
        raise ValueError(f"the cost model prices ZeRO-1/2 over dp x 1 x tp and ZeRO-3 over dp x 1 x 1 layouts "
                         f"(pipelines: predict_pipeline's zero), got ZeRO-{zero} on {layout.shape}")
    layers = layers_at(profile, batch)
    units = [float(sum(layer.param_bytes)) for layer in layers]
    group = layout.nodes_of(layout.replicas_of())
    link = machine.link(not layout.dp_across()).description
    memory = state_memory(units, layout.dp, zero, options).total + activation_memory(layers, options)
    variant = " ".join(word for word in ("" if options.grad_wire == "fp32" or zero == 1 else options.compression,
                                         "recompute" if options.recompute == "full" else "") if word)
    gather_all = machine.collective_seconds("allgather", layout.dp * shard_bytes(sum(units), layout.dp), group)
    flags = 2 * machine.gradient_allreduce_seconds(8.0, group)
    overhead = step_overhead(profile, batch)
    if zero == 1:
        dp = predict_data_parallel(profile, batch, layout, machine, bucket_mb=bucket_mb, options=options)
        return ShardedPrediction("ZeRO-1", layout, dp.step + gather_all, dp.compute, dp.exposed_comm + gather_all,
                                 memory_bytes=memory, link=link, variant=variant, assumptions=dp.assumptions,
                                 gathers=gather_all)
    ratio, notes = precision_assumptions(machine, options)
    if zero == 2:
        _, ready, backward_end = backward_timeline(layers, ratio, options.recompute)
        nbytes = [size for layer in layers for size in layer.param_bytes]
        owner = [index for index, layer in enumerate(layers) for _ in layer.param_bytes]
        network_free = 0.0
        for bucket in assign_buckets(nbytes, [0] * len(nbytes), bucket_mb * 2**20):
            start = max(network_free, max(ready[owner[i]] for i in bucket))
            network_free = start + _reduce_scatter(machine, sum(nbytes[i] for i in bucket), group, options.grad_wire)
        exposed = max(0.0, network_free - backward_end) + flags
        compute = backward_end + overhead
        return ShardedPrediction("ZeRO-2", layout, compute + exposed + gather_all, compute, exposed + gather_all,
                                 memory_bytes=memory, link=link, variant=variant, assumptions=notes,
                                 gathers=gather_all)
    padded = [layout.dp * shard_bytes(size, layout.dp) for size in units]
    gather = [machine.collective_seconds("allgather", size, group) for size in padded]
    forward_times = [ratio * layer.forward for layer in layers]
    backward_times = [ratio * (layer.backward + (layer.forward if options.recompute == "full" else 0.0))
                      for layer in layers]
    count = len(layers)
    # one queue of collectives in the order the hooks start them; compute waits for its unit's gather
    network_free, clock, waited = 0.0, 0.0, 0.0
    gathered: List[float] = [0.0] * count
    network_free = gathered[0] = gather[0]
    for index in range(count):
        begin = max(clock, gathered[index])
        waited += begin - clock
        if index + 1 < count:  # prefetch the next unit when this one begins
            network_free = gathered[index + 1] = max(network_free, begin) + gather[index + 1]
        clock = begin + forward_times[index]
    for index in reversed(range(count)):
        if index < count - 1:
            begin = max(clock, gathered[index])
            waited += begin - clock
            clock = begin
        if index > 0:  # the previous unit's gather starts when this unit's backward begins
            network_free = gathered[index - 1] = max(network_free, clock) + gather[index - 1]
        clock += backward_times[index]
        network_free = max(network_free, clock) + _reduce_scatter(machine, padded[index], group, options.grad_wire)
    busy = sum(forward_times) + sum(backward_times)
    exposed = max(0.0, network_free - clock) + flags + waited
    return ShardedPrediction("ZeRO-3", layout, busy + exposed + overhead, busy + overhead, exposed,
                             memory_bytes=memory, link=link, variant=variant, assumptions=notes, gathers=waited)
