"""Predicted step time, its parts and memory per rank for data parallelism, pipelines, tensor parallelism and grids.

Pure Python over a :class:`~mpipar.cost.machine.Machine`: no MPI, nothing is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mpipar.comm.buckets import assign_buckets
from mpipar.cost.compress import powersgd_seconds, powersgd_split, wire16_seconds
from mpipar.cost.machine import LayerCost, Link, Machine, ModelProfile
from mpipar.cost.memory import activation_memory, shard_bytes, state_memory
from mpipar.cost.options import TrainingOptions, compute_ratio
from mpipar.pipeline_plan.balance import balance_by_time, stage_sums
from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.pipeline_plan.schedule import Schedule, simulate_step

__all__ = ["Layout", "Prediction", "layers_at", "step_overhead", "predict_data_parallel", "predict_pipeline",
           "tensor_parallel_allreduces", "predict_tensor_parallel", "backward_timeline", "gradient_sum_seconds",
           "precision_assumptions"]

DEFAULT = TrainingOptions()


@dataclass(frozen=True)
class Layout:
    """``ranks`` as ``dp`` replicas of ``pp`` stages of ``tp`` ranks, ``ranks_per_node`` consecutive ranks a node.

    Rank ``(replica * pp + stage) * tp + t``, as :class:`~mpipar.comm.topology.ProcessGrid` lays ranks
    out node by node. Raises ValueError when the degrees do not multiply to ``ranks``.
    """

    ranks: int
    ranks_per_node: int
    dp: int = 0  # 0: ranks / (pp * tp)
    pp: int = 1
    tp: int = 1

    def __post_init__(self):
        if self.ranks < 1 or self.ranks_per_node < 1 or self.pp < 1 or self.tp < 1:
            raise ValueError(f"ranks, ranks per node, pp and tp must be >= 1, got {self.ranks}, "
                             f"{self.ranks_per_node}, {self.pp}, {self.tp}")
        if self.dp == 0:
            object.__setattr__(self, "dp", self.ranks // (self.pp * self.tp))
        if self.dp * self.pp * self.tp != self.ranks:
            raise ValueError(f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp} is not {self.ranks} ranks; "
                             f"choose degrees whose product is the rank count")

    def rank(self, replica: int, stage: int, t: int = 0) -> int:
        return (replica * self.pp + stage) * self.tp + t

    def spans_nodes(self, ranks: Sequence[int]) -> bool:
        return len(set(self.nodes_of(ranks))) > 1

    def nodes_of(self, ranks: Sequence[int]) -> List[int]:
        """The node of each of ``ranks``."""
        return [rank // self.ranks_per_node for rank in ranks]

    def replicas_of(self, stage: int = 0, t: int = 0) -> List[int]:
        """The ranks holding position (``stage``, ``t``) in every replica: a data-parallel group."""
        return [self.rank(r, stage, t) for r in range(self.dp)]

    def boundary_across(self, stage: int) -> bool:
        """Whether stage ``stage`` and ``stage + 1`` sit on different nodes in any replica."""
        return any(self.spans_nodes([self.rank(r, stage), self.rank(r, stage + 1)]) for r in range(self.dp))

    def dp_across(self) -> bool:
        return any(self.spans_nodes(self.replicas_of(s, t)) for s in range(self.pp) for t in range(self.tp))

    def tp_across(self) -> bool:
        return any(self.spans_nodes([self.rank(r, s, t) for t in range(self.tp)])
                   for r in range(self.dp) for s in range(self.pp))

    @property
    def shape(self) -> str:
        return f"{self.dp} x {self.pp} x {self.tp}"


@dataclass(frozen=True)
class Prediction:
    """One step of one strategy on one layout: seconds, their parts, and the most bytes a rank holds.

    ``compute``: the busiest rank's forward, backward and update. ``exposed_comm``: Allreduce time that
    ends after the backward (data parallelism, replicas) plus tensor-parallel Allreduces. ``p2p``: what the
    pipeline's activation and gradient messages add to its makespan. ``bubble``: the pipeline's idle share
    (``1 - busy / (stages * makespan)``, as measured).
    """

    strategy: str
    layout: Layout
    step: float
    compute: float
    exposed_comm: float = 0.0
    p2p: float = 0.0
    bubble: float = 0.0
    memory_bytes: float = 0.0
    microbatches: int = 1
    link: str = ""
    variant: str = ""  # what distinguishes rows of one strategy: "bf16 wire", "powersgd:4", "recompute"
    assumptions: Tuple[str, ...] = ()  # what the prediction assumed for want of a measurement
    gathers: float = 0.0  # ZeRO's all-gathers' seconds not hidden behind compute (part of exposed_comm)

    def attrs(self) -> dict:
        """The ``predicted_*`` attributes a run's metrics file stores."""
        return {"predicted_strategy": self.strategy, "predicted_shape": self.layout.shape,
                "predicted_step_seconds": self.step, "predicted_compute_seconds": self.compute,
                "predicted_exposed_comm_seconds": self.exposed_comm, "predicted_p2p_seconds": self.p2p,
                "predicted_bubble": self.bubble, "predicted_memory_bytes": self.memory_bytes}

    def share(self, seconds: float) -> str:
        """``seconds`` as a percentage of the step."""
        return f"{100 * seconds / self.step:.0f}%" if self.step > 0 else "0%"

    @property
    def label(self) -> str:
        """The strategy and its variant, as the plan's table names a row."""
        return f"{self.strategy} {self.variant}".strip()

    def why(self) -> str:
        """A sentence: where the step goes (and what it assumed)."""
        text = self._where()
        return text + "".join(f"; assumed: {note}" for note in self.assumptions)

    def _where(self) -> str:
        share = self.share
        on = f" on {self.link}" if self.link else ""
        if self.layout.pp == 1 and self.layout.tp == 1:
            if self.layout.dp == 1:
                return "one rank: compute only"
            return f"{share(self.exposed_comm)} of the step is exposed Allreduce{on}"
        parts = []
        if self.layout.pp > 1:
            parts += [f"bubble {100 * self.bubble:.0f}%", f"p2p {share(self.p2p)}"]
        if self.layout.dp > 1 or self.layout.tp > 1:
            parts.append(f"Allreduce {share(self.exposed_comm - self.gathers)}")
        if self.gathers:
            parts.append(f"all-gather {share(self.gathers)}")
        return ", ".join(parts) + on


def _interpolate(points: Sequence[Tuple[float, float]], x: float) -> float:
    """Piecewise linear through ``points`` (sorted by x), extended by the end segments; proportional with one."""
    if len(points) == 1:
        x0, y0 = points[0]
        return y0 * x / x0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1 or (x1, y1) == points[-1]:
            return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    raise AssertionError("unreachable")


def layers_at(profile: ModelProfile, batch: float) -> List[LayerCost]:
    """Every layer's cost at micro-batch size ``batch`` (interpolated between the calibrated sizes,
    extrapolated linearly beyond them; bytes in proportion to the nearest size)."""
    if batch <= 0:
        raise ValueError(f"the micro-batch must hold samples, got {batch}")
    sizes = profile.sizes
    nearest = min(sizes, key=lambda size: abs(size - batch))
    result = []
    for index in range(profile.num_layers):
        def curve(attribute, index=index):
            return [(size, getattr(profile.layers[size][index], attribute)) for size in sizes]
        reference = profile.layers[nearest][index]
        result.append(LayerCost(reference.name, _interpolate(curve("forward"), batch),
                                _interpolate(curve("backward"), batch), reference.param_bytes,
                                round(reference.activation_bytes * batch / nearest),
                                round(reference.saved_bytes * batch / nearest), reference.param_shapes))
    return result


def step_overhead(profile: ModelProfile, batch: float) -> float:
    """The whole step's time beyond the sum of its layers (loss, optimizer, Python) at ``batch``; 0 when unknown."""
    points = [(size, seconds - sum(layer.forward + layer.backward for layer in profile.layers[size]))
              for size, seconds in sorted(profile.step_seconds.items()) if size in profile.layers]
    return max(0.0, _interpolate(points, batch)) if points else 0.0


def _param_bytes(layers: Sequence[LayerCost]) -> int:
    return sum(sum(layer.param_bytes) for layer in layers)


def precision_assumptions(machine: Machine, options: TrainingOptions) -> Tuple[float, Tuple[str, ...]]:
    """The compute ratio of ``options.precision`` and the assumptions the prediction makes."""
    ratio, measured = compute_ratio(machine.compute_ratio, options.precision)
    notes = [] if measured else [f"{options.precision} compute as fast as fp32 (not calibrated)"]
    if options.precision != "fp32":
        notes.append(f"{options.precision} activations half of fp32's")
    return ratio, tuple(notes)


def backward_timeline(layers: Sequence[LayerCost], ratio: float = 1.0,
                      recompute: str = "none") -> Tuple[float, List[float], float]:
    """(forward seconds, when each layer's gradients are ready, when the backward ends) of one rank
    running ``layers`` forward then backward (last first), every layer's time times ``ratio`` (the
    precision's); ``recompute="full"`` runs each layer's forward again just before its backward."""
    forward = ratio * sum(layer.forward for layer in layers)
    ready, clock = [0.0] * len(layers), forward
    for index in reversed(range(len(layers))):
        extra = layers[index].forward if recompute == "full" else 0.0
        clock += ratio * (layers[index].backward + extra)
        ready[index] = clock
    return forward, ready, clock


def gradient_sum_seconds(machine: Machine, nbytes: float, nodes: Sequence[int], grad_wire: str = "fp32") -> float:
    """The reducer's sum of ``nbytes`` of fp32 gradients over ranks on ``nodes``, not overlapped: its
    Allreduce, or on a 16-bit wire the Alltoall and the Allgather."""
    if grad_wire == "fp32":
        return machine.gradient_allreduce_seconds(nbytes, nodes)
    return sum(wire16_seconds(machine, int(nbytes) // 4, nodes))


def predict_data_parallel(profile: ModelProfile, batch: int, layout: Layout, machine: Machine, *,
                          bucket_mb: float = 25.0, options: TrainingOptions = DEFAULT) -> Prediction:
    """Data parallelism: forward, then the backward layer by layer (last first); each gradient bucket
    (:func:`~mpipar.comm.buckets.assign_buckets`, as the reducer forms them) starts its non-blocking
    Allreduce (:meth:`~mpipar.cost.machine.Machine.gradient_allreduce_seconds`: the MPI's algorithm, node
    aware) when its last gradient is ready and the previous bucket is done; what ends after the backward
    is exposed. ``batch``: samples per rank.

    ``options``: the precision scales the layers' times (:func:`~mpipar.cost.options.compute_ratio`);
    ``recompute="full"`` adds each layer's forward to its backward; on a 16-bit wire a bucket's Alltoall
    takes the Allreduce's place and the Allgathers all follow the backward (``GradientReducer.finish``);
    PowerSGD sends the matrices it compresses as one Allreduce of every P and one of every Q after the
    backward (the rest in the buckets), its matrix products before, between and after them
    (:func:`~mpipar.cost.compress.powersgd_seconds`: counted as compute, at the machine file's
    ``matmul_flops`` or an assumed rate, said in ``assumptions``). Memory:
    :func:`~mpipar.cost.memory.state_memory` (stage 0) plus
    :func:`~mpipar.cost.memory.activation_memory`.
    """
    layers = layers_at(profile, batch)
    link = machine.link(not layout.dp_across())
    ratio, notes = precision_assumptions(machine, options)
    _, ready, backward_end = backward_timeline(layers, ratio, options.recompute)
    owner = [index for index, layer in enumerate(layers) for _ in layer.param_bytes]
    group = layout.nodes_of(layout.replicas_of())
    nbytes = [size for layer in layers for size in layer.param_bytes]
    compressed = [False] * len(nbytes)
    p_bytes = q_bytes = 0
    if options.powersgd_rank:
        shapes = [shape for layer in layers for shape in layer.param_shapes]
        if len(shapes) != len(nbytes):
            raise ValueError("the machine file has no parameter shapes (written before PowerSGD was modelled): "
                             "run mpipar-calibrate again")
        for index, shape in enumerate(shapes):
            p, q, whole = powersgd_split([shape], options.powersgd_rank)
            compressed[index], p_bytes, q_bytes = not whole, p_bytes + 4 * p, q_bytes + 4 * q
    network_free, gathers = 0.0, 0.0
    sent = [size for size, packed in zip(nbytes, compressed) if not packed]
    sent_owner = [who for who, packed in zip(owner, compressed) if not packed]
    for bucket in assign_buckets(sent, [0] * len(sent), bucket_mb * 2**20):
        start = max(network_free, max(ready[sent_owner[i]] for i in bucket))
        size = sum(sent[i] for i in bucket)
        if options.grad_wire == "fp32":
            network_free = start + machine.gradient_allreduce_seconds(size, group)
        else:
            alltoall, allgather = wire16_seconds(machine, size // 4, group)
            network_free, gathers = start + alltoall, gathers + allgather
    network_free = max(network_free, backward_end) + gathers if gathers else network_free
    local = 0.0  # PowerSGD's matrix products (compute: what of the buckets' Allreduces runs beside M Q is hidden)
    if p_bytes:
        (first, middle, last), note = powersgd_seconds(machine, shapes, options.powersgd_rank)
        notes += (note,) if note else ()
        local = first + middle + last
        network_free = max(network_free, backward_end + first) + machine.gradient_allreduce_seconds(p_bytes, group)
        network_free += middle + machine.gradient_allreduce_seconds(q_bytes, group) + last
    exposed = max(0.0, network_free - backward_end - local)
    overhead = step_overhead(profile, batch)
    memory = state_memory([_param_bytes([layer]) for layer in layers], layout.dp, 0, options).total + \
        activation_memory(layers, options)
    variant = " ".join(word for word in (options.compression if layout.dp > 1 else "",
                                         "recompute" if options.recompute == "full" else "") if word)
    return Prediction("DP", layout, backward_end + local + exposed + overhead, backward_end + local + overhead, exposed,
                      memory_bytes=memory, link=link.description, variant=variant, assumptions=notes)


def predict_pipeline(profile: ModelProfile, batch: int, layout: Layout, machine: Machine, *, microbatches: int,
                     schedule: str = "1f1b", balance: Optional[Sequence[int]] = None,
                     options: TrainingOptions = DEFAULT, virtual_stages: int = 1, zero: int = 0) -> Prediction:
    """A flushing pipeline of ``layout.pp`` ranks on ``batch`` samples per replica in ``microbatches``
    micro-batches: the schedule simulated (:func:`~mpipar.pipeline_plan.schedule.simulate_step`) with each
    stage's forward and backward per micro-batch and each boundary's point-to-point message; then each rank's
    gradients averaged over the ``layout.dp`` replicas (not overlapped). A rank holds one stage, or
    ``virtual_stages`` chunks (``interleaved``: chunk ``c`` on rank ``c % pp``; ``zbv``: two in a V, whatever
    ``virtual_stages`` says). ``balance``: layers per stage
    or chunk (default: the split with the fastest slowest one, as ``--balance auto``).
    ``options``: the precision scales the compute, ``recompute="full"`` adds a stage's forward to its
    backward and keeps of each micro-batch in flight only the stage's input (plus one micro-batch's saved
    tensors while it is recomputed); a 16-bit wire sums the replicas' gradients by Alltoall + Allgather.
    ``zero=1`` (``ShardedUpdate``, ``docs/sharded.md`` "Grids"): each stage's optimizer state is sharded over
    its replicas (memory) and after the step each rank's flat parameter buffer, padded to the replicas, is
    all-gathered over them (the slowest rank's, after the Allreduce). Raises ValueError for ``zero`` not 0 or 1."""
    if zero not in (0, 1):
        raise ValueError(f"a pipeline shards its optimizer state (--zero 1) or nothing (0), got --zero {zero}")
    virtual_stages = schedule_kind(schedule).chunks_per_rank(virtual_stages)  # zbv: always 2
    ranks, stages = layout.pp, layout.pp * virtual_stages
    layers = layers_at(profile, batch / microbatches)
    ratio, notes = precision_assumptions(machine, options)
    if balance is None:
        balance = balance_by_time([layer.forward + layer.backward for layer in layers], stages)
    forwards = [ratio * seconds for seconds in stage_sums([layer.forward for layer in layers], balance)]
    backwards = [ratio * seconds for seconds in stage_sums([layer.backward for layer in layers], balance)]
    if options.recompute == "full":
        backwards = [b + f for f, b in zip(forwards, backwards)]
    ends = [sum(balance[:stage + 1]) - 1 for stage in range(stages)]
    plan = Schedule(schedule, stages, microbatches, virtual_stages=virtual_stages)
    stage_ranks = plan.stage_ranks  # the schedule's own placement: chunk c on c % pp, or zbv's V

    def across(stage: int) -> bool:  # the boundary after ``stage``: between ranks, maybe from the last to the first
        a, b = stage_ranks[stage], stage_ranks[stage + 1]
        return any(layout.spans_nodes([layout.rank(r, a), layout.rank(r, b)]) for r in range(layout.dp))

    transfers = [machine.link(not across(stage)).p2p_seconds(layers[ends[stage]].activation_bytes)
                 for stage in range(stages - 1)]
    stage_times = list(zip(forwards, backwards))

    def makespan(transfer_times):
        spans = simulate_step(plan, stage_ranks, stage_times, transfer_times)
        return max(finish for _, finish in spans.values())

    def per_rank(values: Sequence[float]) -> List[float]:
        return [sum(values[stage] for stage in range(stages) if stage_ranks[stage] == rank) for rank in range(ranks)]

    with_messages = makespan(transfers)
    p2p = with_messages - makespan(None)
    busy = per_rank([microbatches * (f + b) for f, b in stage_times])
    bubble = 1.0 - sum(busy) / (ranks * with_messages) if with_messages > 0 else 0.0
    dp_link = machine.link(not layout.dp_across())
    stage_params = stage_sums([_param_bytes([layer]) for layer in layers], balance)
    rank_params = per_rank(stage_params)
    allreduce = max(gradient_sum_seconds(machine, size, layout.nodes_of(layout.replicas_of(rank)), options.grad_wire)
                    for rank, size in enumerate(rank_params))
    gathers = max(machine.collective_seconds("allgather", layout.dp * shard_bytes(size, layout.dp),
                                             layout.nodes_of(layout.replicas_of(rank)))
                  for rank, size in enumerate(rank_params)) if zero and layout.dp > 1 else 0.0
    overhead = step_overhead(profile, batch) * max(rank_params) / max(sum(rank_params), 1)
    starts = [sum(balance[:stage]) for stage in range(stages)]
    memory = max(per_rank([state_memory([params], layout.dp, zero, options).total + activation_memory(
        layers[starts[stage]:ends[stage] + 1], options, in_flight=plan.max_in_flight(stage),
        input_bytes=layers[starts[stage] - 1].activation_bytes if stage else 0)
        for stage, params in enumerate(stage_params)]))
    links = {machine.link(not across(s)).description for s in range(stages - 1)} | (
        {dp_link.description} if layout.dp > 1 else set())
    return Prediction("PP" if layout.dp == 1 else "PP x DP", layout, with_messages + allreduce + gathers + overhead,
                      max(busy) + overhead, allreduce + gathers, p2p, bubble, memory, microbatches,
                      " / ".join(sorted(link for link in links if link)),
                      " ".join(word for word in ("ZeRO-1" if zero and layout.dp > 1 else "",
                                                 options.compression if layout.dp > 1 and not options.powersgd_rank
                                                 else "", "recompute" if options.recompute == "full" else "")
                               if word), notes, gathers)


def tensor_parallel_allreduces(blocks: int, kind: str = "transformer") -> Tuple[int, int]:
    """(forward, backward) Allreduces per micro-batch of Megatron-split ``blocks``: a transformer block
    (attention pair + MLP pair) has 2 and 2, an MLP pair (column then row parallel) 1 and 1."""
    per_block = {"transformer": 2, "mlp": 1}
    if kind not in per_block:
        raise ValueError(f"kind must be one of {sorted(per_block)}, got {kind!r}")
    return blocks * per_block[kind], blocks * per_block[kind]


def predict_tensor_parallel(compute: float, layout: Layout, link: Link, *, allreduces: int,
                            allreduce_bytes: float, split_share: float = 1.0) -> Prediction:
    """Tensor parallelism over ``layout.tp`` ranks: the split share of ``compute`` (one rank's seconds
    unsplit) divided by ``tp``, plus ``allreduces`` blocking Allreduces of ``allreduce_bytes`` each."""
    communication = allreduces * link.allreduce_seconds(allreduce_bytes, layout.tp)
    busy = compute * (1 - split_share) + compute * split_share / layout.tp
    return Prediction("TP", layout, busy + communication, busy, communication, link=link.description)
