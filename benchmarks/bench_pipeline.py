"""Benchmark: 2-stage pipelines split three ways (even, auto, fine-grained auto), mpipar and torch pipelining.

Usage:
    mpirun -n 2 python benchmarks/bench_pipeline.py --model resnet-small --rounds 10
    mpirun -n 2 python benchmarks/bench_pipeline.py --model mlp --schedule gpipe --microbatches 16 --width 1024
    mpirun -n 2 python benchmarks/bench_pipeline.py --model mlp --width 512 --depth 18 --microbatches 8 \
        --receives-ahead 0,2 --no-torch
    mpirun -n 2 python benchmarks/bench_pipeline.py --schedule interleaved --virtual-stages 2 --rounds 8
    mpirun -n 2 python benchmarks/bench_pipeline.py --schedule zero-bubble --rounds 8

The same model and micro-batches run as:

* one process: rank 0 runs the whole model over the micro-batches with gradient
  accumulation (the other rank waits, sleeping);
* ``even``: mpipar's ``Pipeline`` with the block model split by layer count (resnet-small: 3|2);
* ``auto``: the block model split by mpipar's profiling partitioner;
* ``fine``: (resnet-small only) the same network as ``resnet-small-fine`` (30 layers, skip
  connections across the cut) split by the partitioner;
* each split also through ``torch.distributed.pipelining`` (``PipelineStage`` with the same
  stage modules, the same schedule, a gloo group; for ``fine`` the skips crossing the cut
  travel as extra stage outputs / inputs, which works for 2 stages).

``--schedule interleaved --virtual-stages V`` splits every variant into ``2 V`` chunks, chunk ``c`` on rank
``c % 2`` (even, auto over the chunks, fine), against torch's ``ScheduleInterleaved1F1B`` on the same chunks;
``--schedule zero-bubble`` runs mpipar's ZB-H1 against torch's ``ScheduleInterleavedZeroBubble`` on the same
stages and adds ``torch zbv``: ``ScheduleZBVZeroBubble`` on 4 equal chunks in its V shape (rank 0: chunks 0
and 3). A torch variant that cannot run (a skip crossing chunks; its own error, e.g. on CPU/gloo) is named
and left out.

Rounds alternate the order (ABBA) so that drift in machine load hits all alike. Rank 0
prints, per variant, the median time per batch, and for mpipar the measured bubble
(1 - busy / (ranks * wall)) beside the ideal (p-1)/(m+p-1), the bound that the
measured stage times give with free communication (bound - ideal: imbalance; measured -
bound: communication and overhead), each ``--receives-ahead`` value a variant of its own; then the paired
per-round ratios (median and range
over rounds, the extreme tenth trimmed at 10 rounds and more): "no measurable
difference" where the range includes 1. Each rank uses --threads torch threads.
"""

import argparse
import copy
import itertools
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench import abba, init_gloo, mpi_library, paired, sleeping_barrier  # before mpipar: the checkout on sys.path
from mpi4py import MPI
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from mpipar import models
from mpipar.pipeline import Pipeline, Placement, SkipSequential, auto_balance, find_skips, measured_bubble
from mpipar.pipeline.partition import stage_sums
from mpipar.pipeline.schedule import Schedule, placement_bubble
from mpipar.pipeline_plan.placement import Segment, even_balance


def make_model(name: str, width: int, depth: int) -> nn.Sequential:
    if name == "resnet-small":
        return models.resnet_small()
    layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class _TorchStage(nn.Module):
    """A stage for torch pipelining: skips crossing the cut become extra outputs (first stage) or inputs."""

    def __init__(self, part: nn.Sequential, takes, gives):
        super().__init__()
        self.part, self.takes, self.gives = part, list(takes), list(gives)

    def forward(self, x, *skips):
        if not isinstance(self.part, SkipSequential):
            return self.part(x)
        store = dict(zip(self.takes, skips))
        y = self.part(x, store)
        return (y, *[store[name] for name in self.gives]) if self.gives else y


TORCH_MULTI = {"interleaved": ScheduleInterleaved1F1B, "zero-bubble": ScheduleInterleavedZeroBubble,
               "zbv": ScheduleZBVZeroBubble}


def _torch_multi(model, segments, schedule: str, microbatches: int, sample, rank: int, size: int, comm):
    """A step of torch's schedule ``schedule`` (several stages per rank allowed) on the stages ``segments``
    (``Segment`` s in model order), or why it cannot run (decided on every rank alike: a skip crossing stages,
    or torch's error on any rank)."""
    stage_of = [index for index, segment in enumerate(segments) for _ in range(segment.start, segment.stop)]
    if any(stage_of[e.producer] != stage_of[e.consumer] for e in find_skips(model)):
        return "skips cross its stages"
    error = None
    try:
        stages, parts = [], []
        for index, segment in enumerate(segments):
            if segment.rank != rank:
                continue
            part = copy.deepcopy(model)[segment.start:segment.stop]
            with torch.no_grad():  # example input: what the stages before give
                example = copy.deepcopy(model)[:segment.start](sample) if segment.start else sample
            stages.append(PipelineStage(part, index, len(segments), torch.device("cpu"), input_args=(example,)))
            parts.append(part)
        torch_schedule = TORCH_MULTI[schedule](stages, microbatches, loss_fn=F.cross_entropy)
        optimizer = torch.optim.SGD([p for part in parts for p in part.parameters()], lr=0.01)
    except Exception as exc:  # noqa: BLE001 - reported, the variant left out
        error = f"{type(exc).__name__}: {exc}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        return errors[0][:200]
    first, last = segments[0].rank == rank, segments[-1].rank == rank

    def run_torch(images, labels):
        optimizer.zero_grad()
        torch_schedule.step(*((images,) if first else ()), **({"target": labels, "losses": []} if last else {}))
        optimizer.step()

    return run_torch


def single_process_step(model, optimizer, images, labels, microbatches) -> None:
    optimizer.zero_grad()
    for chunk, target in zip(images.chunk(microbatches), labels.chunk(microbatches)):
        (F.cross_entropy(model(chunk), target) / microbatches).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "resnet-small"], default="resnet-small")
    parser.add_argument("--width", type=int, default=768, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=9, help="MLP linear layers (9: halves of equal cost)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved", "zero-bubble"], default="1f1b")
    parser.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank for --schedule interleaved")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--receives-ahead", default="2",
                        help="receives mpipar keeps posted per stream; a comma list (e.g. 0,2) runs each, paired")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 2:
        raise SystemExit(f"bench_pipeline compares 2-stage pipelines: run with mpirun -n 2 (got {size})")
    torch.set_num_threads(args.threads)
    if not args.no_torch:
        init_gloo(comm)

    torch.manual_seed(0)
    base = make_model(args.model, args.width, args.depth)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]
    micro = args.batch_size // args.microbatches
    sample = batches[0][0][:micro]
    chunks_per_rank = args.virtual_stages if args.schedule == "interleaved" else 1
    chunks = size * chunks_per_rank
    schedule = Schedule(args.schedule, chunks, args.microbatches, virtual_stages=chunks_per_rank)
    in_flight = [schedule.max_in_flight(stage) for stage in range(chunks)]

    splits = {"even": (base, Placement.interleaved(len(base), size, chunks_per_rank), None)}
    balance, profiles = auto_balance(base, sample, chunks, comm, in_flight=in_flight)
    splits["auto"] = (base, Placement.looped(balance, size), stage_sums([p.time for p in profiles], balance))
    if args.model == "resnet-small":
        fine = models.split_blocks(copy.deepcopy(base))  # the same parameters
        balance, profiles = auto_balance(fine, sample, chunks, comm, in_flight=in_flight)
        splits["fine"] = (fine, Placement.looped(balance, size), stage_sums([p.time for p in profiles], balance))

    serial_model = copy.deepcopy(base)
    serial_optimizer = torch.optim.SGD(serial_model.parameters(), lr=0.01)

    def run_serial(images, labels):
        if rank == 0:
            single_process_step(serial_model, serial_optimizer, images, labels, args.microbatches)

    runners = {"one process": run_serial}
    torch_skipped = {}  # variant -> why torch's counterpart does not run
    aheads = [int(k) for k in args.receives_ahead.split(",")]
    variants = {name: [name] if len(aheads) == 1 else [f"{name}/ahead{k}" for k in aheads] for name in splits}
    bubbles = {variant: [] for names in variants.values() for variant in names}
    bounds = {variant: [] for names in variants.values() for variant in names}
    for name, (model, placement, _) in splits.items():
        for variant, ahead in zip(variants[name], aheads):
            pipe = Pipeline(copy.deepcopy(model), comm, placement, schedule=args.schedule,
                            microbatches=args.microbatches, loss_fn=F.cross_entropy, receives_ahead=ahead)
            optimizer = torch.optim.SGD(pipe.parameters(), lr=0.01)

            def run_mpipar(images, labels, pipe=pipe, optimizer=optimizer, variant=variant):
                optimizer.zero_grad()
                result = pipe.step(images, labels)
                optimizer.step()
                gathered = comm.allgather((result.times.busy, result.times.wall, result.stage_times))
                bubbles[variant].append(measured_bubble([b for b, _, _ in gathered], [w for _, w, _ in gathered]))
                stage_times = {s: t for _, _, times in gathered for s, t in times.items()}
                bounds[variant].append(placement_bubble(pipe.schedule, pipe.stage_ranks, [
                    (f / args.microbatches, b / args.microbatches) for f, b in
                    (stage_times[s] for s in range(pipe.num_stages))]))

            runners[f"mpipar {variant}"] = run_mpipar
        if args.no_torch:
            continue
        if args.schedule in ("interleaved", "zero-bubble"):
            runner = _torch_multi(model, placement.segments, args.schedule, args.microbatches, sample, rank, size,
                                  comm)
            if isinstance(runner, str):
                torch_skipped[name] = runner
            else:
                runners[f"torch {name}"] = runner
            continue
        segment = placement.segments[rank]
        crossing = [e.name for e in find_skips(model) if placement.ranks[e.producer] != placement.ranks[e.consumer]]
        part = _TorchStage(copy.deepcopy(model)[segment.start:segment.stop], crossing if rank else [],
                           [] if rank else crossing)
        with torch.no_grad():  # example inputs: what the stage before gives
            first = _TorchStage(copy.deepcopy(model)[:placement.segments[0].stop], [], crossing)
            example = (sample,) if rank == 0 else first(sample)
            example = example if isinstance(example, tuple) else (example,)
        stage = PipelineStage(part, rank, size, torch.device("cpu"), input_args=example)
        torch_schedule = (Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe)(
            stage, args.microbatches, loss_fn=F.cross_entropy)
        torch_optimizer = torch.optim.SGD(part.parameters(), lr=0.01)

        def run_torch(images, labels, torch_schedule=torch_schedule, torch_optimizer=torch_optimizer):
            torch_optimizer.zero_grad()
            if rank == 0:
                torch_schedule.step(images)
            else:
                torch_schedule.step(target=labels, losses=[])
            torch_optimizer.step()

        runners[f"torch {name}"] = run_torch

    if args.schedule == "zero-bubble" and not args.no_torch:  # torch's ZB-V on its own V-shaped split of 4 chunks
        ends = list(itertools.accumulate(even_balance(len(base), 2 * size)))
        v_shape = [Segment(min(c, 2 * size - 1 - c), ends[c - 1] if c else 0, ends[c]) for c in range(2 * size)]
        runner = _torch_multi(base, v_shape, "zbv", args.microbatches, sample, rank, size, comm)
        if isinstance(runner, str):
            torch_skipped["zbv"] = runner
        else:
            runners["torch zbv"] = runner
    seconds = {name: [] for name in runners}
    for round_index in range(args.rounds):
        for name in abba(runners, round_index):
            run = runners[name]
            run(*batches[0])  # warm-up
            sleeping_barrier(comm)
            start = time.perf_counter()
            for images, labels in batches[1:]:
                run(images, labels)
            sleeping_barrier(comm)
            seconds[name].append((time.perf_counter() - start) / args.steps)

    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        print(f"model {args.model} ({params:,} parameters), batch {args.batch_size} = {args.microbatches} x {micro}, "
              f"{args.schedule}, {size} ranks x {args.threads} threads, {args.steps} steps x {args.rounds} rounds "
              f"(ABBA), receives ahead {args.receives_ahead}, torch {torch.__version__}, {mpi_library()}")
        print("shared 2-core machine with other jobs running: times are noisy; compare the paired ratios below")
        if chunks_per_rank > 1:
            print(f"{chunks_per_rank} chunks per rank (interleaved): chunk c on rank c % {size}")
        for name, why in torch_skipped.items():
            print(f"torch {name}: not run ({why})")
        for name, (model, placement, predicted) in splits.items():
            extra = "" if predicted is None else f", predicted stage ms {[round(1e3 * t, 2) for t in predicted]}"
            print(f"split {name}: {len(model)} layers, {placement.balance()} layers per stage{extra}")
        print()
        print("| variant | ms/batch (median) | min-max over rounds | bubble measured | bound (measured stages) "
              "| ideal | imbalance | comm + overhead |")
        print("|---|---|---|---|---|---|---|---|")
        ideal = schedule.ideal_bubble
        for name, values in seconds.items():
            row = (f"| {name} | {1e3 * statistics.median(values):.1f} | "
                   f"{1e3 * min(values):.1f}-{1e3 * max(values):.1f} |")
            variant = name[len("mpipar "):]
            if name.startswith("mpipar"):
                measured, bound = statistics.median(bubbles[variant]), statistics.median(bounds[variant])
                row += f" {measured:.3f} | {bound:.3f} | {ideal:.3f} | {bound - ideal:+.3f} | {measured - bound:+.3f} |"
            else:
                row += " | | | | |"
            print(row)
        print()
        print("paired per-round time ratios (median, range):")
        pairs = [("mpipar even", "mpipar auto"), ("mpipar even", "mpipar fine"), ("mpipar auto", "mpipar fine"),
                 ("one process", "mpipar fine")]
        pairs += [(f"torch {name}", f"mpipar {variants[name][-1]}") for name in splits]
        pairs += [("torch zbv", f"mpipar {variants[name][-1]}") for name in splits]
        pairs += [(f"mpipar {names[0]}", f"mpipar {other}") for names in variants.values() for other in names[1:]]
        for slow, fast in pairs:
            if slow in seconds and fast in seconds:
                ratio = paired(seconds[slow], seconds[fast])
                print(f"  {slow} / {fast}: {ratio.text(f'{fast} faster', f'{slow} faster')}")
        for variant in bubbles:
            measured = statistics.median(bubbles[variant])
            print(f"  mpipar {variant}: measured bubble / ideal = {measured / ideal:.2f}")
        for names in variants.values():
            for other in names[1:]:
                gaps = sorted((b0 - c0) - (b1 - c1) for b0, c0, b1, c1 in zip(
                    bubbles[names[0]], bounds[names[0]], bubbles[other], bounds[other]))  # step by step
                print(f"  comm + overhead, {names[0]} minus {other}, paired per step: median "
                      f"{statistics.median(gaps):+.3f} (range {gaps[0]:+.3f} to {gaps[-1]:+.3f}, {len(gaps)} steps)")
    if not args.no_torch:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
