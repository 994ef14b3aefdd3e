"""``mpipar-plan``: rank strategies and grid shapes by predicted step time and memory, and say why."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mpipar.cost.machine import Machine, interconnect
from mpipar.cost.memory import GiB, Memory, activation_memory, state_memory
from mpipar.cost.model import DEFAULT, Layout, Prediction, layers_at, predict_data_parallel, predict_pipeline
from mpipar.cost.options import GRAD_WIRES, OPTIMIZER_STATE_BYTES, PRECISIONS, RECOMPUTE, TrainingOptions
from mpipar.cost.sharded import predict_sharded
from mpipar.cost.tensor import predict_tensor_grid, tensor_degrees
from mpipar.pipeline_plan.kinds import schedule_kind
from mpipar.pipeline_plan.schedule import FLUSHING_SCHEDULES, Schedule

__all__ = ["PlanRow", "candidates", "plan", "format_plan", "memory_by_stage", "verdicts", "parse_compress",
           "parse_zero", "main"]


@dataclass(frozen=True)
class PlanRow:
    """A strategy's prediction, whether it lies beyond what the machine file measured, and whether it fits
    the memory budget per rank (None: no budget given)."""

    prediction: Prediction
    extrapolated: bool
    fits: Optional[bool] = None


def candidates(ranks: int, num_layers: int) -> List[tuple]:
    """(dp, pp) of every grid of ``ranks`` whose pipelines have at most ``num_layers`` stages."""
    return [(ranks // pp, pp) for pp in range(1, min(ranks, num_layers) + 1) if ranks % pp == 0]


def plan(machine: Machine, model: str, batch_size: int, ranks: int, ranks_per_node: int, *, bucket_mb: float = 25.0,
         schedule: str = "1f1b", microbatch_choices: Sequence[int] = (1, 2, 4), zero_stages: Sequence[int] = (),
         options: TrainingOptions = DEFAULT, memory_bytes: float = 0.0, virtual_stages: int = 1) -> List[PlanRow]:
    """Every data x pipeline grid of ``ranks``, and for a model with tensor-parallel profiles in the machine
    file (a vision transformer: ``MODEL/tpT``) every data x tensor grid instead of the pipelines (no job
    pipelines a vision transformer); fastest predicted step first (then least memory).

    The global batch is ``batch_size * ranks`` in every row (``batch_size`` per rank, as data parallelism
    takes it); a pipeline of ``pp`` ranks (``virtual_stages`` chunks each for ``interleaved``) splits its
    replica's share into ``k * pp`` micro-batches for each ``k`` of ``microbatch_choices`` that divides it, and
    the best is kept; a tensor-parallel group of ``tp`` ranks takes ``tp * batch_size`` samples. ``zero_stages``:
    ZeRO stages (1-3) to add as rows where the grid has replicas and the stage composes with it
    (``docs/sharded.md`` "Grids"): 1-3 on the data-parallel grid, 1 on pipeline grids, 1 and 2 on tensor grids.
    ``options``: optimizer, precision and recompute
    of every row; its compression (a 16-bit wire, PowerSGD) adds a data-parallel row with it beside the fp32
    one. ``memory_bytes``: the budget per rank (0: none); with one, the rows that fit come first. Pure.
    """
    profile = machine.profile(model)
    virtual_stages = schedule_kind(schedule).chunks_per_rank(virtual_stages)  # zbv: always 2
    extrapolated = ranks > machine.ranks or ranks_per_node != machine.ranks_per_node or (
        machine.across is not None and machine.across.description != "the measured network")
    base = dataclasses.replace(options, grad_wire="fp32", powersgd_rank=0)
    rows: List[Prediction] = []
    degrees = tensor_degrees(machine, model)
    for tp in degrees:
        if ranks % tp == 0:
            layout = Layout(ranks, ranks_per_node, tp=tp)
            rows += [predict_tensor_grid(machine, model, batch_size * tp, layout, bucket_mb=bucket_mb, zero=zero,
                                         options=base)
                     for zero in (0, *zero_stages) if zero == 0 or (zero in (1, 2) and layout.dp > 1)]
    for dp, pp in candidates(ranks, 1 if degrees else profile.num_layers // virtual_stages):
        layout = Layout(ranks, ranks_per_node, dp=dp, pp=pp)
        replica_batch = batch_size * ranks // dp
        if pp == 1:
            rows.append(predict_data_parallel(profile, replica_batch, layout, machine, bucket_mb=bucket_mb,
                                              options=base))
            if options.compression and dp > 1:
                rows.append(predict_data_parallel(profile, replica_batch, layout, machine, bucket_mb=bucket_mb,
                                                  options=options))
            rows += [predict_sharded(profile, replica_batch, layout, machine, zero=zero, bucket_mb=bucket_mb,
                                     options=base) for zero in zero_stages if dp > 1 and not degrees]
            continue
        for zero in (0, *zero_stages):
            if zero == 0 or (zero == 1 and dp > 1):
                choices = [predict_pipeline(profile, replica_batch, layout, machine, microbatches=k * pp,
                                            schedule=schedule, options=base, virtual_stages=virtual_stages, zero=zero)
                           for k in microbatch_choices if replica_batch % (k * pp) == 0]
                if choices:
                    rows.append(min(choices, key=lambda p: p.step))
    budget = memory_bytes if memory_bytes > 0 else None
    result = [PlanRow(p, extrapolated, None if budget is None else p.memory_bytes <= budget) for p in rows]
    result.sort(key=lambda row: (row.fits is False, row.prediction.step, row.prediction.memory_bytes))
    return result


def memory_by_stage(machine: Machine, model: str, batch_size: int, ranks: int,
                    options: TrainingOptions = DEFAULT) -> List[Memory]:
    """The memory per rank of data parallelism (ZeRO 0) and ZeRO-1, 2 and 3 on ``ranks`` ranks,
    ``batch_size`` samples per rank. Pure."""
    layers = layers_at(machine.profile(model), batch_size)
    units = [float(sum(layer.param_bytes)) for layer in layers]
    activations = activation_memory(layers, options)
    return [dataclasses.replace(state_memory(units, ranks, zero, options), activations=activations)
            for zero in range(4)]


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def verdicts(rows: Sequence[PlanRow], stages: Sequence[Memory], *, model: str, ranks: int, memory_bytes: float,
             options: TrainingOptions = DEFAULT) -> List[str]:
    """Sentences under the table: whether the model fits ``memory_bytes`` per rank without sharding (and
    which ``--zero`` it needs otherwise), and whether the compression of ``options`` pays. Pure."""
    lines = []
    if memory_bytes > 0:
        budget = f"{_size(memory_bytes)} per rank"
        need = [_size(memory.total) for memory in stages]
        fitting = [zero for zero, memory in enumerate(stages) if memory.total <= memory_bytes]
        if fitting and fitting[0] == 0:
            lines.append(f"memory: {model} fits {budget} without sharding (data parallelism needs {need[0]})")
        elif fitting:
            zero = fitting[0]
            lines.append(f"memory: {model} does not fit {budget} without --zero {zero} (data parallelism needs "
                         f"{need[0]}, ZeRO-{zero} {need[zero]} on {ranks} ranks)")
        else:
            lines.append(f"memory: {model} does not fit {budget} even with --zero 3 ({need[3]} on {ranks} ranks; "
                         f"data parallelism {need[0]}): more ranks, --recompute full or a pipeline")
    if options.compression:
        plain = [row.prediction for row in rows if row.prediction.label == "DP" + (
            " recompute" if options.recompute == "full" else "") and row.prediction.layout.dp > 1]
        packed = [row.prediction for row in rows if row.prediction.strategy == "DP"
                  and options.compression in row.prediction.variant]
        if plain and packed:
            fp32, other = plain[0], packed[0]
            pays = "pays" if other.step < fp32.step else "does not pay"
            lines.append(f"compression {pays} on {other.link or 'this link'}: {options.compression} "
                         f"{1e3 * other.step:.2f} ms against fp32 {1e3 * fp32.step:.2f} ms per step "
                         f"({100 * (other.step / fp32.step - 1):+.0f}%; exposed communication "
                         f"{1e3 * other.exposed_comm:.2f} ms against {1e3 * fp32.exposed_comm:.2f} ms)")
        else:
            lines.append("compression: no data-parallel grid of these ranks to compare (one rank)")
    return lines


def format_plan(rows: Sequence[PlanRow], *, model: str, batch_size: int, ranks: int, ranks_per_node: int,
                notes: Sequence[str] = ()) -> str:
    """A table: rank, strategy, DP x PP x TP, micro-batches, step ms, samples/s, MiB per rank, (whether it
    fits the budget,) why; then ``notes``."""
    lines = [f"mpipar-plan: {model}, {batch_size} samples per rank ({batch_size * ranks} per step), {ranks} ranks, "
             f"{ranks_per_node} per node"]
    if any(row.extrapolated for row in rows):
        lines.append("PREDICTIONS beyond the calibrated machine (more ranks, another layout or a described "
                     "interconnect): not measured")
    budget = any(row.fits is not None for row in rows)
    width = max([8, *(len(row.prediction.label) for row in rows)])
    lines.append(f"{'#':>2}  {'strategy':{width}}  {'dp x pp x tp':12}  {'micro':>5}  {'step ms':>9}  "
                 f"{'samples/s':>10}  {'MiB/rank':>8}  {'fits  ' if budget else ''}why")
    for index, row in enumerate(rows, 1):
        p = row.prediction
        fits = "" if not budget else f"{'yes' if row.fits else 'NO':4}  "
        lines.append(f"{index:>2}  {p.label:{width}}  {p.layout.shape:12}  {p.microbatches:>5}  {1e3 * p.step:9.2f}  "
                     f"{batch_size * ranks / p.step:10.0f}  {p.memory_bytes / 2**20:8.1f}  {fits}{p.why()}")
    return "\n".join([*lines, *notes])


def parse_zero(text: str) -> Tuple[int, ...]:
    """``--zero``: ``all`` (1, 2, 3), or stages 0-3 separated by commas (0: data parallelism alone)."""
    if text == "all":
        return (1, 2, 3)
    try:
        stages = tuple(sorted({int(word) for word in text.split(",")}))
    except ValueError:
        stages = (-1,)
    if any(stage not in (0, 1, 2, 3) for stage in stages):
        raise ValueError(f"--zero takes 'all' or stages 0-3 separated by commas, e.g. '0' or '1,3', got {text!r}")
    return tuple(stage for stage in stages if stage)


def parse_compress(text: str) -> int:
    """``--compress``: ``none`` (0) or ``powersgd:R`` (the rank R >= 1)."""
    if text == "none":
        return 0
    name, _, rank = text.partition(":")
    if name != "powersgd" or not rank.isdigit() or int(rank) < 1:
        raise ValueError(f"--compress takes 'none' or 'powersgd:RANK' with RANK >= 1, e.g. 'powersgd:4', got {text!r}")
    return int(rank)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="mpipar-plan", description=__doc__)
    parser.add_argument("--model", default="resnet-small", help="a model the machine file has layer times of")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--ranks-per-node", type=int, default=0, help="default: the machine file's")
    parser.add_argument("--machine", required=True, help="the machine file of mpipar-calibrate")
    parser.add_argument("--interconnect", help="the link across nodes, e.g. '1gbit,1ms', '100gbit,2us', 'ib-hdr' "
                                               "(default: the measured one)")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--schedule", choices=FLUSHING_SCHEDULES, default="1f1b")
    parser.add_argument("--zero", default="all", help="ZeRO stages to add as rows: 'all' (1,2,3), e.g. '2' or '1,3'; "
                                                      "'0': none")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATE_BYTES), default="sgd",
                        help="its state per parameter: sgd 4 B (momentum), adamw 8 B")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype of the compute")
    parser.add_argument("--grad-wire", choices=GRAD_WIRES, default="fp32",
                        help="16 bits: a data-parallel row with the 16-bit wire beside the fp32 one")
    parser.add_argument("--compress", default="none", help="'powersgd:R': a data-parallel row with PowerSGD of rank R")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--memory-gb", type=float, default=0.0,
                        help="memory per rank, GiB (default: the machine file's node memory / ranks per node)")
    parser.add_argument("--virtual-stages", type=int, default=1,
                        help="chunks per rank of --schedule interleaved (1: one stage per rank; zbv: always 2)")
    args = parser.parse_args(argv)
    try:
        if args.ranks < 1 or args.batch_size < 1 or args.memory_gb < 0 or args.virtual_stages < 1:
            raise ValueError(f"--ranks, --batch-size and --virtual-stages must be >= 1 and --memory-gb >= 0, got "
                             f"{args.ranks}, {args.batch_size}, {args.virtual_stages}, {args.memory_gb}")
        chunks = schedule_kind(args.schedule).chunks_per_rank(args.virtual_stages)
        Schedule(args.schedule, chunks, chunks, virtual_stages=chunks)
        options = TrainingOptions(args.optimizer, args.precision, args.grad_wire, args.recompute,
                                  parse_compress(args.compress))
        zero_stages = parse_zero(args.zero)
        machine = Machine.load(args.machine)
        if args.interconnect:
            machine = machine.with_across(interconnect(args.interconnect))
        per_node = args.ranks_per_node or min(machine.ranks_per_node, args.ranks)
        budget = args.memory_gb * 2**30 or machine.memory_bytes / per_node
        rows = plan(machine, args.model, args.batch_size, args.ranks, per_node, bucket_mb=args.bucket_mb,
                    schedule=args.schedule, zero_stages=zero_stages, options=options, memory_bytes=budget,
                    virtual_stages=args.virtual_stages)
        notes = verdicts(rows, memory_by_stage(machine, args.model, args.batch_size, args.ranks, options),
                         model=args.model, ranks=args.ranks, memory_bytes=budget, options=options)
    except ValueError as exc:
        sys.exit(f"mpipar-plan: {exc}")
    print(format_plan(rows, model=args.model, batch_size=args.batch_size, ranks=args.ranks, ranks_per_node=per_node,
                      notes=notes))


if __name__ == "__main__":
    main()
