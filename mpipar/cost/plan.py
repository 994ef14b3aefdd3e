"""``mpipar-plan``: rank strategies and grid shapes by predicted step time and memory, and say why."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

from mpipar.cost.machine import Machine, interconnect
from mpipar.cost.model import Layout, Prediction, predict_data_parallel, predict_pipeline
from mpipar.cost.tensor import predict_tensor_grid, tensor_degrees
from mpipar.pipeline_plan.schedule import FLUSHING_SCHEDULES, Schedule

__all__ = ["PlanRow", "candidates", "plan", "format_plan", "main"]


@dataclass(frozen=True)
class PlanRow:
    """A strategy's prediction, and whether it lies beyond what the machine file measured."""

    prediction: Prediction
    extrapolated: bool


def candidates(ranks: int, num_layers: int) -> List[tuple]:
    """(dp, pp) of every grid of ``ranks`` whose pipelines have at most ``num_layers`` stages."""
    return [(ranks // pp, pp) for pp in range(1, min(ranks, num_layers) + 1) if ranks % pp == 0]


def plan(machine: Machine, model: str, batch_size: int, ranks: int, ranks_per_node: int, *, bucket_mb: float = 25.0,
         schedule: str = "1f1b", microbatch_choices: Sequence[int] = (1, 2, 4),
         virtual_stages: int = 1) -> List[PlanRow]:
    """Every data x pipeline grid of ``ranks``, and for a model with tensor-parallel profiles in the machine
    file (a vision transformer: ``MODEL/tpT``) every data x tensor grid instead of the pipelines (no job
    pipelines a vision transformer); fastest predicted step first (then least memory).

    The global batch is ``batch_size * ranks`` in every row (``batch_size`` per rank, as data parallelism
    takes it); a pipeline of ``pp`` ranks (``virtual_stages`` chunks each for ``interleaved``) splits its
    replica's share into ``k * pp`` micro-batches for each ``k`` of ``microbatch_choices`` that divides it, and
    the best is kept; a tensor-parallel group of ``tp`` ranks takes ``tp * batch_size`` samples. Pure.
    """
    profile = machine.profile(model)
    extrapolated = ranks > machine.ranks or ranks_per_node != machine.ranks_per_node or (
        machine.across is not None and machine.across.description != "the measured network")
    rows: List[Prediction] = []
    degrees = tensor_degrees(machine, model)
    for tp in degrees:
        if ranks % tp == 0:
            rows.append(predict_tensor_grid(machine, model, batch_size * tp, Layout(ranks, ranks_per_node, tp=tp),
                                            bucket_mb=bucket_mb))
    for dp, pp in candidates(ranks, 1 if degrees else profile.num_layers // virtual_stages):
        layout = Layout(ranks, ranks_per_node, dp=dp, pp=pp)
        replica_batch = batch_size * ranks // dp
        if pp == 1:
            rows.append(predict_data_parallel(profile, replica_batch, layout, machine, bucket_mb=bucket_mb))
            continue
        options = [predict_pipeline(profile, replica_batch, layout, machine, microbatches=k * pp, schedule=schedule,
                                    virtual_stages=virtual_stages)
                   for k in microbatch_choices if replica_batch % (k * pp) == 0]
        if options:
            rows.append(min(options, key=lambda p: p.step))
    rows.sort(key=lambda p: (p.step, p.memory_bytes))
    return [PlanRow(p, extrapolated) for p in rows]


def format_plan(rows: Sequence[PlanRow], *, model: str, batch_size: int, ranks: int, ranks_per_node: int) -> str:
    """A table: rank, strategy, DP x PP x TP, micro-batches, step ms, samples/s, MiB per rank, why."""
    lines = [f"mpipar-plan: {model}, {batch_size} samples per rank ({batch_size * ranks} per step), {ranks} ranks, "
             f"{ranks_per_node} per node"]
    if any(row.extrapolated for row in rows):
        lines.append("PREDICTIONS beyond the calibrated machine (more ranks, another layout or a described "
                     "interconnect): not measured")
    lines.append(f"{'#':>2}  {'strategy':8}  {'dp x pp x tp':12}  {'micro':>5}  {'step ms':>9}  {'samples/s':>10}  "
                 f"{'MiB/rank':>8}  why")
    for index, row in enumerate(rows, 1):
        p = row.prediction
        lines.append(f"{index:>2}  {p.strategy:8}  {p.layout.shape:12}  {p.microbatches:>5}  {1e3 * p.step:9.2f}  "
                     f"{batch_size * ranks / p.step:10.0f}  {p.memory_bytes / 2**20:8.1f}  {p.why()}")
    return "\n".join(lines)


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
    parser.add_argument("--virtual-stages", type=int, default=1,
                        help="chunks per rank of --schedule interleaved (1: one stage per rank)")
    args = parser.parse_args(argv)
    try:
        if args.ranks < 1 or args.batch_size < 1 or args.virtual_stages < 1:
            raise ValueError(f"--ranks, --batch-size and --virtual-stages must be >= 1, got {args.ranks}, "
                             f"{args.batch_size}, {args.virtual_stages}")
        Schedule(args.schedule, args.virtual_stages, args.virtual_stages, virtual_stages=args.virtual_stages)
        machine = Machine.load(args.machine)
        if args.interconnect:
            machine = machine.with_across(interconnect(args.interconnect))
        per_node = args.ranks_per_node or min(machine.ranks_per_node, args.ranks)
        rows = plan(machine, args.model, args.batch_size, args.ranks, per_node, bucket_mb=args.bucket_mb,
                    schedule=args.schedule, virtual_stages=args.virtual_stages)
    except ValueError as exc:
        sys.exit(f"mpipar-plan: {exc}")
    print(format_plan(rows, model=args.model, batch_size=args.batch_size, ranks=args.ranks, ranks_per_node=per_node))


if __name__ == "__main__":
    main()
