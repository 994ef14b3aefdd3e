"""Benchmark: flushing (GPipe, 1F1B) vs never-flushing (PipeDream, 2BW) pipelines on 2 ranks; and the accuracy study.

Usage:
    mpirun -n 2 python benchmarks/bench_async_pipeline.py --rounds 10                  # time per batch, bubble
    python benchmarks/bench_async_pipeline.py --study runs/study/1f1b runs/study/pipedream runs/study/2bw

Timing: one 2-stage pipeline per schedule and micro-batch count (``--microbatches``, default
4 and 8) over the same MLP (``--depth`` linear layers, halves of equal cost, even split),
SGD stepped by the loop's rule (flushing: after the batch; pipedream / 2bw: by the pipeline
at each update). A round runs every variant in ABBA order: one warm-up step (for
pipedream / 2bw the fill), ``--steps`` timed steps between two sleeping barriers (the
asynchronous pipelines stay full across them; their final drain is outside the timed
block, as it happens once per epoch or checkpoint), then a drain. Rank 0 prints per
variant the median ms per batch and the measured bubble of the timed block,
``1 - sum(busy) / (ranks x wall)``, beside the ideal one and each rank's busy time per
batch (forward, backward and, for pipedream / 2bw, the updates and weight copies); then the paired per-round ratios
against 1F1B (median and range, the extreme tenth trimmed at 10 rounds and more; "no
measurable difference" when the range includes 1).

Study (``--study DIR ...``): reads the ``metrics.h5`` of ``jobs/resnet_pp.py`` runs and prints
per run the final test accuracy, the final training loss (mean of the last 20 steps), the
first step whose 20-step running mean loss is at or below ``--target-loss``, and for the
asynchronous ones the staleness histogram and stash memory per rank.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from _bench import abba, mpi_library, paired, sleeping_barrier  # before mpipar: the checkout on sys.path
from torch import nn

from mpipar.pipeline import Pipeline, Placement
from mpipar.pipeline.schedule import Schedule

SCHEDULES = ("gpipe", "1f1b", "pipedream", "2bw")


def make_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def timing(args) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 2:
        raise SystemExit(f"bench_async_pipeline times 2-stage pipelines: run with mpirun -n 2 (got {size})")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps + 1)]
    runners, busy = {}, {}
    for microbatches in args.microbatches:
        for name in SCHEDULES:
            model = make_model(args.width, args.depth)
            pipe = Pipeline(model, comm, Placement.even(len(model), size), schedule=name,
                            microbatches=microbatches, loss_fn=F.cross_entropy)
            optimizer = torch.optim.SGD(pipe.parameters(), lr=0.01, momentum=0.9)
            if pipe.schedule.is_async:
                pipe.bind_optimizer(optimizer)
            key = (name, microbatches)
            busy[key] = []

            def step(images, labels, pipe=pipe, optimizer=optimizer):
                optimizer.zero_grad()
                result = pipe.step(images, labels)
                if not pipe.schedule.is_async:
                    optimizer.step()
                return result.times.busy

            runners[key] = (pipe, step)

    seconds = {key: [] for key in runners}
    bubbles = {key: [] for key in runners}
    busy_per_batch = {key: [] for key in runners}  # per round: each rank's busy seconds per batch
    for round_index in range(args.rounds):
        for key in abba(runners, round_index):
            pipe, step = runners[key]
            step(*batches[0])  # warm-up (the fill of pipedream / 2bw)
            sleeping_barrier(comm)
            start = time.perf_counter()
            worked = sum(step(images, labels) for images, labels in batches[1:])
            sleeping_barrier(comm)
            wall = time.perf_counter() - start
            pipe.drain()
            seconds[key].append(wall / args.steps)
            worked_by_rank = comm.allgather(worked)
            bubbles[key].append(1.0 - sum(worked_by_rank) / (size * wall))
            busy_per_batch[key].append([w / args.steps for w in worked_by_rank])

    if rank == 0:
        params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
        print(f"MLP {args.depth} linear layers, width {args.width} ({params:,} parameters), batch {args.batch_size}, "
              f"2 stages (even split), {size} ranks x {args.threads} threads, {args.steps} steps x {args.rounds} "
              f"rounds (ABBA), torch {torch.__version__}, {mpi_library()}")
        print("shared 2-core machine with other jobs running: times are noisy; compare the paired ratios below")
        print()
        print("| schedule | m | ms/batch (median) | min-max over rounds | busy ms/batch per rank (median) "
              "| bubble measured (median) | ideal |")
        print("|---|---|---|---|---|---|---|")
        for (name, m), values in seconds.items():
            ideal = Schedule(name, size, m).ideal_bubble
            busy = [1e3 * statistics.median(b[r] for b in busy_per_batch[name, m]) for r in range(size)]
            print(f"| {name} | {m} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f}-"
                  f"{1e3 * max(values):.1f} | {', '.join(f'{b:.1f}' for b in busy)} | "
                  f"{statistics.median(bubbles[name, m]):.3f} | {ideal:.3f} |")
        print()
        print("paired per-round time ratios, 1F1B / other (above 1: the other is faster):")
        for m in args.microbatches:
            for name in SCHEDULES:
                if name != "1f1b":
                    ratio = paired(seconds["1f1b", m], seconds[name, m])
                    print(f"  m={m}: 1f1b / {name}: {ratio.text(f'{name} faster', '1f1b faster')}")


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def study(args) -> None:
    import h5py

    print(f"| run | schedule | steps | final test accuracy | final train loss (last 20 steps) | first step with "
          f"20-step mean loss <= {args.target_loss} | staleness per stage (schedule) | staleness histogram | "
          f"peak stash MiB per rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for directory in args.study:
        with h5py.File(f"{directory}/metrics.h5", "r") as f:
            loss = f["steps/loss"][...]
            accuracy = f["epochs/test_accuracy"][-1]
            mean = running_mean(loss, 20)
            reached = np.nonzero(mean <= args.target_loss)[0]
            first = str(int(reached[0]) + 20) if len(reached) else "not reached"
            schedule = f.attrs["schedule"]
            staleness = f.attrs.get("staleness_per_stage", "[0, 0]")
            histogram = f["pipeline_updates/staleness_histogram"][...].tolist() if "pipeline_updates" in f else "-"
            stash = f.attrs.get("peak_stash_bytes_per_rank")
            stash = "-" if stash is None else str([round(b / 2**20, 2) for b in json.loads(stash)])
            print(f"| {directory} | {schedule} | {len(loss)} | {accuracy:.4f} | {loss[-20:].mean():.4f} | {first} | "
                  f"{staleness} | {histogram} | {stash} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=9, help="MLP linear layers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--study", nargs="+", metavar="RUN_DIR", help="summarise jobs/resnet_pp.py runs instead")
    parser.add_argument("--target-loss", type=float, default=0.6)
    args = parser.parse_args()
    if args.study:
        study(args)
    else:
        timing(args)


if __name__ == "__main__":
    main()
