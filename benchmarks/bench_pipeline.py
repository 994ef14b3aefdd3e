"""Benchmark: pipelines over p stages split several ways, mpipar's schedules against torch.distributed.pipelining's.

Usage:
    mpirun -n 2 python benchmarks/bench_pipeline.py --model resnet-small --rounds 10
    mpirun -n 2 python benchmarks/bench_pipeline.py --model mlp --schedule gpipe --microbatches 16 --width 1024
    mpirun -n 2 python benchmarks/bench_pipeline.py --model mlp --width 512 --depth 18 --microbatches 8 \
        --receives-ahead 0,2 --no-torch
    mpirun -n 2 python benchmarks/bench_pipeline.py --schedule interleaved --virtual-stages 2 --rounds 8
    mpirun -n 4 --oversubscribe python benchmarks/bench_pipeline.py --model mlp --depth 18 --microbatches 8 \
        --schedule best --rounds 10

The same model and micro-batches run on p = ranks (any p >= 2) as:

* one process: rank 0 runs the whole model over the micro-batches with gradient accumulation (the
  other ranks wait, sleeping);
* mpipar's ``Pipeline`` and torch's ``PipelineStage`` s (gloo) on the same chunks of the model, each
  schedule on its layout (``_pipeline_variants.py``): ``stages`` (p chunks, chunk c on rank c: gpipe,
  1f1b, zero-bubble; torch ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleavedZeroBubble``),
  ``looped`` (p V chunks, chunk c on rank c % p, V = ``--virtual-stages``: interleaved; torch
  ``ScheduleInterleaved1F1B``, ``ScheduleLoopedBFS``) and ``v`` (2p chunks, rank r holding chunks r
  and 2p-1-r: torch ``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``);
* each split (``--splits``): ``even`` (the chunks by layer count), ``auto`` (by mpipar's profiling
  partitioner), ``fine`` (resnet-small only: the same network as ``resnet-small-fine``, 30 layers with
  skip connections across the cuts, split by the partitioner). torch's single-stage schedules (GPipe,
  1F1B) carry a skip that crosses cuts as extra outputs and inputs of the stages in between; its other
  schedules (they fail at run time with the extra tensors) are left out where a skip crosses chunks.

``--schedule S`` runs mpipar's S against its torch counterparts (1f1b: 1F1B; interleaved:
Interleaved1F1B; zero-bubble: InterleavedZeroBubble and ZBVZeroBubble) on every split (default even
and auto, and fine for resnet-small). ``--schedule best`` runs every mpipar flushing schedule and every
torch schedule in one ABBA run (default: the even split) and reports best against best: per round the
fastest mpipar variant and the fastest torch variant, the paired ratio torch best / mpipar best (median
and range) and how often each variant was the fastest. A variant that cannot run (too few layers for its
chunks, micro-batches interleaved cannot group, a skip crossing torch's chunks, torch's own error on any
rank, a schedule missing from the installed torch) is named and left out.

Rounds alternate the order (ABBA) so that drift in machine load hits all alike. Rank 0 prints, per
variant, the median time per batch, and for mpipar the measured bubble (1 - busy / (ranks * wall))
beside the schedule's ideal, the bound that the measured stage times give with free communication
(bound - ideal: imbalance; measured - bound: communication and overhead), each ``--receives-ahead``
value a variant of its own; then the paired per-round ratios (median and range over rounds, the extreme
tenth trimmed at 10 rounds and more): "no measurable difference" where the range includes 1. Each rank
uses --threads torch threads; more ranks than cores is oversubscribed (printed).
"""

import argparse
import copy
import inspect
import os
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
import torch.nn.functional as F
from _bench import abba, init_gloo, mpi_library, paired, sleeping_barrier  # before mpipar: the checkout on sys.path
from _pipeline_variants import (
    COUNTERPARTS,
    MPIPAR,
    TORCH,
    best_per_round,
    carried_skips,
    chosen,
    chunk_ranks,
    layer_ranks,
    mpipar_schedule,
    segments,
)
from mpi4py import MPI
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from mpipar import models
from mpipar.pipeline import Pipeline, Placement, SkipSequential, auto_balance, find_skips, measured_bubble
from mpipar.pipeline.partition import stage_sums
from mpipar.pipeline.schedule import placement_bubble
from mpipar.pipeline_plan.placement import even_balance

SPLITS = ("even", "auto", "fine")


def make_model(name: str, width: int, depth: int) -> nn.Sequential:
    if name == "resnet-small":
        return models.resnet_small()
    layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class _TorchStage(nn.Module):
    """A stage for torch pipelining: the skips it ``takes`` come as extra inputs, those it ``gives`` (saved here
    or carried through) go out as extra outputs."""

    def __init__(self, part: nn.Sequential, takes, gives):
        super().__init__()
        self.part, self.takes, self.gives = part, list(takes), list(gives)

    def forward(self, x, *skips):
        if not isinstance(self.part, SkipSequential):
            return self.part(x)
        store = dict(zip(self.takes, skips))
        y = self.part(x, store)
        return (y, *[store[name] for name in self.gives]) if self.gives else y


def _torch_runner(model, chunks, schedule_class, microbatches: int, sample, rank: int, comm):
    """A step of torch's ``schedule_class`` on the stages ``chunks`` (``Segment`` s in model order, any number per
    rank), or why it cannot run (decided on every rank alike: a skip crossing the chunks of a schedule of several
    stages per rank, or torch's error on any rank)."""
    stage_of = [index for index, chunk in enumerate(chunks) for _ in range(chunk.start, chunk.stop)]
    carried = carried_skips(stage_of, [(e.name, e.producer, e.consumer) for e in find_skips(model)])
    single = issubclass(schedule_class, PipelineScheduleSingle)
    if not single and any(gives for _, gives in carried):
        return "skips cross its chunks (carried only by torch's single-stage schedules here)"
    error = None
    try:
        stages, parameters = [], []
        with torch.no_grad():
            example = (sample,)  # what the stages before give
            for index, chunk in enumerate(chunks):
                takes, gives = carried[index]
                if chunk.rank == rank:
                    part = _TorchStage(copy.deepcopy(model)[chunk.start:chunk.stop], takes, gives)
                    stages.append(PipelineStage(part, index, len(chunks), torch.device("cpu"), input_args=example))
                    parameters += list(part.parameters())
                output = _TorchStage(copy.deepcopy(model)[chunk.start:chunk.stop], takes, gives)(*example)
                example = output if isinstance(output, tuple) else (output,)
        torch_schedule = schedule_class(stages[0] if single else stages, microbatches, loss_fn=F.cross_entropy)
        optimizer = torch.optim.SGD(parameters, lr=0.01)
    except Exception as exc:  # noqa: BLE001 - reported, the variant left out
        error = f"{type(exc).__name__}: {exc}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        return errors[0][:200]
    first, last = chunks[0].rank == rank, chunks[-1].rank == rank
    quiet = {"return_outputs": False} if "return_outputs" in inspect.signature(torch_schedule.step).parameters \
        else {}

    def run_torch(images, labels):
        optimizer.zero_grad()
        torch_schedule.step(*((images,) if first else ()), **({"target": labels, "losses": []} if last else {}),
                            **quiet)
        optimizer.step()

    return run_torch


def _placement(chunks) -> Placement:
    """mpipar's placement of ``chunks``: each a stage where mpipar has ``Placement.chunked`` (ZB-V's two adjacent
    chunks on one rank too), else the ranks of the layers (adjacent chunks of one rank merge into one stage)."""
    chunked = getattr(Placement, "chunked", None)
    if chunked is not None:
        return chunked([chunk.stop - chunk.start for chunk in chunks], [chunk.rank for chunk in chunks])
    return Placement(layer_ranks(chunks))


def single_process_step(model, optimizer, images, labels, microbatches) -> None:
    optimizer.zero_grad()
    for chunk, target in zip(images.chunk(microbatches), labels.chunk(microbatches)):
        (F.cross_entropy(model(chunk), target) / microbatches).backward()
    optimizer.step()


def _cores(comm) -> str:
    """Nodes, machines and cores, and whether the ranks of a machine outnumber its cores (emulated nodes are
    namespaces of one machine: one boot id)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    nodes = comm.allreduce(int(node.Get_rank() == 0))
    node.Free()
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            machine = file.read().strip()
    except OSError:
        machine = MPI.Get_processor_name()
    machines = Counter(comm.allgather(machine))
    crowded = any(count > (os.cpu_count() or 1) for count in machines.values())
    return (f"{comm.Get_size()} ranks on {nodes} node(s), {len(machines)} machine(s) of {os.cpu_count()} cores"
            + (": OVERSUBSCRIBED (more ranks than cores on a machine)" if crowded else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "resnet-small"], default="resnet-small")
    parser.add_argument("--width", type=int, default=768, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=9, help="MLP linear layers (9: halves of equal cost)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=[*MPIPAR, "best"], default="1f1b",
                        help="mpipar's schedule against its torch counterparts; best: all of both, best against best")
    parser.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank of the looped layout")
    parser.add_argument("--splits", help=f"comma list of {SPLITS} (default: even,auto[,fine]; with best: even)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--receives-ahead", default="2",
                        help="receives mpipar keeps posted per stream; a comma list (e.g. 0,2) runs each, paired")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.distributed.pipelining")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD  # every check below is on the arguments and the size: alike on every rank
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        raise SystemExit(f"bench_pipeline compares pipelines of p >= 2 stages: run with mpirun -n P (got {size})")
    default_splits = "even" if args.schedule == "best" else \
        "even,auto,fine" if args.model == "resnet-small" else "even,auto"
    splits = (args.splits or default_splits).split(",")
    if set(splits) - set(SPLITS) or ("fine" in splits and args.model != "resnet-small"):
        raise SystemExit(f"--splits takes {SPLITS} (fine for resnet-small only), got {args.splits}")
    mpipar_names, torch_names = chosen(args.schedule)
    torch_names = () if args.no_torch else torch_names
    torch.set_num_threads(args.threads)
    hardware = _cores(comm)
    if torch_names:
        init_gloo(comm)

    torch.manual_seed(0)
    base = make_model(args.model, args.width, args.depth)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]
    micro = args.batch_size // args.microbatches
    sample = batches[0][0][:micro]
    split_models = {"even": base, "auto": base}
    if "fine" in splits:
        split_models["fine"] = models.split_blocks(copy.deepcopy(base))  # the same parameters
    balances = {}  # (split, chunks) -> (layers per chunk, predicted seconds per chunk or None)

    def chunks_of(split: str, layout: str):
        """The split's chunks on ``layout`` (``Segment`` s), or why there are none. Collective (auto profiles)."""
        ranks, model = chunk_ranks(layout, size, args.virtual_stages), split_models[split]
        if len(model) < len(ranks):
            return f"{len(model)} layers cannot make {len(ranks)} chunks"
        if (split, len(ranks)) not in balances:
            if split == "even":
                balances[split, len(ranks)] = (even_balance(len(model), len(ranks)), None)
            else:
                balance, profiles = auto_balance(model, sample, len(ranks), comm)
                balances[split, len(ranks)] = (balance, stage_sums([p.time for p in profiles], balance))
        return segments(balances[split, len(ranks)][0], ranks)

    serial_model = copy.deepcopy(base)
    serial_optimizer = torch.optim.SGD(serial_model.parameters(), lr=0.01)

    def run_serial(images, labels):
        if rank == 0:
            single_process_step(serial_model, serial_optimizer, images, labels, args.microbatches)

    runners = {"one process": run_serial}
    skipped = {}  # variant -> why it does not run
    aheads = [int(k) for k in args.receives_ahead.split(",")]
    by_ahead = {}  # "name split" -> its variants, one per receives-ahead value
    bubbles, bounds, ideals = {}, {}, {}  # mpipar variant -> per step / its schedule's ideal
    for name in mpipar_names:
        plan = mpipar_schedule(name, size, args.virtual_stages, args.microbatches)
        for split in splits:
            label = f"{name} {split}"
            chunks = plan if isinstance(plan, str) else chunks_of(split, MPIPAR[name])
            if isinstance(chunks, str):
                skipped[f"mpipar {label}"] = chunks
                continue
            by_ahead[label] = [label] if len(aheads) == 1 else [f"{label}/ahead{k}" for k in aheads]
            for variant, ahead in zip(by_ahead[label], aheads):
                try:  # a refusal is raised on every rank alike (the Pipeline's contract)
                    pipe = Pipeline(copy.deepcopy(split_models[split]), comm, _placement(chunks),
                                    schedule=name, microbatches=args.microbatches, loss_fn=F.cross_entropy,
                                    receives_ahead=ahead)
                except (ValueError, TypeError) as error:
                    skipped[f"mpipar {variant}"] = str(error)[:200]
                    continue
                optimizer = torch.optim.SGD(pipe.parameters(), lr=0.01)
                bubbles[variant], bounds[variant], ideals[variant] = [], [], pipe.schedule.ideal_bubble

                def run_mpipar(images, labels, pipe=pipe, optimizer=optimizer, variant=variant):
                    optimizer.zero_grad()
                    result = pipe.step(images, labels)
                    optimizer.step()
                    gathered = comm.allgather((result.times.busy, result.times.wall, result.stage_times))
                    bubbles[variant].append(measured_bubble([b for b, _, _ in gathered],
                                                            [w for _, w, _ in gathered]))
                    stage_times = {s: t for _, _, times in gathered for s, t in times.items()}
                    bounds[variant].append(placement_bubble(pipe.schedule, pipe.stage_ranks, [
                        (f / args.microbatches, b / args.microbatches) for f, b in
                        (stage_times[s] for s in range(pipe.num_stages))]))

                runners[f"mpipar {variant}"] = run_mpipar
    for name in torch_names:
        class_name, layout = TORCH[name]
        schedule_class = getattr(pipelining, class_name, None)
        for split in splits:
            label = f"torch {name} {split}"
            chunks = f"no {class_name} in torch {torch.__version__}" if schedule_class is None else \
                chunks_of(split, layout)
            runner = chunks if isinstance(chunks, str) else _torch_runner(
                split_models[split], chunks, schedule_class, args.microbatches, sample, rank, comm)
            if isinstance(runner, str):
                skipped[label] = runner
            else:
                runners[label] = runner

    seconds = {name: [] for name in runners}
    for round_index in range(args.rounds):
        for name in abba(runners, round_index):
            run = runners[name]
            run(*batches[0])  # warm-up
            sleeping_barrier(comm)
            start = time.perf_counter()
            for images, targets in batches[1:]:
                run(images, targets)
            sleeping_barrier(comm)
            seconds[name].append((time.perf_counter() - start) / args.steps)

    if rank == 0:
        report(args, base, hardware, splits, balances, skipped, seconds, by_ahead, bubbles, bounds, ideals)
    if torch_names:
        dist.destroy_process_group()


def report(args, base, hardware, splits, balances, skipped, seconds, by_ahead, bubbles, bounds, ideals) -> None:
    """Rank 0's tables: times and bubbles per variant, the paired ratios, best against best."""
    params = sum(p.numel() for p in base.parameters())
    micro = args.batch_size // args.microbatches
    print(f"model {args.model} ({params:,} parameters), batch {args.batch_size} = {args.microbatches} x {micro}, "
          f"--schedule {args.schedule}, splits {','.join(splits)}, virtual stages {args.virtual_stages}, "
          f"{args.threads} threads per rank, {args.steps} steps x {args.rounds} rounds (ABBA), receives ahead "
          f"{args.receives_ahead}, torch {torch.__version__}, {mpi_library()}")
    print(hardware)
    print("on a shared machine the times are noisy; compare the paired ratios below")
    for name, why in skipped.items():
        print(f"{name}: not run ({why})")
    for (split, chunks), (balance, predicted) in balances.items():
        extra = "" if predicted is None else f", predicted ms per chunk {[round(1e3 * t, 2) for t in predicted]}"
        print(f"split {split}, {chunks} chunks: {balance} layers per chunk{extra}")
    print()
    print("| variant | ms/batch (median) | min-max over rounds | bubble measured | bound (measured stages) "
          "| ideal | imbalance | comm + overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in seconds.items():
        row = f"| {name} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f}-{1e3 * max(values):.1f} |"
        variant = name[len("mpipar "):]
        if variant in bubbles:
            measured, bound, ideal = statistics.median(bubbles[variant]), statistics.median(bounds[variant]), \
                ideals[variant]
            row += f" {measured:.3f} | {bound:.3f} | {ideal:.3f} | {bound - ideal:+.3f} | {measured - bound:+.3f} |"
        else:
            row += " | | | | |"
        print(row)
    print()
    print("paired per-round time ratios (median, range):")
    pairs = []
    for name in MPIPAR:
        present = [split for split in splits if f"{name} {split}" in by_ahead]
        pairs += [(f"mpipar {by_ahead[f'{name} {a}'][-1]}", f"mpipar {by_ahead[f'{name} {b}'][-1]}")
                  for index, a in enumerate(present) for b in present[index + 1:]]
        pairs += [(f"torch {other} {split}", f"mpipar {by_ahead[f'{name} {split}'][-1]}")
                  for split in present for other in COUNTERPARTS[name]]
    pairs += [(f"mpipar {names[0]}", f"mpipar {other}") for names in by_ahead.values() for other in names[1:]]
    for slow, fast in pairs:
        if slow in seconds and fast in seconds:
            print(f"  {slow} / {fast}: {paired(seconds[slow], seconds[fast]).text(f'{fast} faster', f'{slow} faster')}")
    for variant in bubbles:
        measured = statistics.median(bubbles[variant])
        print(f"  mpipar {variant}: measured bubble / ideal = {measured / ideals[variant]:.2f}" if ideals[variant]
              else f"  mpipar {variant}: measured bubble {measured:.3f}, ideal 0")
    for names in by_ahead.values():
        for other in [other for other in names[1:] if names[0] in bubbles and other in bubbles]:
            gaps = sorted((b0 - c0) - (b1 - c1) for b0, c0, b1, c1 in zip(
                bubbles[names[0]], bounds[names[0]], bubbles[other], bounds[other]))  # step by step
            print(f"  comm + overhead, {names[0]} minus {other}, paired per step: median "
                  f"{statistics.median(gaps):+.3f} (range {gaps[0]:+.3f} to {gaps[-1]:+.3f}, {len(gaps)} steps)")
    sides = {side: [name for name in seconds if name.startswith(f"{side} ")] for side in ("mpipar", "torch")}
    if not all(sides.values()):
        return
    best = {side: best_per_round(seconds, names) for side, names in sides.items()}
    print()
    print(f"best against best, per round ({len(sides['mpipar'])} mpipar and {len(sides['torch'])} torch variants):")
    ratio = paired(best["torch"].seconds, best["mpipar"].seconds)
    print(f"  torch best / mpipar best: {ratio.text('mpipar faster', 'torch faster')}")
    print(f"  one process / mpipar best: "
          f"{paired(seconds['one process'], best['mpipar'].seconds).text('mpipar faster', 'one process faster')}")
    for side in ("mpipar", "torch"):
        print(f"  {side} best ms/batch (median) {1e3 * statistics.median(best[side].seconds):.1f}; fastest: " +
              ", ".join(f"{name} {count}/{args.rounds}" for name, count in best[side].wins()))


if __name__ == "__main__":
    main()
