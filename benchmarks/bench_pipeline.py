"""Benchmark: a 2-stage mpipar pipeline vs torch.distributed.pipelining (gloo) vs one process.

Usage:
    mpirun -n 2 python benchmarks/bench_pipeline.py
    mpirun -n 2 python benchmarks/bench_pipeline.py --schedule gpipe --microbatches 16 --width 1024

The same model (an MLP of equal hidden layers or --model resnet-small), split in
two by mpipar's profiling partitioner (--balance auto) or by layer count, and the
same micro-batches run three ways, in alternating rounds so that drift in machine
load hits all alike:

* one process: rank 0 runs the whole model over the micro-batches with gradient
  accumulation (the other rank waits);
* mpipar: ``mpipar.pipeline.Pipeline`` over MPI Send/Recv, half the layers per rank;
* torch: ``torch.distributed.pipelining`` with the same split, the same schedule
  and a gloo process group (rendezvous on localhost, rank and size from MPI).

Rank 0 prints the median time per batch of each, the speedups over one process,
and mpipar's measured bubble (1 - busy / (ranks * wall), from its per-rank timers)
next to the ideal (p-1)/(m+p-1) for equal stages and to the bubble the schedule
gives with the stage times measured in the same step (communication free): the
gap between ideal and that bound is stage imbalance, the rest of the measured
bubble is communication and the executor's overhead. Each rank uses --threads torch threads (one core
per rank is the fair comparison with the single process on one core).
"""

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _bench import init_gloo  # before mpipar: the checkout on sys.path
from mpi4py import MPI
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from mpipar import models
from mpipar.pipeline import Pipeline, Placement, auto_balance, measured_bubble
from mpipar.pipeline.schedule import Schedule, placement_bubble


def make_model(name: str, width: int, depth: int) -> nn.Sequential:
    if name == "resnet-small":
        return models.resnet_small()
    layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def single_process_step(model, optimizer, images, labels, microbatches) -> None:
    optimizer.zero_grad()
    for chunk, target in zip(images.chunk(microbatches), labels.chunk(microbatches)):
        (F.cross_entropy(model(chunk), target) / microbatches).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "resnet-small"], default="mlp")
    parser.add_argument("--width", type=int, default=768, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=9, help="MLP linear layers (9: halves of equal cost)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--balance", choices=["auto", "even"], default="auto",
                        help="split by profiled time (mpipar's partitioner) or by layer count; both use it")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 2:
        raise SystemExit(f"bench_pipeline compares 2-stage pipelines: run with mpirun -n 2 (got {size})")
    torch.set_num_threads(args.threads)
    init_gloo(comm)

    torch.manual_seed(0)
    base = make_model(args.model, args.width, args.depth)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]
    micro = args.batch_size // args.microbatches
    if args.balance == "auto":
        balance, _ = auto_balance(base, batches[0][0][:micro], size, comm)
        placement = Placement.from_balance(balance)
    else:
        placement = Placement.even(len(base), size)
    segment = placement.segments[rank]

    serial_model = copy.deepcopy(base)
    serial_optimizer = torch.optim.SGD(serial_model.parameters(), lr=0.01)

    mpipar_model = copy.deepcopy(base)
    pipe = Pipeline(mpipar_model, comm, placement, schedule=args.schedule, microbatches=args.microbatches,
                    loss_fn=F.cross_entropy)
    mpipar_optimizer = torch.optim.SGD(pipe.parameters(), lr=0.01)

    torch_part = copy.deepcopy(base)[segment.start:segment.stop]
    example = torch.randn(micro, 1, 28, 28)
    with torch.no_grad():
        example_in = example if rank == 0 else copy.deepcopy(base)[:segment.start](example)
    stage = PipelineStage(torch_part, rank, size, torch.device("cpu"), input_args=example_in)
    torch_schedule = (Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe)(
        stage, args.microbatches, loss_fn=F.cross_entropy)
    torch_optimizer = torch.optim.SGD(torch_part.parameters(), lr=0.01)

    bubbles, bounds = [], []

    def run_serial(images, labels):
        if rank == 0:
            single_process_step(serial_model, serial_optimizer, images, labels, args.microbatches)

    def run_mpipar(images, labels):
        mpipar_optimizer.zero_grad()
        result = pipe.step(images, labels)
        mpipar_optimizer.step()
        return result

    def run_torch(images, labels):
        torch_optimizer.zero_grad()
        if rank == 0:
            torch_schedule.step(images)
        else:
            torch_schedule.step(target=labels, losses=[])
        torch_optimizer.step()

    runners = {"one process": run_serial, "mpipar": run_mpipar, "torch pipelining": run_torch}
    seconds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            run(*batches[0])  # warm-up
            comm.Barrier()
            start = time.perf_counter()
            for images, labels in batches[1:]:
                result = run(images, labels)
                if name == "mpipar":
                    gathered = comm.allgather((result.times.busy, result.times.wall, result.stage_times))
                    bubbles.append(measured_bubble([b for b, _, _ in gathered], [w for _, w, _ in gathered]))
                    stage_times = {s: t for _, _, times in gathered for s, t in times.items()}
                    bounds.append(placement_bubble(pipe.schedule, pipe.stage_ranks, [
                        (f / args.microbatches, b / args.microbatches) for f, b in
                        (stage_times[s] for s in range(pipe.num_stages))]))
            comm.Barrier()
            seconds[name].append((time.perf_counter() - start) / args.steps)

    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        ideal = Schedule(args.schedule, size, args.microbatches).ideal_bubble
        print(f"model {args.model} ({params:,} parameters, {len(base)} layers, {args.balance} split "
              f"{placement.balance()}), "
              f"batch {args.batch_size} = {args.microbatches} x {micro}, {args.schedule}, {size} ranks x "
              f"{args.threads} threads, {args.steps} steps x {args.rounds} rounds, torch {torch.__version__}")
        serial = statistics.median(seconds["one process"])
        for name, values in seconds.items():
            median = statistics.median(values)
            print(f"{name:>17}: ms/batch per round " + " ".join(f"{1e3 * v:8.1f}" for v in values)
                  + f" | median {1e3 * median:8.1f} | speedup over one process {serial / median:5.2f}")
        measured, bound = statistics.median(bubbles), statistics.median(bounds)
        print(f"mpipar bubble (median over steps): measured {measured:.3f}; ideal (p-1)/(m+p-1) = {ideal:.3f} "
              f"with equal stages; {bound:.3f} for the measured stage times (imbalance "
              f"{bound - ideal:+.3f}); communication and overhead {measured - bound:+.3f}")
        ratio = statistics.median(seconds["torch pipelining"]) / statistics.median(seconds["mpipar"])
        print(f"mpipar speedup / torch pipelining speedup: {ratio:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
